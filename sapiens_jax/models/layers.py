"""Transformer pieces shared by the backbones and the MAE decoder: pre-norm blocks, attention, MLP,
fixed sin-cos position tables, initialisers, scan and remat.

Every parameter and activation carries logical axis names; how they map onto a device mesh is
decided by the sharding rules, not here. `block_torch_entries` names a block's parameters as the
original mmcv code does, next to the block it names.
"""
import math
from typing import Any

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from sapiens_jax import torch_names
from sapiens_jax.models import attention

LN_EPS = 1e-6  # every LayerNorm in Sapiens (blocks, final norm, MAE decoder)

# Activation checkpointing of each block: which of its values the backward pass keeps (by name)
# instead of recomputing them from the block's input. "dots" keeps what the backward reads of every
# matmul (q, k, v, the attention's output and softmax statistics, the projection's output, the MLP's
# hidden layer), so no matmul runs twice; "qkv_proj" recomputes the MLP's first matmul instead of
# keeping its 4C-wide output; "full" keeps nothing but the block's input. None keeps attention's
# score blocks: the blocked and fused attentions recompute them block by block anyway.
QKV, PROJECTION, MLP_HIDDEN = "qkv", "attention_projection", "mlp_hidden"
_NAMED = jax.checkpoint_policies.save_only_these_names
REMAT_POLICIES = {
    "none": None,                                               # keep everything (most memory)
    "dots": _NAMED(QKV, attention.RESIDUALS, PROJECTION, MLP_HIDDEN),
    "qkv_proj": _NAMED(QKV, attention.RESIDUALS, PROJECTION),
    "full": jax.checkpoint_policies.nothing_saveable,           # keep only block inputs
}


def partitioned(init_fn, names):
  return nn.with_logical_partitioning(init_fn, names)


def matrix_init(init_fn, num_in_axes):
  """`init_fn` drawn on the 2-D (fan_in, fan_out) view of the shape, then reshaped.

  The distribution is the same (fans are products of the leading / trailing axes either way),
  but XLA:CPU compiles JAX's partitionable threefry over 3-D and 4-D shapes several times slower:
  initialising a small model took seconds per layer.
  """
  def init(key, shape, dtype=jnp.float32):
    fan_in = int(np.prod(shape[:num_in_axes]))
    return init_fn(key, (fan_in, int(np.prod(shape)) // fan_in), dtype).reshape(shape)
  return init


def sincos_2d(grid_hw, dim, temperature=10000.0):
  """Fixed 2D sin-cos position embedding of shape (h*w, dim), tokens row-major over (h, w).

  Channels are [sin(row*w_k), cos(row*w_k), sin(col*w_k), cos(col*w_k)] with
  w_k = 1 / temperature**(k / (dim/4)), as in the Sapiens/MAE code (identical for square grids).
  """
  if dim % 4:
    raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
  h, w = grid_hw
  omega = 1.0 / temperature ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
  rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
  out_r = rows.reshape(-1, 1) * omega
  out_c = cols.reshape(-1, 1) * omega
  return np.concatenate([np.sin(out_r), np.cos(out_r), np.sin(out_c), np.cos(out_c)], axis=1).astype(np.float32)


def sincos_init(grid_hw, num_extra_tokens):
  """Initialiser for a (1, extra + h*w, C) position embedding: zero rows for extra tokens, then sin-cos."""
  def init(key, shape, dtype=jnp.float32):
    del key
    table = sincos_2d(grid_hw, shape[-1])
    table = np.concatenate([np.zeros((num_extra_tokens, shape[-1]), np.float32), table])
    return jnp.asarray(table[None], dtype)
  return init


def layer_norm(name, dtype):
  return nn.LayerNorm(
      epsilon=LN_EPS, dtype=dtype, name=name,
      scale_init=partitioned(nn.initializers.ones, ("embed",)),
      bias_init=partitioned(nn.initializers.zeros, ("embed",)))


def matmul(x, kernel):
  """(B, T, *in) @ (*in, *out) -> (B, T, *out), as one 2-D matmul with the in and out axes flattened."""
  num_in = x.ndim - 2
  flat_kernel = kernel.reshape(math.prod(kernel.shape[:num_in]), -1)
  return (x.reshape(*x.shape[:2], -1) @ flat_kernel).reshape(*x.shape[:2], *kernel.shape[num_in:])


class Attention(nn.Module):
  """Multi-head self-attention with a fused q|k|v projection (heads contiguous inside q, k, v)."""
  num_heads: int
  dtype: Any = jnp.float32
  implementation: str = "auto"  # models.attention.IMPLEMENTATIONS

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    shape = (3, self.num_heads, head_dim)
    # qkv kernel (C, 3, heads, head_dim) is PyTorch's (3C, C) qkv weight, transposed and split.
    qkv_kernel = self.param(
        "qkv_kernel", partitioned(matrix_init(nn.initializers.xavier_uniform(), 1),
                                  ("embed", None, "heads", "kv")), (width, *shape))
    qkv_bias = self.param("qkv_bias", partitioned(nn.initializers.zeros, (None, "heads", "kv")), shape)
    kernel, bias = qkv_kernel.astype(self.dtype), qkv_bias.astype(self.dtype)
    # Three plain (C, C) matmuls, not one einsum into (3, heads, head_dim): XLA:CPU copies a transposed
    # kernel for each backward matmul that contracts several axes (18% of a 0.3b step, BENCHMARKS.md).
    # Slicing the unsharded q|k|v axis keeps heads the major, shardable axis of each (C, C) matrix.
    q, k, v = (checkpoint_name(matmul(x, kernel[:, i]) + bias[i], QKV) for i in range(3))
    axes = ("act_batch", "act_length", "act_heads", "act_kv")
    q = nn.with_logical_constraint(q, axes)
    out = attention.attention(q, k, v, self.implementation, partition=nn.logical_to_mesh_axes(axes))
    proj_kernel = self.param(
        "proj_kernel", partitioned(matrix_init(nn.initializers.xavier_uniform(), 2),
                                   ("heads", "kv", "embed")), (self.num_heads, head_dim, width))
    proj_bias = self.param("proj_bias", partitioned(nn.initializers.zeros, ("embed",)), (width,))
    return checkpoint_name(matmul(out, proj_kernel.astype(self.dtype)) + proj_bias.astype(self.dtype), PROJECTION)


class Mlp(nn.Module):
  """Linear(4C) -> exact-erf GELU -> Linear(C)."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    h = nn.Dense(self.hidden, dtype=self.dtype, name="fc1",
                 kernel_init=partitioned(nn.initializers.xavier_uniform(), ("embed", "mlp")),
                 bias_init=partitioned(nn.initializers.zeros, ("mlp",)))(x)
    h = nn.gelu(checkpoint_name(h, MLP_HIDDEN), approximate=False)
    h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_mlp"))
    return nn.Dense(width, dtype=self.dtype, name="fc2",
                    kernel_init=partitioned(nn.initializers.xavier_uniform(), ("mlp", "embed")),
                    bias_init=partitioned(nn.initializers.zeros, ("embed",)))(h)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(ln1(x)), then x + ffn(ln2(x)); no layer scale.

  Its second argument and output exist so nn.scan can use it as (carry, x) -> (carry, y).
  """
  num_heads: int
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, unused=None):
    attn = Attention(self.num_heads, self.dtype, self.attention, name="attn")
    x = x + attn(layer_norm("ln1", self.dtype)(x))
    x = x + Mlp(4 * x.shape[-1], self.dtype, name="ffn")(layer_norm("ln2", self.dtype)(x))
    return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed")), unused


def make_blocks(depth, num_heads, dtype, scan, remat_policy, attention_implementation="auto", name=None):
  """`depth` Blocks: a list (params `name_0`, `name_1`, ...) or, with `scan`, one scanned module whose
  params are stacked on a leading "layers" axis (one compiled block body: faster compiles)."""
  return stack(Block, dict(num_heads=num_heads, dtype=dtype, attention=attention_implementation), depth, scan,
               remat_policy, name)


def stack(block, kwargs, depth, scan, remat_policy, name=None, first=0, broadcast=0):
  """`depth` modules `block(**kwargs)` called as (x, *args) -> (x, _), with `remat_policy`: a list
  named `name_{first}`, `name_{first + 1}`, ..., or one nn.scan over them whose trailing `broadcast`
  arguments are the same for every block (e.g. RoPE tables)."""
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat_policy={remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}")
  policy = REMAT_POLICIES[remat_policy]
  block = block if policy is None else nn.remat(block, policy=policy, prevent_cse=not scan)
  if not scan:
    return [block(**kwargs, name=None if name is None else f"{name}_{first + i}") for i in range(depth)]
  return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=depth,
                 in_axes=(nn.broadcast,) * broadcast or 0,
                 metadata_params={nn.PARTITION_NAME: "layers"})(**kwargs, name=name)


