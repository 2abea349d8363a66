r"""Quickstart for Sapiens2 pretraining: MAE + self-distillation with an EMA teacher on a small Sapiens2, on the
built-in generated images, about 5 minutes on 2 CPU cores.

  python -m sapiens_jax.main --config=configs/quickstart_sapiens2.py --workdir=/tmp/sapiens2_quickstart

Writes checkpoints, metrics.jsonl (every term, the teacher's entropy, the student-teacher KL, the CLS spread, the
EMA momentum), TensorBoard events and reconstruction PNGs. Both the reconstruction and the distillation losses
fall; `python -m sapiens_jax.export --workdir=... --output=teacher.safetensors` writes the teacher backbone.
"""
from sapiens_jax import default_config


def get_config():
  c = default_config.pretrain("sapiens2_tiny", "mae_distill")
  c.image_size = (96, 96)
  c.batch_size = 32
  c.total_steps = 500
  c.log_every_steps = 10
  c.checkpoint_every_steps = 100
  c.eval_every_steps = 100
  c.model.scan_layers = True  # compiles in seconds
  c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 64, 2, 4
  d = c.distill
  d.num_prototypes, d.head_hidden_dim, d.head_bottleneck_dim = 4096, 256, 64
  d.dense_tokens = 16
  d.num_local_crops, d.local_size = 2, (48, 48)
  d.teacher_temperature_warmup_steps = 100
  d.momentum_start = 0.9  # a short run: the teacher follows the student faster than at scale (0.994)
  c.optim.base_lr = 1e-2  # peak lr 1.25e-3 at batch 32
  c.optim.warmup_steps = 30
  c.data.num_generated = 4096
  return c
