"""Inference pipelines: fill-mask, NER, text classification, QA, embeddings, GPT-BERT generation."""
