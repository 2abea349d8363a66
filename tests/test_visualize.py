"""Tests for patches.py and the tiling and saving of visualize.py."""
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from sapiens_jax import visualize
from sapiens_jax.data import transforms
from sapiens_jax.patches import patchify, unpatchify


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


def test_denormalize_inverts_normalisation():
  pixels = np.array([[0, 128, 255]], np.float32)
  normalised = (pixels - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
  np.testing.assert_array_equal(transforms.denormalize(normalised), pixels.astype(np.uint8))


def test_save_png_creates_parent_dirs(tmp_path):
  image = np.random.default_rng(5).integers(0, 256, size=(6, 10, 3), dtype=np.uint8)
  path = tmp_path / "a" / "b" / "grid.png"
  visualize.save_png(path, image)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
