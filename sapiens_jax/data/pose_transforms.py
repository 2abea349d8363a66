"""Top-down pose augmentation: boxes as (center, scale), UDP crops, albumentations.

A person box is a centre (x, y) and a scale (w, h) in image pixels, mmpose's
convention. Training (reference section 4.4) jitters that box, warps it to the
network input with the UDP affine matrix and encodes the moved keypoints as
heatmaps. Everything random takes an explicit `np.random.Generator`.
"""
import math

import cv2
import numpy as np

from sapiens_jax.data import heatmaps as heatmap_codec


def fix_aspect_ratio(scale, aspect_ratio):
  """Grows the short side of a (w, h) box so that w / h == aspect_ratio."""
  width, height = np.asarray(scale, dtype=np.float64)
  if width > height * aspect_ratio:
    return np.array([width, width / aspect_ratio])
  return np.array([height * aspect_ratio, height])


def box_to_center_scale(bbox_xywh, aspect_ratio=0.75, padding=1.25):
  """(x, y, w, h) -> (center, scale): the box padded, then fixed to w/h = ratio.

  `aspect_ratio=None` skips the fix: training jitters the unfixed box (the
  shift is relative to it, as in the reference) and fixes it just before the
  warp.
  """
  x, y, width, height = np.asarray(bbox_xywh, dtype=np.float64)
  center = np.array([x + 0.5 * width, y + 0.5 * height])
  scale = np.array([width, height]) * padding
  if aspect_ratio is not None:
    scale = fix_aspect_ratio(scale, aspect_ratio)
  return center, scale


def flip(image, keypoints, visible, center, flip_indices):
  """Mirrors image, keypoints and box centre left-right, swapping left/right ids.

  x -> W - 1 - x (pixel-centre convention of UDP) for keypoints and centre.
  """
  width = image.shape[1]
  flip_indices = np.asarray(flip_indices)
  keypoints = np.array(keypoints, dtype=np.float64)
  keypoints[:, 0] = width - 1 - keypoints[:, 0]
  center = np.array([width - 1 - center[0], center[1]], dtype=np.float64)
  return (image[:, ::-1], keypoints[flip_indices],
          np.asarray(visible)[flip_indices], center)


def half_body(keypoints, visible, upper_ids, lower_ids, rng, min_total=9,
              min_upper=2, min_lower=3, padding=1.5, prob=0.3,
              upper_prioritized_prob=0.7):
  """Sometimes replaces the box by one around the upper or the lower body only.

  Returns (center, scale) of the chosen half: the mean of its visible
  keypoints and their extent times `padding`; None when the box is kept
  (too few visible keypoints, or the `prob` draw failed).
  """
  visible = np.asarray(visible) > 0
  if visible.sum() < min_total or rng.uniform() >= prob:
    return None
  upper = [i for i in upper_ids if visible[i]]
  lower = [i for i in lower_ids if visible[i]]
  prefer_upper = rng.uniform() < upper_prioritized_prob
  if len(upper) < min_upper and len(lower) < min_lower:
    return None
  if len(lower) < min_lower:
    chosen = upper
  elif len(upper) < min_upper:
    chosen = lower
  else:
    chosen = upper if prefer_upper else lower
  points = np.asarray(keypoints, dtype=np.float64)[chosen]
  center = points.mean(axis=0)
  scale = (points.max(axis=0) - points.min(axis=0)) * padding
  if not np.any(scale > 0):  # All chosen keypoints coincide: no box to crop.
    return None
  return center, scale


def truncated_normal(rng, size):
  """Standard normal draws conditioned on [-1, 1] (rejection sampling)."""
  values = rng.standard_normal(size)
  outside = np.abs(values) > 1
  while outside.any():
    values[outside] = rng.standard_normal(int(outside.sum()))
    outside = np.abs(values) > 1
  return values


def random_box_transform(center, scale, rng, shift_factor=0.16, shift_prob=0.3,
                         scale_factor=(0.5, 1.5), scale_prob=1.0,
                         rotate_factor=80, rotate_prob=0.6):
  """Random shift, rescale and rotation of a box -> (center, scale, degrees).

  Each amount is a truncated normal t in [-1, 1]: shift = t * shift_factor *
  scale per axis, scale multiplier = mean + t * half-range of `scale_factor`,
  rotation = t * rotate_factor; each applies with its own probability.
  """
  shift_t = truncated_normal(rng, 2)
  scale_t, rotate_t = truncated_normal(rng, 2)
  center = np.asarray(center, dtype=np.float64)
  scale = np.asarray(scale, dtype=np.float64)
  if rng.uniform() < shift_prob:
    center = center + shift_t * shift_factor * scale
  if rng.uniform() < scale_prob:
    low, high = scale_factor
    scale = scale * (0.5 * (low + high) + scale_t * 0.5 * (high - low))
  rotation = rotate_t * rotate_factor if rng.uniform() < rotate_prob else 0.0
  return center, scale, float(rotation)


