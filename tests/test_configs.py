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


def load_with_arg(name, arg):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# config -> (task, outputs, patch padding (reference §1.3), peak lr at the config's batch)
FINETUNE = {
    "pose_coco": ("pose", 17, 2, 5e-4),
    "pose_coco_wholebody": ("pose", 133, 2, 5e-4 * 64 / 512),  # auto_scale_lr, base batch 512
    "pose_goliath": ("pose", 308, 2, 5e-5),
    "seg_goliath": ("seg", 28, 0, 5e-4),
    "seg_cihp": ("seg", 20, 2, 5e-4),
    "depth_render_people": ("depth", 1, 0, 5e-4),
    "normal_render_people": ("normal", 3, 2, 5e-4),
}


@pytest.mark.parametrize("name", sorted(FINETUNE))
@pytest.mark.parametrize("size", sorted(TABLE2))
def test_finetune_configs_follow_the_reference(name, size):
  from sapiens_jax import task_model  # pylint: disable=g-import-not-at-top
  c = load_with_arg(name, size)
  task, outputs, padding, lr = FINETUNE[name]
  assert (c.task, c.model.size, tuple(c.image_size)) == (task, size, (1024, 768))
  assert task_model.num_outputs(c) == outputs
  assert c.model.patch_padding == padding
  assert optim.learning_rate(c) == pytest.approx(lr)
  assert (c.optim.b1, c.optim.b2, c.optim.weight_decay, c.optim.grad_clip_norm) == (0.9, 0.999, 0.1, 1.0)
  assert c.optim.layer_decay == (0.95 if (name, size) == ("pose_goliath", "1b") else 0.85)
  assert c.optim.frozen == () and c.optim.warmup_start_factor == 1e-3
  assert c.model.head_channels == (384 if task == "depth" else 768)
  if task == "pose":
    assert c.optim.schedule == "multistep" and c.optim.warmup_steps == 500
    assert c.loss.name == ("ohkm" if name == "pose_goliath" and size in ("0.3b", "1b") else "mse")
  else:
    assert c.optim.schedule == "linear" and c.optim.warmup_steps == 400


@pytest.mark.parametrize("task", ["pose", "seg", "depth", "normal"])
def test_synthetic_configs_are_small(task):
  c = load_with_arg("synthetic", task)
  assert c.task == task and c.data.source == "synthetic"
  assert c.model.size in ("small", "tiny") and max(c.image_size) <= 256
