"""HF <-> bert_jax checkpoint conversion: one mapping table per family."""
