"""An independent PyTorch version of the Sapiens2 task heads, written from the facts in sapiens2.md §3
(and the port's head layout for matting), as upstream builds them out of `nn.Sequential`s.

Attribute names and Sequential positions are chosen so `state_dict()` keys are upstream's `decode_head.*` keys
without the prefix (`deconv_layers.3.weight`, `upsample_blocks.2.0.bias`, `scale_final_layer.5.weight`, ...),
which is what lets tests load exported heads with `load_state_dict(strict=True)`. Initial values do not matter:
every test loads its weights.
"""
import torch
from torch import nn

RMS_NORM_EPS = 1e-6


class RMSNorm2d(nn.Module):
  """Albedo's norm: x / sqrt(mean over channels of x^2 + eps) * weight, per pixel, in float32."""

  def __init__(self, channels, eps=RMS_NORM_EPS):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(channels))

  def forward(self, x):
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(dim=1, keepdim=True) + self.eps)
    return (y * self.weight.view(1, -1, 1, 1)).to(x.dtype)


def make_norm(kind, channels):
  return nn.InstanceNorm2d(channels) if kind == "instance" else RMSNorm2d(channels)


class DeconvHead(nn.Module):
  """seg / pose: [ConvTranspose2d 4x4 s2 p1 (no bias), IN, SiLU] x n, [Conv 1x1, IN, SiLU] x m, final 1x1."""

  def __init__(self, in_channels, deconv_channels, conv_channels, out_channels, final_name):
    super().__init__()
    deconvs, convs, cin = [], [], in_channels
    for c in deconv_channels:
      deconvs += [nn.ConvTranspose2d(cin, c, 4, stride=2, padding=1, bias=False), nn.InstanceNorm2d(c), nn.SiLU()]
      cin = c
    for c in conv_channels:
      convs += [nn.Conv2d(cin, c, 1), nn.InstanceNorm2d(c), nn.SiLU()]
      cin = c
    self.deconv_layers = nn.Sequential(*deconvs)
    self.conv_layers = nn.Sequential(*convs)
    self.final_name = final_name
    setattr(self, final_name, nn.Conv2d(cin, out_channels, 1))

  def forward(self, x):
    return getattr(self, self.final_name)(self.conv_layers(self.deconv_layers(x)))


def halved(n, times):
  """A 1x1 stride-2 conv (padding 0) maps n -> (n - 1) // 2 + 1."""
  for _ in range(times):
    n = (n - 1) // 2 + 1
  return n


class UpsampleHead(nn.Module):
  """normal / albedo / pointmap / matting: input_conv, PixelShuffle upsample_blocks, 3x3 conv_layers, final 1x1.

  `scale` = (conv channels, hidden sizes, input grid (h, w)) adds pointmap's branch on the input map; forward
  then returns (map, scale (B, 1)).
  """

  def __init__(self, in_channels, upsample_channels, conv_channels, out_channels, final_name, norm="instance",
               sigmoid=False, scale=None):
    super().__init__()
    self.input_conv = nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, padding=1),
                                    make_norm(norm, in_channels), nn.SiLU())
    blocks, convs, cin = [], [], in_channels
    for c in upsample_channels:
      blocks.append(nn.Sequential(nn.Conv2d(cin, 4 * c, 3, padding=1), nn.PixelShuffle(2), make_norm(norm, c),
                                  nn.SiLU()))
      cin = c
    for c in conv_channels:
      convs += [nn.Conv2d(cin, c, 3, padding=1), make_norm(norm, c), nn.SiLU()]
      cin = c
    self.upsample_blocks = nn.Sequential(*blocks)
    self.conv_layers = nn.Sequential(*convs)
    self.final_name = final_name
    self.sigmoid = sigmoid
    setattr(self, final_name, nn.Conv2d(cin, out_channels, 1))
    self.has_scale = scale is not None
    if self.has_scale:
      scale_channels, hidden, (h, w) = scale
      layers, cin = [], in_channels
      for c in scale_channels:
        layers += [nn.Conv2d(cin, c, 1, stride=2), nn.InstanceNorm2d(c), nn.SiLU()]
        cin = c
      self.scale_conv_layers = nn.Sequential(*layers)
      flat = cin * halved(h, len(scale_channels)) * halved(w, len(scale_channels))
      mlp, fan_in = [nn.Flatten()], flat
      for size in hidden:
        mlp += [nn.Linear(fan_in, size), nn.SiLU()]
        fan_in = size
      self.scale_final_layer = nn.Sequential(*mlp, nn.Linear(fan_in, 1))

  def forward(self, x):
    out = getattr(self, self.final_name)(self.conv_layers(self.upsample_blocks(self.input_conv(x))))
    if self.sigmoid:
      out = out.sigmoid()
    if not self.has_scale:
      return out
    return out, self.scale_final_layer(self.scale_conv_layers(x))
