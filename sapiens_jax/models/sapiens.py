"""Sapiens (2024): the plain ViT of paper Table 2, as the released code builds it.

A patch-16 convolution, an optional cls token, a learnt position table (initialised to fixed 2D
sin-cos), L pre-norm blocks and a final LayerNorm. Parameter names mirror the PyTorch state dict
(`patch_embed`, `cls_token`, `pos_embed`, `layers_{i}/...`, final `ln1`), so weight conversion is
a rename plus a transpose (`torch_part`). Everything a backbone family owns is here: the size
table, the module, its PyTorch names, its layer ids for layer-wise lr decay, its FLOPs, and how
its position table adapts to another token grid on load.
"""
import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sapiens_jax import torch_names
from sapiens_jax.models import layers
from sapiens_jax.models import posemb


@dataclasses.dataclass(frozen=True)
class Size:
  width: int  # C
  depth: int  # L
  num_heads: int
  mlp_ratio: int = 4


# The four Sapiens sizes are the paper's Table 2; "small" is for the CPU quickstart, "tiny" for tests.
SIZES = {
    "0.3b": Size(width=1024, depth=24, num_heads=16),
    "0.6b": Size(width=1280, depth=32, num_heads=16),
    "1b": Size(width=1536, depth=40, num_heads=24),
    "2b": Size(width=1920, depth=48, num_heads=32),
    "small": Size(width=192, depth=6, num_heads=3),
    "tiny": Size(width=64, depth=2, num_heads=4),
}


def size(name):
  """The Size named `name`, with an error that lists the valid names."""
  if name not in SIZES:
    raise ValueError(f"config.model.size={name!r} is not a known size; expected one of {sorted(SIZES)}")
  return SIZES[name]


class ViT(nn.Module):
  """`embed` and `encode` are separate so MAE can drop tokens between them; `__call__` runs both."""
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
  attention: str = "auto"  # models.attention.IMPLEMENTATIONS

  @property
  def grid(self):
    return token_grid(self.image_size, self.patch_size, self.patch_padding)

  @property
  def num_prefix_tokens(self):
    """Tokens before the patch tokens in the output: the cls token, when there is one."""
    return int(self.use_cls_token)

  def setup(self):
    p, c = self.patch_size, self.width
    self.patch_embed = nn.Conv(
        c, (p, p), strides=(p, p), padding=self.patch_padding, dtype=self.dtype,
        # Xavier over PyTorch's (C, 3*p*p) view of the kernel.
        kernel_init=layers.partitioned(
            layers.matrix_init(nn.initializers.xavier_uniform(), 3), (None, None, None, "embed")),
        bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)))
    extra = self.num_prefix_tokens
    if self.use_cls_token:
      self.cls_token = self.param(
          "cls_token", layers.partitioned(nn.initializers.normal(0.02), (None, None, "embed")), (1, 1, c))
    gh, gw = self.grid
    self.pos_embed = self.param("pos_embed", layers.partitioned(
        layers.sincos_init(self.grid, extra), (None, None, "embed")), (1, extra + gh * gw, c))
    self.layers = layers.make_blocks(self.depth, self.num_heads, self.dtype, self.scan_layers, self.remat_policy,
                                     self.attention)
    self.ln1 = layers.layer_norm("ln1", self.dtype)

  def embed(self, images):
    """(B, H, W, 3) images -> (B, N, C) patch tokens with their position embedding added."""
    if tuple(images.shape[1:3]) != tuple(self.image_size):
      raise ValueError(f"ViT built for images of {tuple(self.image_size)} (H, W), got {tuple(images.shape[1:3])}")
    x = self.patch_embed(images.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, self.width)
    x = x + self.pos_embed[:, self.num_prefix_tokens:].astype(self.dtype)
    return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

  def encode(self, tokens, ids=None):
    """(B, n, C) tokens -> prepend cls (with its position slot) -> blocks -> final norm. `ids` (the
    tokens' grid positions) is unused: `embed` added the position table."""
    del ids
    if self.use_cls_token:
      cls = (self.cls_token + self.pos_embed[:, :1]).astype(self.dtype)
      tokens = jnp.concatenate([jnp.broadcast_to(cls, (tokens.shape[0], 1, self.width)), tokens], axis=1)
    return self.ln1(layers.run_blocks(self.layers, tokens))

  def __call__(self, images):
    return self.encode(self.embed(images))


