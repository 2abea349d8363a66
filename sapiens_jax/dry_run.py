"""`--dry_run`: what a config will cost on its mesh, without allocating anything of model size.

Parameters come from `jax.eval_shape`, FLOPs from XLA's cost analysis of the lowered train step,
and memory per device from the compiled (never run) program's memory analysis on the configured
mesh. Plan a pod from a laptop with fake devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=64 python -m sapiens_jax.main \
      --config=configs/pretrain_2b.py --config.mesh.data=8 --config.mesh.fsdp=8 --dry_run
"""
import math

import flax
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


LARGE_PARAM_BYTES = 1 << 20


def unsharded_large_params(abstract_params, shardings):
  """Names of parameters of >= 1 MiB that every device would hold whole."""
  flat = flax.traverse_util.flatten_dict(abstract_params, sep="/")
  flat_shardings = flax.traverse_util.flatten_dict(shardings, sep="/")
  return sorted(name for name, leaf in flat.items()
                if math.prod(leaf.shape) * leaf.dtype.itemsize >= LARGE_PARAM_BYTES
                and flat_shardings[name].is_fully_replicated)


def lower_train_step(config, mesh, rules):
  """(lowered train step, abstract sharded state, batch sharding) for `config` on `mesh`."""
  model = mae.mae_from_config(config)
  tx = optim.make_optimizer(config)
  abstract = train.abstract_train_state(model, tx, config, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    batch_sharding = sharding.batch_sharding(mesh, rules)
    batch = {"image": jax.ShapeDtypeStruct((config.batch_size, *config.image_size, 3), jnp.float32,
                                           sharding=batch_sharding)}
    state_shardings = jax.tree.map(lambda a: a.sharding, abstract)
    lowered = train.jit_train_step(model, tx, config, mesh, rules, state_shardings).lower(abstract, batch)
  return lowered, abstract, batch_sharding


def train_flops(config, mesh, rules):
  """FLOPs of one train step from XLA's cost analysis. It counts a scan body once, so the cost is
  taken from the unrolled program without remat (model FLOPs, not recompute)."""
  unrolled = config.copy_and_resolve_references()
  unrolled.model.scan_layers, unrolled.model.remat_policy = False, "none"
  cost = lower_train_step(unrolled, mesh, rules)[0].cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def plan(config, compile_program=True):
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config)
  lowered, abstract, _ = lower_train_step(config, mesh, rules)
  state_shardings = jax.tree.map(lambda a: a.sharding, abstract)
  flops = train_flops(config, mesh, rules)

  param_bytes = sharding.bytes_per_device(abstract["params"], state_shardings["params"])
  opt_bytes = sharding.bytes_per_device(abstract["opt_state"], state_shardings["opt_state"])
  per_device_batch = config.batch_size / sharding.batch_shards(mesh, rules)
  act_bytes = int(activation_bytes_per_example(config) * per_device_batch)
  memory = 2 * param_bytes + opt_bytes + act_bytes  # params + gradients + optimizer + activations
  compiled = {}
  if compile_program:
    stats = lowered.compile().memory_analysis()
    # Arguments (state + batch shard) + outputs not aliased to donated inputs + temporaries.
    memory = int(stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
                 + stats.temp_size_in_bytes)
    compiled = {"compiled_argument_bytes": int(stats.argument_size_in_bytes),
                "compiled_temp_bytes": int(stats.temp_size_in_bytes)}
  unsharded = unsharded_large_params(abstract["params"], state_shardings["params"])
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
      **compiled,
      "memory_per_device_bytes": memory,
      "memory_source": "compiled" if compile_program else "estimate",
      "num_large_params_unsharded": len(unsharded),
      "large_params_unsharded": unsharded[:10],
      "params": count(abstract["params"]),
  }
