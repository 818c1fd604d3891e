"""Evaluation: downstream tasks through lm-evaluation-harness (and, later, perplexity)."""
