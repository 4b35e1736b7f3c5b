"""selfflow.tools"""
