"""Tokenizers and input pipelines."""
