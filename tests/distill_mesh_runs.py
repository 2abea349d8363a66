"""Trains MAE + self-distillation (objectives/mae_distill.py) for a few steps under several meshes.

Run by tests/test_sharding_distill.py in a subprocess with 8 host CPU devices (tests/fake_devices.py):
`distill_mesh_runs.py SETTINGS_JSON OUT_DIR` writes each setting's final state, gathered whole, to
OUT_DIR/NAME.npz (keys `params/...`, `teacher/...`, `centers/...`), the common starting point to
OUT_DIR/initial.npz, and prints the losses, the loss components and the shardings as JSON. Every
setting starts from the same values, sees the same batches and draws the same keys (the step's key
is fold_in(config.seed, step), one per example), so the results must agree.
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
from sapiens_jax.objectives import mae_distill

STEPS = 4  # the first at learning rate 0 (warm-up from 0), so three updates
BATCH = 8  # one example per device under data=8
COMPONENTS = ("mae_loss", "dino_loss", "dense_loss", "koleo_loss", "teacher_entropy", "cls_std", "grad_norm")


def distill_config(setting):
  """tests/objectives/test_mae_distill.py's small config, on 8 examples."""
  c = default_config.pretrain("sapiens2_tiny", "mae_distill")
  c.image_size = (32, 32)
  c.batch_size = BATCH
  c.total_steps = 10
  c.model.scan_layers = True  # 18 blocks as 3 scanned segments: seconds to compile, not minutes
  c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 32, 1, 2
  d = c.distill
  d.num_prototypes, d.head_hidden_dim, d.head_bottleneck_dim = 64, 32, 16
  d.dense_tokens = 3
  d.num_local_crops, d.local_size = 2, (16, 16)
  d.teacher_temperature_warmup_steps = 4
  d.freeze_prototypes_steps = 1  # the prototypes train from the second step on
  d.centering = setting.get("centering", "sinkhorn_knopp")
  # lr 3.9e-4 a step at batch 8 (a quarter of tests/mesh_runs.py's): see ATOL in test_sharding_distill.py.
  c.optim.base_lr, c.optim.warmup_steps = 0.0125, 1
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = setting.get("mesh", (1, 1, 1))
  return c


def trained_looking(params):
  """Layer scales of 0.1 instead of the init's 1e-4 (as tests/objectives/test_mae_distill.py): at init every
  image gives nearly the same CLS, and KoLeo (the log of nearest-neighbour distances between them) blows up
  any noise. Even so the spread is small here (cls_std ~0.08: the student sees 1 of 4 patches at 32 px).
  Scales of 1 spread it more (cls_std ~0.55) but 18 such blocks amplify the layout-dependent float32 noise of
  the forward: data8 then ended up to 9e-4 off one device."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * 1e3 if getattr(path[-1], "key", "") == "gamma" else x, params)


def initial_values(config):
  """The student and, unlike the real loop (teacher = student), a teacher of its own: a mix-up of the two
  in the sharded step could not cancel out, and the EMA then visibly moves the teacher."""
  model = mae_distill.build_model(config)
  init = jax.jit(lambda key: trained_looking(nn.unbox(mae_distill.init_params(model, config, key))))
  return jax.device_get(init(jax.random.key(0))), jax.device_get(init(jax.random.key(1)))


def flat(tree, prefix):
  return {f"{prefix}/{k}": np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}


def run(setting, params0, opt_state0, teacher0, batches):
  config = distill_config(setting)
  n = int(np.prod(config.mesh.values()))
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:n])
  rules = sharding.rules(config)
  model, tx = mae_distill.build_model(config), optim.make_optimizer(config)
  abstract = train_step.abstract_train_state(mae_distill, model, tx, config, mesh, rules)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  # The same host values for every mesh (scan_layers everywhere: one layout), laid out as the real loop would.
  state = {"step": np.zeros((), np.int32), "params": params0, "opt_state": opt_state0,
           **jax.device_get(mae_distill.init_extra_state(params0, config)), "teacher": teacher0}
  state = jax.device_put(state, shardings)
  step = train_step.jit_train_step(mae_distill, model, tx, config, mesh, rules, shardings)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  losses, components = [], {k: [] for k in COMPONENTS}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for batch in batches:
      state, metrics = step(state, {k: jax.device_put(v, batch_sharding) for k, v in batch.items()})
      metrics = jax.device_get(metrics)
      losses.append(float(metrics["loss"]))
      for k in COMPONENTS:
        components[k].append(float(metrics[k]))
  # How the state really lies on the devices after the steps: the spec of every leaf not fully replicated.
  specs = {group: {k: str(a.sharding.spec) for k, a in flax.traverse_util.flatten_dict(state[group], sep="/").items()
                   if not a.sharding.is_fully_replicated}
           for group in ("params", "teacher")}
  host = jax.device_get({k: v for k, v in state.items() if k in ("params", "teacher", "centers")})
  arrays = {}
  for group, tree in host.items():
    arrays.update(flat(tree, group))
  return {"losses": losses, "components": components, "sharded": specs}, arrays


def main():
  settings, out_dir = json.loads(sys.argv[1]), sys.argv[2]
  params0, teacher0 = initial_values(distill_config({}))
  opt_state0 = jax.device_get(optim.make_optimizer(distill_config({})).init(params0))  # one optimizer for all
  np.savez(os.path.join(out_dir, "initial.npz"), **flat(params0, "params"), **flat(teacher0, "teacher"))
  rng = np.random.default_rng(0)
  spec = mae_distill.batch_spec(distill_config({}), BATCH)  # {"image": (B, 2, H, W, 3), "local": (B, L, h, w, 3)}
  batches = [{k: rng.integers(0, 256, s.shape, dtype=np.uint8) for k, s in spec.items()} for _ in range(STEPS)]
  summary = {}
  for name, setting in settings.items():
    summary[name], arrays = run(setting, params0, opt_state0, teacher0, batches)
    np.savez(os.path.join(out_dir, f"{name}.npz"), **arrays)  # every value, gathered from the devices
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
