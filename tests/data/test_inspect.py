"""Tests for the data-inspection CLI (sapiens_jax/data/inspect.py) on a tiny synthetic dataset."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from sapiens_jax import default_config
from sapiens_jax import tasks
from sapiens_jax import visualize
from sapiens_jax.data import inspect
from sapiens_jax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEIGHT, WIDTH = 64, 48
DATASETS = {"pose": "coco", "seg": "goliath_seg", "depth": "render_people_depth", "normal": "render_people_normal"}


def _config(task):
  config = default_config.finetune(DATASETS[task], "tiny")
  config.data.source = "synthetic"
  config.image_size = (HEIGHT, WIDTH)
  config.data.num_generated = 8
  config.data.num_eval = 2
  return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """One rendered dataset for every task (they all read the same synthetic humans)."""
  path = str(tmp_path_factory.mktemp("inspect"))
  pipeline.ensure_synthetic_data(_config("seg"), path)
  return path


def _panel_width(columns):
  return columns * WIDTH + (columns - 1) * visualize._GAP


@pytest.mark.parametrize("task", ["pose", "seg", "depth", "normal"])
def test_render_writes_a_grid_of_labelled_samples(task, workdir, tmp_path):
  output = tmp_path / f"{task}.png"
  inspect.render(_config(task), 5, output, "train", workdir)
  grid = np.asarray(Image.open(output))
  gap = visualize._GAP
  # Five [image | target] panels, four to a row.
  assert grid.shape == (2 * HEIGHT + gap, 4 * _panel_width(2) + 3 * gap, 3)
  assert grid.std() > 10
  assert (grid[HEIGHT + gap:, _panel_width(2) + gap:] == 255).all()  # the filler panels
  # Sample 1 is the pipeline's training example for (seed, 1).
  config = _config(task)
  source = pipeline.make_task_source(config, "train", workdir)
  example = tasks.get(task).train_example(config, source)(1, np.random.default_rng([0, 1]))
  left = _panel_width(2) + gap
  np.testing.assert_array_equal(grid[:HEIGHT, left:left + WIDTH],
                                example["image"])


def test_eval_split_shows_pose_targets_from_the_annotations(workdir):
  panels = inspect.sample_panels(_config("pose"), 2, "eval", workdir)
  assert len(panels) == 2 and panels[0].shape == (HEIGHT, _panel_width(2), 3)
  for panel in panels:  # the skeleton changes the target tile
    assert (panel[:, :WIDTH] != panel[:, -WIDTH:]).any()


def test_mae_draws_augmented_crops():
  config = default_config.pretrain("tiny")
  config.image_size = (32, 32)
  config.data.num_generated = 4
  panels = inspect.sample_panels(config, 6, "train")
  assert len(panels) == 6 and panels[0].shape == (32, 32, 3)
  assert not np.array_equal(panels[0], panels[4])  # record 0 again, with another crop
  with pytest.raises(ValueError, match="no eval split"):
    inspect.sample_panels(config, 1, "eval")


def test_bad_arguments_are_named(workdir):
  with pytest.raises(ValueError, match="split 'test'"):
    inspect.sample_panels(_config("seg"), 1, "test", workdir)
  config = _config("seg")
  config.task = "detection"
  with pytest.raises(ValueError, match="'detection'"):
    inspect.sample_panels(config, 1, "train", workdir)
  with pytest.raises(ValueError, match="--workdir"):
    inspect.sample_panels(_config("seg"), 1, "train", "")


def test_command_line(workdir, tmp_path):
  output = tmp_path / "depth.png"
  command = [
      sys.executable, "-m", "sapiens_jax.data.inspect",
      "--config=configs/depth_render_people.py:tiny", "--config.data.source=synthetic",
      f"--config.image_size=({HEIGHT}, {WIDTH})", "--config.data.num_generated=8",
      "--config.data.num_eval=2", "--num=3", "--split=eval", f"--output={output}",
      f"--workdir={workdir}"]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  grid = np.asarray(Image.open(output))
  assert grid.shape == (HEIGHT, 3 * _panel_width(2) + 2 * visualize._GAP, 3)
  assert grid.std() > 10
