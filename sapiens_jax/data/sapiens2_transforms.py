"""Data transforms of the Sapiens2 dense tasks: resize-pad, canonical pointmaps, camera updates, sample filters.

Pixel convention (as sapiens_jax.data.synthetic_humans and losses.intrinsics_consistency_l1): pixel centres are
integers, u = column, v = row, so the image spans [-0.5, W - 0.5] and a camera point projects to
u = fx X / Z + skew Y / Z + cx, v = fy Y / Z + cy. Each geometric change of the pixel grid is an affine map
of pixel coordinates, and K takes the same map (K' = A K), so the transformed pointmap projected with the
transformed K lands on the transformed pixel grid:
  resize by s (= new size / old size, per axis):  u' = s (u + 0.5) - 0.5, the mapping cv2.resize samples by.
    Upstream scales cx by s alone, which is off by (s - 1) / 2 pixels (a 1/4-downscale: 0.375 px).
  pad by (top, left): u' = u + left;  crop at (top, left): u' = u - left;
  horizontal flip: u' = W - 1 - u, with X negated (upstream: "mirrors cx and negates extrinsic row 0"),
    so fx stays positive.

Targets are resampled by kind (`TARGET_KINDS`, overridable per call): "nearest" for labels, masks and the maps
that must not be averaged across the silhouette (depth, normals, pointmaps: a linear blend of person and
background invents points between them, as in dense_transforms), "linear" for smooth maps (albedo, alpha).
Nearest takes the source pixel whose centre is nearest under the convention above, an exact tie going to the
later one (cv2's INTER_NEAREST_EXACT except on ties; plain INTER_NEAREST floors, which shifts a downscale by up
to half a source pixel against the image).

Upstream generates the pointmap last, from the transformed depth and K, so it always agrees with K; do the same:
transform depth and mask, update K alongside, then call `canonical_pointmap`.
"""
from typing import NamedTuple

import cv2
import numpy as np

NEAREST = "nearest"
LINEAR = "linear"
TARGET_KINDS = {"label": NEAREST, "mask": NEAREST, "depth": NEAREST, "normal": NEAREST, "pointmap": NEAREST,
                "albedo": LINEAR, "alpha": LINEAR}
INPUT_SIZE = (1024, 768)  # (H, W) of every Sapiens2 task
CANONICAL_FOCAL = 768.0
# Upstream PointmapPackInputs drops samples outside these (§3.3), and albedo datasets flat albedos (§3.4).
POINTMAP_MIN_PIXELS = 16
POINTMAP_MAX_FOREGROUND = 0.96
POINTMAP_MIN_DEPTH = 0.04
ALBEDO_MIN_STD = 0.02


class Padding(NamedTuple):
  """Where `resize_pad` put the photo in its canvas, so a prediction can be cut out and sized back.

  top/bottom/left/right are the zero pad widths; scale_y/scale_x = resized / original height and width (the
  aspect-preserving factor, per axis because the resized size is rounded to whole pixels).
  """
  top: int
  bottom: int
  left: int
  right: int
  scale_y: float
  scale_x: float


def _kinds_of(targets, kinds):
  """Each target's resampling kind; an unknown name is an error rather than a silent guess."""
  kinds = {**TARGET_KINDS, **(kinds or {})}
  unknown = [name for name in targets if name not in kinds]
  if unknown:
    raise ValueError(f"no resampling kind for targets {unknown}; pass kinds={{name: {NEAREST!r} | {LINEAR!r}}}")
  bad = {name: kinds[name] for name in targets if kinds[name] not in (NEAREST, LINEAR)}
  if bad:
    raise ValueError(f"unknown resampling kinds {bad}; expected {NEAREST!r} or {LINEAR!r}")
  return {name: kinds[name] for name in targets}


def _nearest_indices(old, new):
  """Source index per output index: the pixel whose centre is nearest to (i + 0.5) old / new - 0.5."""
  return np.minimum(np.floor((np.arange(new) + 0.5) * (old / new)).astype(np.int64), old - 1)


def resample(array, size, kind):
  """`array` (H, W, ...) resized to `size` (H, W) by `kind` (see the module docstring).

  Nearest works by indexing, so it keeps any dtype and channel count exactly (bool masks, int64 labels).
  """
  array = np.asarray(array)
  height, width = size
  if kind == NEAREST:
    rows = _nearest_indices(array.shape[0], height)
    cols = _nearest_indices(array.shape[1], width)
    return array[rows[:, None], cols[None, :]]
  if kind != LINEAR:
    raise ValueError(f"unknown resampling kind {kind!r}; expected {NEAREST!r} or {LINEAR!r}")
  resized = cv2.resize(array, (width, height), interpolation=cv2.INTER_LINEAR)
  return resized.reshape((height, width) + array.shape[2:])  # cv2 drops a trailing channel axis of 1


