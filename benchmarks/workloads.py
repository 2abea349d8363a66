r"""The workloads this project exists for, timed against our PyTorch reference; one JSON line.

  taskset -c 0 python benchmarks/workloads.py --workload=mae|finetune|predict \
      [--size=0.3b] [--steps=2] [--warmup=1] [--threads=1] [--attention=auto] [--remat=POLICY]

mae:      the MAE pretraining step at 1024x1024, batch 1 (configs/pretrain_SIZE.py): encoder on 1,025
          tokens, decoder on 4,097.
finetune: the body-part segmentation fine-tuning step at 1024x768, batch 1 (configs/seg_goliath.py:SIZE):
          3,072 tokens in every layer, the x8 head, class-weighted cross-entropy, AdamW.
predict:  that seg model's forward at 1024x768, batch 1, no gradients.

Each side runs in a process of its own (this script with --side=jax or --side=torch), so each
reports its own peak resident memory (ru_maxrss); the parent prints both, and torch / JAX ratios
(above 1: JAX is faster or smaller). The PyTorch side is tests/torch_reference.py's model (the
architecture is ours by construction), eager, float32, F.scaled_dot_product_attention, fused AdamW.
Model FLOPs are XLA's cost analysis of the unscanned, un-rematerialised forward (x3 for a train step);
MFU is against a float32 2048^2 jnp.dot measured in the JAX process.
"""
import json
import os
import resource
import subprocess
import sys

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks"), os.path.join(REPO, "tests")]
import timing  # pylint: disable=g-import-not-at-top,wrong-import-position  (benchmarks/timing.py)

_WORKLOAD = flags.DEFINE_enum("workload", "mae", ["mae", "finetune", "predict"], "What to time.")
_SIZE = flags.DEFINE_string("size", "0.3b", "Backbone size.")
_STEPS = flags.DEFINE_integer("steps", 2, "Timed steps; the median is reported.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps first (the first compiles).")
_THREADS = flags.DEFINE_integer("threads", 1, "torch.set_num_threads (XLA: the CPUs of the process).")
_ATTENTION = flags.DEFINE_string("attention", "auto", "config.model.attention of the JAX side.")
_REMAT = flags.DEFINE_string("remat", "", "config.model.remat_policy of the JAX side (default: the config's).")
_SIDE = flags.DEFINE_enum("side", "both", ["both", "jax", "torch"], "Run one side (used by the parent).")


def workload_config(workload, size, attention="auto", remat=""):
  """The run config of a workload: the shipped config at batch 1 and a constant learning rate."""
  from sapiens_jax import default_config  # pylint: disable=g-import-not-at-top
  if workload == "mae":
    c = default_config.pretrain(size)
  else:
    c = default_config.finetune("goliath_seg", size)
  c.batch_size = c.eval_batch_size = 1
  c.model.attention = attention
  c.model.remat_policy = remat or c.model.remat_policy
  return c


def time_calls(fn, steps, warmup):
  """(first call s, median s, process CPU s per call) of fn() (it must wait for its result)."""
  first = timing.first_call_s(fn)
  median, _, cpu = timing.time_calls(fn, steps, warmup - 1)
  return first, median, cpu


def peak_rss_bytes():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------- JAX

def synthetic_batch(objective, config, rng):
  """A batch of the workload's shapes: random uint8 images, targets drawn in their valid range."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  batch = {}
  for key, spec in objective.batch_spec(config, config.batch_size).items():
    if spec.dtype == np.uint8:
      batch[key] = rng.integers(0, 256, spec.shape, dtype=np.uint8)
    elif np.issubdtype(spec.dtype, np.integer):
      batch[key] = rng.integers(0, 20, spec.shape).astype(spec.dtype)
    else:
      batch[key] = rng.standard_normal(spec.shape).astype(spec.dtype)
  return batch


def forward_flops(objective, config, batch, with_loss):
  """XLA's FLOPs of one forward (with the loss, or the bare model), unscanned, no remat."""
  import jax  # pylint: disable=g-import-not-at-top
  from sapiens_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from sapiens_jax import prng  # pylint: disable=g-import-not-at-top
  plain = config.copy_and_resolve_references()
  plain.model.scan_layers, plain.model.remat_policy, plain.model.attention = False, "none", "xla"
  model = objective.build_model(plain)
  params = checkpoint.abstract_weights(plain)
  keys = prng.example_keys(jax.random.key(0), plain.batch_size)
  if with_loss:
    forward = lambda p, b: objective.loss(model, p, {}, b, keys, plain)[0]
  else:
    forward = lambda p, b: model.apply({"params": p}, b["image"].astype(jax.numpy.float32))
  cost = jax.jit(forward).lower(params, batch).cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def jax_side(workload, size, steps, warmup, attention, remat):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sapiens_jax import objectives  # pylint: disable=g-import-not-at-top
  from sapiens_jax import optim  # pylint: disable=g-import-not-at-top
  from sapiens_jax import sharding  # pylint: disable=g-import-not-at-top
  from sapiens_jax import step  # pylint: disable=g-import-not-at-top
  from sapiens_jax.data import transforms  # pylint: disable=g-import-not-at-top

  config = workload_config(workload, size, attention, remat)
  objective = objectives.get(config)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config)
  model, tx = objective.build_model(config), optim.make_optimizer(config)
  host_batch = synthetic_batch(objective, config, np.random.default_rng(0))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, rules)) for k, v in host_batch.items()}
    if workload == "predict":  # params only, as predict.py restores them: no optimizer state
      init = jax.jit(lambda key: nn.unbox(objective.init_params(model, config, key)))
      params = init(jax.random.key(config.seed))
      forward = jax.jit(lambda p, x: model.apply({"params": p}, transforms.normalize(x)))
      run = lambda: jax.block_until_ready(forward(params, batch["image"]))
    else:
      abstract = step.abstract_train_state(objective, model, tx, config, mesh, rules)
      state = step.init_train_state(objective, model, tx, config, mesh, rules, abstract)
      jitted = step.jit_train_step(objective, model, tx, config, mesh, rules,
                                   jax.tree.map(lambda a: a.sharding, abstract))
      holder = {"state": state}
      del state

      def run():
        holder["state"], metrics = jitted(holder["state"], batch)
        jax.block_until_ready(metrics)
    first, median, cpu = time_calls(run, steps, warmup)
  rss = peak_rss_bytes()  # before anything else runs in this process: the FLOP count lowers a big program
  flops = forward_flops(objective, config, host_batch, with_loss=workload != "predict")
  flops *= 1 if workload == "predict" else 3
  peak = timing.jax_matmul_flops()
  return {"first_step_s": first, "step_time_s": median, "cpu_s_per_step": cpu, "model_flops": flops,
          "peak_flops": peak, "mfu": flops / median / peak, "peak_rss_bytes": rss,
          "attention": attention, "remat_policy": config.model.remat_policy,
          "xla_cpu_threads": len(os.sched_getaffinity(0))}


