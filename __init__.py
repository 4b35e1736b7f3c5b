"""selfflow: train multimodal flow-matching transformers with Self-Flow (arXiv 2603.06507)."""

__version__ = "0.1.0"
