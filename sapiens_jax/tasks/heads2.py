"""The Sapiens2 task heads (reference sapiens2.md §3), under upstream's parameter names.

Two families read the backbone's NHWC map (B, h, w, C):
- seg-29 and pose-308: v1's stack (`heads.DenseHead`): [ConvTranspose 4x4 s2 -> IN -> SiLU] x n,
  [1x1 conv -> IN -> SiLU] x m, a final 1x1 conv (`conv_seg`, `conv_pose`). Only the widths are new.
- normal, albedo, pointmap, matting (`UpsampleHead`): `input_conv` [3x3 conv C -> C, norm, SiLU], 4
  `upsample_blocks` [3x3 conv -> 4 c, PixelShuffle(2), norm, SiLU] (x16 in all), `conv_layers`
  [3x3 conv, norm, SiLU] x 3 and a final 1x1 conv. The norm is InstanceNorm2d (affine=False), for
  albedo an RMSNorm over the channels with a weight. Pointmap adds a scale branch on the backbone map:
  `scale_conv_layers` [1x1 conv stride 2, IN, SiLU] x 3, a C-major flatten and the MLP
  `scale_final_layer` (Linear, SiLU, Linear, SiLU, Linear -> 1). Matting ends in a sigmoid (RGB
  foreground in channels 0-2, alpha in 3).

Parameter names are upstream's `decode_head.*` keys with '.' -> '_' (`upsample_blocks_2_0`,
`conv_layers_3`, `scale_final_layer_5`), so `torch_part` is a rename plus the layout change.
Parameters are float32, the math runs in `dtype`, norms in float32.
"""
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sapiens_jax.models import layers
from sapiens_jax.tasks import heads

TORCH_PREFIX = "decode_head."  # every Sapiens2 head, the pointmap scale branch included
RMS_NORM_EPS = 1e-6  # albedo's RMSNorm2d: not in any source we have; the backbone RMSNorm's eps (sapiens2.md §1.2)
NORMS = ("instance", "rms")


class Widths(NamedTuple):
  """A head's channel counts: the upsampling stages, then the conv stages."""
  upsample: tuple
  conv: tuple


class ScaleWidths(NamedTuple):
  """Pointmap's scale branch: the stride-2 1x1 convs, then the MLP's hidden sizes (its output is 1)."""
  conv: tuple
  hidden: tuple


UPSTREAM_SIZES = ("sapiens2_0.4b", "sapiens2_0.8b", "sapiens2_1b", "sapiens2_5b")
# Test sizes (models/sapiens2.py SIZES): small widths of our choosing, no upstream counterpart.
TEST_SIZES = ("sapiens2_micro", "sapiens2_tiny", "sapiens2_small")
_TEST = Widths((32, 16, 16, 8), (8, 8, 8))

_SEG = Widths((512, 256, 128, 64), (64, 64))  # §3.1; the same at every size (our reading: no per-size row)
_POSE_1B = Widths((1536, 1024), (768, 512, 256))  # §3.5: 1b
_POSE = Widths((1024, 768), (512, 512, 256))  # §3.5: 0.4b, 0.8b, 5b
_NORMAL = Widths((768, 512, 256, 128), (64, 32, 16))  # §3.2; matting 1b's config has the same
_NORMAL_5B = Widths((1536, 768, 512, 256), (128, 64, 32))  # §3.2, and upstream's normal 5b config
_POINTMAP = Widths((1536, 768, 512, 256), (64, 32, 16))  # §3.3
_POINTMAP_5B = Widths((1536, 768, 768, 768), (128, 64, 32))  # §3.3
_SCALE = ScaleWidths((1536, 512, 128), (512, 128))  # §3.3, every size

# task -> size -> Widths. Albedo (§3.4: "identical to NormalHead") and matting (released at 1b only) take
# the normal widths at every size: an assumption where no config is known (0.4b-5b albedo, matting but 1b).
WIDTHS = {
    "seg": {**dict.fromkeys(UPSTREAM_SIZES, _SEG), **dict.fromkeys(TEST_SIZES, Widths((32, 16, 16, 8), (8, 8)))},
    "pose": {"sapiens2_0.4b": _POSE, "sapiens2_0.8b": _POSE, "sapiens2_1b": _POSE_1B, "sapiens2_5b": _POSE,
             **dict.fromkeys(TEST_SIZES, Widths((32, 16), (16, 16, 8)))},
    **{task: {**dict.fromkeys(UPSTREAM_SIZES[:3], _NORMAL), "sapiens2_5b": _NORMAL_5B,
              **dict.fromkeys(TEST_SIZES, _TEST)} for task in ("normal", "albedo", "matting")},
    "pointmap": {**dict.fromkeys(UPSTREAM_SIZES[:3], _POINTMAP), "sapiens2_5b": _POINTMAP_5B,
                 **dict.fromkeys(TEST_SIZES, _TEST)},
}
SCALE_WIDTHS = {**dict.fromkeys(UPSTREAM_SIZES, _SCALE), **dict.fromkeys(TEST_SIZES, ScaleWidths((32, 16, 8), (16, 8)))}

