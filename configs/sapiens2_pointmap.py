r"""Sapiens2 canonical-camera pointmaps with the focal-scale branch (§3.3): `--config=configs/sapiens2_pointmap.py:SIZE`, SIZE in 0.4b|0.8b|1b|5b.

The recipe of sapiens2.md §4 for that size (lr, layer decay, steps, clip, batch of 8 GPUs, 500
warm-up steps, bf16, the whole backbone rematerialised). Point data.path (and data.eval_path) at
the dataset folder (README: Sapiens2 tasks) and config.init_from at a Sapiens2 pretrain file.
"""
from sapiens_jax import default_config


def get_config(size="1b"):
  return default_config.finetune("sapiens2_pointmap", size if size.startswith("sapiens2_") else f"sapiens2_{size}")
