r"""Depth fine-tuning on render_people_depth (reference §5-§7): `--config=configs/depth_render_people.py:SIZE`, SIZE in 0.3b|0.6b|1b|2b.

Point data.path (and data.eval_path) at a folder with images/ and the task's labels (see
sapiens_jax/data/dense_source.py), and config.init_from at a pretrained encoder.
"""
from sapiens_jax import default_config


def get_config(size="1b"):
  return default_config.finetune("render_people_depth", size)
