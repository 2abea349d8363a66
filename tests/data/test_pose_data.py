"""Tests for top-down pose data: pose_transforms and the COCO keypoint source."""
import json
import math
import os
import re

import numpy as np
import pytest

from sapiens_jax.data import coco_source
from sapiens_jax.data import heatmaps
from sapiens_jax.data import pose_transforms

# COCO-17, built here rather than read from the package's skeleton metadata.
COCO_FLIP = np.array([0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15])
UPPER = list(range(11))
LOWER = list(range(11, 17))
INPUT = (48, 64)
HEATMAP = (12, 16)
SIGMA = 2.0


# ---------------------------------------------------------------- boxes, flip


def test_box_to_center_scale_grows_the_short_side():
  center, scale = pose_transforms.box_to_center_scale([10, 20, 30, 80])
  np.testing.assert_allclose(center, [25, 60])
  np.testing.assert_allclose(scale, [75, 100])  # padded (37.5, 100), w grown
  center, scale = pose_transforms.box_to_center_scale([0, 0, 100, 20])
  np.testing.assert_allclose(center, [50, 10])
  np.testing.assert_allclose(scale, [125, 125 / 0.75])  # padded (125, 25)
  _, scale = pose_transforms.box_to_center_scale([0, 0, 100, 20],
                                                 aspect_ratio=None)
  np.testing.assert_allclose(scale, [125, 25])


def test_flip_mirrors_and_swaps_left_right():
  image = np.zeros((4, 10, 3), np.uint8)
  image[1, 2] = 255
  keypoints = np.zeros((17, 2))
  keypoints[1] = [2, 1]  # left eye
  keypoints[2] = [6, 3]  # right eye
  visible = np.zeros(17)
  visible[1] = 1
  out_image, out_keypoints, out_visible, center = pose_transforms.flip(
      image, keypoints, visible, np.array([3.0, 2.0]), COCO_FLIP)
  assert out_image[1, 7].max() == 255 and out_image.sum() == 3 * 255
  np.testing.assert_allclose(out_keypoints[2], [7, 1])  # left eye -> right
  np.testing.assert_allclose(out_keypoints[1], [3, 3])
  assert out_visible[2] == 1 and out_visible[1] == 0
  np.testing.assert_allclose(center, [6, 2])
  assert keypoints[1, 0] == 2  # inputs untouched


def test_flip_then_flip_heatmaps_back_recovers_the_heatmaps():
  rng = np.random.default_rng(0)
  keypoints = rng.uniform([0, 0], [47, 63], size=(17, 2))
  visible = (rng.uniform(size=17) > 0.2).astype(np.float32)
  image = np.zeros((64, 48, 3), np.uint8)
  expected, weight = heatmaps.encode(keypoints, visible, INPUT, HEATMAP, SIGMA)
  _, flipped_keypoints, flipped_visible, _ = pose_transforms.flip(
      image, keypoints, visible, np.zeros(2), COCO_FLIP)
  flipped, flipped_weight = heatmaps.encode(
      flipped_keypoints, flipped_visible, INPUT, HEATMAP, SIGMA)
  np.testing.assert_allclose(heatmaps.flip_heatmaps_back(flipped, COCO_FLIP),
                             expected, atol=1e-6)
  np.testing.assert_array_equal(flipped_weight[COCO_FLIP], weight)


# ---------------------------------------------------------------- affine


def test_affine_maps_box_centre_and_edges():
  center, scale = np.array([50.0, 40.0]), np.array([30.0, 40.0])
  matrix = pose_transforms.udp_affine_matrix(center, scale, 0.0, INPUT)
  points = [center, center + [15, 0], center - [15, 20]]
  np.testing.assert_allclose(
      pose_transforms.transform_points(points, matrix),
      [[23.5, 31.5], [47, 31.5], [0, 0]], atol=1e-9)


