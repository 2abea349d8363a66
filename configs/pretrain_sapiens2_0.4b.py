r"""Sapiens2-0.4B pretraining: MAE + self-distillation with an EMA teacher, 1024x1024 global views.

  python -m sapiens_jax.main --config=configs/pretrain_sapiens2_0.4b.py --workdir=DIR
  python -m sapiens_jax.main --config=configs/pretrain_sapiens2_0.4b.py --dry_run

Sapiens2 published none of its pretraining values: the objective's defaults are DINOv2's and MAE's (each named
in sapiens_jax/objectives/mae_distill.py), the schedule ours (default_config.pretrain_sapiens2).
"""
from sapiens_jax import default_config


def get_config():
  return default_config.pretrain_sapiens2("sapiens2_0.4b")
