"""MAE's reconstruction grid: original | masked input | reconstruction, and the norm-pix inverse."""
import jax.numpy as jnp
import numpy as np
import pytest

from sapiens_jax import visualize
from sapiens_jax.data import transforms
from sapiens_jax.objectives import mae
from sapiens_jax.patches import patchify, unpatchify


def _tile_at(grid, row, col, height, width):
  top, left = row * (height + visualize._GAP), col * (width + visualize._GAP)
  return grid[top:top + height, left:left + width]


def _norm_pix_target(patches):
  mean = patches.mean(-1, keepdims=True)
  var = patches.var(-1, keepdims=True, ddof=1)
  return (patches - mean) / np.sqrt(var + 1e-6)


def test_unnormalize_pred_inverts_norm_pix_with_unbiased_var():
  patches = np.random.default_rng(2).normal(size=(2, 6, 12)).astype(np.float32) * 3 + 1
  recovered = mae._unnormalize_pred(_norm_pix_target(patches), patches)
  np.testing.assert_allclose(recovered, patches, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_reconstruction_grid_with_perfect_prediction(norm_pix):
  rng = np.random.default_rng(3)
  batch, height, width, p = 3, 32, 48, 16
  images = rng.normal(size=(batch, height, width, 3)).astype(np.float32)
  mask = np.array([[1, 0, 0, 1, 1, 0]] * batch, np.float32)
  target = patchify(images, p)
  pred = _norm_pix_target(target) if norm_pix else target

  grid = mae.reconstruction_grid(jnp.asarray(images), jnp.asarray(pred), mask, p, norm_pix)

  assert grid.dtype == np.uint8
  gap = visualize._GAP
  assert grid.shape == (batch * height + (batch - 1) * gap, 3 * width + 2 * gap, 3)
  pixel_masked = unpatchify(np.broadcast_to(mask[..., None], target.shape), p, (2, 3)) > 0
  for row in range(batch):
    original = _tile_at(grid, row, 0, height, width).astype(int)
    masked = _tile_at(grid, row, 1, height, width)
    reconstruction = _tile_at(grid, row, 2, height, width).astype(int)
    np.testing.assert_array_equal(original, transforms.denormalize(images[row]))
    assert np.abs(reconstruction - original).max() <= 1
    assert (masked[pixel_masked[row]] == mae._GREY).all()
    np.testing.assert_array_equal(masked[~pixel_masked[row]], original[~pixel_masked[row]])


def test_reconstruction_grid_limits_rows_and_shows_prediction_column():
  rng = np.random.default_rng(4)
  images = rng.normal(size=(5, 16, 32, 3)).astype(np.float32)
  pred = rng.normal(size=(5, 8, 8 * 8 * 3)).astype(np.float32)
  mask = np.zeros((5, 8), bool)  # nothing masked: reconstruction shows only original pixels
  grid = mae.reconstruction_grid(images, pred, mask, 8, norm_pix=False, max_rows=2,
                                       include_prediction=True)
  gap = visualize._GAP
  assert grid.shape == (2 * 16 + gap, 4 * 32 + 3 * gap, 3)
  np.testing.assert_array_equal(_tile_at(grid, 1, 2, 16, 32), transforms.denormalize(images[1]))
  raw = transforms.denormalize(unpatchify(pred, 8, (2, 4)))
  np.testing.assert_array_equal(_tile_at(grid, 1, 3, 16, 32), raw[1])
