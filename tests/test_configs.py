"""The shipped configs hold the paper's settings and load the way the CLI loads them."""
import importlib.util
import os

import pytest

from sapiens_jax import default_config
from sapiens_jax import optim
from sapiens_jax import tasks
from sapiens_jax.models import sapiens

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
  assert c.model.size == size and size in sapiens.SIZES
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
  c = load_with_arg(name, size)
  task, outputs, padding, lr = FINETUNE[name]
  assert (c.objective, c.task, c.model.size, tuple(c.image_size)) == ("finetune", task, size, (1024, 768))
  assert tasks.get(task).make_head(c).out_channels == outputs
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


# config -> (task, outputs) of the Sapiens2 recipes (sapiens2.md §3); their numbers: tests/tasks/test_sapiens2_recipes.py
SAPIENS2_FINETUNE = {"sapiens2_seg": ("seg", 29), "sapiens2_normal": ("normal", 3), "sapiens2_pointmap": ("pointmap", 3),
                     "sapiens2_albedo": ("albedo", 3), "sapiens2_matting": ("matting", 4), "sapiens2_pose": ("pose", 308)}


@pytest.mark.parametrize("name", sorted(SAPIENS2_FINETUNE))
@pytest.mark.parametrize("size", ["0.4b", "0.8b", "1b", "5b"])
def test_sapiens2_finetune_configs_build_the_released_heads(name, size):
  c = load_with_arg(name, size)
  task, outputs = SAPIENS2_FINETUNE[name]
  assert (c.objective, c.task, c.recipe, c.model.size) == ("finetune", task, "sapiens2", f"sapiens2_{size}")
  assert tasks.get(task).make_head(c).out_channels == outputs
  assert tasks.get(task).METRICS[c.best_metric] in ("min", "max")


@pytest.mark.parametrize("task", ["pose", "seg", "depth", "normal", "albedo", "matting", "pointmap",
                                  "sapiens2_seg", "sapiens2_normal", "sapiens2_pose"])
def test_synthetic_configs_are_small(task):
  c = load_with_arg("synthetic", task)
  assert task.endswith(c.task) and c.data.source == "synthetic"
  assert c.model.size in ("small", "tiny", "sapiens2_small") and max(c.image_size) <= 256
  assert c.recipe == ("sapiens2" if c.model.size.startswith("sapiens2") else "sapiens")


def keys(config, skip=()):
  """Every key path of a config, e.g. "optim.base_lr", leaving out the sections in `skip`."""
  out = set()
  for key, value in config.items():
    if key in skip:
      continue
    out |= {f"{key}.{k}" for k in keys(value)} if hasattr(value, "items") else {key}
  return out


def test_every_finetune_config_has_the_same_keys_and_each_task_its_own_loss_keys():
  """No generic code reads a key with .get: what one fine-tuning config has, all have; the task's
  own settings sit in `loss`, the same for every config of that task."""
  configs = {name: load_with_arg(name, "1b") for name in [*FINETUNE, *SAPIENS2_FINETUNE]}
  configs.update({f"synthetic_{t}": load_with_arg("synthetic", t) for t in ("pose", "seg", "depth", "normal")})
  generic = {name: keys(c, skip=("loss",)) for name, c in configs.items()}
  assert len({frozenset(k) for k in generic.values()}) == 1, generic
  for task in ("pose", "seg", "depth", "normal"):
    loss_keys = {frozenset(keys(c.loss)) for c in configs.values() if c.task == task}
    assert len(loss_keys) == 1, (task, loss_keys)
  assert keys(configs["pose_coco"].loss) == {"name", "ohkm_topk", "heatmap_sigma"}
  assert "heatmap_sigma" not in configs["pose_coco"]
  pretrain = {frozenset(keys(load(f"pretrain_{size}"))) for size in TABLE2}
  assert len(pretrain) == 1 and "task" not in next(iter(pretrain))


@pytest.mark.parametrize("name", sorted(FINETUNE))
def test_dataset_reader_and_best_metric_are_separate_named_settings(name):
  c = load_with_arg(name, "0.3b")
  dataset = default_config.DATASETS[c.data.dataset]
  assert c.data.source == "folder"  # the reader; the dataset's name is data.dataset
  assert (dataset.task, dataset.labels, dataset.patch_padding) == (c.task, c.data.labels, c.model.patch_padding)
  assert tasks.get(c.task).METRICS[c.best_metric] == ("min" if c.task in ("depth", "normal") else "max")


@pytest.mark.parametrize("size", ["0.1b", "0.4b", "0.8b", "1b", "5b"])
def test_sapiens2_pretrain_configs_take_dinov2_and_mae_defaults(size):
  """Sapiens2 published no pretraining values: each default is DINOv2's or MAE's, as the objective says."""
  c = load(f"pretrain_sapiens2_{size}")
  assert (c.objective, c.model.size, tuple(c.image_size)) == ("mae_distill", f"sapiens2_{size}", (1024, 1024))
  assert c.model.mask_ratio == 0.75 and (c.model.decoder_width, c.model.decoder_depth) == (512, 8)  # MAE
  d = c.distill
  assert (d.num_prototypes, d.head_hidden_dim, d.head_bottleneck_dim, d.head_layers) == (65536, 2048, 256, 3)
  assert (d.student_temperature, d.teacher_temperature_start, d.teacher_temperature) == (0.1, 0.04, 0.07)
  assert d.teacher_temperature_warmup_steps == 37_500 and (d.momentum_start, d.momentum_end) == (0.994, 1.0)
  assert (d.dino_weight, d.dense_weight, d.koleo_weight, d.num_local_crops) == (1.0, 1.0, 0.1, 8)
  assert tuple(d.global_scale) == (0.32, 1.0) and tuple(d.local_scale) == (0.05, 0.32)
  assert 1e9 - c.batch_size < c.batch_size * c.total_steps <= 1e9  # one pass over Sapiens2's 1B images
  assert c.model.dtype == "bfloat16" and c.optim.grad_clip_norm == 3.0
  from sapiens_jax import train  # pylint: disable=g-import-not-at-top
  train.check_config(c)


def test_sapiens2_quickstart_is_small_and_uses_generated_data():
  c = load("quickstart_sapiens2")
  assert c.objective == "mae_distill" and c.data.source == "generated"
  assert c.model.size == "sapiens2_tiny" and max(c.image_size) <= 128
