"""Masked autoencoder (MAE) pretraining, the Sapiens recipe (sapiens_v1.md §3): 75% of the patch
tokens dropped at random per example, the encoder sees the rest, a lightweight decoder predicts
every patch's (per-patch normalised) pixels, the loss counts the masked patches only.

Parameter tree: `encoder/...` (the backbone family's, = the PyTorch backbone keys) and
`decoder/...` (= the PyTorch `neck.*` keys: decoder_embed, mask_token, decoder_pos_embed,
decoder_blocks_{j}, ln1, decoder_pred). Evaluation: the loss on a small fixed batch with fixed
masks, and the reconstruction grid (original | masked input | reconstruction).
"""
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sapiens_jax import models
from sapiens_jax import patches
from sapiens_jax import prng
from sapiens_jax import sharding
from sapiens_jax import step as train_step
from sapiens_jax import torch_names
from sapiens_jax import visualize
from sapiens_jax.data import pipeline
from sapiens_jax.data import sources
from sapiens_jax.data import transforms
from sapiens_jax.models import layers
from sapiens_jax.models import posemb

NORM_PIX_EPS = 1e-6  # the per-patch target normalisation (and its inverse, for pictures)
PICTURES = "reconstructions"
WEIGHTS = "params"  # the state entry that export, predict and init_from read
_GREY = 128  # masked patches in the middle column of the reconstruction grid


def configure(config):
  """MAE's keys in config.model, with the reference's values."""
  config.model.mask_ratio = 0.75
  config.model.decoder_width = 512
  config.model.decoder_depth = 8
  config.model.decoder_heads = 16
  config.model.norm_pix_loss = True


def check_config(config):
  del config


# ---------------------------------------------------------------- model

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
  attention: str = "auto"

  @nn.compact
  def __call__(self, latent, restore_ids, return_features=False):
    """Predicted pixels (B, N, p*p*3); with `return_features` also the features they are read from
    (B, N, width), after the final norm (a self-distillation objective reads its dense term there)."""
    b, n = restore_ids.shape
    d = self.width
    x = nn.Dense(d, dtype=self.dtype, name="decoder_embed",
                 kernel_init=layers.partitioned(nn.initializers.xavier_uniform(), (None, "embed")),
                 bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)))(latent)
    mask_token = self.param("mask_token", layers.partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
                            (1, 1, d))
    pos_embed = self.param("decoder_pos_embed",
                           layers.partitioned(layers.sincos_init(self.grid, 1), (None, None, "embed")),
                           (1, 1 + n, d))
    fill = jnp.broadcast_to(mask_token.astype(x.dtype), (b, n + 1 - x.shape[1], d))
    tokens = restore_order(x[:, 1:], fill, restore_ids)
    x = jnp.concatenate([x[:, :1], tokens], axis=1) + pos_embed.astype(x.dtype)
    x = layers.run_blocks(layers.make_blocks(self.depth, self.num_heads, self.dtype, self.scan_layers,
                                             self.remat_policy, self.attention, name="decoder_blocks"), x)
    features = layers.layer_norm("ln1", self.dtype)(x)[:, 1:]
    pixels = nn.Dense(self.patch_size ** 2 * 3, dtype=self.dtype, name="decoder_pred",
                      kernel_init=layers.partitioned(nn.initializers.xavier_uniform(), ("embed", None)),
                      bias_init=layers.partitioned(nn.initializers.zeros, (None,)))(features)
    return (pixels, features) if return_features else pixels


class MAE(nn.Module):
  """The encoder sees only the visible tokens (after its cls token); the decoder predicts every patch."""
  encoder: nn.Module
  decoder: Decoder
  mask_ratio: float = 0.75

  def __call__(self, images, mask_keys):
    """Returns predicted pixels (B, N, p*p*3) and the mask (B, N), 1 = masked.

    mask_keys: (B,) PRNG keys, one per example (see `prng.example_keys`).
    """
    tokens = self.encoder.embed(images)
    keep_ids, mask, restore_ids = random_masking(mask_keys, tokens.shape[1], self.mask_ratio)
    latent = self.encoder.encode(gather_tokens(tokens, keep_ids), keep_ids)
    # The decoder reads the cls token and the visible patch tokens (registers, if any, are dropped).
    latent = jnp.concatenate([latent[:, :1], latent[:, self.encoder.num_prefix_tokens:]], axis=1)
    return self.decoder(latent, restore_ids).astype(jnp.float32), mask


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


def encoder(config):
  """The backbone as MAE pretrains it: with its cls token."""
  return models.family(config.model).build(config.model, config.image_size, cls_token=True)


