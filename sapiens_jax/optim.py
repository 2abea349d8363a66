"""AdamW for MAE pretraining: linear warm-up then cosine, global-norm clipping, selective decay.

Weight decay applies to kernels only (linear and conv weights); biases, norms, position
embeddings, the cls token and the mask token are not decayed. Fixed (sin-cos) position
embeddings are frozen: their updates are exactly zero.
"""
import flax
import jax.numpy as jnp
import optax

FROZEN = ("pos_embed", "decoder_pos_embed")


def learning_rate(config):
  """Peak learning rate: base_lr * global_batch / 256 (the MAE scaling rule)."""
  return config.optim.base_lr * config.batch_size / 256


def schedule(config):
  warmup = min(config.optim.warmup_steps, config.total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate(config), warmup_steps=warmup,
      decay_steps=max(config.total_steps, warmup + 1), end_value=config.optim.min_lr)


def _label_leaves(params, label_fn):
  """A tree like `params` holding label_fn(leaf name) at every leaf."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({path: label_fn(path[-1]) for path in flat})


def decay_mask(params):
  return _label_leaves(params, lambda name: name.endswith("kernel"))


def frozen_labels(params):
  return _label_leaves(params, lambda name: "frozen" if name in FROZEN else "train")


def make_optimizer(config):
  o = config.optim
  adamw = optax.chain(
      optax.clip_by_global_norm(o.grad_clip_norm),
      optax.adamw(schedule(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask,
                  mu_dtype=jnp.dtype(o.mu_dtype)))
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, frozen_labels)
