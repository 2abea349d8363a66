"""Executes colabs/sapiens2_tasks.ipynb with a tiny Sapiens2 and a few steps per task: six runs, exported,
loaded back as released task files are, run on a photo, shown side by side.

How a notebook is run (parameters injected as papermill does, a kernel running this interpreter):
tests/notebooks.py.
"""
import importlib.util
import io
import math
import os
import re

import numpy as np
from PIL import Image
import pytest

import notebooks
from sapiens_jax import predict
from sapiens_jax import writers
from sapiens_jax.data import meta

NOTEBOOK = "sapiens2_tasks.ipynb"
TASK_STEPS = 2
MODEL_SIZE = "sapiens2_tiny"  # 18 blocks, 64 wide: grouped-query blocks, as the released sizes have
IMAGE_SIZE = (64, 48)  # a 4x3 token grid; pointmap's scale branch takes it (ceil-halved to 1x1)
# configs/synthetic.py:NAME -> (task, recipe, labels) that load_weights must read off the exported file's
# head: the synthetic labels for seg and pose (28 classes, COCO's 17 keypoints), none for the others.
LOADED = {"sapiens2_seg": ("seg", "sapiens2_seg", "seg28"), "sapiens2_normal": ("normal", "sapiens2_normal", ""),
          "pointmap": ("pointmap", "sapiens2_pointmap", ""), "albedo": ("albedo", "sapiens2_albedo", ""),
          "matting": ("matting", "sapiens2_matting", ""), "sapiens2_pose": ("pose", "sapiens2_pose", "coco17")}
PANELS = 8  # photo, body parts, normals, depth, albedo, alpha, cut-out, pose
PER_ROW = 4


