"""Hugging Face interop: weight-name mapping (and, later, the exported model code)."""
