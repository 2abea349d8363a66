"""Resizing a position embedding to another token grid, exactly as the PyTorch Sapiens code does.

Released checkpoints carry a (1, 1 + 64*64, C) table; a model at another resolution needs it on
its own grid. The reference resizes with `F.interpolate(mode='bicubic', align_corners=False)` in
float32 (reference §1.4); `jax.image.resize` uses a different cubic (a = -0.5, antialiased), so the
PyTorch kernel is written out here: cubic convolution with a = -0.75, half-pixel centres, source
indices clamped at the borders, no antialiasing.
"""
import math

import numpy as np

CUBIC_A = np.float32(-0.75)  # PyTorch's cubic convolution coefficient


def _fma(a, b, c):
  """a*b + c rounded once to float32 (the float64 product of two float32 values is exact).

  PyTorch's x86 CPU build contracts some steps of its index and weight arithmetic into fused
  multiply-adds. The far-tap weight cancels heavily, so plain float32 steps would put the weights
  up to 5e-7 off PyTorch's; fusing the same steps reproduces them bit for bit (measured).
  """
  return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)


def _cubic_near(x):
  """Kernel weight at distance |x| <= 1: (a+2)|x|^3 - (a+3)|x|^2 + 1."""
  a = CUBIC_A
  return _fma(a + 2, x, -(a + 3)) * x * x + 1


def _cubic_far(x):
  """Kernel weight at distance 1 < |x| < 2: a|x|^3 - 5a|x|^2 + 8a|x| - 4a."""
  a = CUBIC_A
  return _fma(_fma(a, x, -5 * a), x, 8 * a) * x - 4 * a


def _taps(in_size, out_size):
  """(indices, weights), both (out_size, 4): the four source samples of each output sample.

  Output i sits at source coordinate (i + 0.5) * in/out - 0.5 (half-pixel centres); its taps are
  the samples floor-1 ... floor+2, clamped into [0, in_size - 1]. All in float32, as in PyTorch.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src = _fma(scale, np.arange(out_size, dtype=np.float32) + np.float32(0.5), np.float32(-0.5))
  first = np.floor(src)
  t = src - first
  weights = np.stack([_cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t), _cubic_far((1 - t) + 1)], axis=1)
  indices = np.clip(first.astype(np.int64)[:, None] + np.arange(-1, 3), 0, in_size - 1)
  return indices, weights.astype(np.float32)


def _resize_axis(x, axis, out_size):
  """Cubic resampling along one axis; the four products are summed left to right like PyTorch."""
  indices, weights = _taps(x.shape[axis], out_size)
  shape = [1] * x.ndim
  shape[axis] = out_size
  out = 0
  for j in range(4):
    out = out + np.take(x, indices[:, j], axis=axis) * weights[:, j].reshape(shape)
  return out


def resize_bicubic_torch(grid, new_hw):
  """(1, H, W, C) or (H, W, C) float array -> same layout at new_hw = (H', W'), in float32.

  Equals torch's `F.interpolate(x, size=new_hw, mode='bicubic', align_corners=False)` on the
  NCHW view (a width pass, then a height pass, as PyTorch nests them).
  """
  grid = np.asarray(grid, np.float32)
  if grid.ndim not in (3, 4):
    raise ValueError(f"expected a (1, H, W, C) or (H, W, C) grid, got shape {grid.shape}")
  h_axis = grid.ndim - 3
  if tuple(grid.shape[h_axis:h_axis + 2]) == tuple(new_hw):
    return grid.copy()
  out = _resize_axis(grid, h_axis + 1, new_hw[1])
  return _resize_axis(out, h_axis, new_hw[0]).astype(np.float32)


def infer_grid(num_tokens):
  """(h, w) of a row-major token grid: square, or 4:3 (H:W, a 1024x768 finetune); else an error.

  Never guesses further: the PyTorch loaders silently mis-reshape or zero what they cannot
  recognise (reference §1.4, §10.12).
  """
  side = math.isqrt(num_tokens)
  if side * side == num_tokens:
    return side, side
  k = math.isqrt(num_tokens // 12)
  if 12 * k * k == num_tokens:
    return 4 * k, 3 * k
  raise ValueError(f"cannot tell the token grid of a position embedding with {num_tokens} patch tokens: "
                   f"it is neither square nor 4:3 (H:W)")


def resize_pos_embed(pos, old_grid, new_grid, num_extra_in, num_extra_out):
  """(1, num_extra_in + h*w, C) -> (1, num_extra_out + h'*w', C), keeping the input's dtype.

  The leading extra (cls) rows are kept (the first `num_extra_out` of them) or dropped, never
  resized; the grid rows are resized bicubically like PyTorch.
  """
  pos = np.asarray(pos)
  h, w = old_grid
  if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[1] != num_extra_in + h * w:
    raise ValueError(f"position embedding of shape {pos.shape} is not (1, {num_extra_in} + {h}*{w}, C)")
  if num_extra_out > num_extra_in:
    raise ValueError(f"position embedding has {num_extra_in} extra (cls) rows; {num_extra_out} wanted")
  grid = pos[0, num_extra_in:].reshape(h, w, -1)
  grid = resize_bicubic_torch(grid, new_grid).reshape(1, new_grid[0] * new_grid[1], -1)
  return np.concatenate([pos[:, :num_extra_out], grid.astype(pos.dtype)], axis=1)


def fit_table(state_dict, key, wanted_shape, extra_in, extra_out, source_grid, target_grid, what):
  """Resizes the position table `state_dict[key]` (in place) to `target_grid` with
  `extra_out` leading rows, when its shape or grid differs; returns what was done, for the log.

  The source grid is `source_grid` where known, else inferred from the token count (square or
  4:3). A table whose width differs is left for the caller's shape check to report.
  """
  pos = state_dict[key]
  same_grid = source_grid is None or tuple(source_grid) == tuple(target_grid)
  if (pos.shape == tuple(wanted_shape) and same_grid) or pos.ndim != 3 or pos.shape[-1] != wanted_shape[-1]:
    return []
  try:
    grid = source_grid or infer_grid(pos.shape[1] - extra_in)
  except ValueError as e:
    raise ValueError(f"init_from={what!r}, {key} of shape {pos.shape}: {e}") from None
  state_dict[key] = resize_pos_embed(pos, grid, target_grid, extra_in, extra_out)
  return [f"{key} {grid[0]}x{grid[1]}+{extra_in} -> {target_grid[0]}x{target_grid[1]}+{extra_out}"]
