"""MAE reconstruction figures, laid out as in the MAE and Sapiens papers.

One row per example: original | masked input | reconstruction | (optionally) raw prediction.
Everything runs in numpy on host; pass device arrays and they are fetched once.
"""
import os

import numpy as np
from PIL import Image

from sapiens_jax.patches import patchify, unpatchify

# Per-channel RGB normalisation on the 0-255 scale used for every Sapiens input image.
_MEAN = np.array((123.675, 116.28, 103.53), np.float32)
_STD = np.array((58.395, 57.12, 57.375), np.float32)
_NORM_PIX_EPS = 1e-6  # must match the norm_pix loss target
_GREY = 128
_GAP = 4  # white pixels between tiles


def _to_uint8(images):
  """Normalised float images -> displayable uint8."""
  return np.clip(np.rint(images * _STD + _MEAN), 0, 255).astype(np.uint8)


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


def save_png(path, image_uint8):
  """Writes an (H, W, 3) uint8 image, creating parent directories."""
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  Image.fromarray(np.asarray(image_uint8)).save(path, format="PNG")
