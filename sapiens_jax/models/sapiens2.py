"""Sapiens2 (2026): the second backbone family, as the released `Sapiens2` module computes it
(../shared/reference/sapiens2.md §1).

What differs from the v1 ViT: RMSNorm everywhere (no biases), q/k RMS-normalised over the head
dim, 2-D RoPE on the patch tokens (coordinates normalised per axis, so any grid works) instead of
a position table, a cls token and 8 registers in front, SwiGLU MLPs, a LayerScale on the attention
branch only, separate q/k/v projections, and grouped-query attention (half the kv heads) in all
but the first and last 8 blocks. The 4K variant puts a windowed tokenizer between the patch
embedding and the blocks: every 4x4 window of patch tokens is attended with its own cls token,
which becomes one token of a 4x coarser grid.

Parameter names follow the PyTorch state dict (`blocks_{i}/attn/wq`, `ffn/w12`, `storage_tokens`,
...), so `torch_part` is a rename plus transposes. Blocks of the same shape scan together:
`blocks` (full attention), `gqa_blocks`, `late_blocks`.
"""
import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from sapiens_jax import torch_names
from sapiens_jax.models import attention
from sapiens_jax.models import layers

NORM_EPS = 1e-6  # every RMSNorm (blocks, q/k, final)
FULL_ATTENTION_EDGE = 8  # blocks i < 8 and i >= depth - 8 attend with every kv head
ROPE_BASE = 100.0
ROPE_DTYPES = ("bfloat16", "float32")  # upstream rotates in bfloat16 even for float32 models
WINDOW = 4  # the 4K tokenizer's window side, in patch tokens
WINDOW_CHUNK = 1024  # windows the tokenizer runs at once (and rematerialises as one piece)
SEGMENTS = ("blocks", "gqa_blocks", "late_blocks")  # scanned runs of equally shaped blocks


@dataclasses.dataclass(frozen=True)
class Size:
  width: int  # C
  depth: int  # L
  num_heads: int
  tokenizer_depth: int = 0  # blocks of the 4K windowed tokenizer; 0 = none
  num_registers: int = 8

  @property
  def head_dim(self):
    return self.width // self.num_heads

  def kv_heads(self, layer):
    return kv_heads(layer, self.depth, self.num_heads)

  def segments(self):
    return segments(self.depth, self.num_heads)


def kv_heads(layer, depth, num_heads):
  """Key/value heads of block `layer`: all of them near either end, half in between."""
  if layer < FULL_ATTENTION_EDGE or layer >= depth - FULL_ATTENTION_EDGE:
    return num_heads
  return num_heads // 2


def segments(depth, num_heads):
  """[(name, first block, number of blocks, kv heads)] of the runs of equally shaped blocks."""
  runs = []
  for i in range(depth):
    if runs and runs[-1][3] == kv_heads(i, depth, num_heads):
      runs[-1][2] += 1
    else:
      runs.append([SEGMENTS[len(runs)], i, 1, kv_heads(i, depth, num_heads)])
  return [tuple(run) for run in runs]


# The upstream arch_zoo; `_4k` adds the windowed tokenizer (only 1b is released so). The small
# sizes have 18 blocks, so blocks 8 and 9 use grouped-query attention as in the big ones; `_micro`
# has 2 (full attention only): the learning tests' budget on a CPU.
SIZES = {
    "sapiens2_0.1b": Size(width=768, depth=12, num_heads=12),
    "sapiens2_0.4b": Size(width=1024, depth=24, num_heads=16),
    "sapiens2_0.8b": Size(width=1280, depth=32, num_heads=16),
    "sapiens2_1b": Size(width=1536, depth=40, num_heads=24),
    "sapiens2_1b_4k": Size(width=1536, depth=40, num_heads=24, tokenizer_depth=4),
    "sapiens2_5b": Size(width=2432, depth=56, num_heads=32),
    "sapiens2_small": Size(width=192, depth=18, num_heads=3),
    "sapiens2_tiny": Size(width=64, depth=18, num_heads=4),
    "sapiens2_tiny_4k": Size(width=64, depth=18, num_heads=4, tokenizer_depth=2),
    "sapiens2_micro": Size(width=64, depth=2, num_heads=4),
}