def token_grid(image_size, patch_size, patch_padding=0):
  """(h, w) of the patch-token grid of a padded, strided patch convolution."""
  h, w = image_size
  p, pad = patch_size, patch_padding
  return ((h + 2 * pad - p) // p + 1, (w + 2 * pad - p) // p + 1)


def build(model_config, image_size, cls_token):
  """The encoder of `model_config` for (H, W) images; MAE pretrains with a cls token, the task
  fine-tunes drop it (reference §1.3)."""
  dims = size(model_config.size)
  return ViT(width=dims.width, depth=dims.depth, num_heads=dims.num_heads, image_size=tuple(image_size),
             patch_size=model_config.patch_size, patch_padding=model_config.patch_padding,
             use_cls_token=cls_token, dtype=jnp.dtype(model_config.dtype),
             scan_layers=model_config.scan_layers, remat_policy=model_config.remat_policy,
             attention=model_config.attention)


def grid(model_config, image_size):
  return token_grid(image_size, model_config.patch_size, model_config.patch_padding)


# ---------------------------------------------------------------- PyTorch names

def _torch_entries(encoder):
  """(path in params["encoder"], key, layout), for the unscanned encoder params."""
  entries = [(("patch_embed", "kernel"), "patch_embed.projection.weight", "conv"),
             (("patch_embed", "bias"), "patch_embed.projection.bias", "same"),
             (("pos_embed",), "pos_embed", "same")]
  if "cls_token" in encoder:
    entries.append((("cls_token",), "cls_token", "same"))
  depth = torch_names.count_blocks(encoder, r"layers_(\d+)")
  for i in range(depth):
    entries += layers.block_torch_entries(f"layers_{i}", f"layers.{i}")
  return entries + torch_names.norm_entries(("ln1",), "ln1")


def torch_part(prefix=""):
  """The encoder's PyTorch keys: bare as in the released `*_clean.pth` files, or under `backbone.`
  as inside full MAE and task checkpoints."""
  return torch_names.Part("encoder", prefix, _torch_entries, scanned="layers")


def torch_buffers(model_config, prefix=""):
  del model_config, prefix
  return {}


def upstream_names(state_dict):
  return state_dict  # no other port's names to read


def transformers_config(model_config, image_size):
  del image_size
  raise ValueError(f"config.model.size={model_config.size!r}: transformers has no Sapiens (v1) port; export "
                   f"it as .safetensors or .pth")


def _width_depth(state_dict, prefix):
  depth = torch_names.count_blocks(state_dict, re.escape(prefix) + r"layers\.(\d+)\..*")
  return state_dict[prefix + "patch_embed.projection.weight"].shape[0], depth


def size_of(state_dict, prefix=""):
  """The name of the size whose tensors `state_dict` holds, or None."""
  if not all(prefix + k in state_dict for k in ("patch_embed.projection.weight", "layers.0.attn.qkv.weight")):
    return None
  found = _width_depth(state_dict, prefix)
  return next((name for name, s in SIZES.items() if (s.width, s.depth) == found), None)


def check_state_dict(state_dict, prefix, model_config, what):
  """A backbone of another size is named as such, not drowned in a list of mis-shaped keys."""
  if prefix + "patch_embed.projection.weight" not in state_dict:
    return
  if prefix + "layers.0.attn.qkv.weight" not in state_dict and prefix + "blocks.0.attn.wq.weight" in state_dict:
    raise ValueError(f"init_from={what!r} holds a Sapiens2 backbone, but config.model.size={model_config.size!r} "
                     f"is a Sapiens (v1) size: set config.model.size to a sapiens2_* size")
  found = _width_depth(state_dict, prefix)
  dims = size(model_config.size)
  if found != (dims.width, dims.depth):
    name = size_of(state_dict, prefix)
    looks = f"model.size={name!r}" if name else "no known size"
    raise ValueError(f"init_from={what!r} holds a ViT of width {found[0]} with {found[1]} blocks ({looks}), "
                     f"but config.model.size={model_config.size!r} is width {dims.width} with {dims.depth} blocks")


def adapt_state_dict(state_dict, expected, prefix, source_grid, target_grid, what):
  """Brings the position table in `state_dict` (in place) to the model's grid and cls slot.

  The source grid is `source_grid` where known (a run of ours), else inferred from the token
  count; the cls row is kept or dropped to match the model, the cls token itself too. Returns a
  description of what was resized.
  """
  key = prefix + "pos_embed"
  cls_in = int(prefix + "cls_token" in state_dict)
  cls_out = int(prefix + "cls_token" in expected)
  if not cls_out:
    state_dict.pop(prefix + "cls_token", None)  # fine-tuning ViTs have none
  if key not in state_dict or key not in expected:
    return []
  return posemb.fit_table(state_dict, key, expected[key], cls_in, cls_out, source_grid, target_grid, what)


# ---------------------------------------------------------------- costs and lr decay

def layer_id(names, leaf, depth):
  """The reference's layer id of an encoder parameter (path `names` inside params["encoder"]):
  patch, position and cls embeddings 0, block i -> i + 1, the final norm depth + 1. Scanned blocks
  get one id per row."""
  if names[0] in ("patch_embed", "pos_embed", "cls_token"):
    return 0
  block = re.fullmatch(r"layers_(\d+)", names[0])
  if block:
    return int(block.group(1)) + 1
  if names[0] == "layers":  # nn.scan stacks the blocks on axis 0
    return np.arange(1, depth + 1).reshape(depth, *[1] * (leaf.ndim - 1))
  return depth + 1


def num_layers(model_config):
  return size(model_config.size).depth


def paper_flops(model_config, image_size):
  """Multiply-accumulates of the encoder's linear layers on all tokens, as the paper's Table 2 counts."""
  dims = size(model_config.size)
  h, w = image_size
  p = model_config.patch_size
  tokens = (h // p) * (w // p)
  return float(dims.depth * 12 * dims.width ** 2 * tokens + 3 * p * p * dims.width * tokens)


def encoder_activation_bytes(model_config, tokens):
  """Rough activation bytes one example of `tokens` tokens keeps in the encoder (no remat)."""
  dims = size(model_config.size)
  return layers.activation_bytes(dims.width, dims.depth, dims.num_heads, tokens, model_config.dtype,
                                 model_config.attention)
