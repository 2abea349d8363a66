"""The Sapiens (v1) task heads: one upsampling conv stack, which each task configures (reference §2.4).

Every head reads the encoder's patch tokens as an NHWC map (B, h, w, C) and runs
[ConvTranspose 4x4 s2 -> InstanceNorm -> SiLU] x n (each doubles h and w), then
[1x1 conv -> InstanceNorm -> SiLU] x m, optional channel dropout, and a final 1x1 conv.
Parameter names carry the PyTorch `nn.Sequential` indices (`deconv_layers_0`, `deconv_layers_3`, ...)
so the state-dict mapping (`torch_part`) is a rename plus a transpose. Deconv kernels use Flax's
`transpose_kernel=True` layout (4, 4, out, in), i.e. PyTorch's (in, out, 4, 4) weight transposed.
"""
import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sapiens_jax import torch_names
from sapiens_jax.models import layers

INSTANCE_NORM_EPS = 1e-5  # PyTorch InstanceNorm2d's default, not the ViT's LayerNorm eps (gotcha §10.2)
STAGE_STRIDE = 3  # each stage is [conv, InstanceNorm2d, SiLU] in one torch Sequential: learnable indices 0, 3, 6, ...


def instance_norm(x, eps=INSTANCE_NORM_EPS):
  """Per-sample, per-channel normalisation over H and W (biased variance, no affine), in float32."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(axis=(1, 2), keepdims=True)
  var = jnp.square(x32 - mean).mean(axis=(1, 2), keepdims=True)
  return ((x32 - mean) * jnp.reciprocal(jnp.sqrt(var + eps))).astype(x.dtype)


# ConvTranspose2d(4, stride 2, padding 1) as four sub-pixel 2x2 convolutions (computed as one
# im2col matmul, which XLA:CPU runs faster than its conv): output row 2m + r
# sums input rows (m - 1, m) with kernel rows (3, 1) when r = 0 and rows (m, m + 1) with (2, 0)
# when r = 1 (same for columns). XLA's CPU backend runs a transposed conv as a conv over a
# zero-dilated input: 4x the arithmetic and 4-8x the time of this form (BENCHMARKS.md).
_PHASE_TAPS = ((3, 1), (2, 0))


def deconv4x4_stride2(x, kernel):
  """x (B, H, W, Cin), kernel (4, 4, Cout, Cin) [PyTorch weight (Cin, Cout, 4, 4) transposed] ->
  (B, 2H, 2W, Cout), exactly PyTorch's ConvTranspose2d(kernel 4, stride 2, padding 1)."""
  b, h, w, _ = x.shape
  k = jnp.transpose(kernel, (0, 1, 3, 2))  # (ky, kx, Cin, Cout)
  phases = [k[jnp.array(_PHASE_TAPS[ry])][:, jnp.array(_PHASE_TAPS[rx])]
            for ry in (0, 1) for rx in (0, 1)]
  stacked = jnp.concatenate(phases, axis=-1)  # (2, 2, Cin, 4 * Cout), phases (ry, rx) major
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # The 2x2 convolution as one matmul over the four shifted windows (im2col).
  windows = jnp.concatenate([padded[:, dy:dy + h + 1, dx:dx + w + 1] for dy in (0, 1) for dx in (0, 1)], -1)
  y = windows @ stacked.reshape(-1, stacked.shape[-1]).astype(x.dtype)
  y = y.reshape(b, h + 1, w + 1, 2, 2, -1)  # (B, H + 1, W + 1, ry, rx, Cout)
  out = jnp.stack([jnp.stack([y[:, ry:ry + h, rx:rx + w, ry, rx] for rx in (0, 1)], axis=3)
                   for ry in (0, 1)], axis=2)  # (B, H, ry, W, rx, Cout)
  return out.reshape(b, 2 * h, 2 * w, -1)


class Deconv(nn.Module):
  """The heads' 4x4 stride-2 transposed conv without bias; the kernel keeps Flax's
  `transpose_kernel=True` layout (4, 4, out, in), so checkpoints and torch_names are unchanged."""
  features: int
  kernel_init: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (4, 4, self.features, x.shape[-1]))
    return deconv4x4_stride2(x.astype(self.dtype), kernel.astype(self.dtype))


class Conv1x1(nn.Module):
  """A 1x1 convolution computed as one (pixels, in) x (in, out) matmul. The parameters keep
  nn.Conv's names and layout ((1, 1, in, out) kernel, bias). XLA:CPU turns the weight gradient of
  nn.Conv((1, 1)) into a convolution whose window is the whole image: the seg head's forward +
  backward on a 64x48x1024 map took 125 s with nn.Conv and 58 s with this (BENCHMARKS.md)."""
  features: int
  kernel_init: Any
  bias_init: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features))
    bias = self.param("bias", self.bias_init, (self.features,))
    y = x.astype(self.dtype).reshape(-1, x.shape[-1]) @ kernel[0, 0].astype(self.dtype)
    return y.reshape(*x.shape[:-1], self.features) + bias.astype(self.dtype)


