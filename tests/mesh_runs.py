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
from sapiens_jax import torch_names
from sapiens_jax.objectives import mae

STEPS = 3


def tiny_config(setting):
  c = default_config.pretrain(setting.get("size", "tiny"))
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


def reference_params(size):
  config = tiny_config({"size": size})
  model = mae.build_model(config)
  return jax.device_get(nn.unbox(train_step.init_state(mae, model, optim.make_optimizer(config), config,
                                                       jax.random.key(0))["params"]))


def run(setting, params0, batches):
  config = tiny_config(setting)
  n = int(np.prod(config.mesh.values()))
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:n])
  rules = sharding.rules(config)
  model, tx = mae.build_model(config), optim.make_optimizer(config)
  abstract = train_step.abstract_train_state(mae, model, tx, config, mesh, rules)
  # The same initial values whatever the layout (scanned blocks stacked), through the PyTorch names.
  parts = mae.torch_parts(config)
  params = torch_names.from_torch(torch_names.to_torch(params0, parts), abstract["params"], parts)
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
  flat = torch_names.to_torch(jax.device_get(state["params"]), parts)  # scanned or not, by PyTorch name
  sharded = sorted(k for k, s in flax.traverse_util.flatten_dict(shardings["params"], sep="/").items()
                   if not s.is_fully_replicated)
  return losses, {k: np.asarray(v) for k, v in flat.items()}, sharded


def main():
  settings, out_dir = json.loads(sys.argv[1]), sys.argv[2]
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8) for _ in range(STEPS)]  # as shipped
  summary, params0 = {}, {}
  for name, setting in settings.items():
    size = setting.get("size", "tiny")
    params0.setdefault(size, reference_params(size))
    losses, params, sharded = run(setting, params0[size], batches)
    np.savez(os.path.join(out_dir, f"{name}.npz"), **params)  # every value, gathered from the devices
    summary[name] = {"losses": losses, "sharded": sharded}
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
