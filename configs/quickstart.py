r"""Quickstart: a small MAE on the built-in generated images, 1-3 minutes on 2 CPU cores.

  python -m sapiens_jax.main --config=configs/quickstart.py --workdir=/tmp/sapiens_quickstart

Writes checkpoints, metrics.jsonl, TensorBoard events and reconstruction PNGs to the workdir;
the loss falls from ~1.0 to well below it, and the reconstructions take the shape of the inputs.
"""
from sapiens_jax import default_config


def get_config():
  config = default_config.pretrain("small")
  config.image_size = (128, 128)
  config.batch_size = 32
  config.total_steps = 300
  config.log_every_steps = 10
  config.checkpoint_every_steps = 100
  config.eval_every_steps = 100
  config.model.decoder_width = 128
  config.model.decoder_depth = 2
  config.model.decoder_heads = 4
  config.optim.base_lr = 1e-2  # peak lr 1.25e-3 at batch 32
  config.optim.warmup_steps = 30
  config.data.num_generated = 4096
  return config
