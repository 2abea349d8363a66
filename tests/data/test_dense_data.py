"""Tests for the dense-task data: transforms, targets, photometric, DenseSource."""
import math
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest

from sapiens_jax import tasks
from sapiens_jax.data import dense_source
from sapiens_jax.data import dense_transforms as dt
from sapiens_jax.data import photometric
from sapiens_jax.data import pipeline

GOLIATH_SWAPS = ((4, 13), (5, 14), (6, 15), (7, 16), (8, 17), (9, 18),
                 (10, 19), (11, 20))


class ScriptedRng:
  """Stands in for np.random.Generator, returning scripted draws in order.

  `integers` falls back to `default_integer` once its script runs out, so a
  test can script only the draws it cares about.
  """

  def __init__(self, integers=(), uniforms=(), default_integer=None):
    self._integers = list(integers)
    self._uniforms = list(uniforms)
    self._default_integer = default_integer

  def integers(self, low, high=None):
    if high is None:
      low, high = 0, low
    if self._integers:
      value = self._integers.pop(0)
    elif self._default_integer is not None:
      value = self._default_integer
    else:
      raise AssertionError("unscripted integers() draw")
    assert low <= value < high, (value, low, high)
    return value

  def uniform(self, low=0.0, high=1.0):
    value = self._uniforms.pop(0)
    assert low <= value <= high, (value, low, high)
    return value


def column_image(height, width):
  """Red = column, green = row: a crop or flip says where it came from."""
  rows, cols = np.mgrid[0:height, 0:width]
  return np.stack([cols, rows, np.full_like(rows, 7)], -1).astype(np.uint8)


# --- flips ---------------------------------------------------------------------


def test_flip_swaps_left_and_right_labels_at_the_mirrored_column():
  label = np.zeros((4, 8), np.uint8)
  label[1, 2] = 5    # Left_Hand
  label[2, 6] = 14   # Right_Hand
  label[3, 0] = 21   # Torso has no twin
  label[0, 7] = 255  # ignored stays ignored
  image, targets = dt.flip(column_image(4, 8), {"label": label}, GOLIATH_SWAPS)
  flipped = targets["label"]
  assert flipped[1, 8 - 1 - 2] == 14
  assert flipped[2, 8 - 1 - 6] == 5
  assert flipped[3, 7] == 21
  assert flipped[0, 0] == 255
  assert np.count_nonzero(flipped) == 4
  np.testing.assert_array_equal(image[..., 0], 7 - column_image(4, 8)[..., 0])


def test_flip_without_swap_pairs_only_mirrors():
  label = np.arange(12, dtype=np.uint8).reshape(3, 4)
  _, targets = dt.flip(np.zeros((3, 4, 3), np.uint8), {"label": label})
  np.testing.assert_array_equal(targets["label"], label[:, ::-1])


def test_flip_mirrors_normals_and_negates_x():
  rng = np.random.default_rng(0)
  normals = rng.normal(size=(3, 5, 3)).astype(np.float32)
  mask = (rng.uniform(size=(3, 5)) > 0.5).astype(np.uint8)
  _, targets = dt.flip(np.zeros((3, 5, 3), np.uint8),
                       {"normal": normals, "mask": mask})
  for row in range(3):
    for col in range(5):
      x, y, z = normals[row, 4 - col]
      np.testing.assert_array_equal(targets["normal"][row, col], [-x, y, z])
      assert targets["mask"][row, col] == mask[row, 4 - col]
  assert normals[0, 0, 0] == targets["normal"][0, 4, 0] * -1  # input untouched


def test_random_flip_probability_extremes():
  image = column_image(2, 3)
  depth = np.arange(6, dtype=np.float32).reshape(2, 3)
  rng = np.random.default_rng(0)
  kept, targets = dt.random_flip(image, {"depth": depth}, rng, prob=0.0)
  np.testing.assert_array_equal(kept, image)
  np.testing.assert_array_equal(targets["depth"], depth)
  flipped, targets = dt.random_flip(image, {"depth": depth}, rng, prob=1.0)
  np.testing.assert_array_equal(flipped, image[:, ::-1])
  np.testing.assert_array_equal(targets["depth"], depth[:, ::-1])


# --- targets -------------------------------------------------------------------


