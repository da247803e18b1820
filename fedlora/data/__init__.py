"""Datasets, held-out splits, partitioners and tokenization."""
