"""Shared test settings: a tiny MAE config that trains in seconds on CPU."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from sapiens_jax import default_config  # pylint: disable=g-import-not-at-top


@pytest.fixture
def tiny_config():
  config = default_config.pretrain("tiny")
  config.image_size = (64, 64)
  config.batch_size = 8
  config.total_steps = 12
  config.log_every_steps = 1
  config.checkpoint_every_steps = 4
  config.eval_every_steps = 6
  config.num_viz_images = 2
  config.model.decoder_width = 32
  config.model.decoder_depth = 1
  config.model.decoder_heads = 2
  config.optim.base_lr = 0.05  # peak lr 1.6e-3 at batch 8
  config.optim.warmup_steps = 2
  config.data.num_generated = 64
  return config
