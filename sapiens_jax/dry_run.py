"""`--dry_run`: what a config will cost, from abstract shapes and the lowered program only.

Nothing of model size is allocated: parameters come from `jax.eval_shape`, FLOPs from XLA's cost
analysis of the lowered (not compiled) train step, and memory per device from the state's
shardings on the configured mesh plus an analytic activation estimate.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sapiens_jax import mae
from sapiens_jax import optim
from sapiens_jax import sharding
from sapiens_jax import train
from sapiens_jax import vit


def count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def paper_flops(config):
  """Multiply-accumulates of the encoder's linear layers on all tokens, as the paper's Table 2 counts."""
  width, depth, _ = vit.size_dims(config.model.size)
  h, w = config.image_size
  p = config.model.patch_size
  tokens = (h // p) * (w // p)
  return float(depth * 12 * width ** 2 * tokens + 3 * p * p * width * tokens)


def activation_bytes_per_example(config):
  """Rough bytes of activations kept for the backward pass, per example (no remat).

  Per token and block: ~16 widths (norm outputs, q/k/v, attention output, 2 x 4C MLP, residual)
  plus one row of attention probabilities per head.
  """
  width, depth, heads = vit.size_dims(config.model.size)
  m = config.model
  h, w = config.image_size
  n = (h // m.patch_size) * (w // m.patch_size)
  visible = 1 + int(n * (1 - m.mask_ratio))
  itemsize = jnp.dtype(m.dtype).itemsize
  per_block = lambda tokens, c, nh: tokens * (16 * c + nh * tokens) * itemsize
  return depth * per_block(visible, width, heads) + m.decoder_depth * per_block(
      n + 1, m.decoder_width, m.decoder_heads)


def plan(config):
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config)
  model = mae.mae_from_config(config)
  tx = optim.make_optimizer(config)
  init = functools.partial(train.init_state, model, tx, tuple(config.image_size))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding.tree_shardings(boxed, mesh, rules)
    abstract = sharding.abstract_arrays(boxed, shardings)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    batch = {"image": jax.ShapeDtypeStruct((config.batch_size, *config.image_size, 3), jnp.float32,
                                           sharding=batch_sharding)}
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, config=config))
    lowered = step.lower(abstract, batch)
  cost = lowered.cost_analysis()
  flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

  state_shardings = jax.tree.map(lambda a: a.sharding, abstract)
  param_bytes = sharding.bytes_per_device(abstract["params"], state_shardings["params"])
  opt_bytes = sharding.bytes_per_device(abstract["opt_state"], state_shardings["opt_state"])
  batch_shards = math.prod(mesh.shape[a] for a in batch_sharding.spec[0] or ())
  per_device_batch = config.batch_size / batch_shards
  act_bytes = int(activation_bytes_per_example(config) * per_device_batch)
  return {
      "model": config.model.size,
      "image_size": list(config.image_size),
      "mesh": dict(mesh.shape),
      "batch_size": config.batch_size,
      "per_device_batch": per_device_batch,
      "peak_learning_rate": optim.learning_rate(config),
      "encoder_params": count(abstract["params"]["encoder"]),
      "decoder_params": count(abstract["params"]["decoder"]),
      "paper_flops": paper_flops(config),
      "train_flops_per_step": flops,
      "flops_per_example": flops / config.batch_size,
      "param_bytes_per_device": param_bytes,
      "optimizer_bytes_per_device": opt_bytes,
      "activation_bytes_per_device_estimate": act_bytes,
      # params + gradients + optimizer state + activations
      "memory_per_device_bytes": 2 * param_bytes + opt_bytes + act_bytes,
      "params": count(abstract["params"]),
  }