def synthetic_config(name):
  path = os.path.join(os.path.dirname(notebooks.COLABS), "configs", "synthetic.py")
  spec = importlib.util.spec_from_file_location("synthetic", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(name)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """(executed notebook, workdir), run once for all tests of this module."""
  pytest.importorskip("torch")  # export needs the [torch] extra: torch and safetensors
  pytest.importorskip("safetensors")
  pytest.importorskip("skimage.data")  # the photo
  root = tmp_path_factory.mktemp("colab_sapiens2_tasks")
  workdir = root / "workdir"
  overrides = {"TASK_STEPS": TASK_STEPS, "WORKDIR": str(workdir), "MODEL_SIZE": MODEL_SIZE,
               "IMAGE_SIZE": IMAGE_SIZE, "NUM_GENERATED": 8}
  with pytest.MonkeyPatch.context() as mp:
    # Unoptimised LLVM code generation in the kernel (as tests/test_sharding_distill.py's runs): the six runs
    # compile their train, eval and predict steps in about half the time, and compiling is most of this test.
    mp.setenv("XLA_FLAGS", (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip())
    return notebooks.execute(NOTEBOOK, root, overrides), workdir


@pytest.fixture(scope="module")
def photo():
  """The notebook's default photo, scikit-image's astronaut, loaded here independently."""
  return pytest.importorskip("skimage.data").astronaut()


def printed(text, name, key):
  """(shape, rest of the line) the notebook printed for `name`'s prediction `key`."""
  found = re.findall(rf"^{name} +{key} \(([\d, ]+)\)(.*)$", text, re.MULTILINE)
  assert len(found) == 1, text[-3000:]
  shape, rest = found[0]
  return tuple(int(v) for v in shape.split(",")), rest


def value_range(rest, what=""):
  """(low, high) of the first `WHAT LOW to HIGH` in a printed line."""
  found = re.search(rf"{what}\s*(-?[\d.e+-]+) to (-?[\d.e+-]+)", rest)
  assert found, rest
  return float(found.group(1)), float(found.group(2))


def test_committed_notebook_is_clean_valid_and_installs_nothing():
  notebooks.assert_clean(NOTEBOOK)
  notebooks.assert_no_shell_lines(NOTEBOOK)


def test_parameters_cell_defines_the_synthetic_config_defaults():
  defaults = notebooks.parameters(NOTEBOOK)
  assert defaults == {"TASK_STEPS": 300, "WORKDIR": "/tmp/sapiens2_tasks_colab", "MODEL_SIZE": "sapiens2_small",
                      "IMAGE_SIZE": (128, 96), "NUM_GENERATED": 512, "PHOTO": "astronaut", "START_FRESH": True}
  for name in LOADED:  # at its defaults the notebook runs configs/synthetic.py's own runs
    config = synthetic_config(name)
    assert config.recipe == "sapiens2", name
    assert (config.total_steps, config.model.size, tuple(config.image_size), config.data.num_generated) == (
        defaults["TASK_STEPS"], defaults["MODEL_SIZE"], defaults["IMAGE_SIZE"], defaults["NUM_GENERATED"]), name


def test_each_task_trains_and_evaluates_on_one_shared_dataset(executed):
  _, workdir = executed
  for name in LOADED:
    records = {r["step"]: r for r in writers.read_metrics(str(workdir / name))}
    assert max(records) == TASK_STEPS, (name, sorted(records))  # the override reached the config
    assert math.isfinite(records[TASK_STEPS]["loss"]), (name, records[TASK_STEPS])
    main = "eval_" + synthetic_config(name).best_metric
    assert math.isfinite(records[TASK_STEPS][main]), (name, main, records[TASK_STEPS])
    assert (workdir / name / "checkpoints").is_dir()
    assert not (workdir / name / "synthetic_humans").exists()  # read from WORKDIR, not rendered again
  train = workdir / "synthetic_humans" / "train"
  assert len(list((train / "images").iterdir())) == 8
  for folder in ("segs", "normals", "depths", "albedos", "alphas", "foregrounds", "backgrounds"):
    assert len(list((train / folder).iterdir())) == 8, folder  # every task's labels, in the one folder


def test_each_exported_file_loads_with_its_task_read_off_its_head(executed):
  """The files are upstream task files (backbone.* + decode_head.*) that predict --weights recognises
  with no run of ours: the task, the recipe and the label set from the head's tensors alone."""
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  nb, workdir = executed
  text = notebooks.stdout(nb)
  for name, (task, dataset, labels) in LOADED.items():
    path = workdir / f"{name}.safetensors"
    keys = load_file(path).keys()
    assert {k.split(".")[0] for k in keys} == {"backbone", "decode_head"}, (name, sorted(keys)[:5])
    config, _ = predict.load_weights(str(path), IMAGE_SIZE)
    assert (config.task, config.data.dataset, config.recipe, config.data.labels, config.model.size) == (
        task, dataset, "sapiens2", labels, MODEL_SIZE), name
    # and the notebook's own load said the same
    line = re.search(rf"^{name}\.safetensors +-> task (\S+), recipe (\S+) ", text, re.MULTILINE)
    assert line and line.groups() == (task, dataset), text[-3000:]


def test_predicts_every_output_at_the_photos_size_and_in_range(executed, photo):
  nb, _ = executed
  text = notebooks.stdout(nb)
  height, width = photo.shape[:2]

  shape, rest = printed(text, "sapiens2_seg", "labels")
  assert shape == (height, width)
  low, high = value_range(rest, "ids")
  assert 0 <= low <= high < meta.seg_classes("seg28").num_classes
  found = re.search(r"found: (.*)$", rest).group(1).split(", ")
  assert found and set(found) <= set(meta.seg_classes("seg28").names), found

  shape, rest = printed(text, "sapiens2_normal", "normals")
  assert shape == (height, width, 3)
  low, high = value_range(rest, "length")
  assert abs(low - 1) < 1e-3 and abs(high - 1) < 1e-3, rest

  shape, rest = printed(text, "pointmap", "pointmap")
  assert shape == (height, width, 3)
  assert re.search(r": 0 pixels not finite", rest), rest
  low, high = value_range(rest, "Z")
  assert math.isfinite(low) and math.isfinite(high)

  shape, rest = printed(text, "albedo", "albedo")
  assert shape == (height, width, 3)
  low, high = value_range(rest)
  assert 0 <= low <= high <= 1, rest

  shape, rest = printed(text, "matting", "alpha")
  assert shape == (height, width)
  low, high = value_range(rest)
  assert 0 <= low <= high <= 1, rest
  assert re.search(rf"foreground \({height}, {width}, 3\)", rest), rest
  low, high = value_range(rest.split("foreground")[1])
  assert 0 <= low <= high <= 1, rest

  shape, rest = printed(text, "sapiens2_pose", "keypoints")
  assert shape == (1, meta.skeleton("coco17").num_keypoints, 2)  # one whole-photo box, COCO's 17 keypoints


def test_shows_the_photo_and_every_task_side_by_side_in_one_saved_figure(executed, photo):
  nb, workdir = executed
  pngs = notebooks.displayed_pngs(nb)
  assert len(pngs) == 1, "expected one figure of every output"
  saved = workdir / "sapiens2_tasks.png"
  assert pngs[0] == saved.read_bytes()  # the figure shown is the one saved
  figure = np.asarray(Image.open(io.BytesIO(pngs[0])).convert("RGB"))
  height, width = photo.shape[:2]
  rows = PANELS // PER_ROW
  gap = (figure.shape[0] - rows * height) // (rows - 1)  # white pixels between tiles, the same both ways
  assert gap > 0 and figure.shape == (rows * height + (rows - 1) * gap, PER_ROW * width + (PER_ROW - 1) * gap, 3)
  tiles = [figure[r * (height + gap):r * (height + gap) + height, c * (width + gap):c * (width + gap) + width]
           for r in range(rows) for c in range(PER_ROW)]
  np.testing.assert_array_equal(tiles[0], photo)  # the photo, first
  for i, tile in enumerate(tiles[1:-1], 1):  # then a picture of each dense output
    assert not np.array_equal(tile, photo), i
  # Last, the skeleton over the photo: only keypoints scored above the threshold are drawn (none, it may
  # be, after a few steps), so the tile is the photo exactly when the notebook counted none.
  _, rest = printed(notebooks.stdout(nb), "sapiens2_pose", "keypoints")
  confident = int(re.search(r": (\d+) of \d+ above", rest).group(1))
  assert np.array_equal(tiles[-1], photo) == (confident == 0), confident
  for c in range(1, PER_ROW):  # the gaps between the columns are white
    assert (figure[:, c * (width + gap) - gap:c * (width + gap)] == 255).all()