def size(name):
  if name not in SIZES:
    raise ValueError(f"config.model.size={name!r} is not a known Sapiens2 size; expected one of {sorted(SIZES)}")
  return SIZES[name]


# ---------------------------------------------------------------- RoPE

def _rounding(dtype):
  """x -> x rounded to `dtype` (kept as float32), the rounding every torch op in `dtype` does."""
  if dtype == "float32":
    return lambda x: np.asarray(x, np.float32)
  return lambda x: np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def rope_periods(head_dim, dtype="bfloat16", base=ROPE_BASE):
  """The (head_dim / 4,) periods base^(2j / (head_dim / 2)), computed op by op in `dtype` as
  upstream fills its `rope_embed.periods` buffer."""
  r = _rounding(dtype)
  exponents = r(r(2 * np.arange(head_dim // 4, dtype=np.float32)) / np.float32(head_dim // 2))
  return r(np.power(np.float64(base), exponents.astype(np.float64)))


def rope_table(grid, head_dim, dtype="bfloat16", base=ROPE_BASE):
  """(sin, cos), each (h*w, head_dim) float32, for the tokens of a (h, w) grid in row-major order.

  Coordinates (i + 0.5) / h and (j + 0.5) / w mapped to [-1, 1], angles 2 pi coord / period for the
  rows then the columns, repeated for both halves of the head dim. Every step is rounded to `dtype`
  as upstream's torch ops in that dtype round it (bfloat16 by default), so the table is upstream's
  to the bit.
  """
  r = _rounding(dtype)
  h, w = grid
  periods = rope_periods(head_dim, dtype, base)
  coords_h = r(r(np.arange(h, dtype=np.float64) + 0.5) / np.float32(h))
  coords_w = r(r(np.arange(w, dtype=np.float64) + 0.5) / np.float32(w))
  coords = np.stack(np.meshgrid(coords_h, coords_w, indexing="ij"), -1).reshape(h * w, 2)
  coords = r(r(np.float32(2.0) * coords) - np.float32(1.0))
  angles = r(r(np.float32(2 * math.pi) * coords[:, :, None]) / periods[None, None, :])
  angles = np.tile(angles.reshape(h * w, head_dim // 2), 2)
  # The sine and cosine of each float32 angle, correctly rounded to float32 first, then to dtype.
  angles = angles.astype(np.float64)
  return r(np.sin(angles).astype(np.float32)), r(np.cos(angles).astype(np.float32))


def _round(x, dtype):
  """x in float32, rounded to `dtype`: explicit, so XLA cannot keep excess precision."""
  return x.astype(jnp.dtype(dtype)).astype(jnp.float32)


def apply_rope(x, sin, cos, num_prefix, dtype):
  """Rotates the patch tokens of x (B, T, heads, D) by (sin, cos) (B or 1, T - num_prefix, D).

  As upstream: every token is first rounded to the rope dtype (the prefix tokens too), and each
  product and the sum are rounded to it, x * cos + rotate_half(x) * sin with rotate_half([a, b])
  = [-b, a] over the two halves of D. Returns x's dtype.
  """
  y = _round(x.astype(jnp.float32), dtype)
  prefix, tokens = y[:, :num_prefix], y[:, num_prefix:]
  half = tokens.shape[-1] // 2
  rotated = jnp.concatenate([-tokens[..., half:], tokens[..., :half]], axis=-1)
  sin, cos = sin[:, :, None], cos[:, :, None]
  tokens = _round(_round(tokens * cos, dtype) + _round(rotated * sin, dtype), dtype)
  return jnp.concatenate([prefix, tokens], axis=1).astype(x.dtype)


# ---------------------------------------------------------------- module

def _normal():
  return nn.initializers.normal(0.02)  # upstream: trunc_normal(0.02) truncated at +-2, i.e. barely


def rms_norm(name, dtype, axis_name="embed"):
  return nn.RMSNorm(epsilon=NORM_EPS, dtype=dtype, name=name,
                    scale_init=layers.partitioned(nn.initializers.ones, (axis_name,)))


class Linear(nn.Module):
  """x (B, T, *in) -> (B, T, *out) with a bias, the in and out axes named for sharding."""
  out_shape: tuple
  axes: tuple  # logical names of (*in, *out)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[2:]
    kernel = self.param("kernel", layers.partitioned(layers.matrix_init(_normal(), len(in_shape)), self.axes),
                        (*in_shape, *self.out_shape))
    bias = self.param("bias", layers.partitioned(nn.initializers.zeros, self.axes[len(in_shape):]), self.out_shape)
    return layers.matmul(x, kernel.astype(self.dtype)) + bias.astype(self.dtype)


class Attention(nn.Module):
  """q/k/v projections, q/k RMSNorm, RoPE on the patch tokens, grouped-query attention, LayerScale.

  The tokenizer's blocks have neither q/k norm nor LayerScale nor RoPE."""
  num_heads: int
  num_kv_heads: int
  dtype: Any = jnp.float32
  implementation: str = "auto"
  rope_dtype: str = "bfloat16"
  qk_norm: bool = True
  layer_scale: bool = True
  num_prefix: int = 0  # tokens in front that RoPE leaves as they are

  @nn.compact
  def __call__(self, x, rope=None):
    width = x.shape[-1]
    hd = width // self.num_heads
    q = Linear((self.num_heads, hd), ("embed", "heads", "kv"), self.dtype, name="wq")(x)
    k = Linear((self.num_kv_heads, hd), ("embed", "kv_heads", "kv"), self.dtype, name="wk")(x)
    v = Linear((self.num_kv_heads, hd), ("embed", "kv_heads", "kv"), self.dtype, name="wv")(x)
    if self.qk_norm:
      q = rms_norm("q_norm", self.dtype, "kv")(q)
      k = rms_norm("k_norm", self.dtype, "kv")(k)
    if rope is not None:
      sin, cos = rope
      q = apply_rope(q, sin, cos, self.num_prefix, self.rope_dtype)
      k = apply_rope(k, sin, cos, self.num_prefix, self.rope_dtype)
    q, k, v = (checkpoint_name(t, layers.QKV) for t in (q, k, v))
    axes = ("act_batch", "act_length", "act_heads", "act_kv")
    q = nn.with_logical_constraint(q, axes)
    k, v = (nn.with_logical_constraint(t, ("act_batch", "act_length", "act_kv_heads", "act_kv")) for t in (k, v))
    out = attention.attention(q, k, v, self.implementation, partition=nn.logical_to_mesh_axes(axes))
    out = checkpoint_name(Linear((width,), ("heads", "kv", "embed"), self.dtype, name="proj")(out), layers.PROJECTION)
    if self.layer_scale:
      gamma = self.param("gamma", layers.partitioned(nn.initializers.constant(1e-4), ("embed",)), (width,))
      out = out * gamma.astype(self.dtype)
    return out


class SwiGLU(nn.Module):
  """w12 (both halves in one kernel (C, 2, F)) -> silu(first) * second -> w3."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = Linear((2, self.hidden), ("embed", None, "mlp"), self.dtype, name="w12")(x)
    h = checkpoint_name(h, layers.MLP_HIDDEN)
    h = nn.with_logical_constraint(nn.silu(h[..., 0, :]) * h[..., 1, :], ("act_batch", "act_length", "act_mlp"))
    return Linear((x.shape[-1],), ("mlp", "embed"), self.dtype, name="w3")(h)


class Block(nn.Module):
  """x + attn(ln1(x)), then x + ffn(ln2(x)); `rope` is (sin, cos) of the patch tokens or None."""
  num_heads: int
  num_kv_heads: int
  dtype: Any = jnp.float32
  attention: str = "auto"
  rope_dtype: str = "bfloat16"
  trunk: bool = True  # False: a tokenizer block (no q/k norm, no LayerScale)
  num_prefix: int = 0

  @nn.compact
  def __call__(self, x, rope=None):
    attn = Attention(self.num_heads, self.num_kv_heads, self.dtype, self.attention, self.rope_dtype,
                     qk_norm=self.trunk, layer_scale=self.trunk, num_prefix=self.num_prefix, name="attn")
    x = x + attn(rms_norm("ln1", self.dtype)(x), rope)
    x = x + SwiGLU(4 * x.shape[-1], self.dtype, name="ffn")(rms_norm("ln2", self.dtype)(x))
    return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed")), None


class Tokenizer(nn.Module):
  """The 4K variant's windowed tokenizer: (B, h, w, C) patch tokens -> (B, h/4 * w/4, C), one
  token per 4x4 window (its cls token after the blocks), windows in row-major order."""
  width: int
  num_heads: int
  depth: int
  dtype: Any = jnp.float32
  attention: str = "auto"
  remat: bool = False

  def setup(self):
    c_axes = (None, None, "embed")
    self.w_cls = self.param("w_cls", layers.partitioned(_normal(), c_axes), (1, 1, self.width))
    self.local_pos_embed = self.param("local_pos_embed", layers.partitioned(_normal(), c_axes),
                                      (1, 1 + WINDOW * WINDOW, self.width))
    self.blocks = [Block(self.num_heads, self.num_heads, self.dtype, self.attention, trunk=False, name=f"blocks_{j}")
                   for j in range(self.depth)]

  def run(self, windows):
    """(m, 16, C) windows -> (m, C) their cls outputs."""
    cls = jnp.broadcast_to(self.w_cls.astype(self.dtype), (windows.shape[0], 1, self.width))
    x = jnp.concatenate([cls, windows], axis=1) + self.local_pos_embed.astype(self.dtype)
    for block in self.blocks:
      x = block(x)[0]
    return x[:, 0]

  def __call__(self, x):
    b, h, w, c = x.shape
    if h % WINDOW or w % WINDOW:
      raise ValueError(f"the 4K tokenizer needs a token grid divisible by {WINDOW}, got {h}x{w} "
                       f"(images of sides divisible by {WINDOW * 16})")
    x = x.reshape(b, h // WINDOW, WINDOW, w // WINDOW, WINDOW, c).transpose(0, 1, 3, 2, 4, 5)
    windows = x.reshape(-1, WINDOW * WINDOW, c)
    run = nn.remat(Tokenizer.run) if self.remat else Tokenizer.run
    out = [run(self, windows[i:i + WINDOW_CHUNK]) for i in range(0, windows.shape[0], WINDOW_CHUNK)]
    return jnp.concatenate(out, axis=0).reshape(b, (h // WINDOW) * (w // WINDOW), c)


class Sapiens2ViT(nn.Module):
  """`embed` (patch tokens, tokenizer) and `encode` (prefix tokens, RoPE, blocks, final norm) are
  separate so masked objectives encode a subset of the tokens, each rotated by its own position."""
  dims: Size
  image_size: tuple  # (H, W)
  patch_size: int = 16
  dtype: Any = jnp.float32
  scan_layers: bool = False
  remat_policy: str = "none"
  attention: str = "auto"
  rope_dtype: str = "bfloat16"

  @property
  def grid(self):
    h, w = self.image_size
    p = self.patch_size * (WINDOW if self.dims.tokenizer_depth else 1)
    return h // p, w // p

  @property
  def num_prefix_tokens(self):
    """The cls token and the registers."""
    return 1 + self.dims.num_registers

  def setup(self):
    d, p = self.dims, self.patch_size
    if self.rope_dtype not in ROPE_DTYPES:
      raise ValueError(f"config.model.rope_dtype={self.rope_dtype!r}; expected one of {ROPE_DTYPES}")
    self.patch_embed = nn.Conv(
        d.width, (p, p), strides=(p, p), padding=0, dtype=self.dtype,
        kernel_init=layers.partitioned(layers.matrix_init(_normal(), 3), (None, None, None, "embed")),
        bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)))
    c_axes = (None, None, "embed")
    self.cls_token = self.param("cls_token", layers.partitioned(_normal(), c_axes), (1, 1, d.width))
    self.storage_tokens = self.param("storage_tokens", layers.partitioned(_normal(), c_axes),
                                     (1, d.num_registers, d.width))
    if d.tokenizer_depth:
      self.tokenizer = Tokenizer(d.width, d.num_heads, d.tokenizer_depth, self.dtype, self.attention,
                                 remat=self.remat_policy != "none")
    if self.scan_layers:  # one nn.scan per segment of equally shaped blocks
      self.blocks = [layers.stack(Block, self._block_kwargs(kv), count, True, self.remat_policy, name, broadcast=1)
                     for name, _, count, kv in d.segments()]
    else:
      self.blocks = [layers.stack(Block, self._block_kwargs(d.kv_heads(i)), 1, False, self.remat_policy, "blocks",
                                  first=i)[0] for i in range(d.depth)]
    self.ln1 = rms_norm("ln1", self.dtype)

  def _block_kwargs(self, kv_heads):
    return dict(num_heads=self.dims.num_heads, num_kv_heads=kv_heads, dtype=self.dtype, attention=self.attention,
                rope_dtype=self.rope_dtype, num_prefix=self.num_prefix_tokens)

  def embed(self, images):
    """(B, H, W, 3) images -> (B, N, C) patch tokens (no position: RoPE rotates them in `encode`)."""
    h, w = images.shape[1:3]
    multiple = self.patch_size * (WINDOW if self.dims.tokenizer_depth else 1)
    if h % multiple or w % multiple:
      raise ValueError(f"Sapiens2{' with the 4K tokenizer' if self.dims.tokenizer_depth else ''} takes images "
                       f"whose sides are multiples of {multiple}, got {h}x{w}")
    if (h, w) != tuple(self.image_size):
      raise ValueError(f"Sapiens2 built for images of {tuple(self.image_size)} (H, W), got {(h, w)}")
    x = self.patch_embed(images.astype(self.dtype))
    if self.dims.tokenizer_depth:
      x = self.tokenizer(x)
    x = x.reshape(x.shape[0], -1, self.dims.width)
    return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

  def encode(self, tokens, ids=None):
    """(B, n, C) patch tokens -> cls, registers, blocks, final norm -> (B, prefix + n, C).

    `ids` (B, n): each token's index in the grid when `tokens` is a subset of it (default: all of
    it, in order); RoPE rotates each token by its own position."""
    d = self.dims
    sin, cos = (jnp.asarray(t) for t in rope_table(self.grid, d.head_dim, self.rope_dtype))
    if ids is None:
      if tokens.shape[1] != sin.shape[0]:
        raise ValueError(f"{tokens.shape[1]} tokens for a {self.grid} grid: pass their grid ids")
      sin, cos = sin[None], cos[None]
    else:
      sin, cos = sin[ids], cos[ids]
    b = tokens.shape[0]
    prefix = jnp.concatenate([self.cls_token, self.storage_tokens], axis=1).astype(self.dtype)
    x = jnp.concatenate([jnp.broadcast_to(prefix, (b, *prefix.shape[1:])), tokens], axis=1)
    for blocks in self.blocks:  # a block, or a scanned segment of them
      x = layers.run_blocks(blocks, x, (sin, cos))
    return self.ln1(x)

  def __call__(self, images):
    return self.encode(self.embed(images))


def build(model_config, image_size, cls_token):
  """The encoder of `model_config` for (H, W) images. Sapiens2 always has its cls token and
  registers (its task models keep them too), so `cls_token` does not change it; its patch
  embedding is never padded, so `model_config.patch_padding` (v1's pose recipe) does not either."""
  del cls_token
  return Sapiens2ViT(dims=size(model_config.size), image_size=tuple(image_size), patch_size=model_config.patch_size,
                     dtype=jnp.dtype(model_config.dtype), scan_layers=model_config.scan_layers,
                     remat_policy=model_config.remat_policy, attention=model_config.attention,
                     rope_dtype=model_config.get("rope_dtype", "bfloat16"))


def grid(model_config, image_size):
  h, w = image_size
  p = model_config.patch_size * (WINDOW if size(model_config.size).tokenizer_depth else 1)
  return h // p, w // p


# ---------------------------------------------------------------- PyTorch names

def _linear_entries(ours, theirs, layout="linear"):
  return [((*ours, "kernel"), f"{theirs}.weight", layout), ((*ours, "bias"), f"{theirs}.bias", "reshape")]


def _block_entries(ours, theirs, trunk=True):
  """A Block's (path, PyTorch key, layout) entries (upstream's TransformerEncoderLayer2 names)."""
  entries = [((ours, "ln1", "scale"), f"{theirs}.ln1.weight", "same"),
             ((ours, "ln2", "scale"), f"{theirs}.ln2.weight", "same")]
  for name in ("wq", "wk", "wv"):
    entries += _linear_entries((ours, "attn", name), f"{theirs}.attn.{name}", "split_out")
  entries += _linear_entries((ours, "attn", "proj"), f"{theirs}.attn.proj", "split_in")
  if trunk:
    entries += [((ours, "attn", "q_norm", "scale"), f"{theirs}.attn.q_norm.weight", "same"),
                ((ours, "attn", "k_norm", "scale"), f"{theirs}.attn.k_norm.weight", "same"),
                ((ours, "attn", "gamma"), f"{theirs}.attn.gamma.weight", "same")]
  entries += _linear_entries((ours, "ffn", "w12"), f"{theirs}.ffn.w12", "split_out")
  entries += _linear_entries((ours, "ffn", "w3"), f"{theirs}.ffn.w3")
  return entries


def _torch_entries(encoder):
  entries = [(("patch_embed", "kernel"), "patch_embed.projection.weight", "conv"),
             (("patch_embed", "bias"), "patch_embed.projection.bias", "same"),
             (("cls_token",), "cls_token", "same"), (("storage_tokens",), "storage_tokens", "same"),
             (("ln1", "scale"), "ln1.weight", "same")]
  if "tokenizer" in encoder:
    entries += [(("tokenizer", "w_cls"), "tokenizer.w_cls", "same"),
                (("tokenizer", "local_pos_embed"), "tokenizer.local_pos_embed", "same")]
    for j in range(torch_names.count_blocks(encoder["tokenizer"], r"blocks_(\d+)")):
      entries += [(("tokenizer", *path), key, layout)
                  for path, key, layout in _block_entries(f"blocks_{j}", f"tokenizer.blocks.{j}", trunk=False)]
  for i in range(torch_names.count_blocks(encoder, r"blocks_(\d+)")):
    entries += _block_entries(f"blocks_{i}", f"blocks.{i}")
  return entries


def torch_part(prefix=""):
  """The encoder's PyTorch keys: bare as in the released pretrain files, under `backbone.` in the
  task checkpoints. The `rope_embed.periods` buffer is not a parameter: see `torch_buffers`."""
  return torch_names.Part("encoder", prefix, _torch_entries, scanned=SEGMENTS)


PERIODS = "rope_embed.periods"


def torch_buffers(model_config, prefix=""):
  """The non-parameter tensors of the upstream module: its RoPE periods, in the rope dtype."""
  dtype = model_config.get("rope_dtype", "bfloat16")
  return {prefix + PERIODS: rope_periods(size(model_config.size).head_dim, dtype).astype(
      ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)}


def architecture(state_dict, prefix=""):
  """(width, depth, heads per kv-head pattern, tokenizer depth, registers) read off the tensors."""
  width = state_dict[prefix + "cls_token"].shape[-1]
  depth = torch_names.count_blocks(state_dict, re.escape(prefix) + r"blocks\.(\d+)\..*")
  head_dim = state_dict[prefix + "blocks.0.attn.q_norm.weight"].shape[0]
  kv = tuple(state_dict[f"{prefix}blocks.{i}.attn.wk.weight"].shape[0] // head_dim for i in range(depth))
  tokenizer = torch_names.count_blocks(state_dict, re.escape(prefix) + r"tokenizer\.blocks\.(\d+)\..*")
  return width, depth, width // head_dim, kv, tokenizer, state_dict[prefix + "storage_tokens"].shape[1]


def _signature(dims):
  return (dims.width, dims.depth, dims.num_heads, tuple(dims.kv_heads(i) for i in range(dims.depth)),
          dims.tokenizer_depth, dims.num_registers)


def size_of(state_dict, prefix=""):
  """The name of the size whose tensors `state_dict` holds, or None."""
  if prefix + "blocks.0.attn.q_norm.weight" not in state_dict:
    return None
  found = architecture(state_dict, prefix)
  return next((name for name, dims in SIZES.items() if _signature(dims) == found), None)


def describe(state_dict, prefix=""):
  width, depth, heads, kv, tokenizer, registers = architecture(state_dict, prefix)
  return (f"a Sapiens2 of width {width}, {depth} blocks, {heads} heads, kv heads {min(kv)}-{max(kv)}, "
          f"{tokenizer} tokenizer blocks, {registers} registers")


def check_state_dict(state_dict, prefix, model_config, what):
  """A Sapiens2 of another size (or a v1 file) is named as such, not drowned in mis-shaped keys."""
  if prefix + "patch_embed.projection.weight" not in state_dict:
    return
  if prefix + "blocks.0.attn.q_norm.weight" not in state_dict:
    raise ValueError(f"init_from={what!r} is not a Sapiens2 backbone (no {prefix}blocks.0.attn.q_norm.weight), "
                     f"but config.model.size={model_config.size!r} is a Sapiens2 size")
  found = size_of(state_dict, prefix)
  if found != model_config.size:
    looks = f"model.size={found!r}" if found else "no known size"
    dims = size(model_config.size)
    raise ValueError(f"init_from={what!r} holds {describe(state_dict, prefix)} ({looks}), but "
                     f"config.model.size={model_config.size!r} is width {dims.width}, {dims.depth} blocks, "
                     f"{dims.num_heads} heads, {dims.tokenizer_depth} tokenizer blocks")


def adapt_state_dict(state_dict, expected, prefix, source_grid, target_grid, what):
  """Positions need no resizing (RoPE is normalised); the periods buffer is checked and dropped."""
  del expected, source_grid, target_grid
  periods = state_dict.pop(prefix + PERIODS, None)
  if periods is not None:
    head_dim = 4 * np.asarray(periods).shape[0]
    ours = [rope_periods(head_dim, dtype) for dtype in ROPE_DTYPES]
    if not any(np.allclose(np.asarray(periods, np.float32), p, rtol=1e-2) for p in ours):
      raise ValueError(f"init_from={what!r}: {prefix}{PERIODS} is not RoPE of base {ROPE_BASE:g} "
                       f"(got {np.asarray(periods)[:4]}..., expected {ours[0][:4]}...)")
  return []


# ---------------------------------------------------------------- costs and lr decay

def layer_id(names, leaf, depth):
  """Upstream's layer ids: tokens, patch embedding and tokenizer 0, block i -> i + 1, the final
  norm depth + 1. Scanned segments get one id per row."""
  if names[0] in ("patch_embed", "cls_token", "storage_tokens", "tokenizer"):
    return 0
  block = re.fullmatch(r"blocks_(\d+)", names[0])
  if block:
    return int(block.group(1)) + 1
  if names[0] in SEGMENTS:
    first = {name: first for name, first, _, _ in segments(depth, 2)}[names[0]]
    count = leaf.shape[0]
    return np.arange(first + 1, first + count + 1).reshape(count, *[1] * (leaf.ndim - 1))
  return depth + 1


def num_layers(model_config):
  return size(model_config.size).depth


def paper_flops(model_config, image_size):
  """Multiply-accumulates of the linear layers on all patch tokens (as v1's Table 2 counts): q and
  proj C^2 each, k and v C * kv * hd each, SwiGLU 12 C^2, per block; the patch embedding; and the
  4K tokenizer's blocks on every window token."""
  d = size(model_config.size)
  h, w = image_size
  p = model_config.patch_size
  patches = (h // p) * (w // p)
  tokens = math.prod(grid(model_config, image_size))
  c = d.width
  blocks = sum(14 * c * c + 2 * c * d.kv_heads(i) * d.head_dim for i in range(d.depth))
  tokenizer = d.tokenizer_depth * 16 * c * c * patches * (1 + WINDOW * WINDOW) / (WINDOW * WINDOW)
  return float(blocks * tokens + 3 * p * p * c * patches + tokenizer)


def encoder_activation_bytes(model_config, tokens):
  """Rough activation bytes of one example of `tokens` patch tokens (no remat), the MLP's hidden
  layer being twice as wide (SwiGLU) and the tokenizer's windows counted."""
  d = size(model_config.size)
  n = tokens + 1 + d.num_registers
  trunk = layers.activation_bytes(d.width, d.depth, d.num_heads, n, model_config.dtype, model_config.attention)
  mlp = d.depth * n * 8 * d.width * jnp.dtype(model_config.dtype).itemsize
  windows = tokens * WINDOW * WINDOW * (1 + WINDOW * WINDOW) / (WINDOW * WINDOW) if d.tokenizer_depth else 0
  tokenizer = layers.activation_bytes(d.width, d.tokenizer_depth, d.num_heads, int(windows), model_config.dtype,
                                      model_config.attention) if windows else 0
  return trunk + mlp + tokenizer


# ---------------------------------------------------------------- the transformers port's names

# transformers' Sapiens2 port (5.23) names the same tensors otherwise; its save_pretrained writes
# upstream names by default, its native names are these (w12 split into gate_proj, the silu
# branch, and up_proj).
_PORT_NAMES = [
    (r"embeddings\.cls_token", "cls_token"), (r"embeddings\.register_tokens", "storage_tokens"),
    (r"embeddings\.patch_embeddings\.(weight|bias)", r"patch_embed.projection.\1"), (r"norm\.weight", "ln1.weight"),
    (r"model\.layer\.(\d+)\.norm([12])\.weight", r"blocks.\1.ln\2.weight"),
    (r"model\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)", r"blocks.\1.attn.w\2.\3"),
    (r"model\.layer\.(\d+)\.attention\.o_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"model\.layer\.(\d+)\.attention\.([qk]_norm)\.weight", r"blocks.\1.attn.\2.weight"),
    (r"model\.layer\.(\d+)\.layer_scale1\.lambda1", r"blocks.\1.attn.gamma.weight"),
    (r"model\.layer\.(\d+)\.mlp\.down_proj\.(weight|bias)", r"blocks.\1.ffn.w3.\2"),
]
_GATE = re.compile(r"(.*)model\.layer\.(\d+)\.mlp\.(gate|up)_proj\.(weight|bias)")


def upstream_names(state_dict):
  """A state dict in the transformers port's native names -> upstream's (others pass unchanged)."""
  if not any(k.startswith(("embeddings.", "model.layer.", "backbone.embeddings.")) for k in state_dict):
    return state_dict
  out, halves = {}, {}
  for key, value in state_dict.items():
    gate = _GATE.fullmatch(key)
    if gate:
      prefix, layer, half, kind = gate.groups()
      halves.setdefault(f"{prefix}blocks.{layer}.ffn.w12.{kind}", {})[half] = value
      continue
    prefix = "backbone." if key.startswith("backbone.") else ""
    rest = key[len(prefix):]
    for pattern, replacement in _PORT_NAMES:
      if re.fullmatch(pattern, rest):
        rest = re.sub(pattern, replacement, rest)
        break
    out[prefix + rest] = value
  for key, pair in halves.items():
    if set(pair) != {"gate", "up"}:
      raise ValueError(f"{key}: the transformers port's gate_proj and up_proj come in pairs, found only {set(pair)}")
    out[key] = np.concatenate([np.asarray(pair["gate"]), np.asarray(pair["up"])], axis=0)
  return out


def transformers_config(model_config, image_size):
  """config.json of the transformers port's Sapiens2Model for this size (no 4K tokenizer there)."""
  d = size(model_config.size)
  if d.tokenizer_depth:
    raise ValueError(f"config.model.size={model_config.size!r}: the transformers port has no 4K tokenizer; "
                     f"export it in the upstream layout (.safetensors) instead")
  return {"model_type": "sapiens2", "architectures": ["Sapiens2Model"], "hidden_size": d.width,
          "intermediate_size": 4 * d.width, "num_hidden_layers": d.depth, "num_attention_heads": d.num_heads,
          "num_key_value_heads_per_layer": [d.kv_heads(i) for i in range(d.depth)],
          "patch_size": model_config.patch_size, "num_channels": 3, "image_size": list(image_size),
          "num_register_tokens": d.num_registers, "rope_theta": ROPE_BASE, "rms_norm_eps": NORM_EPS,
          "hidden_act": "silu", "use_gated_mlp": True, "use_qk_norm": True, "query_bias": True, "key_bias": True,
          "value_bias": True, "proj_bias": True, "mlp_bias": True}
