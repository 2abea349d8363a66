"""Checkpoints written before backbones, objectives and tasks became modules still restore.

Their arrays are named as today's (tests/test_reference_losses.py checks the exported bytes), but
their saved config has the old layout: tests/old_layout_configs.json holds what commit 067733e
saved for two runs, an MAE and a pose fine-tune. A checkpoint of each run is written with today's
code and given that old config, as an old run's workdir has it; then it must resume, export and
predict.
"""
import json
import os

import numpy as np
import pytest

from sapiens_jax import checkpoint
from sapiens_jax import default_config
from sapiens_jax import export
from sapiens_jax import models
from sapiens_jax import predict
from sapiens_jax import train
from sapiens_jax import writers

TESTS = os.path.dirname(os.path.abspath(__file__))


def old_config(kind, **data):
  with open(os.path.join(TESTS, "old_layout_configs.json")) as f:
    saved = json.load(f)[kind]
  saved["data"].update(data)
  return saved


def todays_config(kind, synthetic_config, **data):
  """The same run as today's configs build it."""
  if kind == "mae":
    c = default_config.pretrain("tiny")
    c.image_size = (32, 32)
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 32, 1, 2
    c.num_viz_images, c.data.num_generated = 1, 16
  else:
    c = synthetic_config("pose")
    c.model.size, c.image_size, c.batch_size, c.eval_batch_size = "tiny", (64, 48), 4, 4
    c.eval_every_steps, c.model.head_channels, c.data.num_generated, c.data.num_eval = 2, 16, 8, 4
    c.loss.heatmap_sigma = 1.0
  c.batch_size, c.total_steps, c.checkpoint_every_steps = 4, 2, 1
  c.data.update(data)
  return c


@pytest.mark.parametrize("kind", ["mae", "pose"])
def test_an_old_layout_checkpoint_resumes_exports_and_predicts(kind, synthetic_config, synthetic_root, tmp_path):
  data = {} if kind == "mae" else {"path": synthetic_root}
  saved = old_config(kind, **data)
  config = todays_config(kind, synthetic_config, **data)
  upgraded = default_config.upgrade(saved)
  assert "task" not in upgraded if kind == "mae" else upgraded["task"] == "pose"
  assert upgraded["model"] == config.to_dict()["model"] and upgraded["objective"] == config.objective
  if kind == "pose":
    assert upgraded["loss"]["heatmap_sigma"] == 1.0 and "heatmap_sigma" not in upgraded

  # Step 1 as an old run left it: today's arrays, the old config.
  workdir = str(tmp_path / "run")
  config.total_steps = 1
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "checkpoints", "1", "config", "metadata"), "w") as f:
    json.dump(saved, f)

  params, restored, step = checkpoint.restore_params(workdir)
  assert step == 1 and restored.objective == config.objective and models.family_name(restored.model) == "sapiens"
  assert export.export(workdir, str(tmp_path / "weights.safetensors"))[0] == 1
  image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
  prediction = predict.predict_image(*predict.load_run(workdir), image)
  assert set(prediction) == ({"features"} if kind == "mae" else {"keypoints", "keypoint_scores"})

  config.total_steps = 2  # resumes from the old checkpoint (its config is compatible) and trains step 2
  state = train.train_and_evaluate(config, workdir)
  assert int(state["step"]) == 2
  assert [r["step"] for r in writers.read_metrics(workdir) if "loss" in r] == [1, 2]  # not restarted
