"""Data: indexed datasets, tokenizers and corpora."""
