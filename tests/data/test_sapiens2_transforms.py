"""Tests for sapiens_jax.data.sapiens2_transforms and the seg29 taxonomy (reference §3.0, §3.1, §3.3, §3.4)."""
import numpy as np
import pytest

from sapiens_jax.data import meta
from sapiens_jax.data import sapiens2_transforms as st
from sapiens_jax.data import synthetic_humans

# Reference §3.1, by id.
SEG29_CLASSES = (
    "Background Apparel Eyeglass Face_Neck Hair Left_Foot Left_Hand Left_Lower_Arm Left_Lower_Leg Left_Shoe"
    " Left_Sock Left_Upper_Arm Left_Upper_Leg Lower_Clothing Right_Foot Right_Hand Right_Lower_Arm"
    " Right_Lower_Leg Right_Shoe Right_Sock Right_Upper_Arm Right_Upper_Leg Torso Upper_Clothing Lower_Lip"
    " Upper_Lip Lower_Teeth Upper_Teeth Tongue").split()
SEG29_CLASS_WEIGHT = [0.1, 10, 10, 3, 2, 4, 4, 2, 2, 6, 10, 3, 3, 1, 4, 4, 2, 2, 6, 10, 3, 3, 1, 1, 10, 10, 10,
                      10, 10]

# A tilted plane seen by a camera with distinct fx/fy and an off-centre principal point.
HEIGHT, WIDTH = 48, 40
K = np.array([[60.0, 0.0, 21.3], [0.0, 64.0, 22.7], [0.0, 0.0, 1.0]])
PLANE_NORMAL, PLANE_OFFSET = np.array([0.25, -0.15, 1.0]), 2.0  # points P with n . P = d
REPROJECTION_TOLERANCE = 0.01  # pixels; a half-pixel-convention slip of K is >= 0.1 px here


def plane_depth():
  rays = st.back_project(np.ones((HEIGHT, WIDTH)), K)
  return PLANE_OFFSET / (rays @ PLANE_NORMAL)


def pixel_grid(height, width):
  """(H, W, 2) pixel (u, v) = (column, row)."""
  rows, cols = np.mgrid[0:height, 0:width]
  return np.stack([cols, rows], axis=-1).astype(np.float64)


def interior(height, width, border):
  """Where a bilinear upscale interpolates rather than clamps at the image edge."""
  keep = np.zeros((height, width), bool)
  keep[border:height - border, border:width - border] = True
  return keep


# --- seg29 -----------------------------------------------------------------------------------------------------


def test_seg29_facts_and_swaps_pair_every_left_right_class():
  c = meta.seg_classes("seg29")
  assert list(c.names) == SEG29_CLASSES
  np.testing.assert_array_equal(c.class_weight, np.float32(SEG29_CLASS_WEIGHT))
  assert c.swap_pairs == tuple((i, i + 9) for i in range(5, 13))  # §3.1: 5<->14 ... 12<->21
  sided = {i for i, name in enumerate(c.names) if name.startswith(("Left_", "Right_"))}
  assert {i for pair in c.swap_pairs for i in pair} == sided
  for left, right in c.swap_pairs:
    assert c.names[left] == "Left_" + c.names[right][len("Right_"):]
  assert c.palette.shape == (29, 3) and len({tuple(p) for p in c.palette.tolist()}) == 29
  seg28 = meta.seg_classes("seg28")  # upstream DOME_CLASSES_28: seg29 without Eyeglass, same colours
  for name, colour in zip(seg28.names, seg28.palette.tolist()):
    assert c.palette[c.names.index(name)].tolist() == colour, name


# --- K under geometric transforms --------------------------------------------------------------------------------


def _resized(size):
  pointmap = st.resample(st.back_project(plane_depth(), K), size, st.LINEAR)
  return pointmap, st.scale_intrinsics(K, size[1] / WIDTH, size[0] / HEIGHT), interior(*size, 1)


def _padded(top, bottom, left, right):
  pointmap = np.pad(st.back_project(plane_depth(), K), ((top, bottom), (left, right), (0, 0)))
  valid = np.zeros(pointmap.shape[:2], bool)
  valid[top:top + HEIGHT, left:left + WIDTH] = True
  return pointmap, st.pad_intrinsics(K, top, left), valid


