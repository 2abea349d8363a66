"""Executes colabs/finetune_and_predict.ipynb with a tiny model and a few steps per task.

How a notebook is run (parameters injected as papermill does, a kernel running this interpreter):
tests/notebooks.py.
"""
import base64
import io
import math
import re

import numpy as np
from PIL import Image
import pytest

import notebooks
from sapiens_jax import writers
from sapiens_jax.data import meta

NOTEBOOK = "finetune_and_predict.ipynb"
TASKS = ("pose", "seg", "depth", "normal")
TASK_STEPS = 2
MAIN_METRIC = {"pose": "eval_AP", "seg": "eval_mIoU", "depth": "eval_rmse", "normal": "eval_mean_angle"}


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """(executed notebook, workdir), run once for all tests of this module."""
  root = tmp_path_factory.mktemp("colab_finetune")
  workdir = root / "workdir"
  overrides = {"TASK_STEPS": TASK_STEPS, "WORKDIR": str(workdir), "MODEL_SIZE": "tiny",
               "IMAGE_SIZE": (64, 48), "NUM_GENERATED": 8}
  return notebooks.execute(NOTEBOOK, root, overrides), workdir


@pytest.fixture(scope="module")
def photo():
  """The notebook's default photo, scikit-image's astronaut, loaded here independently."""
  return pytest.importorskip("skimage.data").astronaut()


def shape_of(text, task, key):
  """The shape the notebook printed for `task`'s prediction `key`."""
  found = re.findall(rf"^{task} +{key} \(([\d, ]+)\)", text, re.MULTILINE)
  assert len(found) == 1, text[-2000:]
  return tuple(int(v) for v in found[0].split(","))


def displayed_pngs(nb):
  return [Image.open(io.BytesIO(base64.b64decode(output["data"]["image/png"])))
          for output in notebooks.outputs(nb) if "image/png" in output.get("data", {})]


def test_committed_notebook_is_clean_valid_and_installs_nothing():
  notebooks.assert_clean(NOTEBOOK)
  notebooks.assert_no_shell_lines(NOTEBOOK)


def test_parameters_cell_defines_defaults():
  assert notebooks.parameters(NOTEBOOK) == {
      "TASK_STEPS": 150, "WORKDIR": "/tmp/sapiens_finetune_colab", "MODEL_SIZE": "small",
      "IMAGE_SIZE": (128, 96), "NUM_GENERATED": 512, "PHOTO": "astronaut", "PHOTO_SIZE": (480, 360),
      "START_FRESH": True}


def test_each_task_trains_and_evaluates_on_one_shared_dataset(executed):
  _, workdir = executed
  for task in TASKS:
    records = {r["step"]: r for r in writers.read_metrics(str(workdir / task))}
    assert max(records) == TASK_STEPS, (task, sorted(records))  # the override reached the config
    assert math.isfinite(records[TASK_STEPS]["loss"]), records[TASK_STEPS]
    assert math.isfinite(records[TASK_STEPS][MAIN_METRIC[task]]), records[TASK_STEPS]
    assert (workdir / task / "checkpoints").is_dir()
    assert not (workdir / task / "synthetic_humans").exists()  # read from WORKDIR, not rendered again
  images = sorted((workdir / "synthetic_humans" / "train" / "images").iterdir())
  assert len(images) == 8


def test_predicts_the_four_outputs_at_the_photos_size(executed, photo):
  nb, _ = executed
  text = notebooks.stdout(nb)
  height, width = photo.shape[:2]
  assert shape_of(text, "pose", "keypoints") == (1, 17, 2)  # one whole-image box
  assert shape_of(text, "seg", "labels") == (height, width)
  assert shape_of(text, "depth", "depth") == (height, width)
  assert shape_of(text, "normal", "normals") == (height, width, 3)
  length = re.search(r"^normal .*mean length (\S+)$", text, re.MULTILINE)
  assert abs(float(length.group(1)) - 1.0) < 1e-3, text[-2000:]
  found = re.search(r"^seg .* classes found: (.*)$", text, re.MULTILINE).group(1).split(", ")
  assert found and set(found) <= set(meta.seg_classes("seg28").names), found
  for task in TASKS:  # the evaluation summary
    assert re.search(rf"^{task} +step {TASK_STEPS}: ", text, re.MULTILINE), text[-2000:]


def test_displays_the_photo_then_a_two_by_two_figure_of_its_aspect(executed, photo):
  nb, _ = executed
  pngs = displayed_pngs(nb)
  assert len(pngs) == 2, "expected the photo and the figure of the four outputs"
  shown, figure = pngs
  np.testing.assert_array_equal(np.asarray(shown.convert("RGB")), photo)
  height, width = photo.shape[:2]
  assert 2 * height <= figure.height < 2 * height + 16 and 2 * width <= figure.width < 2 * width + 16, figure.size
  assert figure.height / figure.width == pytest.approx(height / width, rel=0.03)
  np.asarray(figure.convert("RGB"))  # decodes fully
