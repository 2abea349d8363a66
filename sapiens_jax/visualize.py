"""Figures: MAE reconstructions, and pose / body-part / depth / normal targets and predictions.

MAE: one row per example, original | masked input | reconstruction | (optionally) raw prediction,
laid out as in the MAE and Sapiens papers. Tasks: one row per example, image | target | prediction,
drawn as the reference's inference demos do (shared sapiens_v1.md §8). Everything runs in numpy
and cv2 on host, uint8 RGB in and out; pass device arrays and they are fetched once.
"""
import os

import cv2
import numpy as np
from PIL import Image

from sapiens_jax.data import heatmaps as heatmap_codec
from sapiens_jax.data import meta
from sapiens_jax.data import transforms
from sapiens_jax.patches import patchify, unpatchify

_NORM_PIX_EPS = 1e-6  # must match the norm_pix loss target
_GREY = 128
_GAP = 4  # white pixels between tiles


def _to_uint8(images):
  """Normalised float images -> displayable uint8."""
  return transforms.denormalize(images)


def _unnormalize_pred(pred, target):
  """Undoes the norm_pix target normalisation using the original patch's mean and unbiased var.

  The model only learns each patch's shape, not its brightness or contrast, so the original
  patch's statistics are needed to display it.
  """
  mean = target.mean(axis=-1, keepdims=True)
  var = target.var(axis=-1, keepdims=True, ddof=1)
  return pred * np.sqrt(var + _NORM_PIX_EPS) + mean


