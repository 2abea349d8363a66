"""The Sapiens ViT encoder: written once, used by MAE pretraining and by every task head.

Parameter names mirror the original PyTorch state dict (`patch_embed`, `cls_token`, `pos_embed`,
`layers_{i}/{ln1,attn/{qkv,proj}_{kernel,bias},ln2,ffn/fc1,ffn/fc2}`, final `ln1`) so weight conversion is a
rename plus a transpose. Every parameter and activation carries logical axis names; how they map
onto a device mesh is decided by the sharding rules, not here.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# name: (width C, depth L, heads). The four Sapiens sizes are the paper's Table 2; "tiny" is for
# unit tests and "small" for the CPU quickstart.
SIZES = {
    "0.3b": (1024, 24, 16),
    "0.6b": (1280, 32, 16),
    "1b": (1536, 40, 24),
    "2b": (1920, 48, 32),
    "small": (192, 6, 3),
    "tiny": (64, 2, 4),
}

LN_EPS = 1e-6  # every LayerNorm in Sapiens (blocks, final norm, MAE decoder)

# Activation checkpointing of each block: what the backward pass may keep instead of recomputing.
REMAT_POLICIES = {
    "none": None,                                          # keep everything (fastest, most memory)
    "dots": jax.checkpoint_policies.checkpoint_dots,       # keep matmul outputs, recompute the rest
    "full": jax.checkpoint_policies.nothing_saveable,      # keep only block inputs
}


def size_dims(size):
  """(width, depth, heads) for a size name, with an error that lists the valid names."""
  if size not in SIZES:
    raise ValueError(f"config.model.size={size!r} is not a known size; expected one of {sorted(SIZES)}")
  return SIZES[size]


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


def attention_implementation(head_dim, dtype, backend=None):
  """cuDNN's fused flash attention where it applies (GPU, 16-bit, head dim a multiple of 8 up to
  128), XLA elsewhere (CPU, TPU, float32, and Sapiens-2B's head dim of 60)."""
  backend = backend or jax.default_backend()
  fits = jnp.dtype(dtype).itemsize == 2 and head_dim % 8 == 0 and head_dim <= 128
  return "cudnn" if backend == "gpu" and fits else "xla"


def _matmul(x, kernel):
  """(B, T, *in) @ (*in, *out) -> (B, T, *out), as one 2-D matmul with the in and out axes flattened."""
  num_in = x.ndim - 2
  flat_kernel = kernel.reshape(math.prod(kernel.shape[:num_in]), -1)
  return (x.reshape(*x.shape[:2], -1) @ flat_kernel).reshape(*x.shape[:2], *kernel.shape[num_in:])


class Attention(nn.Module):
  """Multi-head self-attention with a fused q|k|v projection (heads contiguous inside q, k, v)."""
  num_heads: int
  dtype: Any = jnp.float32

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
    q, k, v = (_matmul(x, kernel[:, i]) + bias[i] for i in range(3))
    q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", "act_kv"))
    out = jax.nn.dot_product_attention(q, k, v, implementation=attention_implementation(head_dim, self.dtype))
    proj_kernel = self.param(
        "proj_kernel", partitioned(matrix_init(nn.initializers.xavier_uniform(), 2),
                                   ("heads", "kv", "embed")), (self.num_heads, head_dim, width))
    proj_bias = self.param("proj_bias", partitioned(nn.initializers.zeros, ("embed",)), (width,))
    return _matmul(out, proj_kernel.astype(self.dtype)) + proj_bias.astype(self.dtype)


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
    h = nn.gelu(h, approximate=False)
    h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_mlp"))
    return nn.Dense(width, dtype=self.dtype, name="fc2",
                    kernel_init=partitioned(nn.initializers.xavier_uniform(), ("mlp", "embed")),
                    bias_init=partitioned(nn.initializers.zeros, ("embed",)))(h)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(ln1(x)), then x + ffn(ln2(x)); no layer scale."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x + Attention(self.num_heads, self.dtype, name="attn")(layer_norm("ln1", self.dtype)(x))
    x = x + Mlp(4 * x.shape[-1], self.dtype, name="ffn")(layer_norm("ln2", self.dtype)(x))
    return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))


class ScanBlock(Block):
  """A Block in the (carry, x) -> (carry, y) form that nn.scan wants."""

  def __call__(self, x, _):
    return super().__call__(x), None


