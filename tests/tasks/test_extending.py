"""Adding a task is one new module, its registration and a config: the silhouette task of
tests/silhouette_task.py (a tiny head, an L2 loss, the person mask as target), registered from
here, goes through every generic path -- training, evaluation and the best checkpoint, the
baseline, prediction on photos, pictures, inspection, conversion to shards, the dry run and
export -- without any other module knowing about it."""
import json
import os

import numpy as np
from PIL import Image
import pytest

from sapiens_jax import baselines
from sapiens_jax import default_config
from sapiens_jax import dry_run
from sapiens_jax import export
from sapiens_jax import predict
from sapiens_jax import tasks
from sapiens_jax import train
from sapiens_jax import visualize
from sapiens_jax import writers
from sapiens_jax.data import convert
from sapiens_jax.data import inspect
from sapiens_jax.data import pipeline
import silhouette_task

HEIGHT, WIDTH = 64, 48


@pytest.fixture
def config(monkeypatch, synthetic_root):
  monkeypatch.setitem(tasks.TASKS, "silhouette", silhouette_task)
  monkeypatch.setitem(default_config.DATASETS, "silhouettes", default_config.Dataset(
      task="silhouette", labels="", patch_padding=0, lr=1e-3, lr_base_batch=0, batch_size=4))
  c = default_config.finetune("silhouettes", "tiny")
  c.image_size = (HEIGHT, WIDTH)
  c.eval_batch_size = 4
  c.total_steps = 4
  c.log_every_steps = 1
  c.eval_every_steps = c.checkpoint_every_steps = 2
  c.optim.warmup_steps = 1
  c.data.source = "synthetic"
  c.data.framing = "studio"  # as synthetic_root was rendered
  c.data.path = synthetic_root
  c.data.num_generated = 8
  c.data.num_eval = 4
  return c


def test_a_registered_task_trains_evaluates_and_keeps_its_best_checkpoint(config, tmp_path):
  assert config.task == "silhouette" and config.best_metric == "mse"  # from the task's configure
  train.train_and_evaluate(config, str(tmp_path))
  records = writers.read_metrics(tmp_path)
  assert len([r for r in records if "loss" in r]) == 4
  evals = {r["step"]: r["eval_mse"] for r in records if "eval_mse" in r}
  assert sorted(evals) == [2, 4] and all(0 <= v < 1 for v in evals.values())
  best = min(evals, key=lambda s: (evals[s], -s))  # "min" is better, as the task's METRICS say
  assert [d for d in os.listdir(tmp_path / "best_checkpoint") if d.isdigit()] == [str(best)]
  grid = np.asarray(Image.open(tmp_path / "predictions" / "step_0000004.png"))
  assert grid.shape[1] == 3 * WIDTH + 2 * visualize._GAP  # image | target | prediction

  # The baseline (all zeros) scores the mean of the squared targets: the share of person pixels.
  source = pipeline.make_task_source(config, "eval")
  targets = np.concatenate([b["silhouette"][b["valid"]] for b in pipeline.eval_batches(config, source, 4)])
  results = baselines.evaluate(config)
  assert results["empty"]["mse"] == pytest.approx(np.mean(targets), rel=1e-6)
  assert baselines.strongest(config, results, "mse")[0] == "empty"

  # Prediction on photos of another size, from the run directory alone.
  photos = tmp_path / "photos"
  photos.mkdir()
  Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(photos / "a.png")
  written, _ = predict.predict_files(*predict.load_run(str(tmp_path)), str(photos), str(tmp_path / "out"))
  assert written == ["a.png"]
  assert np.load(tmp_path / "out" / "a_silhouette.npy").shape == (30, 40)

  # Export under the task's head prefix.
  safetensors_torch = pytest.importorskip("safetensors.torch")
  export.export(str(tmp_path), str(tmp_path / "silhouette.safetensors"))
  keys = set(safetensors_torch.load_file(tmp_path / "silhouette.safetensors"))
  assert {"decode_head.deconv_layers.0.weight", "decode_head.conv_seg.weight", "backbone.ln1.weight"} <= keys


def test_a_registered_task_is_inspected_converted_and_planned(config, synthetic_root, tmp_path):
  panels = inspect.sample_panels(config, 3, "train")
  assert len(panels) == 3 and panels[0].shape == (HEIGHT, 2 * WIDTH + visualize._GAP, 3)
  out = str(tmp_path / "shards")
  manifest = convert.convert("silhouette", os.path.join(synthetic_root, "train"), out)
  assert manifest["kind"] == "silhouette" and manifest["num_records"] == 8
  config.data.source, config.data.path = "folder", out
  assert len(pipeline.make_task_source(config, "train")) == 8  # read from the shards
  plan = dry_run.plan(config)
  assert plan["objective"] == "finetune" and plan["head_params"] > 0
  assert plan["flops_per_example"] > 0 and plan["memory_per_device_bytes"] > 0
  json.dumps(plan)  # the line --dry_run prints
