"""An independent PyTorch Sapiens2 backbone, written from the facts in sapiens2.md §1.

It is the numerics oracle for the JAX port, so it does what upstream's standalone `Sapiens2` does op by op,
quirks included: RoPE angles and the q/k rotation are computed in `rope_dtype` (bf16 by default, even for
float32 inputs), prefix tokens (cls + registers) are cast through that dtype without being rotated, and GQA
expands k/v with `repeat_interleave`. Module attribute names are chosen so `state_dict()` keys are exactly
upstream's (`blocks.0.attn.wq.weight`, `rope_embed.periods`, `tokenizer.w_cls`, ...), which is what lets tests
load released files with `load_state_dict(strict=True)`.
"""
import math

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

EPS = 1e-6
PATCH_SIZE = 16
FULL_KV_EDGE = 8  # layers i < 8 and i >= depth - 8 keep all kv heads; the ones between use num_heads // 2

# arch -> (width, depth, num_heads, tokenizer layers of its 4K variant); build one with `sapiens2(arch)`.
SIZES = {
    "sapiens2_0.1b": (768, 12, 12, 2),
    "sapiens2_0.4b": (1024, 24, 16, 2),
    "sapiens2_0.8b": (1280, 32, 16, 3),
    "sapiens2_1b": (1536, 40, 24, 4),
    "sapiens2_5b": (2432, 56, 32, 6),
}


def rotate_half(x):
  """[a, b] -> [-b, a] on the two halves of the last dim."""
  a, b = x.chunk(2, dim=-1)
  return torch.cat([-b, a], dim=-1)


def apply_rope(q, k, cos, sin):
  """Rotates the last cos.shape[0] tokens of q and k; like upstream, every token goes through cos.dtype and back."""
  dtype = q.dtype
  num_prefix = q.shape[-2] - cos.shape[0]

  def rotate(x):
    x = x.to(cos.dtype)
    prefix, patches = x[..., :num_prefix, :], x[..., num_prefix:, :]
    return torch.cat([prefix, patches * cos + rotate_half(patches) * sin], dim=-2).to(dtype)

  return rotate(q), rotate(k)


