"""Pictures: tiles joined into rows and grids, and labels drawn as the reference's inference demos
draw them (sapiens_v1.md §8): skeletons, part colours, depth and normal colour maps. The tasks and
objectives compose their panels from these. Everything runs in numpy and cv2 on host, uint8 RGB
in and out.
"""
import os

import cv2
import numpy as np
from PIL import Image

_GAP = 4  # white pixels between tiles


def tile(rows):
  """Joins a list of rows of equally sized (H, W, 3) tiles with white gaps."""
  height, width, channels = rows[0][0].shape
  vertical_gap = np.full((height, _GAP, channels), 255, np.uint8)
  joined_rows = []
  for tiles in rows:
    joined = [tiles[0]]
    for next_tile in tiles[1:]:
      joined += [vertical_gap, next_tile]
    joined_rows.append(np.concatenate(joined, axis=1))
  horizontal_gap = np.full((_GAP, joined_rows[0].shape[1], channels), 255, np.uint8)
  stacked = [joined_rows[0]]
  for joined in joined_rows[1:]:
    stacked += [horizontal_gap, joined]
  return np.concatenate(stacked, axis=0)


def row(tiles):
  """uint8 (H, W, 3) tiles of one size side by side with white gaps: one panel."""
  tiles = [_check_image(t) for t in tiles]
  height, width = tiles[0].shape[:2]
  for t in tiles[1:]:
    if t.shape[:2] != (height, width):
      raise ValueError(f"every tile of a panel must be {height}x{width} like its image, got {t.shape[:2]}")
  return tile([tiles])


def stack_rows(panels, per_row=1):
  """Equally sized (H, W, 3) panels (e.g. task rows), `per_row` side by side, rows top to bottom
  with white gaps; the last row is filled up with white panels."""
  per_row = min(per_row, len(panels))
  blank = np.full_like(panels[0], 255)
  padded = list(panels) + [blank] * (-len(panels) % per_row)
  return tile([padded[i:i + per_row] for i in range(0, len(padded), per_row)])


# ---------------------------------------------------------------- drawing labels

POSE_THRESHOLD = 0.3  # the reference demo's --kpt-thr
SEG_OPACITY = 0.5
DEPTH_BACKGROUND = 100  # grey level of non-person pixels in depth pictures
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


def save_png(path, image_uint8):
  """Writes an (H, W, 3) uint8 image, creating parent directories."""
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  Image.fromarray(np.asarray(image_uint8)).save(path, format="PNG")
