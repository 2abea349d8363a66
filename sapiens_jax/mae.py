"""Masked autoencoder (MAE) pretraining: random masking, the lightweight decoder and the pixel loss.

Parameter tree: `encoder/...` (the ViT, = the PyTorch `backbone.*` keys) and `decoder/...`
(= the PyTorch `neck.*` keys: decoder_embed, mask_token, decoder_pos_embed, decoder_blocks_{j},
ln1, decoder_pred).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sapiens_jax import patches
from sapiens_jax import vit

NORM_PIX_EPS = 1e-6


def example_keys(key, batch):
  """One PRNG key per example, so an example's mask does not depend on how the batch is split
  (devices, micro-batches for gradient accumulation)."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))


def random_masking(keys, num_tokens, mask_ratio):
  """Per-example uniform random masking, example i drawn from keys[i].

  Returns keep_ids (B, n_keep) of the visible tokens, mask (B, N) with 1 = removed, and
  restore_ids (B, N) that put [visible, masked] tokens back in their original order.
  """
  batch = keys.shape[0]
  num_keep = int(num_tokens * (1 - mask_ratio))
  noise = jax.vmap(lambda k: jax.random.uniform(k, (num_tokens,)))(keys)
  shuffle_ids = jnp.argsort(noise, axis=1)
  restore_ids = jnp.argsort(shuffle_ids, axis=1)
  keep_ids = shuffle_ids[:, :num_keep]
  mask = (jnp.arange(num_tokens)[None, :] >= num_keep).astype(jnp.float32)
  mask = jnp.take_along_axis(jnp.broadcast_to(mask, (batch, num_tokens)), restore_ids, axis=1)
  return keep_ids, mask, restore_ids


def gather_tokens(x, ids):
  return jnp.take_along_axis(x, ids[..., None], axis=1)


def restore_order(visible, fill, restore_ids):
  """Visible tokens (in keep order) followed by fill tokens, put back at their original positions."""
  return gather_tokens(jnp.concatenate([visible, fill], axis=1), restore_ids)


class Decoder(nn.Module):
  """MAE decoder: embed -> fill masked slots with the mask token -> unshuffle -> blocks -> pixels."""
  width: int
  depth: int
  num_heads: int
  grid: tuple
  patch_size: int
  dtype: Any = jnp.float32
  scan_layers: bool = False
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, latent, restore_ids):
    b, n = restore_ids.shape
    d = self.width
    x = nn.Dense(d, dtype=self.dtype, name="decoder_embed",
                 kernel_init=vit.partitioned(nn.initializers.xavier_uniform(), (None, "embed")),
                 bias_init=vit.partitioned(nn.initializers.zeros, ("embed",)))(latent)
    mask_token = self.param("mask_token", vit.partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
                            (1, 1, d))
    pos_embed = self.param("decoder_pos_embed", vit.partitioned(vit.sincos_init(self.grid, 1), (None, None, "embed")),
                           (1, 1 + n, d))
    fill = jnp.broadcast_to(mask_token.astype(x.dtype), (b, n + 1 - x.shape[1], d))
    tokens = restore_order(x[:, 1:], fill, restore_ids)
    x = jnp.concatenate([x[:, :1], tokens], axis=1) + pos_embed.astype(x.dtype)
    x = vit.run_blocks(vit.make_blocks(self.depth, self.num_heads, self.dtype, self.scan_layers,
                                       self.remat_policy, name="decoder_blocks"), x)
    x = vit.layer_norm("ln1", self.dtype)(x)
    x = nn.Dense(self.patch_size ** 2 * 3, dtype=self.dtype, name="decoder_pred",
                 kernel_init=vit.partitioned(nn.initializers.xavier_uniform(), ("embed", None)),
                 bias_init=vit.partitioned(nn.initializers.zeros, (None,)))(x)
    return x[:, 1:]


class MAE(nn.Module):
  """Encoder sees only the visible 25% of tokens; the decoder predicts every patch's pixels."""
  encoder: vit.ViT
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16
  mask_ratio: float = 0.75

  @nn.compact
  def __call__(self, images, mask_keys):
    """Returns predicted pixels (B, N, p*p*3) and the mask (B, N), 1 = masked.

    mask_keys: (B,) PRNG keys, one per example (see `example_keys`).
    """
    tokens = self.encoder.embed(images)
    keep_ids, mask, restore_ids = random_masking(mask_keys, tokens.shape[1], self.mask_ratio)
    latent = self.encoder.encode(gather_tokens(tokens, keep_ids))
    enc = self.encoder
    pred = Decoder(self.decoder_width, self.decoder_depth, self.decoder_heads, enc.grid, enc.patch_size,
                   enc.dtype, enc.scan_layers, enc.remat_policy, name="decoder")(latent, restore_ids)
    return pred.astype(jnp.float32), mask


def mae_loss(pred, images, mask, patch_size, norm_pix=True):
  """Mean squared error over masked patches only.

  Targets are the (already mean/std normalised) image patches, each further normalised by its own
  mean and unbiased variance when `norm_pix`, as in the reference implementation.
  """
  target = patches.patchify(images.astype(jnp.float32), patch_size)
  if norm_pix:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + NORM_PIX_EPS)
  per_patch = jnp.mean((pred - target) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


def mae_from_config(config):
  m = config.model
  encoder = vit.vit_from_config(m, config.image_size, use_cls_token=True)
  return MAE(encoder=encoder, decoder_width=m.decoder_width, decoder_depth=m.decoder_depth,
             decoder_heads=m.decoder_heads, mask_ratio=m.mask_ratio)