def token_stride(config):
  """Pixels per encoder token along each side: the patch size, or 64 with Sapiens2's 4K tokenizer
  (whose tokens each stand for a 4x4 window of patches); the decoder predicts patches this big."""
  return config.image_size[0] // models.family(config.model).grid(config.model, config.image_size)[0]


def decoder(config, enc):
  """The MAE decoder of `config` for the token grid of encoder `enc`."""
  m = config.model
  return Decoder(m.decoder_width, m.decoder_depth, m.decoder_heads, enc.grid, token_stride(config),
                 jnp.dtype(m.dtype), m.scan_layers, m.remat_policy, m.attention)


def build_model(config):
  enc = encoder(config)
  return MAE(encoder=enc, decoder=decoder(config, enc), mask_ratio=config.model.mask_ratio)


def init_params(model, config, key):
  images = jnp.zeros((1, *config.image_size, 3), jnp.float32)
  return model.init(key, images, prng.example_keys(key, 1))["params"]


init_extra_state = train_step.no_extra_state
post_update = train_step.no_post_update
step_outputs = train_step.no_step_outputs
alerts = train_step.no_alerts


def loss(model, params, state, batch, keys, config):
  """The loss and (predicted patches, mask); `keys` holds one mask key per example.

  batch["image"] is uint8 RGB as the pipelines ship it; it is normalised here, on the device.
  """
  del state
  images = transforms.normalize(batch["image"])
  pred, mask = model.apply({"params": params}, images, keys)
  return mae_loss(pred, images, mask, token_stride(config), config.model.norm_pix_loss), (pred, mask)


def batch_spec(config, batch_size):
  return {"image": jax.ShapeDtypeStruct((batch_size, *config.image_size, 3), jnp.uint8)}


def activation_bytes_per_example(config):
  """Rough activation bytes of one example (no remat): the visible tokens and the cls token in
  the encoder, every token in the decoder."""
  m = config.model
  h, w = models.family(m).grid(m, config.image_size)
  n = h * w
  visible = 1 + int(n * (1 - m.mask_ratio))
  decoder = layers.activation_bytes(m.decoder_width, m.decoder_depth, m.decoder_heads, n + 1, m.dtype,
                                    m.attention)
  return models.family(m).encoder_activation_bytes(m, visible) + decoder


# ---------------------------------------------------------------- data

def prepare_data(config, workdir):
  del config, workdir


def train_iterator(config, workdir, *, batch_size, seed, process_index=0, process_count=1):
  del workdir
  return pipeline.make_pretrain_iterator(config.data, image_size=config.image_size, batch_size=batch_size,
                                         seed=seed, process_index=process_index, process_count=process_count)


def _crop(load, index, rng):
  return load(index, rng)["image"]


def inspect_samples(config, split, workdir):
  """(index, rng) -> an augmented crop, and the number of records."""
  del workdir
  if split != "train":
    raise ValueError("MAE pretraining has no eval split to inspect; use split='train'")
  image_size = tuple(int(s) for s in config.image_size)
  source = sources.make_source(config.data, image_size, config.seed)
  load = functools.partial(pipeline.load_pretrain_example, source, image_size, config.data.resize,
                           config.data.on_error == "skip")
  return functools.partial(_crop, load), len(source)


# ---------------------------------------------------------------- evaluation

def best_metric(config):
  del config
  return None  # no best checkpoint: the eval loss is not a model-selection criterion


def _unnormalize_pred(pred, target):
  """Undoes the norm_pix target normalisation using the original patch's mean and unbiased var.

  The model only learns each patch's shape, not its brightness or contrast, so the original
  patch's statistics are needed to display it.
  """
  mean = target.mean(axis=-1, keepdims=True)
  var = target.var(axis=-1, keepdims=True, ddof=1)
  return pred * np.sqrt(var + NORM_PIX_EPS) + mean