def run_blocks(blocks, x, *args):
  """Runs a `stack` (a list or a scan) on x; `args` go to every block."""
  if isinstance(blocks, (list, tuple)):
    for block in blocks:
      x = block(x, *args)[0]
    return x
  return blocks(x, *(args or (None,)))[0]


def activation_bytes(width, depth, num_heads, tokens, dtype, attention_implementation):
  """Rough bytes of activations one example keeps for the backward pass in `depth` Blocks (no
  remat): per token and block ~16 widths (norm outputs, q/k/v, attention output, 2 x 4C MLP,
  residual), plus one row of attention probabilities per head where attention is the plain
  formula (the blocked and fused paths keep none)."""
  path = attention.resolve(attention_implementation, width // num_heads, dtype)
  scores = num_heads * tokens if path == "xla" else 0
  return depth * tokens * (16 * width + scores) * jnp.dtype(dtype).itemsize


def tokens_to_map(tokens, grid):
  """(B, h*w, C) patch tokens (prefix tokens already dropped) -> the (B, h, w, C) map heads read."""
  h, w = grid
  if tokens.ndim != 3 or tokens.shape[1] != h * w:
    raise ValueError(f"expected patch tokens of shape (B, {h * w}, C) for a {h}x{w} grid, got {tokens.shape}")
  return tokens.reshape(tokens.shape[0], h, w, tokens.shape[2])


def block_torch_entries(ours, theirs):
  """A Block's (path, PyTorch key, layout) entries; `ours`/`theirs` are its name in each tree
  (mmcv's names: ln1, attn.qkv, attn.proj, ln2, ffn.layers.0.0, ffn.layers.1)."""
  entries = torch_names.norm_entries((ours, "ln1"), f"{theirs}.ln1")
  entries += torch_names.norm_entries((ours, "ln2"), f"{theirs}.ln2")
  entries += [((ours, "attn", name), f"{theirs}.attn.{key}", layout) for name, key, layout in (
      ("qkv_kernel", "qkv.weight", "split_out"), ("qkv_bias", "qkv.bias", "reshape"),
      ("proj_kernel", "proj.weight", "split_in"), ("proj_bias", "proj.bias", "same"))]
  entries += torch_names.dense_entries((ours, "ffn", "fc1"), f"{theirs}.ffn.layers.0.0")
  entries += torch_names.dense_entries((ours, "ffn", "fc2"), f"{theirs}.ffn.layers.1")
  return entries