# ---------------------------------------------------------------- PyTorch

def torch_side(workload, size, steps, warmup, threads):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from sapiens_jax import models  # pylint: disable=g-import-not-at-top
  from sapiens_jax import tasks  # pylint: disable=g-import-not-at-top
  import torch_mae  # pylint: disable=g-import-not-at-top  (benchmarks/torch_mae.py)
  import torch_reference  # pylint: disable=g-import-not-at-top  (tests/torch_reference.py)

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  config = workload_config(workload, size)
  h, w = config.image_size
  images = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, h, w)).astype(np.float32))
  if workload == "mae":
    model, optimizer = torch_mae.make_model_and_optimizer(config)
    step = lambda: torch_mae.train_step(model, optimizer, images, config)
  else:
    m = config.model
    dims = models.family(m).size(m.size)
    grid = models.family(m).grid(m, config.image_size)
    backbone = torch_reference.SapiensViT(dims.width, dims.depth, dims.num_heads, (h, w), m.patch_size,
                                          with_cls_token=False, padding=m.patch_padding)
    classes = tasks.seg.classes(config)
    head = torch_reference.SegHead(dims.width, classes.num_classes, m.head_channels)
    model = torch_reference.TaskModel(backbone, head, "decode_head", grid)
    labels = torch.from_numpy(np.random.default_rng(1).integers(0, classes.num_classes, (1, h, w)))
    weight = torch.from_numpy(np.asarray(classes.class_weight))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.base_lr, betas=(0.9, 0.999), fused=True)

    def train():
      optimizer.zero_grad(set_to_none=True)
      logits = F.interpolate(model(images), size=(h, w), mode="bilinear", align_corners=False)
      loss = (F.cross_entropy(logits, labels, weight=weight, ignore_index=255, reduction="none")).mean()
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip_norm)
      optimizer.step()

    def predict():
      with torch.no_grad():
        model(images)
    model.train(workload == "finetune")
    step = train if workload == "finetune" else predict
  first, median, cpu = time_calls(step, steps, warmup)
  return {"first_step_s": first, "step_time_s": median, "cpu_s_per_step": cpu,
          "peak_rss_bytes": peak_rss_bytes(), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- both

def run_side(side):
  args = [sys.executable, os.path.abspath(__file__), f"--side={side}", f"--workload={_WORKLOAD.value}",
          f"--size={_SIZE.value}", f"--steps={_STEPS.value}", f"--warmup={_WARMUP.value}",
          f"--threads={_THREADS.value}", f"--attention={_ATTENTION.value}", f"--remat={_REMAT.value}"]
  out = subprocess.run(args, capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f"the {side} side failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = (_WORKLOAD.value, _SIZE.value, _STEPS.value, _WARMUP.value)
  if _SIDE.value == "jax":
    result = jax_side(*args, _ATTENTION.value, _REMAT.value)
  elif _SIDE.value == "torch":
    result = torch_side(*args, _THREADS.value)
  else:
    jax_result, torch_result = run_side("jax"), run_side("torch")
    torch_result["mfu"] = jax_result["model_flops"] / torch_result["step_time_s"] / jax_result["peak_flops"]
    result = {"workload": _WORKLOAD.value, "size": _SIZE.value, "steps": _STEPS.value, "cpu": timing.cpu_model(),
              "jax": jax_result, "torch": torch_result,
              "speedup_vs_torch": torch_result["step_time_s"] / jax_result["step_time_s"],
              "cpu_speedup_vs_torch": torch_result["cpu_s_per_step"] / jax_result["cpu_s_per_step"],
              "memory_vs_torch": jax_result["peak_rss_bytes"] / torch_result["peak_rss_bytes"]}
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