def test_affine_rotation_of_90_degrees_by_hand():
  # Scale (30, 40) onto a 31 x 41 output: one output pixel per image pixel.
  center, scale = np.array([50.0, 40.0]), np.array([30.0, 40.0])
  matrix = pose_transforms.udp_affine_matrix(center, scale, 90.0, (31, 41))
  # Offset (5, 3) turns into (-3, 5) around the output centre (15, 20).
  np.testing.assert_allclose(
      pose_transforms.transform_points([[55, 43], [50, 40]], matrix),
      [[12, 25], [15, 20]], atol=1e-9)


def test_warp_moves_a_bright_pixel_where_transform_points_says():
  image = np.zeros((80, 60, 3), np.uint8)
  source = np.array([33, 47])
  image[source[1], source[0]] = 255
  # A 2x enlargement with a 30 degree turn: the dot becomes a small blob.
  matrix = pose_transforms.udp_affine_matrix(
      np.array([30.0, 40.0]), np.array([23.5, 31.5]), 30.0, INPUT)
  warped = pose_transforms.warp(image, matrix, INPUT)
  assert warped.shape == (64, 48, 3) and warped.dtype == np.uint8
  weights = warped[..., 0].astype(np.float64)
  ys, xs = np.mgrid[:64, :48]
  centroid = np.array([(weights * xs).sum(), (weights * ys).sum()]) / weights.sum()
  target = pose_transforms.transform_points([source], matrix)[0]
  np.testing.assert_allclose(centroid, target, atol=0.3)


# ---------------------------------------------------------------- random boxes


def half_body_keypoints():
  rng = np.random.default_rng(3)
  keypoints = rng.uniform(0, 100, size=(17, 2))
  visible = np.ones(17)
  visible[[0, 4, 12]] = 0
  return keypoints, visible


@pytest.mark.parametrize("prefer_upper", [True, False])
def test_half_body_box_around_the_chosen_half(prefer_upper):
  keypoints, visible = half_body_keypoints()
  half = pose_transforms.half_body(
      keypoints, visible, UPPER, LOWER, np.random.default_rng(0), prob=1.0,
      upper_prioritized_prob=1.0 if prefer_upper else 0.0)
  ids = [i for i in (UPPER if prefer_upper else LOWER) if visible[i]]
  chosen = keypoints[ids]
  np.testing.assert_allclose(half[0], chosen.mean(axis=0))
  np.testing.assert_allclose(
      half[1], 1.5 * (chosen.max(axis=0) - chosen.min(axis=0)))


def test_half_body_keeps_the_box_when_it_should():
  keypoints, visible = half_body_keypoints()
  rng = np.random.default_rng(0)
  assert pose_transforms.half_body(keypoints, visible, UPPER, LOWER, rng,
                                   prob=0.0) is None
  few = np.zeros(17)
  few[:8] = 1  # 8 < min_total 9
  assert pose_transforms.half_body(keypoints, few, UPPER, LOWER, rng,
                                   prob=1.0) is None
  # Only 2 lower keypoints (< 3): the upper half even when lower is preferred.
  upper_only = np.ones(17)
  upper_only[13:] = 0
  center, _ = pose_transforms.half_body(
      keypoints, upper_only, UPPER, LOWER, rng, prob=1.0,
      upper_prioritized_prob=0.0)
  np.testing.assert_allclose(center, keypoints[:11].mean(axis=0))


def test_truncated_normal_statistics():
  values = pose_transforms.truncated_normal(np.random.default_rng(0), 40000)
  assert np.abs(values).max() <= 1
  # Standard normal conditioned on [-1, 1]: var = 1 - 2 phi(1) / (2 Phi(1) - 1).
  phi = math.exp(-0.5) / math.sqrt(2 * math.pi)
  mass = math.erf(1 / math.sqrt(2))
  assert abs(values.mean()) < 0.01
  assert abs(values.std() - math.sqrt(1 - 2 * phi / mass)) < 0.01


