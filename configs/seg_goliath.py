r"""Body-part segmentation fine-tuning on goliath_seg (reference §5-§7): `--config=configs/seg_goliath.py:SIZE`, SIZE in 0.3b|0.6b|1b|2b.

Point data.path (and data.eval_path) at a folder with images/ and the task's labels (see
sapiens_jax/data/dense_source.py), and config.init_from at a pretrained encoder.
"""
from sapiens_jax import default_config


def get_config(size="1b"):
  return default_config.finetune("goliath_seg", size)