# Final 1x1 conv per task, as upstream names it.
FINAL_LAYERS = {"seg": "conv_seg", "pose": "conv_pose", "normal": "conv_normal", "albedo": "conv_albedo",
                "pointmap": "conv_pointmap", "matting": "conv_matting"}


def widths(task, size):
  if task not in WIDTHS:
    raise ValueError(f"no Sapiens2 {task!r} head; expected one of {sorted(WIDTHS)}")
  if size not in WIDTHS[task]:
    raise ValueError(f"no Sapiens2 {task} head widths for size {size!r}; expected one of {sorted(WIDTHS[task])}")
  return WIDTHS[task][size]


# Hidden-kernel init for seg/pose: every hidden layer is followed by InstanceNorm, so the scale only
# sets how fast it trains (upstream's own init is not a parity target: weights are loaded or trained).
DENSE_INIT_STD = 0.01


def seg_head(size, num_classes=29, dtype=jnp.float32):
  """Body-part segmentation: x16 to class logits (64x48 -> 1024x768); no dropout (none in §3.1 or the port)."""
  w = widths("seg", size)
  return heads.DenseHead(w.upsample, w.conv, num_classes, FINAL_LAYERS["seg"], 0.0, DENSE_INIT_STD, DENSE_INIT_STD,
                         dtype)


def pose_head(size, num_keypoints=308, dtype=jnp.float32):
  """Pose heatmaps: x4 (64x48 -> 256x192)."""
  w = widths("pose", size)
  return heads.DenseHead(w.upsample, w.conv, num_keypoints, FINAL_LAYERS["pose"], 0.0, DENSE_INIT_STD,
                         DENSE_INIT_STD, dtype)


def pixel_shuffle(x, factor=2):
  """(B, H, W, c * f * f) -> (B, f H, f W, c) in torch's channel order: out[f h + i, f w + j, c] =
  in[h, w, c f^2 + i f + j] (torch's PixelShuffle on NCHW)."""
  b, h, w, channels = x.shape
  c = channels // (factor * factor)
  x = x.reshape(b, h, w, c, factor, factor).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, h * factor, w * factor, c)


def _kaiming_conv(key, shape, dtype=jnp.float32):
  """Upstream's head conv init: kaiming normal, fan_out = out * kh * kw, gain sqrt(2); drawn on the 2-D view
  (layers.matrix_init's reason: XLA:CPU draws 4-D shapes slowly)."""
  kh, kw, cin, cout = shape
  std = math.sqrt(2.0 / (cout * kh * kw))
  return (std * jax.random.normal(key, (kh * kw * cin, cout), dtype)).reshape(shape)


def _kaiming_linear(key, shape, dtype=jnp.float32):
  """Upstream's head Linear init: kaiming normal, fan_in, gain 1."""
  return jax.random.normal(key, shape, dtype) / math.sqrt(shape[0])


_BIAS_INIT = layers.partitioned(nn.initializers.zeros, (None,))


class RMSNorm2d(nn.Module):
  """Albedo's norm: RMS over the channels of each pixel, times a learned weight, in float32."""
  eps: float = RMS_NORM_EPS

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", layers.partitioned(nn.initializers.ones, (None,)), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(x.dtype)


