"""Sapiens in JAX/Flax: ViT encoder, MAE pretraining and dense human-centric tasks."""