def reconstruction_grid(images, pred, mask, patch_size, norm_pix, max_rows=8, include_prediction=False):
  """A uint8 figure, one row per example: original | masked input | reconstruction, laid out as in
  the MAE and Sapiens papers.

  Args:
    images: (B, H, W, 3) normalised input images.
    pred: (B, N, p*p*3) decoder output, in `patchify` order.
    mask: (B, N), 1 = masked (hidden from the encoder), 0 = visible.
    patch_size: p.
    norm_pix: whether `pred` predicts per-patch normalised pixels.
    max_rows: at most this many examples are drawn.
    include_prediction: adds a 4th column with the prediction in every patch, visible ones
      included (the loss ignores those, so they show what the model does without supervision).
  """
  images = np.asarray(images[:max_rows], np.float32)
  pred = np.asarray(pred[:max_rows], np.float32)
  mask = np.asarray(mask[:max_rows]) > 0.5
  grid_hw = (images.shape[1] // patch_size, images.shape[2] // patch_size)

  if norm_pix:
    pred = _unnormalize_pred(pred, patches.patchify(images, patch_size))
  pred_image = transforms.denormalize(patches.unpatchify(pred, patch_size, grid_hw))
  original = transforms.denormalize(images)
  pixel_masked = patches.unpatchify(np.broadcast_to(mask[..., None], pred.shape), patch_size, grid_hw)

  columns = [
      original,
      np.where(pixel_masked, np.uint8(_GREY), original),
      np.where(pixel_masked, pred_image, original),
  ]
  if include_prediction:
    columns.append(pred_image)
  return visualize.tile([list(row) for row in zip(*columns)])


def _eval_step(params, batch, *, model, config):
  keys = prng.example_keys(jax.random.key(config.seed + 1), batch["image"].shape[0])
  value, (pred, mask) = loss(model, params, {}, batch, keys, config)
  n = config.num_viz_images
  return value, transforms.normalize(batch["image"][:n]), pred[:n], mask[:n]


def fixed_eval_batch(iterator, config, workdir, mesh, rules):
  """The first batch of `iterator` (an objective's train_iterator) with seed + 1, on the mesh: the smallest
  multiple of the batch shards and processes that holds num_viz_images."""
  unit = math.lcm(sharding.batch_shards(mesh, rules), jax.process_count())
  rows = unit * -(-config.num_viz_images // unit) // jax.process_count()
  local = next(iterator(config, workdir, batch_size=rows, seed=config.seed + 1,
                        process_index=jax.process_index(), process_count=jax.process_count()))
  batch_sharding = sharding.batch_sharding(mesh, rules)
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items() if k != "skipped"}


class Evaluation:
  """The loss on a small fixed batch with fixed masks, comparable across steps, and the
  reconstructions of its first `num_viz_images` examples.

  The batch is the smallest multiple of the batch shards and processes that holds
  num_viz_images, drawn from the training pipeline with seed + 1.
  """

  def __init__(self, config, workdir, model, mesh, rules, param_shardings):
    self.config = config
    self.batch = fixed_eval_batch(train_iterator, config, workdir, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.step = jax.jit(functools.partial(_eval_step, model=model, config=config),
                        in_shardings=(param_shardings, {"image": batch_sharding}), out_shardings=replicated)

  def __call__(self, step, state):
    """({"loss": ...}, the reconstruction grid on process 0, else None)."""
    del step
    value, images, pred, mask = jax.device_get(self.step(state["params"], self.batch))
    if jax.process_index():
      return {"loss": float(value)}, None
    m = self.config.model
    return {"loss": float(value)}, reconstruction_grid(images, pred, mask, token_stride(self.config), m.norm_pix_loss,
                                                       max_rows=self.config.num_viz_images)


# ---------------------------------------------------------------- weights

def _neck_entries(decoder):
  entries = torch_names.dense_entries(("decoder_embed",), "decoder_embed")
  entries += [(("mask_token",), "mask_token", "same"), (("decoder_pos_embed",), "decoder_pos_embed", "same")]
  for j in range(torch_names.count_blocks(decoder, r"decoder_blocks_(\d+)")):
    entries += layers.block_torch_entries(f"decoder_blocks_{j}", f"decoder_blocks.{j}")
  entries += torch_names.norm_entries(("ln1",), "ln1")
  return entries + torch_names.dense_entries(("decoder_pred",), "decoder_pred")


def torch_parts(config, include_decoder=True):
  """The encoder under its bare keys (as the released `*_clean.pth`), the decoder as `neck.*`.

  A backbone-only file starts the decoder fresh."""
  parts = [models.family(config.model).torch_part("")]
  if include_decoder:
    parts.append(torch_names.Part("decoder", "neck.", _neck_entries, scanned="decoder_blocks",
                                  fresh_if_absent=True))
  return parts


def predict_task(config):
  del config
  return None  # a pretraining run predicts features only


def adapt_state_dict(state_dict, expected, prefix, source_grid, config, what):
  """Position tables (the encoder's and the decoder's) brought to this model's grid, in place."""
  target_grid = models.family(config.model).grid(config.model, config.image_size)
  done = models.family(config.model).adapt_state_dict(state_dict, expected, prefix, source_grid, target_grid, what)
  key = "neck.decoder_pos_embed"
  if key in state_dict and key in expected:  # the decoder always has one (cls) extra row
    done += posemb.fit_table(state_dict, key, expected[key], 1, 1, source_grid, target_grid, what)
  return done