def _cropped(top, left, height, width):
  pointmap = st.back_project(plane_depth(), K)[top:top + height, left:left + width]
  return pointmap, st.crop_intrinsics(K, top, left), np.ones((height, width), bool)


def _flipped():
  pointmap = st.flip_pointmap(st.back_project(plane_depth(), K))
  return pointmap, st.flip_intrinsics(K, WIDTH), np.ones((HEIGHT, WIDTH), bool)


def _resize_padded(size):
  _, targets, padding = st.resize_pad(np.zeros((HEIGHT, WIDTH, 3), np.uint8),
                                      {"pointmap": st.back_project(plane_depth(), K)}, size,
                                      kinds={"pointmap": st.LINEAR})
  valid = np.zeros(size, bool)
  valid[padding.top + 1:size[0] - padding.bottom - 1, padding.left + 1:size[1] - padding.right - 1] = True
  return targets["pointmap"], st.resize_pad_intrinsics(K, padding), valid


def _composed():
  """crop -> flip -> resize -> pad, K updated at each step."""
  pointmap, k = st.back_project(plane_depth(), K)[4:40, 3:35], st.crop_intrinsics(K, 4, 3)
  pointmap, k = st.flip_pointmap(pointmap), st.flip_intrinsics(k, 32)
  pointmap, k = st.resample(pointmap, (27, 24), st.LINEAR), st.scale_intrinsics(k, 24 / 32, 27 / 36)
  pointmap, k = np.pad(pointmap, ((2, 1), (5, 0), (0, 0))), st.pad_intrinsics(k, 2, 5)
  valid = np.zeros(pointmap.shape[:2], bool)
  valid[2:29, 5:29] = True
  return pointmap, k, valid


@pytest.mark.parametrize("transform", [
    lambda: (st.back_project(plane_depth(), K), K, np.ones((HEIGHT, WIDTH), bool)),
    lambda: _resized((24, 20)), lambda: _resized((72, 60)), lambda: _resized((31, 53)),
    lambda: _padded(3, 5, 7, 2), lambda: _cropped(5, 9, 30, 20), _flipped,
    lambda: _resize_padded((64, 64)), lambda: _resize_padded((20, 50)), _composed,
], ids=["identity", "downscale", "upscale", "anisotropic", "pad", "crop", "flip", "resize_pad_tall",
        "resize_pad_wide", "composed"])
def test_transformed_pointmap_projects_onto_the_transformed_pixel_grid(transform):
  pointmap, k, valid = transform()
  error = np.abs(st.project(pointmap[valid], k) - pixel_grid(*pointmap.shape[:2])[valid])
  assert valid.sum() > 100 and error.max() < REPROJECTION_TOLERANCE


def test_upstream_style_resize_of_k_misses_the_grid():
  """cx' = s cx (upstream) is off by (s - 1) / 2 px: the invariant above detects the convention."""
  pointmap, k, valid = _resized((24, 20))
  k[0, 2], k[1, 2] = K[0, 2] * 0.5, K[1, 2] * 0.5
  error = np.abs(st.project(pointmap[valid], k) - pixel_grid(24, 20)[valid])
  assert error.max() > 0.2


def test_intrinsics_maps_compose_and_invert():
  np.testing.assert_allclose(st.scale_intrinsics(st.scale_intrinsics(K, 0.4, 3.0), 2.5, 1 / 3), K, atol=1e-12)
  np.testing.assert_allclose(st.crop_intrinsics(st.pad_intrinsics(K, 4, 7), 4, 7), K)
  skewed = K.copy()
  skewed[0, 1] = 0.5
  flipped = st.flip_intrinsics(skewed, WIDTH)
  assert flipped[0, 0] == K[0, 0] and flipped[0, 1] == -0.5 and flipped[0, 2] == WIDTH - 1 - K[0, 2]
  np.testing.assert_allclose(st.flip_intrinsics(flipped, WIDTH), skewed)
  with pytest.raises(ValueError, match="3x3"):
    st.pad_intrinsics(np.eye(4), 1, 1)


def test_flip_extrinsics_negates_camera_x():
  rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
  extrinsics = np.concatenate([rotation, [[0.1], [0.2], [3.0]]], axis=1)
  world = np.array([0.3, -0.4, 1.5, 1.0])
  camera = extrinsics @ world
  np.testing.assert_allclose(st.flip_extrinsics(extrinsics) @ world, camera * [-1, 1, 1])