def make_blocks(depth, num_heads, dtype, scan, remat_policy, name=None):
  """`depth` blocks: a list (params `name_0`, `name_1`, ...) or, with `scan`, one scanned module whose
  params are stacked on a leading "layers" axis (one compiled block body: faster compiles)."""
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat_policy={remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}")
  policy = REMAT_POLICIES[remat_policy]
  block = ScanBlock if scan else Block
  if policy is not None:
    block = nn.remat(block, policy=policy, prevent_cse=not scan)
  if not scan:
    return [block(num_heads, dtype, name=None if name is None else f"{name}_{i}") for i in range(depth)]
  return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=depth,
                 metadata_params={nn.PARTITION_NAME: "layers"})(num_heads, dtype, name=name)


def run_blocks(blocks, x):
  if isinstance(blocks, (list, tuple)):
    for block in blocks:
      x = block(x)
    return x
  return blocks(x, None)[0]


class ViT(nn.Module):
  """Sapiens ViT: patch-16 conv embedding, optional cls token, L pre-norm blocks, final LayerNorm.

  `embed` and `encode` are separate so MAE can drop tokens between them; `__call__` runs both.
  """
  width: int
  depth: int
  num_heads: int
  image_size: tuple  # (H, W)
  patch_size: int = 16
  use_cls_token: bool = True
  patch_padding: int = 0  # some task finetunes pad the patch conv by 2 (reference §1.3)
  dtype: Any = jnp.float32
  scan_layers: bool = False
  remat_policy: str = "none"

  @property
  def grid(self):
    p, pad = self.patch_size, self.patch_padding
    h, w = self.image_size
    return ((h + 2 * pad - p) // p + 1, (w + 2 * pad - p) // p + 1)

  def setup(self):
    p, c = self.patch_size, self.width
    self.patch_embed = nn.Conv(
        c, (p, p), strides=(p, p), padding=self.patch_padding, dtype=self.dtype,
        # Xavier over PyTorch's (C, 3*p*p) view of the kernel.
        kernel_init=partitioned(
            matrix_init(nn.initializers.xavier_uniform(), 3), (None, None, None, "embed")),
        bias_init=partitioned(nn.initializers.zeros, ("embed",)))
    extra = 1 if self.use_cls_token else 0
    if self.use_cls_token:
      self.cls_token = self.param(
          "cls_token", partitioned(nn.initializers.normal(0.02), (None, None, "embed")), (1, 1, c))
    gh, gw = self.grid
    self.pos_embed = self.param(
        "pos_embed", partitioned(sincos_init(self.grid, extra), (None, None, "embed")), (1, extra + gh * gw, c))
    self.layers = make_blocks(self.depth, self.num_heads, self.dtype, self.scan_layers, self.remat_policy)
    self.ln1 = layer_norm("ln1", self.dtype)

  def embed(self, images):
    """(B, H, W, 3) images -> (B, N, C) patch tokens with their position embedding added."""
    if tuple(images.shape[1:3]) != tuple(self.image_size):
      raise ValueError(f"ViT built for images of {tuple(self.image_size)} (H, W), got {tuple(images.shape[1:3])}")
    x = self.patch_embed(images.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, self.width)
    extra = 1 if self.use_cls_token else 0
    x = x + self.pos_embed[:, extra:].astype(self.dtype)
    return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

  def encode(self, tokens):
    """(B, n, C) tokens -> prepend cls (with its position slot) -> blocks -> final norm."""
    if self.use_cls_token:
      cls = (self.cls_token + self.pos_embed[:, :1]).astype(self.dtype)
      tokens = jnp.concatenate([jnp.broadcast_to(cls, (tokens.shape[0], 1, self.width)), tokens], axis=1)
    return self.ln1(run_blocks(self.layers, tokens))

  def __call__(self, images):
    return self.encode(self.embed(images))


def vit_from_config(model_config, image_size, use_cls_token=True):
  width, depth, heads = size_dims(model_config.size)
  return ViT(width=width, depth=depth, num_heads=heads, image_size=tuple(image_size),
             patch_size=model_config.patch_size, patch_padding=model_config.patch_padding,
             use_cls_token=use_cls_token,
             dtype=jnp.dtype(model_config.dtype), scan_layers=model_config.scan_layers,
             remat_policy=model_config.remat_policy)