def resize(image, targets, size, kinds=None):
  """Image (bilinear) and targets (by kind) stretched to `size` (H, W); K goes through `scale_intrinsics`."""
  kinds = _kinds_of(targets, kinds)
  return (resample(image, size, LINEAR),
          {name: resample(array, size, kinds[name]) for name, array in targets.items()})


def fit_inside(height, width, size):
  """(H, W) scaled by one factor to the largest size that fits inside `size` (H, W), rounded.

  Unlike dense_transforms.fit_size (mmcv's rescale), `size` is oriented: a portrait box stays portrait.
  """
  factor = min(size[0] / height, size[1] / width)
  return (min(size[0], max(1, int(height * factor + 0.5))), min(size[1], max(1, int(width * factor + 0.5))))


def _pad(array, padding):
  widths = ((padding.top, padding.bottom), (padding.left, padding.right)) + ((0, 0),) * (array.ndim - 2)
  return np.pad(array, widths)


def resize_pad(image, targets, size=INPUT_SIZE, kinds=None):
  """Aspect-kept resize to fit `size` (H, W), then a centred zero pad to exactly `size` (upstream
  *ResizePadImage, the test pipeline of the normal, pointmap and albedo tasks).

  Returns (image, targets, `Padding`). An odd pad puts the extra pixel at the bottom / right (top = pad // 2, as
  upstream). Targets pad with 0 too: a 0 mask and 0 depth mark the pad invalid. K: `resize_pad_intrinsics`.
  """
  kinds = _kinds_of(targets, kinds)
  height, width = image.shape[:2]
  resized = fit_inside(height, width, size)
  pad_y, pad_x = size[0] - resized[0], size[1] - resized[1]
  padding = Padding(top=pad_y // 2, bottom=pad_y - pad_y // 2, left=pad_x // 2, right=pad_x - pad_x // 2,
                    scale_y=resized[0] / height, scale_x=resized[1] / width)
  image, targets = resize(image, targets, resized, kinds)
  return _pad(image, padding), {name: _pad(array, padding) for name, array in targets.items()}, padding


def unpad(prediction, padding, original_hw, kind=LINEAR):
  """Inverts `resize_pad` on a (H, W, ...) prediction: cuts the pad off and resizes to `original_hw` (H, W).

  `kind` "linear" for logits and continuous maps, "nearest" for label maps.
  """
  prediction = np.asarray(prediction)
  height, width = prediction.shape[:2]
  inside = prediction[padding.top:height - padding.bottom, padding.left:width - padding.right]
  return resample(inside, original_hw, kind)


def _intrinsics(K):
  K = np.array(K, dtype=np.float64)
  if K.shape != (3, 3) or not np.allclose(K[2], (0.0, 0.0, 1.0)):
    raise ValueError(f"K must be a 3x3 pinhole matrix with last row (0, 0, 1), got {K.tolist()}")
  return K


def _pixel_map(K, a_x, b_x, a_y, b_y):
  """K of the image in which pixel (u, v) of K's image sits at (a_x u + b_x, a_y v + b_y)."""
  return np.array([[a_x, 0.0, b_x], [0.0, a_y, b_y], [0.0, 0.0, 1.0]]) @ _intrinsics(K)


def scale_intrinsics(K, sx, sy):
  """K after a resize by (sx, sy) = new / old (width, height): fx' = sx fx, cx' = sx (cx + 0.5) - 0.5."""
  return _pixel_map(K, sx, (sx - 1.0) / 2.0, sy, (sy - 1.0) / 2.0)


def pad_intrinsics(K, top, left):
  """K after padding `top` rows above and `left` columns left of the image."""
  return _pixel_map(K, 1.0, left, 1.0, top)


def crop_intrinsics(K, top, left):
  """K after a crop whose top-left pixel was (row `top`, column `left`)."""
  return _pixel_map(K, 1.0, -left, 1.0, -top)


def resize_pad_intrinsics(K, padding):
  """K of the canvas `resize_pad` made (`padding` is what it returned)."""
  return pad_intrinsics(scale_intrinsics(K, padding.scale_x, padding.scale_y), padding.top, padding.left)


def flip_intrinsics(K, width):
  """K after a horizontal flip of a `width`-wide image: cx' = W - 1 - cx, fx kept, skew negated.

  Only consistent with camera X negated: pair it with `flip_pointmap` / `flip_extrinsics`.
  """
  return _pixel_map(K, -1.0, width - 1.0, 1.0, 0.0) @ np.diag([-1.0, 1.0, 1.0])


def flip_pointmap(pointmap):
  """(H, W, 3) pointmap mirrored left-right, with X negated (the mirrored camera's x axis)."""
  flipped = np.array(pointmap[:, ::-1], copy=True)
  flipped[..., 0] = -flipped[..., 0]
  return flipped


