"""selfflow.training"""
