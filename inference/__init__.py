"""selfflow.inference"""