class DenseHead(nn.Module):
  """Deconv stages (x2 each), 1x1 conv stages, Dropout2d, final 1x1 conv; params float32, math in `dtype`."""
  deconv_channels: tuple
  conv_channels: tuple
  out_channels: int
  final_name: str
  dropout_rate: float = 0.0
  kernel_std: float = 0.001
  final_std: float = 0.001
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, deterministic=True):
    """features (B, h, w, C) -> (B, h * 2**n, w * 2**n, out_channels) with n deconv stages."""
    if features.ndim != 4:
      raise ValueError(f"head input must be an NHWC feature map (B, h, w, C), got shape {features.shape}")
    x = features.astype(self.dtype)
    hidden_init = layers.matrix_init(nn.initializers.normal(self.kernel_std), 3)
    bias_init = layers.partitioned(nn.initializers.zeros, (None,))
    for i, channels in enumerate(self.deconv_channels):
      x = Deconv(channels, layers.partitioned(hidden_init, (None, None, None, "embed")), self.dtype,
                 name=f"deconv_layers_{STAGE_STRIDE * i}")(x)
      x = nn.silu(instance_norm(x))
    for i, channels in enumerate(self.conv_channels):
      x = Conv1x1(channels, layers.partitioned(hidden_init, (None, None, "embed", None)), bias_init, self.dtype,
                  name=f"conv_layers_{STAGE_STRIDE * i}")(x)
      x = nn.silu(instance_norm(x))
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2))(x, deterministic=deterministic)
    final_init = layers.matrix_init(nn.initializers.normal(self.final_std), 3)
    return Conv1x1(self.out_channels, layers.partitioned(final_init, (None, None, "embed", None)), bias_init,
                   self.dtype, name=self.final_name)(x)


# The seg/depth/normal heads (mmseg) have no init of their own that the reference records. We use
# mmseg's decode-head init for conv_seg (Normal 0.01) and the same std for the hidden kernels: every
# hidden layer is followed by InstanceNorm, so its scale only sets how fast it trains.
MMSEG_INIT_STD = 0.01
MMSEG_DROPOUT = 0.1  # mmseg's `dropout_ratio` default, never overridden (§2.4)


def mmseg_head(num_deconvs, num_convs, out_channels, channels, dtype):
  """mmseg's VitHead family (seg, depth, normal): `conv_seg` last, channel dropout 0.1."""
  return DenseHead((channels,) * num_deconvs, (channels,) * num_convs, out_channels, "conv_seg",
                   MMSEG_DROPOUT, MMSEG_INIT_STD, MMSEG_INIT_STD, dtype)


# PyTorch names: our layer names are the torch Sequential paths with '.' -> '_' (`deconv_layers_3` is
# `deconv_layers.3`; Sapiens2's `upsample_blocks_2_0` is `upsample_blocks.2.0`), and the final 1x1 conv
# is named as in torch (`final_layer` for mmpose, `conv_seg` for mmseg, `conv_<task>` for Sapiens2).
# Kernels: 4-D conv and deconv kernels take the "conv" layout (a Flax transpose_kernel deconv kernel
# (4, 4, out, in) and torch's (in, out, 4, 4) are the same transpose as a conv's), 2-D Dense kernels
# "linear"; norm scales are torch's `.weight`. Deconvs have no bias.
_STAGE = re.compile(r"(deconv_layers|conv_layers|input_conv|upsample_blocks|scale_conv_layers|scale_final_layer)"
                    r"((?:_\d+)+)")
_FINAL = re.compile(r"final_layer|conv_[a-z]+")
_PARAMS = (("kernel", "weight"), ("bias", "bias"), ("scale", "weight"))


def _torch_entries(head):
  """Entries of the named head layers; a name that is no head layer gets none (so it is reported
  as unmapped)."""
  entries = []
  for name in sorted(head):
    stage = _STAGE.fullmatch(name)
    if not stage and not _FINAL.fullmatch(name):
      continue
    theirs = stage.group(1) + stage.group(2).replace("_", ".") if stage else name
    for ours, torch_param in _PARAMS:
      if ours in head[name]:
        layout = ("conv" if head[name][ours].ndim == 4 else "linear") if ours == "kernel" else "same"
        entries.append(((name, ours), f"{theirs}.{torch_param}", layout))
  return entries


def torch_part(prefix):
  """params["head"] of any head (v1's and Sapiens2's) under `prefix`: mmpose's "head.", mmseg's and
  Sapiens2's "decode_head."."""
  return torch_names.Part("head", prefix, _torch_entries)
