"""Tests for patches.py and visualize.py."""
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from sapiens_jax import visualize
from sapiens_jax.patches import patchify, unpatchify


def _tile_at(grid, row, col, height, width):
  top, left = row * (height + visualize._GAP), col * (width + visualize._GAP)
  return grid[top:top + height, left:left + width]


@pytest.mark.parametrize("xp", [np, jnp])
def test_patchify_unpatchify_roundtrip(xp):
  images = xp.asarray(np.random.default_rng(0).normal(size=(2, 32, 48, 3)).astype(np.float32))
  patches = patchify(images, 16)
  assert patches.shape == (2, 6, 16 * 16 * 3)
  np.testing.assert_array_equal(np.asarray(unpatchify(patches, 16, (2, 3))), np.asarray(images))


def test_patchify_token_order_matches_explicit_loop():
  p = 4
  images = np.random.default_rng(1).normal(size=(2, 8, 12, 3)).astype(np.float32)
  b, grid_row, grid_col = 1, 1, 2  # token index = grid_row * (12 / p) + grid_col
  expected = [images[b, grid_row * p + r, grid_col * p + c, ch]
              for r in range(p) for c in range(p) for ch in range(3)]
  np.testing.assert_array_equal(patchify(images, p)[b, grid_row * 3 + grid_col], expected)


def _norm_pix_target(patches):
  mean = patches.mean(-1, keepdims=True)
  var = patches.var(-1, keepdims=True, ddof=1)
  return (patches - mean) / np.sqrt(var + 1e-6)


def test_unnormalize_pred_inverts_norm_pix_with_unbiased_var():
  patches = np.random.default_rng(2).normal(size=(2, 6, 12)).astype(np.float32) * 3 + 1
  recovered = visualize._unnormalize_pred(_norm_pix_target(patches), patches)
  np.testing.assert_allclose(recovered, patches, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_reconstruction_grid_with_perfect_prediction(norm_pix):
  rng = np.random.default_rng(3)
  batch, height, width, p = 3, 32, 48, 16
  images = rng.normal(size=(batch, height, width, 3)).astype(np.float32)
  mask = np.array([[1, 0, 0, 1, 1, 0]] * batch, np.float32)
  target = patchify(images, p)
  pred = _norm_pix_target(target) if norm_pix else target

  grid = visualize.reconstruction_grid(jnp.asarray(images), jnp.asarray(pred), mask, p, norm_pix)

  assert grid.dtype == np.uint8
  gap = visualize._GAP
  assert grid.shape == (batch * height + (batch - 1) * gap, 3 * width + 2 * gap, 3)
  pixel_masked = unpatchify(np.broadcast_to(mask[..., None], target.shape), p, (2, 3)) > 0
  for row in range(batch):
    original = _tile_at(grid, row, 0, height, width).astype(int)
    masked = _tile_at(grid, row, 1, height, width)
    reconstruction = _tile_at(grid, row, 2, height, width).astype(int)
    np.testing.assert_array_equal(original, visualize._to_uint8(images[row]))
    assert np.abs(reconstruction - original).max() <= 1
    assert (masked[pixel_masked[row]] == visualize._GREY).all()
    np.testing.assert_array_equal(masked[~pixel_masked[row]], original[~pixel_masked[row]])


def test_reconstruction_grid_limits_rows_and_shows_prediction_column():
  rng = np.random.default_rng(4)
  images = rng.normal(size=(5, 16, 32, 3)).astype(np.float32)
  pred = rng.normal(size=(5, 8, 8 * 8 * 3)).astype(np.float32)
  mask = np.zeros((5, 8), bool)  # nothing masked: reconstruction shows only original pixels
  grid = visualize.reconstruction_grid(images, pred, mask, 8, norm_pix=False, max_rows=2,
                                       include_prediction=True)
  gap = visualize._GAP
  assert grid.shape == (2 * 16 + gap, 4 * 32 + 3 * gap, 3)
  np.testing.assert_array_equal(_tile_at(grid, 1, 2, 16, 32), visualize._to_uint8(images[1]))
  raw = visualize._to_uint8(unpatchify(pred, 8, (2, 4)))
  np.testing.assert_array_equal(_tile_at(grid, 1, 3, 16, 32), raw[1])


def test_to_uint8_inverts_normalisation():
  pixels = np.array([[0, 128, 255]], np.float32)
  normalised = (pixels - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
  np.testing.assert_array_equal(visualize._to_uint8(normalised), pixels.astype(np.uint8))


def test_save_png_creates_parent_dirs(tmp_path):
  image = np.random.default_rng(5).integers(0, 256, size=(6, 10, 3), dtype=np.uint8)
  path = tmp_path / "a" / "b" / "grid.png"
  visualize.save_png(path, image)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
