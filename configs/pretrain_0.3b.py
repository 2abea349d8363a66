r"""Sapiens-0.3B MAE pretraining: 1024x1024, patch 16, mask 0.75, Table 2 batch, 1.2T tokens.

  python -m sapiens_jax.main --config=configs/pretrain_0.3b.py --workdir=DIR
  python -m sapiens_jax.main --config=configs/pretrain_0.3b.py --dry_run
"""
from sapiens_jax import default_config


def get_config():
  return default_config.pretrain("0.3b")
