"""Parallelism applied around the model: process groups, TP/SP tagging, pipeline partitioning."""
