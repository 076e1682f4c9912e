"""The conversion tool behind `bert-jax convert` and `bert-jax inspect`: above
`bert_jax.pretrained`, which its `--verify` runs on both sides."""
