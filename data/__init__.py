"""selfflow.data"""