def test_random_box_transform_ranges_and_probabilities():
  center, scale = np.array([100.0, 80.0]), np.array([40.0, 60.0])
  rng = np.random.default_rng(0)
  same = pose_transforms.random_box_transform(
      center, scale, rng, shift_prob=0, scale_prob=0, rotate_prob=0)
  np.testing.assert_array_equal(same[0], center)
  np.testing.assert_array_equal(same[1], scale)
  assert same[2] == 0
  for _ in range(200):
    new_center, new_scale, rotation = pose_transforms.random_box_transform(
        center, scale, rng, shift_prob=1, rotate_prob=1)
    assert np.all(np.abs(new_center - center) <= 0.16 * scale + 1e-9)
    factor = new_scale / scale
    assert factor[0] == pytest.approx(factor[1])
    assert 0.5 <= factor[0] <= 1.5
    assert -80 <= rotation <= 80


# ---------------------------------------------------------------- albumentations


def test_blurs_keep_flat_images_and_skip_when_not_drawn():
  image = np.full((20, 30, 3), 77, np.uint8)
  rng = np.random.default_rng(0)
  assert pose_transforms.blur(image, rng, p=0.0) is image
  assert pose_transforms.median_blur(image, rng, p=0.0) is image
  np.testing.assert_array_equal(pose_transforms.blur(image, rng, p=1.0), image)
  np.testing.assert_array_equal(
      pose_transforms.median_blur(image, rng, p=1.0), image)


