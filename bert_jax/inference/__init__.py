"""Inference pipelines: fill-mask (more come with the fine-tuning work)."""
