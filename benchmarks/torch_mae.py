"""The PyTorch side of the train-step benchmark: the same MAE step, eager, float32, on CPU threads.

Built from tests/torch_reference.py (the state-dict-compatible Sapiens ViT and MAE neck), so the
architecture is ours by construction; only the masking, the loss and the optimizer step are added
here, mirroring sapiens_jax.objectives.mae and sapiens_jax.optim: the encoder runs on the visible
25% of tokens plus cls, the decoder on all tokens, norm-pix MSE on masked patches, global-norm
clipping, AdamW (torch's fused kernel) with decay on weight matrices only and the sin-cos position
embeddings frozen. The learning rate is constant; no torch.compile.
"""
import os
import sys

import torch

import timing  # benchmarks/timing.py

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch_sapiens2  # pylint: disable=g-import-not-at-top,wrong-import-position

NORM_PIX_EPS = 1e-6


class MAE(torch.nn.Module):
  """`backbone` + `neck`, with MAE masking between patch embedding and the encoder blocks."""

  def __init__(self, width, depth, heads, image_size, patch_size, decoder_width, decoder_depth,
               decoder_heads, mask_ratio):
    super().__init__()
    h, w = image_size
    self.num_patches = (h // patch_size) * (w // patch_size)
    self.patch_size = patch_size
    self.mask_ratio = mask_ratio
    self.backbone = torch_reference.SapiensViT(width, depth, heads, image_size, patch_size)
    self.neck = torch_reference.MAENeck(width, decoder_width, decoder_depth, decoder_heads,
                                        self.num_patches, patch_size)

  def forward(self, images_nchw):
    """Returns predicted pixels (B, N, p*p*3) and the mask (B, N), 1 = masked."""
    bb = self.backbone
    x = bb.patch_embed(images_nchw) + bb.pos_embed[:, 1:]
    b, n, c = x.shape
    keep = int(n * (1 - self.mask_ratio))
    shuffle = torch.argsort(torch.rand(b, n), dim=1)
    restore = torch.argsort(shuffle, dim=1)
    x = torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, c))
    cls = (bb.cls_token + bb.pos_embed[:, :1]).expand(b, -1, -1)
    x = torch.cat([cls, x], dim=1)
    for layer in bb.layers:
      x = layer(x)
    pred = self.neck(bb.ln1(x), restore)
    mask = torch.ones(b, n)
    mask[:, :keep] = 0
    return pred, torch.gather(mask, 1, restore)


