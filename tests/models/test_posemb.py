"""Position-embedding resizing equals PyTorch's bicubic, checked against torch and against the formula."""
import math

import numpy as np
import pytest

from sapiens_jax.models import posemb


def keys_cubic(d, a=-0.75):
  """The cubic convolution kernel (Keys 1981) at distance d, in float64."""
  d = abs(d)
  if d <= 1:
    return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
  if d < 2:
    return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
  return 0.0


def naive_resize(grid, new_hw):
  """(H, W, C) -> (H', W', C) by the definition, one output sample at a time, in float64:
  half-pixel centres, the 4x4 nearest samples, indices clamped at the borders."""
  h, w, _ = grid.shape
  out = np.zeros((*new_hw, grid.shape[2]))
  for i in range(new_hw[0]):
    y = (i + 0.5) * h / new_hw[0] - 0.5
    for j in range(new_hw[1]):
      x = (j + 0.5) * w / new_hw[1] - 0.5
      for r in range(math.floor(y) - 1, math.floor(y) + 3):
        for c in range(math.floor(x) - 1, math.floor(x) + 3):
          out[i, j] += keys_cubic(y - r) * keys_cubic(x - c) * grid[min(max(r, 0), h - 1), min(max(c, 0), w - 1)]
  return out


def test_one_row_by_hand():
  # 4 -> 8 samples: output 0 sits at source -0.25, so its taps are samples -2, -1, 0, 1 (the first
  # three clamped to sample 0) at distances 1.75, 0.75, 0.25, 1.25, with (a = -0.75) the weights
  # -0.03515625, 0.26171875, 0.87890625, -0.10546875 (exact in binary; they sum to 1).
  row = np.array([1.0, 2.0, 4.0, 8.0], np.float32).reshape(1, 4, 1)
  out = posemb.resize_bicubic_torch(row, (1, 8))[0, :, 0]
  assert out[0] == (-0.03515625 + 0.26171875 + 0.87890625) * 1 - 0.10546875 * 2 == 0.89453125
  # Output 3 sits at source 1.25: samples 0..3 at distances 1.25, 0.25, 0.75, 1.75 (no clamping).
  assert out[3] == -0.10546875 * 1 + 0.87890625 * 2 + 0.26171875 * 4 - 0.03515625 * 8 == 2.41796875
  np.testing.assert_allclose(out, naive_resize(row, (1, 8))[0, :, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("old, new", [((8, 8), (12, 10)), ((6, 5), (3, 4)), ((4, 4), (4, 3)), ((2, 3), (1, 7))])
def test_matches_the_definition(old, new):
  grid = np.random.default_rng(0).standard_normal((*old, 3)).astype(np.float32)
  ours = posemb.resize_bicubic_torch(grid, new)
  assert ours.shape == (*new, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, naive_resize(grid, new), rtol=0, atol=2e-6)


@pytest.mark.parametrize("old, new", [((64, 64), (64, 48)), ((64, 64), (32, 32)), ((8, 8), (12, 10))])
def test_matches_torch_interpolate(old, new):
  torch = pytest.importorskip("torch")
  grid = np.random.default_rng(1).standard_normal((1, *old, 32)).astype(np.float32)
  ours = posemb.resize_bicubic_torch(grid, new)
  nchw = torch.from_numpy(grid).permute(0, 3, 1, 2)
  theirs = torch.nn.functional.interpolate(nchw, size=new, mode="bicubic", align_corners=False)
  theirs = theirs.permute(0, 2, 3, 1).numpy()
  diff = np.abs(ours - theirs).max()
  print(f"{old} -> {new}: max abs diff to torch {diff:.1e}")
  assert ours.shape == theirs.shape and diff <= 1e-6  # measured 4.8e-7 (one float32 ulp at |x| ~ 4)


def test_same_size_is_the_identity():
  grid = np.random.default_rng(2).standard_normal((1, 5, 7, 4)).astype(np.float32)
  out = posemb.resize_bicubic_torch(grid, (5, 7))
  np.testing.assert_array_equal(out, grid)
  assert out is not grid
  pos = np.concatenate([np.ones((1, 1, 4), np.float32), grid.reshape(1, 35, 4)], axis=1)
  np.testing.assert_array_equal(posemb.resize_pos_embed(pos, (5, 7), (5, 7), 1, 1), pos)


def test_resize_pos_embed_keeps_or_drops_the_cls_row():
  rng = np.random.default_rng(3)
  cls, grid = rng.standard_normal((1, 1, 8)), rng.standard_normal((1, 16, 8))
  pos = np.concatenate([cls, grid], axis=1).astype(np.float32)
  resized = posemb.resize_bicubic_torch(grid.reshape(4, 4, 8).astype(np.float32), (4, 3)).reshape(1, 12, 8)
  kept = posemb.resize_pos_embed(pos, (4, 4), (4, 3), 1, 1)
  np.testing.assert_array_equal(kept, np.concatenate([pos[:, :1], resized], axis=1))
  np.testing.assert_array_equal(posemb.resize_pos_embed(pos, (4, 4), (4, 3), 1, 0), resized)
  # The input's dtype is kept; the arithmetic is float32 whatever it is.
  half = posemb.resize_pos_embed(pos.astype(np.float16), (4, 4), (4, 3), 1, 1)
  assert half.dtype == np.float16 and np.abs(half.astype(np.float32) - kept).max() < 1e-2
  with pytest.raises(ValueError, match=r"\(1, 1 \+ 4\*3, C\)"):
    posemb.resize_pos_embed(pos, (4, 3), (4, 4), 1, 1)
  with pytest.raises(ValueError, match="1 extra"):
    posemb.resize_pos_embed(pos, (4, 4), (4, 3), 1, 2)


def test_grid_inference_is_square_or_four_by_three_and_never_a_guess():
  assert posemb.infer_grid(4096) == (64, 64)
  assert posemb.infer_grid(3072) == (64, 48)
  assert posemb.infer_grid(12) == (4, 3)
  assert posemb.infer_grid(16) == (4, 4)
  for n in (15, 4095, 3000):
    with pytest.raises(ValueError, match=f"{n} patch tokens: it is neither square nor 4:3"):
      posemb.infer_grid(n)