# --- canonical camera --------------------------------------------------------------------------------------------


def test_canonical_pointmap_scales_by_canonical_focal_over_fx():
  depth, mask = plane_depth(), np.zeros((HEIGHT, WIDTH), np.uint8)
  mask[10:40, 5:30] = 1
  depth[12, 6] = np.nan  # unknown depth inside the mask: 0, like the background
  pointmap, scale, k_canonical = st.canonical_pointmap(depth, mask, K)
  assert pointmap.dtype == np.float32 and scale == pytest.approx(768 / 60.0)
  camera = synthetic_humans.Camera(fx=K[0, 0], fy=K[1, 1], cx=K[0, 2], cy=K[1, 2])
  valid = (mask > 0) & np.isfinite(depth)
  expected = scale * np.where(valid[..., None], synthetic_humans.pointmap(np.nan_to_num(depth), camera), 0)
  np.testing.assert_allclose(pointmap, expected, rtol=1e-6)
  assert not pointmap[~valid].any()
  # Canonical K: focal 768, fy by the same factor; it is the camera of the photo resized by scale.
  assert k_canonical[0, 0] == pytest.approx(768.0) and k_canonical[1, 1] == pytest.approx(K[1, 1] * scale)
  np.testing.assert_allclose(st.project(pointmap[valid], k_canonical),
                             scale * (pixel_grid(HEIGHT, WIDTH)[valid] + 0.5) - 0.5, atol=1e-3)
  np.testing.assert_allclose(st.project(pointmap[valid], K), pixel_grid(HEIGHT, WIDTH)[valid], atol=1e-4)
  metric = st.metric_from_canonical(pointmap, scale)
  np.testing.assert_allclose(metric[valid], st.back_project(depth, K)[valid], rtol=1e-6)


def test_metric_from_canonical_per_image_scale():
  pointmaps = np.stack([np.full((4, 5, 3), 12.0), np.full((4, 5, 3), 3.0)])
  expected = np.stack([np.full((4, 5, 3), 3.0), np.full((4, 5, 3), 2.0)])
  np.testing.assert_allclose(st.metric_from_canonical(pointmaps, np.array([4.0, 1.5])), expected)
  np.testing.assert_allclose(st.metric_from_canonical(pointmaps, np.array([[4.0], [1.5]])), expected)


# --- resize_pad / unpad --------------------------------------------------------------------------------------------


def smooth_map(height, width):
  rows, cols = np.mgrid[0:height, 0:width] + 0.5
  return np.stack([np.sin(np.pi * cols / width) * np.cos(np.pi * rows / height), rows / height], -1)


def test_resize_pad_centres_the_photo_with_the_odd_pixel_bottom_right():
  image = np.full((30, 50, 3), 200, np.uint8)
  label = np.full((30, 50), 7, np.uint8)
  padded, targets, padding = st.resize_pad(image, {"label": label}, (64, 48))
  # 0.96 = min(64 / 30, 48 / 50): 30 x 50 -> 29 x 48, 35 rows of pad split 17 above, 18 below.
  assert padding == st.Padding(top=17, bottom=18, left=0, right=0, scale_y=29 / 30, scale_x=48 / 50)
  assert padded.shape == (64, 48, 3) and targets["label"].shape == (64, 48)
  inside = np.zeros((64, 48), bool)
  inside[17:46] = True
  assert (padded[inside] == 200).all() and not padded[~inside].any()
  assert (targets["label"][inside] == 7).all() and not targets["label"][~inside].any()
  _, _, wide = st.resize_pad(np.zeros((10, 10, 3), np.uint8), {}, (8, 13))
  assert (wide.left, wide.right) == (2, 3)


@pytest.mark.parametrize("original,size", [((60, 100), (128, 96)), ((20, 30), (128, 96)), ((300, 200), (1024, 768))])
def test_unpad_inverts_resize_pad_on_a_smooth_map(original, size):
  field = smooth_map(*original).astype(np.float32)
  _, targets, padding = st.resize_pad(np.zeros(original + (3,), np.uint8), {"albedo": field}, size)
  assert targets["albedo"].shape == size + (2,)
  restored = st.unpad(targets["albedo"], padding, original)
  assert restored.shape == field.shape
  # Bilinear both ways: about (pixel pitch)^2 |f''| on a half-period sine; the edges clamp.
  np.testing.assert_allclose(restored[1:-1, 1:-1], field[1:-1, 1:-1], atol=0.02)