class UpsampleHead(nn.Module):
  """The PixelShuffle head of normal / albedo / pointmap / matting; with `scale` set (pointmap) it returns
  (map, scale (B, 1)), else the map (B, 16 h, 16 w, out_channels)."""
  upsample_channels: tuple
  conv_channels: tuple
  out_channels: int
  final_name: str
  norm: str = "instance"
  sigmoid: bool = False  # matting
  scale: ScaleWidths | None = None  # pointmap
  dtype: Any = jnp.float32

  def _conv3x3(self, x, features, name):
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=layers.partitioned(_kaiming_conv, (None, None, "embed", None)), bias_init=_BIAS_INIT,
                   name=name)(x)

  def _norm_silu(self, x, name):
    """The stage's norm (named `name` when it has a weight) and SiLU."""
    x = RMSNorm2d(name=name)(x) if self.norm == "rms" else heads.instance_norm(x)
    return nn.silu(x)

  @nn.compact
  def __call__(self, features, deterministic=True):
    del deterministic  # no dropout in these heads; the argument is the task model's call
    if features.ndim != 4:
      raise ValueError(f"head input must be an NHWC feature map (B, h, w, C), got shape {features.shape}")
    if self.norm not in NORMS:
      raise ValueError(f"norm={self.norm!r}; expected one of {NORMS}")
    features = features.astype(self.dtype)
    x = self._norm_silu(self._conv3x3(features, features.shape[-1], "input_conv_0"), "input_conv_1")
    for i, channels in enumerate(self.upsample_channels):
      x = pixel_shuffle(self._conv3x3(x, 4 * channels, f"upsample_blocks_{i}_0"))
      x = self._norm_silu(x, f"upsample_blocks_{i}_2")
    for i, channels in enumerate(self.conv_channels):
      x = self._norm_silu(self._conv3x3(x, channels, f"conv_layers_{heads.STAGE_STRIDE * i}"),
                          f"conv_layers_{heads.STAGE_STRIDE * i + 1}")
    final_init = layers.partitioned(_kaiming_conv, (None, None, "embed", None))
    out = heads.Conv1x1(self.out_channels, final_init, _BIAS_INIT, self.dtype, name=self.final_name)(x)
    if self.sigmoid:
      out = nn.sigmoid(out)
    if self.scale is None:
      return out
    return out, self._scale_branch(features)

  def _scale_branch(self, features):
    """[1x1 conv stride 2 (= keep even rows/cols, then 1x1), IN, SiLU] x n, flatten C-major as torch's NCHW
    Flatten (so the Linear weight loads unchanged), MLP. Each conv maps h -> ceil(h / 2)."""
    s = features
    conv_init = layers.partitioned(_kaiming_conv, (None, None, "embed", None))
    for i, channels in enumerate(self.scale.conv):
      s = heads.Conv1x1(channels, conv_init, _BIAS_INIT, self.dtype,
                        name=f"scale_conv_layers_{heads.STAGE_STRIDE * i}")(s[:, ::2, ::2])
      s = nn.silu(heads.instance_norm(s))
    s = s.transpose(0, 3, 1, 2).reshape(s.shape[0], -1)
    sizes = (*self.scale.hidden, 1)
    for i, size in enumerate(sizes):
      s = nn.Dense(size, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=layers.partitioned(_kaiming_linear, ("embed", None)), bias_init=_BIAS_INIT,
                   name=f"scale_final_layer_{2 * i + 1}")(s)
      if i < len(sizes) - 1:
        s = nn.silu(s)
    return s


def _upsample_head(task, size, out_channels, dtype, **kwargs):
  w = widths(task, size)
  return UpsampleHead(w.upsample, w.conv, out_channels, FINAL_LAYERS[task], dtype=dtype, **kwargs)


def normal_head(size, dtype=jnp.float32):
  """Surface normals, raw (unnormalised) XYZ at x16."""
  return _upsample_head("normal", size, 3, dtype)


def albedo_head(size, dtype=jnp.float32):
  """Albedo RGB at x16, no output activation; RMSNorm2d in place of every InstanceNorm (§3.4)."""
  return _upsample_head("albedo", size, 3, dtype, norm="rms")


def pointmap_head(size, dtype=jnp.float32):
  """Canonical XYZ at x16 and the scale (B, 1); metric XYZ = pointmap / scale (§3.3)."""
  widths("pointmap", size)  # an unknown size fails here, naming the known ones
  return _upsample_head("pointmap", size, 3, dtype, scale=SCALE_WIDTHS[size])


def matting_head(size, dtype=jnp.float32):
  """sigmoid(4 channels) at x16: foreground RGB = [..., :3], alpha = [..., 3:] (the port's split)."""
  return _upsample_head("matting", size, 4, dtype, sigmoid=True)


HEADS = {"seg": seg_head, "pose": pose_head, "normal": normal_head, "albedo": albedo_head,
         "pointmap": pointmap_head, "matting": matting_head}


def head(task, size, dtype=jnp.float32):
  """The task's head at its upstream output count (seg 29 classes, pose 308 keypoints)."""
  if task not in HEADS:
    raise ValueError(f"no Sapiens2 {task!r} head; expected one of {sorted(HEADS)}")
  return HEADS[task](size, dtype=dtype)


def torch_part(prefix=TORCH_PREFIX):
  """params["head"] of any head here under `prefix` (upstream: "decode_head."): heads.torch_part's names."""
  return heads.torch_part(prefix)
