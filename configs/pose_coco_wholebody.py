r"""Pose fine-tuning on coco_wholebody (reference §4): `--config=configs/pose_coco_wholebody.py:SIZE`, SIZE in 0.3b|0.6b|1b|2b.

Point data.path at the image root and data.annotations / data.eval_annotations at the COCO-format
keypoint JSONs, and config.init_from at a pretrained encoder (ours or an original Sapiens file).
"""
from sapiens_jax import default_config


def get_config(size="1b"):
  return default_config.finetune("coco_wholebody", size)
