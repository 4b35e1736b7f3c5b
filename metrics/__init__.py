"""Offline evaluation metrics (issue 7): each a function over media arrays, gathered by tools/evaluate.py."""
