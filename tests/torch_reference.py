"""An independent PyTorch Sapiens ViT and MAE decoder, written from the facts in sapiens_v1.md §1-§3.

Module attribute names are chosen so `state_dict()` keys are exactly the original ones
(`patch_embed.projection.weight`, `layers.0.ffn.layers.0.0.weight`, `neck.decoder_blocks.0...`),
which is what lets the tests check exported files with `load_state_dict(strict=True)`.
Initial values do not matter: every test loads its weights.
"""
import torch
from torch import nn
import torch.nn.functional as F

LN_EPS = 1e-6


class Attention(nn.Module):
  """Fused qkv Linear, heads split as (B, N, 3, heads, hd), scaled dot-product attention, proj."""

  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    return self.proj(out.transpose(1, 2).reshape(b, n, c))


class FFN(nn.Module):
  """mmcv's FFN layout: layers = [[Linear, GELU, Dropout], Linear, Dropout]."""

  def __init__(self, dim, hidden):
    super().__init__()
    self.layers = nn.Sequential(
        nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0)), nn.Linear(hidden, dim), nn.Dropout(0.0))

  def forward(self, x):
    return self.layers(x)


class Block(nn.Module):
  def __init__(self, dim, num_heads):
    super().__init__()
    self.ln1 = nn.LayerNorm(dim, eps=LN_EPS)
    self.attn = Attention(dim, num_heads)
    self.ln2 = nn.LayerNorm(dim, eps=LN_EPS)
    self.ffn = FFN(dim, 4 * dim)

  def forward(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.ffn(self.ln2(x))


class PatchEmbed(nn.Module):
  def __init__(self, dim, patch_size, padding=0):
    super().__init__()
    self.projection = nn.Conv2d(3, dim, patch_size, stride=patch_size, padding=padding)

  def forward(self, images):
    return self.projection(images).flatten(2).transpose(1, 2)


class SapiensViT(nn.Module):
  """Backbone keys as in the `_clean` pretrain checkpoints (no prefix)."""

  def __init__(self, width, depth, num_heads, image_size, patch_size=16, with_cls_token=True, padding=0):
    super().__init__()
    h, w = image_size
    num_patches = ((h + 2 * padding - patch_size) // patch_size + 1) * ((w + 2 * padding - patch_size) // patch_size + 1)
    self.patch_embed = PatchEmbed(width, patch_size, padding)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if with_cls_token else None
    self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + int(with_cls_token), width))
    self.layers = nn.ModuleList([Block(width, num_heads) for _ in range(depth)])
    self.ln1 = nn.LayerNorm(width, eps=LN_EPS)

  def forward_features(self, images_nchw):
    """(B, 3, H, W) -> (B, [1 +] N, C) tokens after the final norm, cls first."""
    x = self.patch_embed(images_nchw)
    if self.cls_token is not None:
      x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    x = x + self.pos_embed
    for layer in self.layers:
      x = layer(x)
    return self.ln1(x)


class MAENeck(nn.Module):
  """The MAE decoder; its keys get `neck.` when it sits inside the full MAE model."""

  def __init__(self, width, dim, depth, num_heads, num_patches, patch_size=16):
    super().__init__()
    self.decoder_embed = nn.Linear(width, dim)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
    self.decoder_blocks = nn.ModuleList([Block(dim, num_heads) for _ in range(depth)])
    self.ln1 = nn.LayerNorm(dim, eps=LN_EPS)
    self.decoder_pred = nn.Linear(dim, patch_size ** 2 * 3)

  def forward(self, latent, ids_restore):
    """latent (B, 1 + kept, C) with cls first; ids_restore (B, N) -> pixels (B, N, p*p*3)."""
    x = self.decoder_embed(latent)
    b, n = ids_restore.shape
    masked = self.mask_token.expand(b, n + 1 - x.shape[1], -1)
    tokens = torch.cat([x[:, 1:], masked], dim=1)
    tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
    x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
    for block in self.decoder_blocks:
      x = block(x)
    return self.decoder_pred(self.ln1(x))[:, 1:]


# Task heads (sapiens_v1.md §2.4, §4.1, §5.2, §6, §7): NCHW in and out.


def _stages(channels, first_in, make_layer):
  """[layer, InstanceNorm2d, SiLU] per stage in one Sequential: learnable indices 0, 3, 6, ..."""
  layers, cin = [], first_in
  for cout in channels:
    layers += [make_layer(cin, cout), nn.InstanceNorm2d(cout), nn.SiLU()]
    cin = cout
  return nn.Sequential(*layers)


class _UpsampleHead(nn.Module):
  """Deconv stages (k4 s2 p1, no bias), 1x1 conv stages, Dropout2d, final 1x1 conv named `final_name`."""

  def __init__(self, in_channels, deconv_channels, conv_channels, out_channels, final_name, dropout):
    super().__init__()
    self.deconv_layers = _stages(
        deconv_channels, in_channels, lambda i, o: nn.ConvTranspose2d(i, o, 4, stride=2, padding=1, bias=False))
    self.conv_layers = _stages(conv_channels, deconv_channels[-1], lambda i, o: nn.Conv2d(i, o, 1))
    self.dropout = nn.Dropout2d(dropout) if dropout else nn.Identity()
    self.final_name = final_name
    setattr(self, final_name, nn.Conv2d(conv_channels[-1], out_channels, 1))

  def forward(self, x):
    x = self.dropout(self.conv_layers(self.deconv_layers(x)))
    return getattr(self, self.final_name)(x)


class PoseHead(_UpsampleHead):
  """mmpose HeatmapHead (keys under `head.`)."""

  def __init__(self, in_channels, num_keypoints, channels=768):
    super().__init__(in_channels, (channels,) * 2, (channels,) * 2, num_keypoints, "final_layer", 0.0)


class SegHead(_UpsampleHead):
  """mmseg VitHead (keys under `decode_head.`)."""

  def __init__(self, in_channels, num_classes, channels=768):
    super().__init__(in_channels, (channels,) * 3, (channels,) * 3, num_classes, "conv_seg", 0.1)


class DepthHead(_UpsampleHead):
  """VitDepthHead: four deconvs, two convs, one output channel."""

  def __init__(self, in_channels, channels=384):
    super().__init__(in_channels, (channels,) * 4, (channels,) * 2, 1, "conv_seg", 0.1)


class NormalHead(SegHead):
  """VitNormalHead: the seg head with 3 outputs."""

  def __init__(self, in_channels, channels=768):
    super().__init__(in_channels, 3, channels)


class TaskModel(nn.Module):
  """A fine-tuned Sapiens model: `backbone.*` (no cls token) and `head.*` / `decode_head.*`."""

  def __init__(self, backbone, head, head_name, grid):
    super().__init__()
    self.backbone = backbone
    self.grid = grid
    setattr(self, head_name, head)
    self.head_name = head_name

  def forward(self, images_nchw):
    tokens = self.backbone.forward_features(images_nchw)
    b, _, c = tokens.shape
    features = tokens.transpose(1, 2).reshape(b, c, *self.grid)  # featmap output: (B, C, h, w)
    return getattr(self, self.head_name)(features)
