"""Learning, measured: a tiny model fine-tuned for a fixed number of steps on studio-framed synthetic
humans beats its task's trivial baseline on the held-out split (the same evaluators score both).

Not timed. Two budgets:
- short (always run; 1 to 2 minutes each on 2 CPU cores): a margin these budgets clear with room to
  spare, so a broken label, loss, head, flip or schedule, which leaves the model at its baseline,
  fails them;
- long (`SAPIENS_LONG_TESTS=1`; 12-18 minutes each): the thresholds of the issue "The four human
  tasks" for seg (mIoU baseline + 20 points) and normals (mean angle 0.7x the mean normal's). Pose's
  (AP 2x the mean pose's) is already checked by the short run; depth's (0.7x a constant's RMSE) is
  not reached on a CPU yet.
RESULTS.md records the values both budgets reach.
"""
import os

import pytest
from sapiens_jax import baselines
from sapiens_jax import train
from sapiens_jax import writers

LONG = os.environ.get("SAPIENS_LONG_TESTS") == "1"
long_only = pytest.mark.skipif(not LONG, reason="long learning run: set SAPIENS_LONG_TESTS=1")


@pytest.fixture(scope="module")
def learning_config(synthetic_config):
  """(task, steps) -> configs/synthetic.py:TASK with a 2-block, width-64 ViT and a width-32 head."""
  def make(task, steps):
    c = synthetic_config(task)
    c.model.size = "tiny"
    c.model.head_channels = 32
    c.optim.base_lr = 4e-3
    c.total_steps = c.eval_every_steps = c.checkpoint_every_steps = steps
    c.log_every_steps = 100
    return c
  return make


@pytest.fixture(scope="module")
def studio_root(tmp_path_factory, learning_config):
  """512 training and 64 held-out renders at 128x96, shared by the four tasks."""
  root = str(tmp_path_factory.mktemp("studio"))
  config = learning_config("seg", 1)
  config.data.path = root
  from sapiens_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.ensure_synthetic_data(config, "")
  return root


def fine_tune(config, root, workdir):
  """(final eval metrics, baseline metrics) of `config`'s run."""
  steps = config.total_steps
  config.data.path = root
  train.train_and_evaluate(config, str(workdir))
  evals = [r for r in writers.read_metrics(workdir) if any(k.startswith("eval_") for k in r)]
  assert evals[-1]["step"] == steps
  final = {k[len("eval_"):]: v for k, v in evals[-1].items() if k.startswith("eval_")}
  return final, baselines.evaluate_baseline(config, str(workdir))


def test_segmentation_learns_beyond_the_majority_class(learning_config, studio_root, tmp_path):
  model, baseline = fine_tune(learning_config("seg", 300), studio_root, tmp_path)
  assert model["mIoU"] >= baseline["mIoU"] + 5, (model, baseline)


def test_normals_learn_beyond_the_mean_normal(learning_config, studio_root, tmp_path):
  model, baseline = fine_tune(learning_config("normal", 200), studio_root, tmp_path)
  assert model["mean_angle"] <= 0.93 * baseline["mean_angle"], (model, baseline)


def test_depth_learns_beyond_a_constant(learning_config, studio_root, tmp_path):
  model, baseline = fine_tune(learning_config("depth", 80), studio_root, tmp_path)
  assert model["rmse"] <= 0.97 * baseline["rmse"], (model, baseline)


def test_pose_learns_beyond_the_mean_pose(learning_config, studio_root, tmp_path):
  model, baseline = fine_tune(learning_config("pose", 800), studio_root, tmp_path)
  assert model["AP"] >= 2 * baseline["AP"] and model["AP"] > 0, (model, baseline)
  assert model["AR50"] >= 2 * baseline["AR50"] + 0.05, (model, baseline)


@long_only
def test_segmentation_reaches_the_issue_threshold(learning_config, studio_root, tmp_path):
  model, baseline = fine_tune(learning_config("seg", 2000), studio_root, tmp_path)
  assert model["mIoU"] >= baseline["mIoU"] + 20, (model, baseline)


@long_only
def test_normals_reach_the_issue_threshold(learning_config, studio_root, tmp_path):
  model, baseline = fine_tune(learning_config("normal", 4000), studio_root, tmp_path)
  assert model["mean_angle"] <= 0.7 * baseline["mean_angle"], (model, baseline)