def test_depth_target_hand_computed():
  nan, inf = np.nan, np.inf
  depth = np.array([[2.0, 4.0, nan, 9.0],
                    [6.0, 1.0, 3.0, inf],
                    [0.0, -2.0, 5.0, 8.0]], np.float32)
  mask = np.array([[1, 1, 1, 0],
                   [1, 0, 255, 1],
                   [1, 1, 1, 0]], np.uint8)
  # Foreground values 2, 4, 6, 3, 5 (NaN, inf, 0, -2 and masked-out are not).
  expected = np.array([[0.0, 0.5, -1, -1],
                       [1.0, -1, 0.25, -1],
                       [-1, -1, 0.75, -1]], np.float32)
  np.testing.assert_allclose(dt.depth_target(depth, mask), expected)
  assert dt.depth_target(depth, mask).dtype == np.float32


def test_depth_target_flat_or_empty_foreground():
  depth = np.full((2, 2), 3.0, np.float32)
  mask = np.array([[1, 0], [1, 1]])
  np.testing.assert_array_equal(dt.depth_target(depth, mask),
                                [[0, -1], [0, 0]])
  np.testing.assert_array_equal(dt.depth_target(depth, np.zeros((2, 2))),
                                np.full((2, 2), -1.0))


def test_depth_target_ignores_global_scale():
  rng = np.random.default_rng(1)
  depth = rng.uniform(1, 5, (6, 7)).astype(np.float32)
  mask = rng.uniform(size=(6, 7)) > 0.3
  np.testing.assert_allclose(dt.depth_target(depth, mask),
                             dt.depth_target(depth * 37.5, mask), atol=1e-6)


def test_normal_target_renormalises_and_marks_background():
  normals = np.array([[[3, 0, 4], [0, 0, 0]],
                      [[1, 1, 1], [np.nan, 0, 1]],
                      [[0, -2, 0], [0, 0, 0.5]]], np.float32)
  mask = np.array([[1, 1], [0, 1], [1, 1]])
  bg = [-1000.0] * 3
  expected = np.array([[[0.6, 0, 0.8], bg],
                       [bg, bg],
                       [[0, -1, 0], [0, 0, 1]]], np.float32)
  np.testing.assert_allclose(dt.normal_target(normals, mask), expected,
                             rtol=1e-6)
  assert dt.normal_target(normals, mask, background=-5.0)[0, 1, 2] == -5.0


# --- resize, crop, rotate ------------------------------------------------------


def test_fit_size_hand_computed():
  assert dt.fit_size(40, 100, (30, 40)) == (16, 40)  # long edge binds: 0.4
  assert dt.fit_size(100, 40, (40, 30)) == (40, 16)  # order of scale is free
  assert dt.fit_size(48, 64, (768, 1024)) == (768, 1024)
  assert dt.fit_size(30, 30, (30, 40)) == (30, 30)   # short edge binds


def test_random_resize_keeps_aspect_within_scaled_target():
  image = column_image(40, 100)
  label = np.zeros((40, 100), np.uint8)
  label[:, 50:] = 9
  for seed in range(5):
    rng = np.random.default_rng(seed)
    ratio = np.random.default_rng(seed).uniform(0.5, 2.0)
    out, targets = dt.random_resize(image, {"label": label}, rng,
                                    scale=(30, 40), ratio_range=(0.5, 2.0))
    height, width = out.shape[:2]
    long_limit, short_limit = int(40 * ratio), int(30 * ratio)
    assert width <= long_limit and height <= short_limit
    assert width == long_limit or height == short_limit
    assert abs(width / height - 2.5) < 2.5 / min(height, width) + 0.05
    assert targets["label"].shape == (height, width)
    assert set(np.unique(targets["label"])) == {0, 9}  # nearest: no blends


def test_resize_to_stretches_and_keeps_label_values():
  label = np.array([[1, 2], [3, 255]], np.uint8)
  depth = np.array([[1.5, 2.5], [np.nan, 4.0]], np.float32)
  image, targets = dt.resize_to(column_image(2, 2),
                                {"label": label, "depth": depth}, (4, 6))
  assert image.shape == (4, 6, 3)
  np.testing.assert_array_equal(targets["label"],
                                np.kron(label, np.ones((2, 3), np.uint8)))
  np.testing.assert_array_equal(targets["depth"],
                                np.kron(depth, np.ones((2, 3))))


def crop_label():
  # Columns 0-9 class 1, 10-13 ignored, 14-19 class 2.
  label = np.ones((4, 20), np.uint8)
  label[:, 10:14] = 255
  label[:, 14:] = 2
  return label


