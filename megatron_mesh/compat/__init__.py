"""Compatibility shims for running megatron-core where it was not designed to run."""
