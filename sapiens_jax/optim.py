"""AdamW for pretraining and fine-tuning: lr scaling and schedules, selective decay, layer-wise lr decay.

Weight decay applies to kernels only (linear and conv weights); biases, norms, position
embeddings, the cls token and the mask token are not decayed. Parameters named in
`config.optim.frozen` (MAE's fixed sin-cos embeddings) get updates of exactly zero.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sapiens_jax import models

SCHEDULES = ("cosine", "linear", "multistep")


def learning_rate(config):
  """Peak learning rate: base_lr * global_batch / lr_base_batch (the linear scaling rule), or
  base_lr as given when lr_base_batch is 0 (the fine-tuning recipes that do not rescale)."""
  o = config.optim
  return o.base_lr * config.batch_size / o.lr_base_batch if o.lr_base_batch else o.base_lr


def schedule(config):
  """Step -> learning rate.

  cosine (MAE): linear warm-up from 0 to the peak, then cosine to min_lr.
  linear, multistep (fine-tuning): the reference chains a linear warm-up factor (from
  warmup_start_factor to 1) with, from step 0, a linear decay to 0 (PolyLR, power 1) or a
  x`gamma` drop at each of `milestones` (fractions of total_steps).
  """
  o, total = config.optim, config.total_steps
  peak = learning_rate(config)
  warmup = min(o.warmup_steps, total)
  if o.schedule not in SCHEDULES:
    raise ValueError(f"config.optim.schedule={o.schedule!r}; expected one of {', '.join(SCHEDULES)}")
  if o.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total, warmup + 1), end_value=o.min_lr)
  milestones = [round(f * total) for f in o.milestones]

  def lr(step):
    step = jnp.asarray(step, jnp.float32)
    start = o.warmup_start_factor
    warm = start + (1.0 - start) * jnp.minimum(step / warmup, 1.0) if warmup else 1.0
    if o.schedule == "linear":
      decay = jnp.maximum(1.0 - step / total, 0.0)
    else:
      decay = o.gamma ** sum((step >= m).astype(jnp.float32) for m in milestones)
    return peak * warm * decay
  return lr


def _label_leaves(params, label_fn):
  """A tree like `params` holding label_fn(leaf name) at every leaf."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({path: label_fn(path[-1]) for path in flat})


def decay_mask(params):
  return _label_leaves(params, lambda name: name.endswith("kernel"))


def frozen_labels(params, frozen):
  return _label_leaves(params, lambda name: "frozen" if name in frozen else "train")


def layer_decay_multipliers(params, rate, family, depth):
  """lr multiplier per parameter, rate ** (depth + 1 - layer id), with the backbone family's
  layer ids (the reference's: embeddings 0, block i -> i + 1, final norm depth + 1); everything
  outside the encoder (the head) gets depth + 1. Scanned blocks get one multiplier per row."""
  def multiplier(path, leaf):
    names = [getattr(p, "key", None) for p in path]
    layer = family.layer_id(names[1:], leaf, depth) if names[0] == "encoder" else depth + 1
    return (rate ** (depth + 1 - np.asarray(layer))).astype(np.float32)
  return jax.tree_util.tree_map_with_path(multiplier, params)


def scale_by_layer_decay(rate, family, depth):
  def update(updates, state, params=None):
    del params
    multipliers = layer_decay_multipliers(updates, rate, family, depth)
    return jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, multipliers), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def clip_by_global_norm(max_norm):
  """PyTorch's clip_grad_norm_, which the reference uses: g * min(1, max_norm / (norm + 1e-6)).

  A multiply by one scalar, unlike optax's where(norm < max, g, g / norm * max): XLA fuses a
  multiply into each consumer (Adam's two moments) but materialises a divide's output, a full
  copy of the gradients per step (2x the optimizer's time on CPU, BENCHMARKS.md).
  """
  def update(grads, state, params=None):
    del params
    scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(grads) + 1e-6))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(config):
  o = config.optim
  adamw = optax.chain(
      clip_by_global_norm(o.grad_clip_norm),
      optax.adamw(schedule(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask,
                  mu_dtype=jnp.dtype(o.mu_dtype)))
  frozen = tuple(o.frozen)
  tx = optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()},
                             lambda params: frozen_labels(params, frozen))
  if o.layer_decay == 1.0:
    return tx
  family = models.family(config.model)
  # Scaling the whole AdamW step (decay term included) is what a per-group lr does in PyTorch.
  return optax.chain(tx, scale_by_layer_decay(o.layer_decay, family, family.num_layers(config.model)))