def test_blur_spreads_and_median_removes_a_single_dot():
  image = np.zeros((21, 21, 3), np.uint8)
  image[10, 10] = 245
  rng = np.random.default_rng(1)
  blurred = pose_transforms.blur(image, rng, p=1.0)
  size = math.isqrt(int(np.count_nonzero(blurred[..., 0])))
  assert size in (3, 5, 7)
  np.testing.assert_array_equal(blurred[..., 0] > 0,
                                np.pad(np.ones((size, size), bool),
                                       (21 - size) // 2))
  assert not pose_transforms.median_blur(image, rng, p=1.0).any()


def test_coarse_dropout_zeroes_one_rectangle():
  rng = np.random.default_rng(0)
  for _ in range(20):
    image = np.full((50, 40, 3), 255, np.uint8)
    out = pose_transforms.coarse_dropout(image, rng)
    rows, cols = np.nonzero(out[..., 0] == 0)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert len(rows) == height * width  # one solid rectangle
    assert 10 <= height <= 20 and 8 <= width <= 16
    assert np.all(out[rows, cols] == 0)
    assert image.min() == 255  # input untouched


# ---------------------------------------------------------------- samples


def ramp_image(height=120, width=100):
  """Red = 2x, green = 2y, blue = 200: a pixel's colour says where it came from."""
  ys, xs = np.mgrid[:height, :width]
  return np.stack([2 * xs, 2 * ys, np.full_like(xs, 200)], axis=-1).astype(
      np.uint8)


def test_topdown_train_sample_geometry_and_weights():
  rng = np.random.default_rng(5)
  keypoints = np.stack([rng.uniform(35, 65, 17), rng.uniform(35, 85, 17)], 1)
  visible = np.ones(17, np.float32)
  visible[3] = 0
  seen = []

  def photometric(image, rng):
    del rng
    seen.append((image.dtype, image.shape))
    return image

  grid = np.array([47 / 11, 63 / 15])
  for seed in range(8):
    sample = pose_transforms.topdown_train_sample(
        ramp_image(), [30, 30, 40, 60], keypoints, visible,
        np.random.default_rng(seed), flip_indices=COCO_FLIP, upper_ids=UPPER,
        lower_ids=LOWER, input_size=INPUT, heatmap_size=HEATMAP, sigma=SIGMA,
        photometric=photometric)
    assert sample["image"].shape == (64, 48, 3)
    assert sample["image"].dtype == np.uint8
    assert sample["heatmaps"].shape == (16, 12, 17)
    assert sample["target_weight"].shape == (17,)
    assert sample["keypoints_in"].shape == (17, 2)
    kp_in = sample["keypoints_in"].astype(np.float64)
    inside = np.all((kp_in >= 0) & (kp_in <= [47, 63]), axis=1)
    weight = sample["target_weight"]
    # Visible keypoints inside the crop keep weight 1; the invisible one (id 3,
    # or 4 after a flip) has weight 0.
    assert weight[3] == 0 or weight[4] == 0
    assert set(np.nonzero(inside & (weight == 0))[0]) <= {3, 4}
    for k in np.nonzero(inside & (weight > 0))[0]:
      peak = np.unravel_index(np.argmax(sample["heatmaps"][..., k]), (16, 12))
      np.testing.assert_allclose(peak[::-1], kp_in[k] / grid, atol=0.51)
    # The crop's colour at each keypoint names the source pixel: either the
    # keypoint itself, or (after a flip) its mirror partner.
    margin = (kp_in >= 4) & (kp_in <= [43, 59])
    checked = np.all(margin, axis=1)
    colours = sample["image"][np.round(kp_in[checked, 1]).astype(int),
                              np.round(kp_in[checked, 0]).astype(int)]
    not_dropped = colours[:, 2] > 0
    source = colours[not_dropped, :2] / 2.0
    direct = keypoints[checked][not_dropped]
    mirrored = keypoints[COCO_FLIP][checked][not_dropped]
    assert (np.abs(source - direct).max() < 2.0
            or np.abs(source - mirrored).max() < 2.0)
  assert seen == [(np.uint8, (64, 48, 3))] * 8


def test_topdown_train_sample_is_reproducible():
  keypoints = np.random.default_rng(0).uniform(30, 70, size=(17, 2))
  kwargs = dict(flip_indices=COCO_FLIP, upper_ids=UPPER, lower_ids=LOWER,
                input_size=INPUT, heatmap_size=HEATMAP, sigma=SIGMA)
  first, second = (pose_transforms.topdown_train_sample(
      ramp_image(), [25, 25, 50, 70], keypoints, np.ones(17),
      np.random.default_rng(7), **kwargs) for _ in range(2))
  for key in first:
    np.testing.assert_array_equal(first[key], second[key])


def test_topdown_eval_sample_centres_the_box():
  sample = pose_transforms.topdown_eval_sample(ramp_image(), [30, 20, 40, 60],
                                               INPUT)
  np.testing.assert_allclose(sample["center"], [50, 50])
  np.testing.assert_allclose(sample["scale"], [56.25, 75])  # padded (50, 75)
  # Crop pixel (x, y) samples the image at
  # center + (x - 23.5, y - 31.5) * (56.25 / 47, 75 / 63).
  crop = sample["image"].astype(np.float64)
  for x, y in ((23, 31), (10, 40), (40, 5)):
    source = np.array([50, 50]) + (np.array([x, y]) - [23.5, 31.5]) * [
        56.25 / 47, 75 / 63]
    np.testing.assert_allclose(crop[y, x, :2] / 2, source, atol=0.6)
  # Pixels mapped from outside the image are black.
  corner = pose_transforms.topdown_eval_sample(ramp_image(), [0, 0, 40, 60],
                                               INPUT)["image"]
  assert not corner[0, 0].any() and corner[63, 47, 2] == 200


# ---------------------------------------------------------------- COCO source

KEYPOINT_NAMES = [f"kp{i}" for i in range(17)]


def coco_keypoints(visible_ids, seed=0):
  rng = np.random.default_rng(seed)
  values = []
  for i in range(17):
    x, y = rng.uniform(0, 50, size=2)
    values += [float(x), float(y), 2 if i in visible_ids else 0]
  return values


def coco_json(annotation_changes=None):
  """2 images, 4 annotations: a person, a crowd, an unlabelled one, a person."""
  annotations = [
      dict(id=11, image_id=1, category_id=1, iscrowd=0, bbox=[5, 6, 20, 30],
           keypoints=coco_keypoints({0, 5, 6})),
      dict(id=12, image_id=1, category_id=1, iscrowd=1, bbox=[0, 0, 10, 10],
           keypoints=coco_keypoints(set(range(17)))),
      dict(id=13, image_id=2, category_id=1, iscrowd=0, bbox=[1, 1, 10, 10],
           keypoints=coco_keypoints(set())),
      dict(id=14, image_id=2, category_id=1, iscrowd=0, bbox=[-5, 50, 30, 90],
           keypoints=coco_keypoints({16}, seed=1)),
  ]
  for annotation in annotations:
    annotation.update((annotation_changes or {}).get(annotation["id"], {}))
  return dict(
      images=[dict(id=1, file_name="a.jpg", width=64, height=48),
              dict(id=2, file_name="sub/b.jpg", width=40, height=100)],
      annotations=annotations,
      categories=[dict(id=1, name="person", keypoints=KEYPOINT_NAMES)])


def write_json(path, content):
  with open(path, "w") as f:
    if isinstance(content, str):
      f.write(content)
    else:
      json.dump(content, f)
  return str(path)


def test_coco_source_elements(tmp_path):
  path = write_json(tmp_path / "ann.json", coco_json())
  source = coco_source.CocoKeypointSource(path, tmp_path / "images")
  assert len(source) == 2
  assert [e["id"] for e in source.images] == [1, 2]
  assert source.images[1] == dict(id=2, file_name="sub/b.jpg", width=40,
                                  height=100)
  first, second = source[0], source[1]
  assert first["annotation_id"] == 11 and first["image_id"] == 1
  assert first["image_name"] == os.path.join(str(tmp_path / "images"), "a.jpg")
  np.testing.assert_array_equal(first["bbox"], [5, 6, 20, 30])
  assert first["bbox"].dtype == np.float32
  expected = np.array(coco_keypoints({0, 5, 6}), np.float32).reshape(17, 3)
  np.testing.assert_array_equal(first["keypoints"], expected[:, :2])
  np.testing.assert_array_equal(first["visible"], expected[:, 2] > 0)
  assert first["visible"].dtype == np.float32
  # Box (-5, 50, 30, 90) on a 40 x 100 image is clipped to x 0..25, y 50..99.
  assert second["annotation_id"] == 14
  np.testing.assert_array_equal(second["bbox"], [0, 50, 25, 49])
  first["keypoints"][:] = -1  # Elements are copies.
  assert source[0]["keypoints"].max() > 0
  (tmp_path / "images").mkdir()
  (tmp_path / "images" / "a.jpg").write_bytes(b"jpeg bytes")
  assert source.read_bytes(source[0]) == b"jpeg bytes"


@pytest.mark.parametrize("changes, message", [
    ({11: dict(keypoints=[1.0] * 50)}, r"annotation id 11 'keypoints'.*51"),
    ({12: dict(keypoints=[0.0] * 54)}, r"annotation id 12 'keypoints'.*51"),
    ({14: dict(keypoints=[float("nan")] + [0.0] * 50)},
     r"annotation id 14 'keypoints'.* contains NaN"),
    ({13: dict(bbox=[0, 0, float("inf"), 4])},
     r"annotation id 13 'bbox' contains NaN or inf"),
    ({11: dict(bbox=[0, 0, 4])}, r"annotation id 11 'bbox' must hold 4"),
    ({14: dict(image_id=99)}, r"annotation id 14 refers to image id 99"),
    ({13: dict(category_id=5)}, r"annotation id 13 has category_id 5"),
])
def test_coco_source_rejects_bad_annotations(tmp_path, changes, message):
  path = write_json(tmp_path / "bad.json", coco_json(changes))
  with pytest.raises(coco_source.CocoAnnotationError) as error:
    coco_source.CocoKeypointSource(path, tmp_path)
  assert "bad.json" in str(error.value)
  assert re.search(message, str(error.value))


def test_coco_source_rejects_missing_or_malformed_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.json"):
    coco_source.CocoKeypointSource(tmp_path / "missing.json", tmp_path)
  path = write_json(tmp_path / "broken.json", '{"images": [')
  with pytest.raises(coco_source.CocoAnnotationError,
                     match="broken.json: malformed JSON"):
    coco_source.CocoKeypointSource(path, tmp_path)
  path = write_json(tmp_path / "partial.json", {"images": [], "annotations": []})
  with pytest.raises(coco_source.CocoAnnotationError, match="'categories'"):
    coco_source.CocoKeypointSource(path, tmp_path)