def flip_extrinsics(M):
  """World-to-camera (3, 4) or (4, 4) extrinsics under a horizontal flip: row 0 (camera X) negated."""
  M = np.array(M, dtype=np.float64)
  M[0] = -M[0]
  return M


def back_project(depth, K):
  """(H, W, 3) float64 camera XYZ = depth K^-1 [u, v, 1] (Z = depth) at every pixel."""
  depth = np.asarray(depth, np.float64)
  rows, cols = np.mgrid[0:depth.shape[0], 0:depth.shape[1]]
  pixels = np.stack([cols, rows, np.ones_like(cols)], axis=-1).astype(np.float64)
  return depth[..., None] * (pixels @ np.linalg.inv(_intrinsics(K)).T)


def project(points, K):
  """(..., 3) camera points -> (..., 2) pixel (u, v) through K."""
  points = np.asarray(points, np.float64)
  pixels = points @ _intrinsics(K).T
  return pixels[..., :2] / pixels[..., 2:]


def canonical_pointmap(depth, mask, K, canonical_focal=CANONICAL_FOCAL):
  """GT pointmap in the canonical camera (upstream PointmapGenerateTarget, §3.3).

  scale = canonical_focal / fx and pointmap = scale * `back_project`(depth, K), float32 (H, W, 3), 0 where
  mask is 0 or depth is not finite. Returns (pointmap, scale, K_canonical). K_canonical = `scale_intrinsics`(K,
  scale, scale): the camera of the photo resized by scale, focal `canonical_focal` (upstream multiplies cx by
  scale too; see the module docstring). X/Z and Y/Z do not change, so losses check the pointmap against the
  original K; the model predicts canonical XYZ and scale, and `metric_from_canonical` undoes it.
  """
  K = _intrinsics(K)
  depth = np.asarray(depth, np.float64)
  scale = float(canonical_focal / K[0, 0])
  valid = (np.asarray(mask) > 0) & np.isfinite(depth)
  pointmap = scale * back_project(np.where(valid, depth, 0.0), K)
  return pointmap.astype(np.float32), scale, scale_intrinsics(K, scale, scale)


def metric_from_canonical(pointmap, scale):
  """Metric XYZ = pointmap / scale (inference: vis_pointmap), numpy or jax.

  pointmap (..., H, W, 3); scale a number or one per image, shaped (...) or (..., 1) like the scale head's output
  (reshaped, not broadcast, so a (B, 1) scale cannot silently divide every image by every scale).
  """
  if np.ndim(scale) == 0:
    return pointmap / scale
  if not hasattr(scale, "reshape"):
    scale = np.asarray(scale)
  return pointmap / scale.reshape(pointmap.shape[:-3] + (1, 1, 1))


def pointmap_sample_ok(depth, mask, min_pixels=POINTMAP_MIN_PIXELS, max_foreground=POINTMAP_MAX_FOREGROUND,
                       min_depth=POINTMAP_MIN_DEPTH):
  """Whether a pointmap sample is worth a step (upstream PointmapPackInputs' filters).

  `depth` is the Z the target holds: canonical, pointmap[..., 2], which is what upstream tests. False when fewer
  than `min_pixels` mask pixels (nothing to learn), more than `max_foreground` of the image is mask (a close-up
  filling the frame), or a mask depth below `min_depth` (the surface clips the camera) or not finite (upstream
  lets NaN through). Bounds are inclusive: exactly 16 pixels, 96 % or 0.04 pass. min_depth is compared at the
  depth's own precision, so a float32 depth of 0.04 (0.0399999991) passes too.
  """
  valid = np.asarray(mask) > 0
  count = int(valid.sum())
  if count < min_pixels or count / valid.size > max_foreground:
    return False
  depth = np.asarray(depth)
  if depth.dtype.kind != "f":
    depth = depth.astype(np.float64)
  values = depth[valid]
  return bool(np.all(np.isfinite(values)) and values.min() >= depth.dtype.type(min_depth))


def albedo_sample_ok(albedo, mask, min_std=ALBEDO_MIN_STD):
  """Whether an albedo target has any texture (upstream albedo datasets, §3.4).

  False when the largest per-channel standard deviation (population, as np.std) of the albedo inside the mask is
  below `min_std`: a flat albedo teaches only one colour. `albedo` is RGB in [0, 1], or uint8 (divided by 255
  as upstream); an empty mask is False.
  """
  albedo = np.asarray(albedo)
  albedo = albedo / 255.0 if albedo.dtype == np.uint8 else albedo.astype(np.float64)
  inside = albedo[np.asarray(mask) > 0]
  return bool(len(inside) and np.std(inside, axis=0).max() >= min_std)
