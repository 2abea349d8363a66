r"""Times the jitted MAE train step on a fixed device-resident batch; prints one JSON line.

  python benchmarks/train_step.py --config=configs/quickstart.py [--config.key=value ...] \
      [--steps=10] [--warmup=2] [--torch] [--threads=N] [--breakdown]

Any size of either family: --config.model.size=sapiens2_small times the MAE with a Sapiens2 encoder.

The step is exactly what training runs (step.abstract_train_state + step.init_train_state +
step.jit_train_step, on the configured mesh), so the input pipeline is excluded and the number is
the model's ceiling. MFU is analytic model FLOPs (`model_flops_per_step`) over the device peak: a
table for accelerators, and on CPU a float32 jnp.dot matmul measured in the same run. `--torch`
also times the PyTorch eager reference of the same model and batch (benchmarks/torch_mae.py).
XLA:CPU sizes its thread pool from the CPUs this process may run on (limit it with `taskset`);
`--threads` sets torch's only.
On a shared CPU, compare the `cpu_s_per_step` fields (process CPU time): other processes stretch
wall time but hardly the CPU seconds the step itself needs.
"""
import json
import os

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from sapiens_jax import models
from sapiens_jax import objectives
from sapiens_jax import optim
from sapiens_jax import prng
from sapiens_jax import sharding
from sapiens_jax import step
from sapiens_jax import train
from sapiens_jax.data import transforms
import timing  # pylint: disable=g-bad-import-order  (benchmarks/timing.py)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps; the step time is their median.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first (the first one compiles).")
_TORCH = flags.DEFINE_bool("torch", False, "Also time the PyTorch eager reference step.")
_THREADS = flags.DEFINE_integer("threads", len(os.sched_getaffinity(0)), "torch.set_num_threads.")
_BREAKDOWN = flags.DEFINE_bool("breakdown", False, "Also time forward and forward+backward alone.")
flags.mark_flags_as_required(["config"])

# Dense per-chip peak FLOP/s as (bfloat16, float32) by device_kind prefix, longest prefix first.
# float32 dots run at default precision: TF32 tensor cores on these GPUs, one bf16 pass on TPUs.
PEAK_FLOPS = {
    "NVIDIA H100 PCIe": (756e12, 378e12),
    "NVIDIA H100": (989e12, 495e12),  # SXM
    "NVIDIA H200": (989e12, 495e12),
    "NVIDIA A100": (312e12, 156e12),
    "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12),  # v5e
    "TPU v5p": (459e12, 459e12),
    "TPU v5": (459e12, 459e12),  # v5p reports "TPU v5"
    "TPU v6 lite": (918e12, 918e12),  # v6e
}


def block_flops(tokens, width):
  """Forward FLOPs of one pre-norm block on n tokens of width C (4C MLP), 2 per multiply-add.

  qkv 6nC^2 + proj 2nC^2 + MLP 16nC^2 + scores QK^T 2n^2C + weighted values AV 2n^2C.
  """
  return 24 * tokens * width ** 2 + 4 * tokens ** 2 * width


