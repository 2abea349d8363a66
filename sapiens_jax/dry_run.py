"""`--dry_run`: what a config (any objective) will cost on its mesh, without allocating anything of model size.

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

from sapiens_jax import models
from sapiens_jax import objectives
from sapiens_jax import optim
from sapiens_jax import sharding
from sapiens_jax import step


def count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


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
  objective = objectives.get(config)
  model = objective.build_model(config)
  tx = optim.make_optimizer(config)
  abstract = step.abstract_train_state(objective, model, tx, config, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    batch_sharding = sharding.batch_sharding(mesh, rules)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
             for k, v in objective.batch_spec(config, config.batch_size).items()}
    state_shardings = jax.tree.map(lambda a: a.sharding, abstract)
    jitted = step.jit_train_step(objective, model, tx, config, mesh, rules, state_shardings)
    lowered = jitted.lower(abstract, batch)
  return lowered, abstract, batch_sharding


def train_flops(config, mesh, rules):
  """FLOPs of one train step from XLA's cost analysis. It counts a loop body once, so the cost is
  taken from the unrolled program without remat and with the plain attention formula (model FLOPs:
  no recompute, and no blocked attention loops)."""
  unrolled = config.copy_and_resolve_references()
  unrolled.model.scan_layers, unrolled.model.remat_policy, unrolled.model.attention = False, "none", "xla"
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
  # The objective's own state (an EMA teacher, centres), sharded like the params.
  extra_bytes = {k: sharding.bytes_per_device(v, state_shardings[k])
                 for k, v in step.extra_state(abstract).items()}
  per_device_batch = config.batch_size / sharding.batch_shards(mesh, rules)
  act_bytes = int(objectives.get(config).activation_bytes_per_example(config) * per_device_batch)
  memory = 2 * param_bytes + opt_bytes + sum(extra_bytes.values()) + act_bytes  # params, gradients, optimizer, extra, activations
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
      "family": models.family_name(config.model),
      "objective": config.objective,
      "image_size": list(config.image_size),
      "mesh": dict(mesh.shape),
      "batch_size": config.batch_size,
      "per_device_batch": per_device_batch,
      "peak_learning_rate": optim.learning_rate(config),
      **{f"{group}_params": count(tree) for group, tree in abstract["params"].items()},
      "paper_flops": models.family(config.model).paper_flops(config.model, config.image_size),
      "train_flops_per_step": flops,
      "flops_per_example": flops / config.batch_size,
      "param_bytes_per_device": param_bytes,
      "optimizer_bytes_per_device": opt_bytes,
      **{f"{k}_bytes_per_device": b for k, b in extra_bytes.items()},
      "activation_bytes_per_device_estimate": act_bytes,
      **compiled,
      "memory_per_device_bytes": memory,
      "memory_source": "compiled" if compile_program else "estimate",
      "num_large_params_unsharded": len(unsharded),
      "large_params_unsharded": unsharded[:10],
      "params": count(abstract["params"]),
  }