class RopeEmbedding(nn.Module):
  """2-D RoPE with per-axis normalised coordinates in [-1, 1]; every step in `dtype` with torch ops, as upstream."""

  def __init__(self, head_dim, base, dtype):
    super().__init__()
    assert head_dim % 4 == 0, head_dim
    self.dtype = dtype
    periods = base ** (2 * torch.arange(head_dim // 4, dtype=dtype) / (head_dim // 2))
    self.register_buffer("periods", periods, persistent=True)

  def forward(self, gh, gw):
    """(cos, sin), each [gh*gw, head_dim]: h-angles then w-angles, tiled twice."""
    dd = dict(dtype=self.dtype, device=self.periods.device)
    coords_h = torch.arange(0.5, gh, **dd) / gh
    coords_w = torch.arange(0.5, gw, **dd) / gw
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0
    angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]
    angles = angles.flatten(1, 2).tile(2)
    return torch.cos(angles), torch.sin(angles)


class LayerScale(nn.Module):
  """Per-channel scale; a module so its key is `attn.gamma.weight`."""

  def __init__(self, dim, init):
    super().__init__()
    self.weight = nn.Parameter(torch.full((dim,), float(init)))

  def forward(self, x):
    return x * self.weight


class Attention(nn.Module):
  """Separate q/k/v/proj Linears; optional QK-norm (per head), GQA, RoPE and LayerScale (trunk has all four)."""

  def __init__(self, dim, num_heads, num_kv_heads, qk_norm=True, layer_scale_init=None):
    super().__init__()
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
    self.wq = nn.Linear(dim, dim)
    self.wk = nn.Linear(dim, num_kv_heads * self.head_dim)
    self.wv = nn.Linear(dim, num_kv_heads * self.head_dim)
    self.proj = nn.Linear(dim, dim)
    self.q_norm = nn.RMSNorm(self.head_dim, eps=EPS) if qk_norm else nn.Identity()
    self.k_norm = nn.RMSNorm(self.head_dim, eps=EPS) if qk_norm else nn.Identity()
    self.gamma = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()

  def forward(self, x, rope=None):
    b, n, c = x.shape
    q = self.wq(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
    k = self.wk(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
    v = self.wv(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
    q, k = self.q_norm(q), self.k_norm(k)
    if self.num_kv_heads != self.num_heads:  # kv head j serves the contiguous query heads j*g .. j*g + g - 1
      group = self.num_heads // self.num_kv_heads
      k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if rope is not None:
      q, k = apply_rope(q, k, *rope)
    out = F.scaled_dot_product_attention(q, k, v)
    return self.gamma(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class SwiGLU(nn.Module):
  """`w12` packs the silu branch (first half) and the multiplier (second half); no LayerScale on this branch."""

  def __init__(self, dim, hidden):
    super().__init__()
    self.w12 = nn.Linear(dim, 2 * hidden)
    self.w3 = nn.Linear(hidden, dim)

  def forward(self, x):
    x1, x2 = self.w12(x).chunk(2, dim=-1)
    return self.w3(F.silu(x1) * x2)


class Block(nn.Module):
  """Pre-norm block with RMSNorm; the same class serves the trunk and (without QK-norm/LayerScale) the tokenizer."""

  def __init__(self, dim, num_heads, num_kv_heads, qk_norm=True, layer_scale_init=None):
    super().__init__()
    self.ln1 = nn.RMSNorm(dim, eps=EPS)
    self.attn = Attention(dim, num_heads, num_kv_heads, qk_norm, layer_scale_init)
    self.ln2 = nn.RMSNorm(dim, eps=EPS)
    self.ffn = SwiGLU(dim, 4 * dim)

  def forward(self, x, rope=None):
    x = x + self.attn(self.ln1(x), rope)
    return x + self.ffn(self.ln2(x))


class Tokenizer(nn.Module):
  """The 4K variant: each window x window patch group becomes one token (its cls output after a few
  full-MHSA blocks)."""

  def __init__(self, dim, num_heads, num_layers, window_size):
    super().__init__()
    self.window_size = window_size
    self.w_cls = nn.Parameter(torch.zeros(1, 1, dim))
    self.local_pos_embed = nn.Parameter(torch.zeros(1, window_size ** 2 + 1, dim))
    self.blocks = nn.ModuleList([Block(dim, num_heads, num_heads, qk_norm=False) for _ in range(num_layers)])

  def forward(self, x, gh, gw):
    """(B, gh*gw, C) row-major grid -> (B, gh/s * gw/s, C) row-major window grid."""
    b, _, c = x.shape
    s = self.window_size
    assert gh % s == 0 and gw % s == 0, (gh, gw, s)
    x = x.view(b, gh // s, s, gw // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, c)
    x = torch.cat([self.w_cls.expand(x.shape[0], -1, -1), x], dim=1) + self.local_pos_embed
    for block in self.blocks:
      x = block(x)
    return x[:, 0].reshape(b, -1, c)


class PatchEmbed(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.projection = nn.Conv2d(3, dim, PATCH_SIZE, stride=PATCH_SIZE)

  def forward(self, images):
    """(B, 3, H, W) -> tokens (B, h*w, C) and the grid (h, w)."""
    x = self.projection(images)
    return x.flatten(2).transpose(1, 2), tuple(x.shape[-2:])


class Sapiens2Reference(nn.Module):
  """Upstream `Sapiens2` (standalone) with out_type="raw" from `forward` and "featmap" from `featmap`."""

  def __init__(self, width, depth, num_heads, num_tokenizer_layers=0, num_registers=8, rope_base=100.0,
               rope_dtype=torch.bfloat16, layer_scale_init=1e-4, window_size=4):
    super().__init__()
    head_dim = width // num_heads
    self.num_prefix = 1 + num_registers
    self.patch_embed = PatchEmbed(width)
    if num_tokenizer_layers:
      self.tokenizer = Tokenizer(width, num_heads, num_tokenizer_layers, window_size)
    else:
      self.tokenizer = None
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
    self.storage_tokens = nn.Parameter(torch.zeros(1, num_registers, width))
    self.rope_embed = RopeEmbedding(head_dim, rope_base, rope_dtype)

    def kv_heads(i):
      return num_heads if i < FULL_KV_EDGE or i >= depth - FULL_KV_EDGE else num_heads // 2

    self.blocks = nn.ModuleList(
        [Block(width, num_heads, kv_heads(i), layer_scale_init=layer_scale_init) for i in range(depth)])
    self.ln1 = nn.RMSNorm(width, eps=EPS)
    self.reset_parameters()

  def reset_parameters(self):
    """Upstream's init: trunc_normal(0.02) weights and tokens, zero biases, unit norms (gammas keep their init)."""
    for m in self.modules():
      if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
      elif isinstance(m, nn.RMSNorm):
        nn.init.ones_(m.weight)
    tokens = [self.cls_token, self.storage_tokens]
    if self.tokenizer is not None:
      tokens += [self.tokenizer.w_cls, self.tokenizer.local_pos_embed]
    for p in tokens:
      nn.init.trunc_normal_(p, std=0.02)

  def forward_with_grid(self, images):
    """(B, 3, H, W) -> all tokens (B, 1 + R + h*w, C) after the final norm, and the trunk grid (h, w)."""
    x, (gh, gw) = self.patch_embed(images)
    if self.tokenizer is not None:
      x = self.tokenizer(x, gh, gw)
      gh, gw = gh // self.tokenizer.window_size, gw // self.tokenizer.window_size
    b = x.shape[0]
    x = torch.cat([self.cls_token.expand(b, -1, -1), self.storage_tokens.expand(b, -1, -1), x], dim=1)
    rope = self.rope_embed(gh, gw)
    for block in self.blocks:
      x = block(x, rope)
    return self.ln1(x), (gh, gw)

  def forward(self, images):
    """out_type="raw": cls, registers, then the row-major patch tokens."""
    return self.forward_with_grid(images)[0]

  def featmap(self, images):
    """out_type="featmap": patch tokens as (B, C, h, w)."""
    x, (gh, gw) = self.forward_with_grid(images)
    b, _, c = x.shape
    return x[:, self.num_prefix:].transpose(1, 2).reshape(b, c, gh, gw)


def sapiens2(arch, use_tokenizer=False, **kwargs):
  """The named upstream arch; `use_tokenizer=True` gives its 4K variant."""
  width, depth, num_heads, tokenizer_layers = SIZES[arch]
  return Sapiens2Reference(width, depth, num_heads, tokenizer_layers if use_tokenizer else 0, **kwargs)


def is_unit_param(name):
  """Parameters that multiply activations (RMSNorm weights, LayerScale) and so should be randomised around 1."""
  return name.endswith(("ln1.weight", "ln2.weight", "q_norm.weight", "k_norm.weight", "gamma.weight"))


@torch.no_grad()
def randomize_(model, seed, scale=0.02):
  """Seeded random values for every floating-point parameter so every part of the model matters in a comparison.

  Norm weights and gammas become 1 + 0.1*N(0, 1), everything else scale*N(0, 1). Buffers (`rope_embed.periods`)
  are left alone. Returns the model.
  """
  gen = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    if not p.is_floating_point():
      continue
    noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
    p.copy_(1.0 + 0.1 * noise if is_unit_param(name) else scale * noise)
  return model


def num_params(model):
  """Parameter count as upstream reports it: the state dict minus the periods buffer."""
  return sum(v.numel() for k, v in model.state_dict().items() if k != "rope_embed.periods")


def random_reference(dims, rope_dtype="bfloat16", seed=0):
  """A reference of `dims` (width, depth, num_heads and tokenizer_depth attributes, e.g. one of the
  JAX port's sizes) with every parameter random (norms and LayerScale near 1, so attention matters)."""
  model = Sapiens2Reference(dims.width, dims.depth, dims.num_heads, num_tokenizer_layers=dims.tokenizer_depth,
                            rope_dtype=getattr(torch, rope_dtype))
  return randomize_(model, seed, scale=0.1).eval()


def forward_nhwc(model, images):
  """All output tokens (numpy) of (B, H, W, 3) images."""
  with torch.no_grad():
    return model(torch.tensor(np.asarray(images)).permute(0, 3, 1, 2)).numpy()


def sensitivity(model, images):
  """How far the reference's own output moves when its input moves by one float32 ulp (up or down):
  with RoPE rotated in bfloat16, a float32 difference anywhere before the rotation flips some
  bfloat16 roundings, so two implementations whose float32 matmuls sum in another order cannot
  agree more closely than this."""
  want = forward_nhwc(model, images)
  return max(np.abs(want - forward_nhwc(model, np.nextafter(np.asarray(images), np.float32(to)))).max()
             for to in (np.inf, -np.inf))


EXPECTED_PARAMS = {
    ("sapiens2_0.1b", False): 113_993_472,
    ("sapiens2_0.4b", False): 395_450_368,
    ("sapiens2_0.8b", False): 814_283_520,
    ("sapiens2_1b", False): 1_455_474_176,
    ("sapiens2_1b", True): 1_606_588_928,
    ("sapiens2_5b", False): 5_066_902_976,
}

if __name__ == "__main__":
  # Self-check of the module structure against upstream's exact counts, on the meta device (nothing allocated).
  for (arch, use_tokenizer), expected in EXPECTED_PARAMS.items():
    with torch.device("meta"):
      model = sapiens2(arch, use_tokenizer)
    got = num_params(model)
    print(f"{arch}{' +tokenizer' if use_tokenizer else ''}: {got:,}", "ok" if got == expected else f"!= {expected:,}")
    assert got == expected
