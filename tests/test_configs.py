"""The shipped configs hold the paper's settings and load the way the CLI loads them."""
import importlib.util
import os

import pytest

from sapiens_jax import optim
from sapiens_jax import vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE2 = {"0.3b": 98_304, "0.6b": 65_536, "1b": 40_960, "2b": 20_480}


def load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("size", sorted(TABLE2))
def test_pretrain_configs_follow_the_paper(size):
  c = load(f"pretrain_{size}")
  assert c.model.size == size and size in vit.SIZES
  assert tuple(c.image_size) == (1024, 1024) and c.model.patch_size == 16
  assert c.model.mask_ratio == 0.75 and c.model.norm_pix_loss
  assert (c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads) == (512, 8, 16)
  assert c.batch_size == TABLE2[size]
  assert optim.learning_rate(c) == pytest.approx(1.5e-4 * TABLE2[size] / 256)
  assert (c.optim.b1, c.optim.b2, c.optim.weight_decay) == (0.9, 0.95, 0.05)
  tokens = c.total_steps * c.batch_size * 4096
  assert 1.2e12 - c.batch_size * 4096 < tokens <= 1.2e12
  assert 0 < c.optim.warmup_steps < c.total_steps // 10


def test_quickstart_is_small_and_uses_generated_data():
  c = load("quickstart")
  assert c.data.source == "generated"
  assert c.model.size in ("small", "tiny") and max(c.image_size) <= 256
  assert c.total_steps * c.batch_size <= 20_000