def mae_forward_flops(config):
  """Forward matmul FLOPs of one example through the MAE, as sapiens_jax.objectives.mae computes it.

  With N = (H/p)(W/p) patches, n_e = 1 + int(N (1 - mask_ratio)) encoder tokens (visible + cls),
  n_d = 1 + N decoder tokens, encoder (C, L), decoder (D, L_d):
    2 N (3p^2) C                   patch embedding (a strided conv, run on all N patches)
  + L block_flops(n_e, C)          encoder on the visible tokens + cls
  + 2 n_e C D                      decoder_embed
  + L_d block_flops(n_d, D)        decoder on all tokens + cls
  + 2 n_d D (3p^2)                 decoder_pred
  Norms, softmax, GELU, masking and the loss are left out (not matmuls). A Sapiens2 encoder's
  linear layers are its family's count (paper_flops per token: grouped-query k/v, SwiGLU) on its
  n_e + 8 tokens (the registers), plus the same attention scores.
  """
  m = config.model
  family = models.family(m)
  dims = family.size(m.size)
  width, depth = dims.width, dims.depth
  h, w = config.image_size
  p, d = m.patch_size, m.decoder_width
  n = (h // p) * (w // p)
  n_enc, n_dec = 1 + int(n * (1 - m.mask_ratio)), 1 + n
  patch_embed = 2 * n * 3 * p * p * width
  if models.family_name(m) == "sapiens2":
    tokens = n_enc + dims.num_registers
    linear_per_token = (family.paper_flops(m, config.image_size) - patch_embed / 2) / n
    encoder = 2 * linear_per_token * tokens + depth * 4 * tokens ** 2 * width
  else:
    encoder = depth * block_flops(n_enc, width)
  return (patch_embed + encoder + 2 * n_enc * width * d + m.decoder_depth * block_flops(n_dec, d)
          + 2 * n_dec * d * 3 * p * p)


def model_flops_per_step(config):
  """3 x forward (backward = 2 x forward) x global batch; remat recomputation is not counted."""
  return 3 * config.batch_size * mae_forward_flops(config)


def peak_flops(device, dtype):
  """(peak FLOP/s of one device, where the number came from)."""
  kind = device.device_kind
  for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
    if kind.startswith(prefix):
      return PEAK_FLOPS[prefix][0 if dtype == "bfloat16" else 1], f"table[{prefix!r}]"
  return timing.jax_matmul_flops(), "measured: best of 10 float32 2048x2048 jnp.dot"


def time_calls(fn, steps, warmup):
  """timing.time_calls of fn, waiting for each result."""
  return timing.time_calls(lambda: jax.block_until_ready(fn()), steps, warmup)


def synthetic_images(config):
  """A fixed uint8 RGB batch (B, H, W, 3), as the pipelines ship it (the step normalises it)."""
  rng = np.random.default_rng(config.seed)
  return rng.integers(0, 256, size=(config.batch_size, *config.image_size, 3), dtype=np.uint8)


def benchmark_jax(config, images, steps, warmup, breakdown):
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config)
  objective = objectives.get(config)
  model, tx = objective.build_model(config), optim.make_optimizer(config)
  abstract = step.abstract_train_state(objective, model, tx, config, mesh, rules)
  state = step.init_train_state(objective, model, tx, config, mesh, rules, abstract)
  state_shardings = jax.tree.map(lambda a: a.sharding, abstract)
  jitted_step = step.jit_train_step(objective, model, tx, config, mesh, rules, state_shardings)
  out = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    batch = {"image": jax.device_put(images, sharding.batch_sharding(mesh, rules))}
    holder = {"state": state}
    del state

    def run_step():
      holder["state"], metrics = jitted_step(holder["state"], batch)
      return holder["state"], metrics

    out["first_step_s"] = timing.first_call_s(lambda: jax.block_until_ready(run_step()))  # compile + one step
    median, best, cpu = time_calls(run_step, steps, max(warmup - 1, 0))
    out.update(step_time_s=median, step_time_min_s=best, cpu_s_per_step=cpu)

    if breakdown:
      state = holder["state"]
      keys = prng.example_keys(jax.random.key(0), images.shape[0])
      forward = jax.jit(lambda s, b, k: objective.loss(model, s["params"], s, b, k, config)[0])
      grads = jax.jit(lambda s, b, k: step.loss_and_grads(objective, model, s, b, k, config))
      out["forward_s"] = time_calls(lambda: forward(state, batch, keys), steps, 1)[0]
      out["forward_backward_s"] = time_calls(lambda: grads(state, batch, keys), steps, 1)[0]
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if train.check_config(config) is not objectives.mae:
    raise app.UsageError(f"this benchmark times the MAE pretraining step; --config has "
                         f"objective={config.objective!r}, not 'mae'")
  device = jax.devices()[0]
  dims = models.family(config.model).size(config.model.size)
  result = {
      "model": config.model.size, "width": dims.width, "depth": dims.depth, "heads": dims.num_heads,
      "decoder": [config.model.decoder_width, config.model.decoder_depth, config.model.decoder_heads],
      "image_size": list(config.image_size), "batch_size": config.batch_size,
      "dtype": config.model.dtype, "scan_layers": config.model.scan_layers,
      "remat_policy": config.model.remat_policy, "grad_accum_steps": config.grad_accum_steps,
      "platform": device.platform, "device_kind": device.device_kind, "num_devices": jax.device_count(),
      "cpu": timing.cpu_model(), "xla_cpu_threads": len(os.sched_getaffinity(0)),
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__,
      "steps": _STEPS.value, "warmup": _WARMUP.value, "loadavg_start": os.getloadavg()[0],
  }
  images = synthetic_images(config)
  peak, source = peak_flops(device, config.model.dtype)
  result.update(benchmark_jax(config, images, _STEPS.value, _WARMUP.value, _BREAKDOWN.value))
  flops = model_flops_per_step(config)
  # CPU "devices" (--xla_force_host_platform_device_count) share the cores the matmul already used.
  peak_total = peak if device.platform == "cpu" else peak * jax.device_count()
  result.update(
      examples_per_sec=config.batch_size / result["step_time_s"], model_flops_per_step=flops,
      peak_flops=peak_total, peak_flops_source=source,
      mfu=flops / result["step_time_s"] / peak_total)
  if _TORCH.value:
    import torch_mae  # pylint: disable=g-import-not-at-top
    # torch gets the same batch normalised, as the JAX step normalises it on the device.
    t = torch_mae.benchmark(config, transforms.normalize(images), _STEPS.value, _WARMUP.value, _THREADS.value,
                            _BREAKDOWN.value)
    t["torch_matmul_flops"] = torch_mae.matmul_flops()
    t["torch_mfu"] = flops / t["torch_step_time_s"] / peak_total
    t["speedup_vs_torch"] = t["torch_step_time_s"] / result["step_time_s"]
    t["cpu_speedup_vs_torch"] = t["torch_cpu_s_per_step"] / result["cpu_s_per_step"]
    result.update(t)
  result["loadavg_end"] = os.getloadavg()[0]
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