def reconstruction_grid(images, pred, mask, patch_size, norm_pix, max_rows=8,
                        include_prediction=False):
  """Returns a uint8 (rows*H + gaps, cols*W + gaps, 3) figure for the first `max_rows` examples.

  Args:
    images: (B, H, W, 3) normalised input images.
    pred: (B, N, p*p*3) decoder output, in `patchify` order.
    mask: (B, N), 1 = masked (hidden from the encoder), 0 = visible.
    patch_size: p.
    norm_pix: whether `pred` predicts per-patch normalised pixels.
    max_rows: at most this many examples are drawn.
    include_prediction: adds a 4th column with the prediction in every patch, visible ones
      included (the loss ignores those, so they show what the model does without supervision).
  """
  images = np.asarray(images[:max_rows], np.float32)
  pred = np.asarray(pred[:max_rows], np.float32)
  mask = np.asarray(mask[:max_rows]) > 0.5
  grid_hw = (images.shape[1] // patch_size, images.shape[2] // patch_size)

  if norm_pix:
    pred = _unnormalize_pred(pred, patchify(images, patch_size))
  pred_image = _to_uint8(unpatchify(pred, patch_size, grid_hw))
  original = _to_uint8(images)
  patch_mask = np.broadcast_to(mask[..., None], pred.shape)
  pixel_masked = unpatchify(patch_mask, patch_size, grid_hw)

  columns = [
      original,
      np.where(pixel_masked, np.uint8(_GREY), original),
      np.where(pixel_masked, pred_image, original),
  ]
  if include_prediction:
    columns.append(pred_image)
  return _tile([list(row) for row in zip(*columns)])


def _tile(rows):
  """Joins a list of rows of equally sized (H, W, 3) tiles with white gaps."""
  height, width, channels = rows[0][0].shape
  vertical_gap = np.full((height, _GAP, channels), 255, np.uint8)
  joined_rows = []
  for row in rows:
    tiles = [row[0]]
    for tile in row[1:]:
      tiles += [vertical_gap, tile]
    joined_rows.append(np.concatenate(tiles, axis=1))
  horizontal_gap = np.full((_GAP, joined_rows[0].shape[1], channels), 255, np.uint8)
  stacked = [joined_rows[0]]
  for row in joined_rows[1:]:
    stacked += [horizontal_gap, row]
  return np.concatenate(stacked, axis=0)


def stack_rows(panels, per_row=1):
  """Equally sized (H, W, 3) panels (e.g. task rows), `per_row` side by side, rows top to bottom
  with white gaps; the last row is filled up with white panels."""
  per_row = min(per_row, len(panels))
  blank = np.full_like(panels[0], 255)
  padded = list(panels) + [blank] * (-len(panels) % per_row)
  return _tile([padded[i:i + per_row] for i in range(0, len(padded), per_row)])


# ---------------------------------------------------------------- fine-tuning tasks

POSE_THRESHOLD = 0.3  # the reference demo's --kpt-thr
SEG_OPACITY = 0.5
DEPTH_BACKGROUND = 100  # grey level of non-person pixels in depth pictures
NORMAL_EPS = 1e-5  # the reference demo's L2 normalisation of predicted normals
_NORMAL_BACKGROUND_BELOW = -100  # normal targets mark background with -1000
_SUBPIXEL_BITS = 4  # cv2 drawing takes fixed-point coordinates with this many fraction bits


def _check_image(image):
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(
        f"expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}"
        " (normalised images go through sapiens_jax.data.transforms.denormalize first)")
  return image


def _check_map(name, array, height, width):
  if array.shape[:2] != (height, width):
    raise ValueError(f"{name} must cover the image's {height}x{width} pixels, got shape {array.shape}")


def _fixed_point(point):
  return tuple(int(v) for v in np.rint(np.asarray(point) * (1 << _SUBPIXEL_BITS)))


def draw_pose(image, keypoints, scores, skeleton, threshold=POSE_THRESHOLD, radius=None,
              thickness=None):
  """The skeleton's links, then its keypoints, over a copy of `image`, in the skeleton's colours.

  keypoints (K, 2) are (x, y) image pixels; a keypoint with score <= threshold (or a non-finite
  position) is left out, and so is every link touching it. Sizes default to a fraction of the
  image so that pictures look alike at 256 and at 1024 pixels.
  """
  canvas = _check_image(image).copy()
  keypoints = np.asarray(keypoints, np.float64)
  scores = np.asarray(scores, np.float64)
  count = skeleton.num_keypoints
  if keypoints.shape != (count, 2) or scores.shape != (count,):
    raise ValueError(
        f"skeleton {skeleton.name!r} has {count} keypoints: expected keypoints ({count}, 2) and"
        f" scores ({count},), got {keypoints.shape} and {scores.shape}")
  short_side = min(canvas.shape[:2])
  radius = max(1, round(short_side / 150)) if radius is None else radius
  thickness = max(1, round(short_side / 300)) if thickness is None else thickness
  shown = (scores > threshold) & np.isfinite(keypoints).all(axis=1)
  for (a, b), color in zip(skeleton.links, skeleton.link_colors):
    if shown[a] and shown[b]:
      cv2.line(canvas, _fixed_point(keypoints[a]), _fixed_point(keypoints[b]),
               tuple(int(c) for c in color), thickness, cv2.LINE_AA, _SUBPIXEL_BITS)
  for k in np.flatnonzero(shown):
    cv2.circle(canvas, _fixed_point(keypoints[k]), radius << _SUBPIXEL_BITS,
               tuple(int(c) for c in skeleton.keypoint_colors[k]), -1, cv2.LINE_AA, _SUBPIXEL_BITS)
  return canvas


def overlay_parts(image, labels, palette, opacity=SEG_OPACITY, ignore_index=255):
  """Palette colours blended over `image` where label > 0; background (0) and ignored pixels
  keep the image, so the person's parts stand out against the scene."""
  image = _check_image(image)
  labels = np.asarray(labels)
  palette = np.asarray(palette, np.float32)
  _check_map("labels", labels, *image.shape[:2])
  parts = (labels > 0) & (labels != ignore_index)
  if parts.any() and labels[parts].max() >= len(palette):
    raise ValueError(f"label {labels[parts].max()} has no colour in a palette of {len(palette)}")
  blended = image.astype(np.float32)
  blended[parts] = (1 - opacity) * blended[parts] + opacity * palette[labels[parts]]
  return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def colorize_depth(depth, mask):
  """Relative depth as the reference shows it: the person's depth min-max normalised and
  inverted (nearest = 1), times 255, through COLORMAP_INFERNO; everything else grey 100."""
  depth = np.asarray(depth, np.float32)
  if depth.ndim == 3 and depth.shape[-1] == 1:
    depth = depth[..., 0]
  _check_map("mask", np.asarray(mask), *depth.shape)
  foreground = np.asarray(mask, bool) & np.isfinite(depth)
  picture = np.full(depth.shape + (3,), DEPTH_BACKGROUND, np.uint8)
  if foreground.any():
    values = depth[foreground]
    low, high = values.min(), values.max()
    normalised = (values - low) / (high - low) if high > low else np.zeros_like(values)
    levels = ((1 - normalised) * 255).astype(np.uint8)  # truncates, as the reference's cast
    bgr = cv2.applyColorMap(levels[:, None], cv2.COLORMAP_INFERNO)[:, 0]
    picture[foreground] = bgr[:, ::-1]
  return picture


def colorize_normals(normals, mask):
  """Unit normals as colours (n + 1) / 2 * 255 (x -> red, y -> green, z -> blue); black where
  mask is 0 or a normal is not finite."""
  normals = np.asarray(normals, np.float32)
  _check_map("mask", np.asarray(mask), *normals.shape[:2])
  foreground = np.asarray(mask, bool) & np.isfinite(normals).all(axis=-1)
  colors = np.clip((normals + 1) / 2 * 255, 0, 255)
  return np.where(foreground[..., None], colors, 0).astype(np.uint8)


def _resize(outputs, height, width):
  """Network outputs (h, w, C) -> (height, width, C), bilinear with half-pixel centres (as the
  losses' and the reference's align_corners=False resize)."""
  outputs = np.asarray(outputs, np.float32)
  if outputs.ndim != 3:
    raise ValueError(f"a prediction must be one example's (h, w, C) outputs, got shape {outputs.shape}")
  resized = cv2.resize(outputs, (width, height), interpolation=cv2.INTER_LINEAR)
  return resized.reshape(height, width, outputs.shape[-1])


def _draw_pose_heatmaps(image, heatmaps, labels):
  height, width = image.shape[:2]
  keypoints, scores = heatmap_codec.decode(heatmaps, input_size=(width, height))
  return draw_pose(image, keypoints, scores, meta.skeleton(labels))


def task_panel(task, image, target=None, prediction=None, labels=""):
  """One row [image | target drawn | prediction drawn] (either may be None and is then left out).

  image: uint8 (H, W, 3) RGB. target: the pipeline's target for the task -- pose "heatmaps"
  (h, w, K), seg "label" (H, W), depth "depth" (H, W) (background -1), normal "normal" (H, W, 3)
  (background -1000). prediction: the model's raw output for one example -- pose heatmaps
  (h, w, K), seg logits (h, w, C), depth (h, w, 1), normal (h, w, 3) -- resized to the image.
  Depth and normal predictions are drawn on the target's person mask when there is a target
  (the reference draws them on a segmentation mask), else everywhere.
  labels: the skeleton (pose) or class set (seg) name, as config.data.labels.
  """
  image = _check_image(image)
  height, width = image.shape[:2]
  tiles = [image]
  if task == "pose":
    tiles += [_draw_pose_heatmaps(image, x, labels) for x in (target, prediction) if x is not None]
  elif task == "seg":
    palette = meta.seg_classes(labels).palette
    if target is not None:
      tiles.append(overlay_parts(image, target, palette))
    if prediction is not None:
      tiles.append(overlay_parts(image, _resize(prediction, height, width).argmax(-1), palette))
  elif task in ("depth", "normal"):
    mask = np.ones((height, width), bool)
    if target is not None:
      target = np.asarray(target, np.float32)
      _check_map(f"{task} target", target, height, width)
      if task == "depth":
        mask = target >= 0
        tiles.append(colorize_depth(target, mask))
      else:
        mask = (target > _NORMAL_BACKGROUND_BELOW).all(axis=-1)
        tiles.append(colorize_normals(target, mask))
    if prediction is not None:
      prediction = _resize(prediction, height, width)
      if task == "depth":
        tiles.append(colorize_depth(prediction[..., 0], mask))
      else:
        length = np.linalg.norm(prediction, axis=-1, keepdims=True)
        tiles.append(colorize_normals(prediction / np.maximum(length, NORMAL_EPS), mask))
  else:
    raise ValueError(f"no task panel for task {task!r}; expected pose, seg, depth or normal")
  return _tile([tiles])


def save_png(path, image_uint8):
  """Writes an (H, W, 3) uint8 image, creating parent directories."""
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  Image.fromarray(np.asarray(image_uint8)).save(path, format="PNG")