def test_nearest_targets_keep_their_values_and_dtype():
  label = np.random.default_rng(0).integers(0, 29, (30, 40)).astype(np.int64)
  mask = label > 10
  _, targets, padding = st.resize_pad(np.zeros((30, 40, 3), np.uint8), {"label": label, "mask": mask}, (50, 50))
  assert targets["label"].dtype == np.int64 and targets["mask"].dtype == bool
  assert set(np.unique(targets["label"])) <= set(np.unique(label)) | {0}
  np.testing.assert_array_equal(targets["mask"], targets["label"] > 10)
  restored = st.unpad(targets["label"], padding, (30, 40), kind=st.NEAREST)
  assert restored.dtype == np.int64 and set(np.unique(restored)) <= set(np.unique(label))
  # Nearest picks the source pixel whose centre is nearest: a 2x downscale takes pixels 1, 3, 5, ...
  np.testing.assert_array_equal(st.resample(np.arange(8)[None], (1, 4), st.NEAREST), [[1, 3, 5, 7]])


def test_targets_without_a_kind_are_rejected():
  with pytest.raises(ValueError, match="uv"):
    st.resize(np.zeros((4, 4, 3), np.uint8), {"uv": np.zeros((4, 4, 2))}, (8, 8))
  _, targets = st.resize(np.zeros((4, 4, 3), np.uint8), {"uv": np.zeros((4, 4, 1))}, (8, 8),
                         kinds={"uv": st.LINEAR})
  assert targets["uv"].shape == (8, 8, 1)


# --- sample filters ------------------------------------------------------------------------------------------------


def _mask(count, height=10, width=10):
  mask = np.zeros(height * width, np.uint8)
  mask[:count] = 1
  return mask.reshape(height, width)


@pytest.mark.parametrize("count,ok", [(15, False), (16, True), (96, True), (97, False)])
def test_pointmap_filter_pixel_count_and_foreground_bounds(count, ok):
  assert st.pointmap_sample_ok(np.ones((10, 10)), _mask(count)) is ok


def test_pointmap_filter_exact_foreground_fraction_on_another_size():
  assert st.pointmap_sample_ok(np.ones((50, 50)), _mask(2400, 50, 50))  # 96 % exactly
  assert not st.pointmap_sample_ok(np.ones((50, 50)), _mask(2401, 50, 50))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pointmap_filter_minimum_depth(dtype):
  mask = _mask(50)
  depth = np.full((10, 10), 0.5, dtype)
  depth[9, 9] = 0.0  # background depth does not count
  depth[0, 0] = 0.04
  assert st.pointmap_sample_ok(depth, mask)
  assert st.pointmap_sample_ok(depth, mask, min_depth=np.float64(0.04))  # compared at the depth's precision
  depth[0, 0] = 0.0399
  assert not st.pointmap_sample_ok(depth, mask)
  depth[0, 0] = np.nan
  assert not st.pointmap_sample_ok(depth, mask)


def test_albedo_filter_needs_texture_inside_the_mask():
  mask = _mask(50)
  albedo = np.full((10, 10, 3), 0.5)
  albedo[5:] = 0.0  # outside the mask: ignored
  assert not st.albedo_sample_ok(albedo, mask)
  albedo[:5, ::2, 1] = 0.5 + 2 * 0.0199  # std 0.0199 in one channel: half the mask pixels 2 std off
  assert not st.albedo_sample_ok(albedo, mask)
  albedo[:5, ::2, 1] = 0.5 + 2 * 0.0201
  assert st.albedo_sample_ok(albedo, mask)
  texture = np.where(albedo > 0.52, 140, 128).astype(np.uint8)  # uint8 is read as / 255: std 6 / 255
  assert st.albedo_sample_ok(texture, mask) and not st.albedo_sample_ok(texture // 2 + 64, mask)
  assert not st.albedo_sample_ok(albedo, np.zeros((10, 10)))
