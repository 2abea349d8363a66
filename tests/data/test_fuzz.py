"""Fuzz test: corrupt random files of a small dataset; `skip` trains on and counts exactly the bad
records, `raise` names the broken file. Folders (MAE, seg, pose) and converted shards (seg)."""
import glob
import os
import shutil

import ml_collections
import numpy as np
import pytest

from sapiens_jax import default_config
from sapiens_jax.data import convert
from sapiens_jax.data import pipeline
from sapiens_jax.data import synthetic_humans

NUM_IMAGES = 8
CORRUPTIONS = ("truncate", "empty", "garbage")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("pristine"))
  synthetic_humans.write_dataset(root, NUM_IMAGES, 64, 48, seed=11)
  return root


def corrupt(path, how):
  """Damages a file in place: first half only, zero bytes, or random bytes of the same length."""
  with open(path, "rb") as f:
    data = f.read()
  rng = np.random.default_rng(len(data))
  damaged = {"truncate": data[:len(data) // 2], "empty": b"",
             "garbage": rng.integers(0, 256, len(data), dtype=np.uint8).tobytes()}[how]
  with open(path, "wb") as f:
    f.write(damaged)


def corrupt_random_files(root, patterns, count, seed):
  """Corrupts `count` files (relative paths) drawn by a seeded rng among the globbed ones."""
  rng = np.random.default_rng(seed)
  candidates = sorted(os.path.relpath(p, root) for pattern in patterns
                      for p in glob.glob(os.path.join(root, pattern)))
  chosen = [candidates[i] for i in rng.choice(len(candidates), count, replace=False)]
  for k, relative in enumerate(chosen):
    corrupt(os.path.join(root, relative), CORRUPTIONS[(k + seed) % len(CORRUPTIONS)])
  return chosen


def expected_skips(bad):
  """Per record index, how many records load_with_skips passes over: the run of bad ones from it."""
  runs = []
  for i in range(len(bad)):
    run = 0
    while bad[(i + run) % len(bad)]:
      run += 1
    runs.append(run)
  return np.array(runs)


def one_epoch_of_skips(iterator, num_records):
  """Batch size 1 over one epoch: every record index is drawn exactly once."""
  return np.array([int(next(iterator)["skipped"][0]) for _ in range(num_records)])


def task_config(task, path, on_error):
  config = default_config.finetune("coco" if task == "pose" else "goliath_seg", "tiny")
  config.image_size = (64, 48)
  if task == "pose":
    config.loss.heatmap_sigma = 1.0
  config.data.path = path
  config.data.annotations = os.path.join(path, "person_keypoints.json") if task == "pose" else ""
  config.data.on_error = on_error
  return config


def bad_records(task, source, root, broken):
  """Which records of `source` read a broken file (pose: every person of a broken image)."""
  if task == "pose":
    return np.array([os.path.relpath(source[i]["image_name"], root) in broken
                     for i in range(len(source))])
  stems = {os.path.splitext(os.path.basename(p))[0] for p in broken}
  return np.array([source[i]["name"] in stems for i in range(len(source))])


CASES = {  # task, which files to damage, where the data is read from
    "seg": ("seg", ("images/*.jpg", "segs/*.png"), "folder"),
    "seg_records": ("seg", ("images/*.jpg", "segs/*.png"), "records"),
    "pose": ("pose", ("images/*.jpg",), "folder"),
}


def prepare(case, pristine, tmp_path, count, seed):
  task, patterns, form = CASES[case]
  root = str(tmp_path / "data")
  shutil.copytree(pristine, root)
  broken = corrupt_random_files(root, patterns, count, seed)
  path = root
  if form == "records":
    path = str(tmp_path / "records")
    convert.convert(task, root, path, records_per_shard=3)
  return task, root, path, broken


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", sorted(CASES))
def test_skip_trains_on_and_counts_every_bad_record(case, seed, pristine, tmp_path):
  task, root, path, broken = prepare(case, pristine, tmp_path, count=3, seed=seed)
  config = task_config(task, path, "skip")
  source = pipeline.make_task_source(config, "train")
  bad = bad_records(task, source, root, broken)
  assert bad.any() and not bad.all()
  skipped = one_epoch_of_skips(pipeline.make_task_iterator(config, batch_size=1, seed=seed),
                               len(source))
  assert np.count_nonzero(skipped) == np.count_nonzero(bad)
  assert skipped.sum() == expected_skips(bad).sum()


@pytest.mark.parametrize("case", sorted(CASES))
def test_raise_names_the_broken_file(case, pristine, tmp_path):
  task, _, path, broken = prepare(case, pristine, tmp_path, count=1, seed=4)
  config = task_config(task, path, "raise")
  source = pipeline.make_task_source(config, "train")
  iterator = pipeline.make_task_iterator(config, batch_size=1, seed=0)
  with pytest.raises(ValueError) as error:
    for _ in range(len(source)):
      next(iterator)
  # Folders name the file; shards name the shard record and the file it came from.
  assert broken[0] in str(error.value)


def mae_config(path, on_error):
  return ml_collections.ConfigDict(dict(source="folder", path=path, on_error=on_error,
                                        num_workers=0, resize="pil"))


@pytest.mark.parametrize("seed", [0, 1])
def test_mae_folder_skip_counts_and_raise_names_the_file(seed, pristine, tmp_path):
  root = str(tmp_path / "images")
  shutil.copytree(os.path.join(pristine, "images"), root)
  broken = corrupt_random_files(root, ("*.jpg",), 3, seed)
  paths = sorted(glob.glob(os.path.join(root, "*.jpg")))
  bad = np.array([os.path.relpath(p, root) in broken for p in paths])
  iterator = pipeline.make_pretrain_iterator(mae_config(root, "skip"), image_size=(16, 16),
                                             batch_size=1, seed=seed)
  skipped = one_epoch_of_skips(iterator, len(paths))
  assert np.count_nonzero(skipped) == 3
  assert skipped.sum() == expected_skips(bad).sum()
  iterator = pipeline.make_pretrain_iterator(mae_config(root, "raise"), image_size=(16, 16),
                                             batch_size=1, seed=seed)
  with pytest.raises(ValueError, match="cannot decode image") as error:
    for _ in range(len(paths)):
      next(iterator)
  assert any(os.path.join(root, name) in str(error.value) for name in broken)
