"""Optimizers, train steps, the trainer loop and checkpointing."""
