"""Trains a tiny MAE for a few steps under several meshes and settings; prints losses and params.

Run by tests/test_sharding.py in a subprocess with 8 host CPU devices (tests/fake_devices.py):
`mesh_runs.py SETTINGS_JSON OUT_DIR` writes each setting's final parameters, whole, to
OUT_DIR/NAME.npz and prints its losses and sharded parameters as JSON. Every setting starts from
the same parameters and sees the same batches, so the results must agree.
"""
import json
import os
import sys

import flax
import flax.linen as nn
import jax
import numpy as np

from sapiens_jax import default_config
from sapiens_jax import optim
from sapiens_jax import sharding
from sapiens_jax import step as train_step
from sapiens_jax.objectives import mae

STEPS = 3


def tiny_config(setting):
  c = default_config.pretrain("tiny")
  c.image_size = (32, 32)
  c.batch_size = 8
  c.total_steps = 10
  c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 32, 2, 2
  c.optim.base_lr, c.optim.warmup_steps = 0.05, 1
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = setting.get("mesh", (1, 1, 1))
  c.model.scan_layers = setting.get("scan", False)
  c.model.remat_policy = setting.get("remat", "none")
  c.grad_accum_steps = setting.get("accum", 1)
  c.model.attention = setting.get("attention", "auto")
  return c


def stack_blocks(params, prefix):
  """Unscanned {prefix_0: t0, prefix_1: t1, ...} -> scanned {prefix: leaves stacked on axis 0}."""
  blocks = [params.pop(f"{prefix}_{i}") for i in range(len([k for k in params if k.startswith(prefix + "_")]))]
  params[prefix] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)


def reference_params():
  model = mae.build_model(tiny_config({}))
  return jax.device_get(nn.unbox(train_step.init_state(mae, model, optim.make_optimizer(tiny_config({})),
                                                       tiny_config({}), jax.random.key(0))["params"]))


def run(setting, params0, batches):
  config = tiny_config(setting)
  n = int(np.prod(config.mesh.values()))
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:n])
  rules = sharding.rules(config)
  model, tx = mae.build_model(config), optim.make_optimizer(config)
  params = flax.core.unfreeze(jax.tree.map(np.array, params0))
  if config.model.scan_layers:
    stack_blocks(params["encoder"], "layers")
    stack_blocks(params["decoder"], "decoder_blocks")
  abstract = train_step.abstract_train_state(mae, model, tx, config, mesh, rules)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  state = {"step": np.zeros((), np.int32), "params": params, "opt_state": tx.init(params)}
  state = jax.device_put(state, shardings)
  step = train_step.jit_train_step(mae, model, tx, config, mesh, rules, shardings)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for images in batches:
      state, metrics = step(state, {"image": jax.device_put(images, batch_sharding)})
      losses.append(float(metrics["loss"]))
  params = jax.device_get(state["params"])
  if config.model.scan_layers:  # unstack for comparison
    for part, prefix in (("encoder", "layers"), ("decoder", "decoder_blocks")):
      stacked = params[part].pop(prefix)
      depth = jax.tree.leaves(stacked)[0].shape[0]
      for i in range(depth):
        params[part][f"{prefix}_{i}"] = jax.tree.map(lambda x: x[i], stacked)
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  sharded = sorted(k for k, s in flax.traverse_util.flatten_dict(shardings["params"], sep="/").items()
                   if not s.is_fully_replicated)
  return losses, {k: np.asarray(v) for k, v in flat.items()}, sharded


def main():
  settings, out_dir = json.loads(sys.argv[1]), sys.argv[2]
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8) for _ in range(STEPS)]  # as shipped
  params0 = reference_params()
  summary = {}
  for name, setting in settings.items():
    losses, params, sharded = run(setting, params0, batches)
    np.savez(os.path.join(out_dir, f"{name}.npz"), **params)  # every value, gathered from the devices
    summary[name] = {"losses": losses, "sharded": sharded}
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