def test_random_crop_redraws_while_one_class_dominates():
  image = column_image(4, 20)
  # Window left=0: only class 1. left=5: class 1 plus ignored pixels, which
  # do not count, so still one class. left=8: classes 1 and 2 at 50% each.
  rng = ScriptedRng(integers=[0, 0, 0, 5, 0, 8])
  out, targets = dt.random_crop(image, {"label": crop_label()}, rng, (4, 8),
                                cat_max_ratio=0.75)
  assert out[0, 0, 0] == 8 and out.shape == (4, 8, 3)
  np.testing.assert_array_equal(targets["label"], crop_label()[:, 8:16])


def test_random_crop_keeps_first_window_without_cat_max_ratio():
  rng = ScriptedRng(integers=[0, 0])
  out, _ = dt.random_crop(column_image(4, 20), {"label": crop_label()}, rng,
                          (4, 8))
  assert out[0, 0, 0] == 0


def test_random_crop_gives_up_after_ten_redraws():
  rng = ScriptedRng(integers=[0, 0] * 10 + [0, 3])
  out, _ = dt.random_crop(column_image(4, 20), {"label": crop_label()}, rng,
                          (4, 8), cat_max_ratio=0.75)
  assert out[0, 0, 0] == 3  # the 11th window, although it is all class 1


def test_random_crop_keeps_short_sides_whole():
  image = column_image(5, 30)
  mask = np.ones((5, 30), np.uint8)
  out, targets = dt.random_crop(image, {"mask": mask},
                                np.random.default_rng(0), (10, 12))
  assert out.shape == (5, 12, 3) and targets["mask"].shape == (5, 12)
  assert np.all(np.diff(out[0, :, 0].astype(int)) == 1)


def expected_rotated_point(x, y, width, height, degrees):
  """Clockwise-on-screen rotation about ((W-1)/2, (H-1)/2), y pointing down."""
  cx, cy = (width - 1) / 2, (height - 1) / 2
  theta = math.radians(degrees)
  dx, dy = x - cx, y - cy
  return (cx + math.cos(theta) * dx - math.sin(theta) * dy,
          cy + math.sin(theta) * dx + math.cos(theta) * dy)


@pytest.mark.parametrize("degrees", [90, 30, -50])
def test_rotate_moves_a_blob_where_the_rotation_matrix_says(degrees):
  height, width = 21, 25
  x, y = 17, 6
  label = np.full((height, width), 3, np.uint8)
  label[y - 1:y + 2, x - 1:x + 2] = 9
  mask = (label == 9).astype(np.uint8)
  _, targets = dt.rotate(np.zeros((height, width, 3), np.uint8),
                         {"label": label, "mask": mask}, degrees)
  ex, ey = expected_rotated_point(x, y, width, height, degrees)
  assert targets["label"][round(ey), round(ex)] == 9
  assert targets["mask"][round(ey), round(ex)] == 1
  ys, xs = np.nonzero(targets["label"] == 9)
  assert abs(xs.mean() - ex) < 1 and abs(ys.mean() - ey) < 1