def udp_affine_matrix(center, scale, rotation, output_size):
  """2x3 matrix taking image pixels into an output of size (W, H) (UDP).

  out = S R (p - center) + ((W - 1) / 2, (H - 1) / 2), with
  R = [[cos, -sin], [sin, cos]] of `rotation` degrees and
  S = diag((W - 1) / scale_w, (H - 1) / scale_h): the box centre lands on the
  output's centre pixel and the box width spans W - 1 pixel steps, so pixel
  centres map to pixel centres (that is what makes the heatmaps unbiased).
  """
  out_w, out_h = output_size
  angle = math.radians(rotation)
  cos, sin = math.cos(angle), math.sin(angle)
  stretch = np.diag([(out_w - 1) / scale[0], (out_h - 1) / scale[1]])
  linear = stretch @ np.array([[cos, -sin], [sin, cos]])
  offset = np.array([(out_w - 1) / 2, (out_h - 1) / 2]) - linear @ np.asarray(
      center, dtype=np.float64)
  return np.concatenate([linear, offset[:, None]], axis=1)


def warp(image, matrix, output_size):
  """Applies a 2x3 matrix: bilinear, zeros outside; output (H, W, C)."""
  return cv2.warpAffine(np.ascontiguousarray(image), matrix,
                        tuple(int(s) for s in output_size),
                        flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def transform_points(points, matrix):
  """(N, 2) points through a 2x3 affine matrix."""
  points = np.asarray(points, dtype=np.float64)
  return points @ matrix[:, :2].T + matrix[:, 2]


def _odd_kernel_size(rng, low=3, high=7):
  return int(rng.choice(np.arange(low, high + 1, 2)))


def blur(image, rng, p=0.1):
  """Box blur with a random odd kernel of 3, 5 or 7, with probability p."""
  if rng.uniform() >= p:
    return image
  size = _odd_kernel_size(rng)
  return cv2.blur(image, (size, size))


def median_blur(image, rng, p=0.1):
  """Median filter with a random odd kernel of 3, 5 or 7, with probability p."""
  if rng.uniform() >= p:
    return image
  return cv2.medianBlur(np.ascontiguousarray(image), _odd_kernel_size(rng))


def coarse_dropout(image, rng, height_range=(0.2, 0.4), width_range=(0.2, 0.4),
                   p=1.0):
  """Zeroes one rectangle whose sides are random fractions of the image's."""
  if rng.uniform() >= p:
    return image
  height, width = image.shape[:2]
  hole_h = int(height * rng.uniform(*height_range))
  hole_w = int(width * rng.uniform(*width_range))
  top = int(rng.integers(0, height - hole_h + 1))
  left = int(rng.integers(0, width - hole_w + 1))
  image = image.copy()
  image[top:top + hole_h, left:left + hole_w] = 0
  return image


def topdown_train_sample(image, bbox, keypoints, visible, rng, *, flip_indices,
                         upper_ids, lower_ids, input_size=(768, 1024),
                         heatmap_size=(192, 256), sigma=6.0, photometric=None):
  """One training example from an image and a person box (section 4.4, in order).

  Box -> random flip -> half body -> box jitter -> UDP crop -> photometric
  -> blur / median blur / coarse dropout -> heatmaps. `photometric` is
  `fn(image, rng) -> image` on the uint8 crop (the pipeline passes
  data/photometric.py's distortion); None skips that step. Keypoints that
  leave the crop get target weight 0 through the codec.
  Returns dict(image uint8 (H, W, 3), heatmaps (H_hm, W_hm, K), target_weight
  (K,), keypoints_in (K, 2) in crop pixels, center, scale).
  """
  keypoints = np.asarray(keypoints, dtype=np.float64)
  visible = np.asarray(visible, dtype=np.float32)
  center, scale = box_to_center_scale(bbox, aspect_ratio=None)
  if rng.uniform() < 0.5:
    image, keypoints, visible, center = flip(
        image, keypoints, visible, center, flip_indices)
  half = half_body(keypoints, visible, upper_ids, lower_ids, rng)
  if half is not None:
    center, scale = half
  center, scale, rotation = random_box_transform(center, scale, rng)
  scale = fix_aspect_ratio(scale, input_size[0] / input_size[1])
  matrix = udp_affine_matrix(center, scale, rotation, input_size)
  crop = warp(image, matrix, input_size)
  keypoints_in = transform_points(keypoints, matrix)
  if photometric is not None:
    crop = photometric(crop, rng)
  crop = coarse_dropout(median_blur(blur(crop, rng), rng), rng)
  heatmaps, target_weight = heatmap_codec.encode(
      keypoints_in, visible, input_size, heatmap_size, sigma)
  return dict(image=crop, heatmaps=heatmaps, target_weight=target_weight,
              keypoints_in=keypoints_in.astype(np.float32),
              center=center.astype(np.float32), scale=scale.astype(np.float32))


def topdown_eval_sample(image, bbox, input_size=(768, 1024)):
  """The un-augmented crop of a person box: dict(image, center, scale).

  Predictions go back to image pixels with heatmaps.to_image_coords(kp,
  center, scale, input_size).
  """
  center, scale = box_to_center_scale(
      bbox, aspect_ratio=input_size[0] / input_size[1])
  matrix = udp_affine_matrix(center, scale, 0.0, input_size)
  return dict(image=warp(image, matrix, input_size),
              center=center.astype(np.float32), scale=scale.astype(np.float32))