class Sapiens2MAE(torch.nn.Module):
  """The same MAE with our PyTorch Sapiens2 as the encoder: cls and registers in front, RoPE on the
  kept tokens at their own grid positions, the decoder reading cls + the kept patch tokens. One mask
  per batch (the reference rotates with one table), which costs what one per example costs."""

  def __init__(self, dims, image_size, patch_size, decoder_width, decoder_depth, decoder_heads, mask_ratio):
    super().__init__()
    h, w = image_size
    self.num_patches = (h // patch_size) * (w // patch_size)
    self.patch_size = patch_size
    self.mask_ratio = mask_ratio
    self.backbone = torch_sapiens2.Sapiens2Reference(dims.width, dims.depth, dims.num_heads,
                                                     num_tokenizer_layers=dims.tokenizer_depth)
    self.neck = torch_reference.MAENeck(dims.width, decoder_width, decoder_depth, decoder_heads, self.num_patches,
                                        patch_size)

  def forward(self, images_nchw):
    bb = self.backbone
    x, (gh, gw) = bb.patch_embed(images_nchw)
    b, n, c = x.shape
    keep = int(n * (1 - self.mask_ratio))
    shuffle = torch.randperm(n)
    restore = torch.argsort(shuffle).expand(b, -1)
    x = torch.cat([bb.cls_token.expand(b, -1, -1), bb.storage_tokens.expand(b, -1, -1), x[:, shuffle[:keep]]], 1)
    cos, sin = bb.rope_embed(gh, gw)
    for block in bb.blocks:
      x = block(x, (cos[shuffle[:keep]], sin[shuffle[:keep]]))
    x = bb.ln1(x)
    pred = self.neck(torch.cat([x[:, :1], x[:, bb.num_prefix:]], dim=1), restore)
    mask = torch.ones(b, n)
    mask[:, :keep] = 0
    return pred, torch.gather(mask, 1, restore)


def patchify(images_nchw, p):
  """(B, 3, H, W) -> (B, N, p*p*3) in sapiens_jax.patches order (row-in-patch, col-in-patch, channel)."""
  b, c, h, w = images_nchw.shape
  x = images_nchw.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def mae_loss(pred, images_nchw, mask, patch_size):
  target = patchify(images_nchw, patch_size)
  mean = target.mean(dim=-1, keepdim=True)
  var = target.var(dim=-1, keepdim=True, unbiased=True)
  target = (target - mean) / torch.sqrt(var + NORM_PIX_EPS)
  per_patch = ((pred - target) ** 2).mean(dim=-1)
  return (per_patch * mask).sum() / mask.sum()


def make_model_and_optimizer(config):
  """The MAE for `config` (a Sapiens or Sapiens2 size) and its AdamW, as the JAX step has."""
  from sapiens_jax import models  # pylint: disable=g-import-not-at-top
  m, o = config.model, config.optim
  dims = models.family(m).size(m.size)
  if models.family_name(m) == "sapiens2":
    if dims.tokenizer_depth:
      raise ValueError("the PyTorch MAE benchmark has no 4K tokenizer path")
    model = Sapiens2MAE(dims, tuple(config.image_size), m.patch_size, m.decoder_width, m.decoder_depth,
                        m.decoder_heads, m.mask_ratio)
  else:
    model = MAE(dims.width, dims.depth, dims.num_heads, tuple(config.image_size), m.patch_size,
                m.decoder_width, m.decoder_depth, m.decoder_heads, m.mask_ratio)
    model.backbone.pos_embed.requires_grad_(False)
  model.neck.decoder_pos_embed.requires_grad_(False)
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
  lr = o.base_lr * config.batch_size / 256  # constant: a schedule costs nothing measurable
  # fused=True: torch's one-kernel AdamW, still eager; the default per-tensor loop is several times
  # slower on CPU at 0.3b and would flatter the JAX side.
  return model, torch.optim.AdamW(groups, lr=lr, betas=(o.b1, o.b2), fused=True)


def train_step(model, optimizer, images_nchw, config):
  optimizer.zero_grad(set_to_none=True)
  pred, mask = model(images_nchw)
  loss = mae_loss(pred, images_nchw, mask, config.model.patch_size)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip_norm)
  optimizer.step()
  return loss


def benchmark(config, images_nhwc, steps, warmup, threads, breakdown=False):
  """Times the eager step on `images_nhwc` (numpy, the JAX benchmark's batch); returns a dict."""
  torch.set_num_threads(threads)
  torch.manual_seed(config.seed)
  model, optimizer = make_model_and_optimizer(config)
  images = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()
  median, best, cpu = timing.time_calls(lambda: train_step(model, optimizer, images, config), steps, warmup)
  out = {"torch_threads": torch.get_num_threads(), "torch_step_time_s": median, "torch_step_time_min_s": best,
         "torch_cpu_s_per_step": cpu, "torch_examples_per_sec": images.shape[0] / median}
  if breakdown:
    def forward():
      with torch.no_grad():
        pred, mask = model(images)
        mae_loss(pred, images, mask, config.model.patch_size)

    def forward_backward():
      model.zero_grad(set_to_none=True)
      pred, mask = model(images)
      mae_loss(pred, images, mask, config.model.patch_size).backward()

    out["torch_forward_s"] = timing.time_calls(forward, steps, 1)[0]
    out["torch_forward_backward_s"] = timing.time_calls(forward_backward, steps, 1)[0]
  return out


def matmul_flops(n=2048, repeats=5):
  """FLOP/s of the best of `repeats` float32 n x n matmuls with torch's BLAS (for comparison)."""
  a, b = torch.randn(n, n), torch.randn(n, n)
  return 2 * n ** 3 / timing.time_calls(lambda: a @ b, repeats, 1)[1]
