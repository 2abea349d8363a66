"""Learning, measured: a tiny model fine-tuned for a fixed number of steps on studio-framed synthetic
humans beats its task's trivial baseline on the held-out split (the same evaluators score both).

Not timed: each task trains for about a minute on a 2-core CPU. The margins are what these budgets
reach with room to spare (RESULTS.md has the measured values); a broken label, loss, head, flip or
schedule leaves the model at its baseline and fails them. The issue's own thresholds (seg +20
points, depth and normals 0.7x their constants) need longer runs and are tracked in RESULTS.md.
"""
import pytest
from test_finetune import synthetic_config

from sapiens_jax import baselines
from sapiens_jax import train
from sapiens_jax import writers

STEPS = {"pose": 800, "seg": 300, "depth": 300, "normal": 400}


def learning_config(task):
  """configs/synthetic.py:TASK with a 2-block, width-64 ViT and a width-32 head."""
  c = synthetic_config(task)
  c.model.size = "tiny"
  c.model.head_channels = 32
  c.optim.base_lr = 4e-3
  c.total_steps = c.eval_every_steps = c.checkpoint_every_steps = STEPS[task]
  c.log_every_steps = 100
  return c


@pytest.fixture(scope="module")
def studio_root(tmp_path_factory):
  """512 training and 64 held-out renders at 128x96, shared by the four tasks."""
  root = str(tmp_path_factory.mktemp("studio"))
  config = learning_config("seg")
  config.data.path = root
  from sapiens_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.ensure_synthetic_data(config, "")
  return root


def fine_tune(task, root, workdir):
  """(final eval metrics, baseline metrics) of a run of `task`."""
  config = learning_config(task)
  config.data.path = root
  train.train_and_evaluate(config, str(workdir))
  evals = [r for r in writers.read_metrics(workdir) if any(k.startswith("eval_") for k in r)]
  assert evals[-1]["step"] == STEPS[task]
  final = {k[len("eval_"):]: v for k, v in evals[-1].items() if k.startswith("eval_")}
  return final, baselines.evaluate_baseline(config, str(workdir))


def test_segmentation_learns_beyond_the_majority_class(studio_root, tmp_path):
  model, baseline = fine_tune("seg", studio_root, tmp_path)
  assert model["mIoU"] >= baseline["mIoU"] + 5, (model, baseline)


def test_normals_learn_beyond_the_mean_normal(studio_root, tmp_path):
  model, baseline = fine_tune("normal", studio_root, tmp_path)
  assert model["mean_angle"] <= 0.93 * baseline["mean_angle"], (model, baseline)


def test_depth_learns_beyond_a_constant(studio_root, tmp_path):
  model, baseline = fine_tune("depth", studio_root, tmp_path)
  assert model["rmse"] <= 0.97 * baseline["rmse"], (model, baseline)


def test_pose_learns_beyond_the_mean_pose(studio_root, tmp_path):
  model, baseline = fine_tune("pose", studio_root, tmp_path)
  assert model["AP"] >= 2 * baseline["AP"] and model["AP"] > 0, (model, baseline)
  assert model["AR50"] >= 2 * baseline["AR50"] + 0.05, (model, baseline)