def test_rotate_fills_uncovered_corners():
  height, width = 12, 16
  image = np.full((height, width, 3), 200, np.uint8)
  targets = {"label": np.full((height, width), 5, np.uint8),
             "mask": np.ones((height, width), np.uint8),
             "depth": np.full((height, width), 2.0, np.float32),
             "normal": np.ones((height, width, 3), np.float32)}
  image, targets = dt.rotate(image, targets, 30)
  np.testing.assert_array_equal(image[0, 0], 0)
  assert targets["label"][0, 0] == 0  # class 0, the reference's seg_pad_val
  assert targets["mask"][0, 0] == 0
  assert np.isnan(targets["depth"][0, 0])
  assert np.isnan(targets["normal"][0, 0]).all()
  center = (height // 2, width // 2)
  assert targets["label"][center] == 5 and targets["depth"][center] == 2.0
  assert image[center][0] == 200


# --- background, photometric ---------------------------------------------------


def test_composite_background_keeps_person_and_replaces_the_rest():
  image = np.full((6, 8, 3), 50, np.uint8)
  mask = np.zeros((6, 8), np.uint8)
  mask[2:4, 3:6] = 255
  background = np.full((3, 5, 3), (10, 220, 30), np.uint8)
  out = dt.composite_background(image, mask, [background],
                                np.random.default_rng(0), prob=1.0)
  np.testing.assert_array_equal(out[mask > 0], image[mask > 0])
  np.testing.assert_array_equal(out[mask == 0],
                                np.broadcast_to((10, 220, 30), (48 - 6, 3)))
  same = dt.composite_background(image, mask, [background],
                                 np.random.default_rng(0), prob=0.0)
  np.testing.assert_array_equal(same, image)
  np.testing.assert_array_equal(
      dt.composite_background(image, mask, None, np.random.default_rng(0), 1.0),
      image)


def test_photometric_skipping_every_step_returns_the_input():
  image = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
  out = photometric.photometric_distortion(image, ScriptedRng(default_integer=0))
  np.testing.assert_array_equal(out, image)


def test_photometric_brightness_only_hand_computed():
  image = np.array([[[0, 100, 250]]], np.uint8)
  # brightness on (+10.5), contrast last, saturation off, hue off, contrast off.
  rng = ScriptedRng(integers=[1, 0, 0, 0, 0], uniforms=[10.5])
  out = photometric.photometric_distortion(image, rng)
  np.testing.assert_array_equal(out, [[[10, 110, 255]]])  # truncated, clipped


def test_photometric_hue_shift_of_gray_is_identity_and_deterministic():
  gray = np.full((4, 4, 3), 90, np.uint8)
  rng = ScriptedRng(integers=[0, 0, 0, 1, 7, 0])  # only hue, shift 7
  np.testing.assert_array_equal(photometric.photometric_distortion(gray, rng),
                                gray)
  image = np.random.default_rng(1).integers(0, 256, (16, 12, 3), dtype=np.uint8)
  outs = [photometric.photometric_distortion(image, np.random.default_rng(s))
          for s in (3, 3, 4)]
  np.testing.assert_array_equal(outs[0], outs[1])
  for out in outs:
    assert out.dtype == np.uint8 and out.shape == image.shape
  changed = [photometric.photometric_distortion(image, np.random.default_rng(s))
             for s in range(8)]
  assert any(not np.array_equal(out, image) for out in changed)


def test_photometric_rejects_non_uint8():
  with pytest.raises(ValueError, match="uint8"):
    photometric.photometric_distortion(np.zeros((2, 2, 3), np.float32),
                                       np.random.default_rng(0))


# --- task recipes --------------------------------------------------------------


def person_sample(height=48, width=64, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  label = np.zeros((height, width), np.uint8)
  label[10:40, 20:30] = 5
  label[10:40, 30:44] = 14
  label[5:10, 25:40] = 2
  mask = (label > 0).astype(np.uint8)
  depth = rng.uniform(1, 3, (height, width)).astype(np.float32)
  normal = rng.normal(size=(height, width, 3)).astype(np.float32)
  return image, label, mask, depth, normal


def test_seg_train_sample_shapes_values_and_reproducibility():
  image, label, *_ = person_sample()
  backgrounds = [np.full((20, 30, 3), 9, np.uint8)]
  outs = [dt.seg_train_sample(image, {"label": label}, np.random.default_rng(s),
                              swap_pairs=GOLIATH_SWAPS, size=(32, 24),
                              background_images=backgrounds)
          for s in (0, 0, 1, 2, 3)]
  for out in outs:
    assert out["image"].shape == (32, 24, 3) and out["image"].dtype == np.uint8
    assert out["label"].shape == (32, 24) and out["label"].dtype == np.int32
    assert set(np.unique(out["label"])) <= {0, 2, 5, 14}
  np.testing.assert_array_equal(outs[0]["image"], outs[1]["image"])
  np.testing.assert_array_equal(outs[0]["label"], outs[1]["label"])
  with pytest.raises(TypeError):
    dt.seg_train_sample(image, {"label": label}, np.random.default_rng(0))


def test_depth_and_normal_train_samples():
  image, _, mask, depth, normal = person_sample()
  for s in range(4):
    out = dt.depth_train_sample(image, {"mask": mask == 1, "depth": depth},
                                np.random.default_rng(s), size=(32, 24))
    assert out["image"].shape == (32, 24, 3)
    assert out["depth"].shape == (32, 24) and out["depth"].dtype == np.float32
    foreground = out["depth"][out["depth"] != -1]
    assert foreground.size and foreground.min() == 0 and foreground.max() == 1
    out = dt.normal_train_sample(image, {"mask": mask, "normal": normal},
                                 np.random.default_rng(s), size=(32, 24))
    assert out["normal"].shape == (32, 24, 3)
    valid = out["normal"][..., 0] > -100
    assert valid.any() and (out["normal"][~valid] == -1000).all()
    np.testing.assert_allclose(np.linalg.norm(out["normal"][valid], axis=-1),
                               1, rtol=1e-5)


def test_scale_range_sets_the_random_resize_ratio():
  """A crop shrunk by the ratio is stretched back to the network size, so a ratio below 1 costs
  detail: a 1-pixel checkerboard of foreground survives ratio 1 and turns into blocks at 1/4."""
  height, width = 48, 64
  image = np.zeros((height, width, 3), np.uint8)
  mask = (np.add.outer(np.arange(height), np.arange(width)) % 2).astype(np.uint8)
  normal = np.zeros((height, width, 3), np.float32)
  normal[..., 2] = 1
  changes = {}
  for ratio in (1.0, 0.25):
    out = dt.normal_train_sample(image, {"mask": mask, "normal": normal}, np.random.default_rng(0),
                                 size=(height, width), ratio_range=(ratio, ratio))
    valid = out["normal"][..., 0] > -100
    changes[ratio] = int(np.sum(valid[:, 1:] != valid[:, :-1]))
  assert changes[1.0] == height * (width - 1)
  assert changes[0.25] <= height * (width - 1) / 4


def test_a_bad_scale_range_names_the_field():
  config = ml_collections.ConfigDict({"task": "seg", "recipe": "sapiens", "image_size": (64, 48), "data": {
      "backgrounds": "", "labels": "seg28", "scale_range": (2.0, 0.5)}})
  with pytest.raises(ValueError, match=r"data\.scale_range"):
    tasks.get("seg").train_example(config, source=None)
  config.data.scale_range = ("x", 1)
  with pytest.raises(ValueError, match=r"data\.scale_range"):
    tasks.get("seg").train_example(config, source=None)


def test_eval_samples_are_deterministic_resizes():
  image, label, mask, depth, normal = person_sample()
  out = dt.seg_eval_sample(image, {"label": label}, size=(24, 32))
  np.testing.assert_array_equal(out["label"], label[::2, ::2])
  out = dt.depth_eval_sample(image, {"mask": mask, "depth": depth},
                             size=(48, 64))
  np.testing.assert_array_equal(out["depth"], dt.depth_target(depth, mask))
  out = dt.normal_eval_sample(image, {"mask": mask, "normal": normal},
                              size=(48, 64))
  np.testing.assert_array_equal(out["normal"], dt.normal_target(normal, mask))
  assert out["image"].shape == (48, 64, 3)


def test_recipes_reject_bad_targets():
  image, label, mask, depth, _ = person_sample()
  with pytest.raises(ValueError, match="missing"):
    dt.depth_train_sample(image, {"depth": depth}, np.random.default_rng(0))
  with pytest.raises(ValueError, match=r"\(24, 32\)"):
    dt.seg_eval_sample(image, {"label": label[::2, ::2]})


# --- DenseSource ---------------------------------------------------------------


def write_png(path, pixels, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = Image.fromarray(pixels)
  if mode == "P":
    image = image.convert("P")
    image.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    image.frombytes(pixels.tobytes())  # keep the values as palette indices
  image.save(path)


def write_npy(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.save(path, array)


def make_dataset(root, names=("a", "b"), height=6, width=8):
  for i, name in enumerate(names):
    write_png(os.path.join(root, "images", f"{name}.png"),
              np.full((height, width, 3), 40 * i, np.uint8))
    label = np.zeros((height, width), np.uint8)
    label[2:4, 2:6] = 5 + i
    write_png(os.path.join(root, "segs", f"{name}.png"), label)
    write_png(os.path.join(root, "masks", f"{name}.png"),
              (label > 0).astype(np.uint8) * 255)
    write_npy(os.path.join(root, "depths", f"{name}.npy"),
              np.full((height, width), 2.0 + i, np.float32))
    write_npy(os.path.join(root, "normals", f"{name}.npy"),
              np.tile(np.float32([0, 0, 1]), (height, width, 1)))
  return str(root)


def source_with(tmp_path, task, relative_path, array):
  """`task`'s source over a fresh dataset with one file replaced by `array`."""
  root = make_dataset(tmp_path)
  write = write_npy if relative_path.endswith(".npy") else write_png
  write(os.path.join(root, relative_path), array)
  return dense_source.DenseSource(root, tasks.get(task).LAYOUT)


def test_dense_source_lists_and_loads_each_task(tmp_path):
  root = make_dataset(tmp_path)
  seg = dense_source.DenseSource(root, tasks.get("seg").LAYOUT)
  assert len(seg) == 2 and [e["name"] for e in seg.elements] == ["a", "b"]
  image, targets = seg.load(seg[1])
  assert image.shape == (6, 8, 3) and image[0, 0, 0] == 40
  assert targets["label"].dtype == np.uint8 and targets["label"][2, 2] == 6
  image, targets = dense_source.DenseSource(root, tasks.get("depth").LAYOUT).load(
      dense_source.DenseSource(root, tasks.get("depth").LAYOUT)[0])
  assert set(targets) == {"mask", "depth"} and targets["mask"].sum() == 8
  normal = dense_source.DenseSource(root, tasks.get("normal").LAYOUT)
  assert normal[0]["normal_path"].endswith(os.path.join("normals", "a.npy"))
  assert normal.load(normal[0])[1]["normal"].shape == (6, 8, 3)


def test_dense_source_missing_label_file(tmp_path):
  root = make_dataset(tmp_path, names=("a", "b", "c"))
  os.remove(os.path.join(root, "segs", "b.png"))
  with pytest.raises(dense_source.DataError, match=r"segs.b\.png"):
    dense_source.DenseSource(root, tasks.get("seg").LAYOUT)
  source = dense_source.DenseSource(root, tasks.get("seg").LAYOUT, on_missing="skip")
  assert [e["name"] for e in source.elements] == ["a", "c"]
  assert source.num_skipped == 1
  assert len(dense_source.DenseSource(root, tasks.get("depth").LAYOUT)) == 3


@pytest.mark.parametrize("task, path, array, message", [
    ("depth", "depths/a.npy", np.ones((6, 9), np.float32),
     r"depths.a\.npy.*9x6.*images.a\.png.*8x6"),  # size mismatch
    ("seg", "segs/a.png", np.zeros((6, 8, 3), np.uint8), r"segs.a\.png.*'RGB'"),
    ("normal", "normals/a.npy", np.ones((6, 8), np.float32),
     r"normals.a\.npy.*\(H, W, 3\)"),
    ("normal", "normals/a.npy", np.ones((6, 8, 3), np.int64),
     r"normals.a\.npy.*float"),
    ("depth", "depths/a.npy", np.full((6, 8), np.nan, np.float32),
     r"depths.a\.npy.*no valid foreground.*NaN"),
])
def test_dense_source_load_errors_name_the_file(tmp_path, task, path, array,
                                                message):
  source = source_with(tmp_path, task, path, array)
  with pytest.raises(dense_source.DataError, match=message):
    source.load(source[0])
  source.load(source[1])  # the other sample is still fine


def test_dense_source_reads_palette_labels_as_indices(tmp_path):
  root = make_dataset(tmp_path)
  label = np.arange(48, dtype=np.uint8).reshape(6, 8)
  write_png(os.path.join(root, "segs", "a.png"), label, mode="P")
  source = dense_source.DenseSource(root, tasks.get("seg").LAYOUT)
  np.testing.assert_array_equal(source.load(source[0])[1]["label"], label)


def test_dense_source_nan_depth_becomes_background(tmp_path):
  depth = np.full((6, 8), 2.0, np.float32)
  depth[2, 2] = np.nan
  depth[3, 5] = np.inf
  source = source_with(tmp_path, "depth", "depths/a.npy", depth)
  _, targets = source.load(source[0])
  assert targets["mask"].sum() == 6
  assert targets["mask"][2, 2] == 0 and targets["mask"][3, 5] == 0


def test_dense_source_corrupt_image_and_bad_arguments(tmp_path):
  root = make_dataset(tmp_path)
  with open(os.path.join(root, "images", "a.png"), "wb") as f:
    f.write(b"not a png")
  source = dense_source.DenseSource(root, tasks.get("seg").LAYOUT)
  with pytest.raises(dense_source.DataError, match=r"images.a\.png"):
    source.load(source[0])
  with pytest.raises(ValueError, match="on_missing"):
    dense_source.DenseSource(root, tasks.get("seg").LAYOUT, on_missing="ignore")
  with pytest.raises(dense_source.DataError, match="does not exist"):
    dense_source.DenseSource(os.path.join(root, "nowhere"), tasks.get("seg").LAYOUT)
