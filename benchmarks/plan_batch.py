r"""The largest per-device batch whose compiled train step fits an accelerator's memory; JSON lines.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/plan_batch.py \
      --config=configs/seg_goliath.py --config.model.size=sapiens2_5b --config.model.dtype=bfloat16 \
      --config.model.scan_layers=True --config.model.remat_policy=full --config.mesh.fsdp=8 \
      --config.mesh.data=1 [--capacity_gb=80,141]

`dry_run.plan` (the compiled program's memory analysis per device, never run) at per-device batch
1, 2, 4, ... until it exceeds each capacity, then bisected; one line per plan, then one per
capacity with the answer. Memory does not grow linearly in the batch (XLA schedules a bigger
program differently), so every answer is a compiled plan, never an extrapolation.
"""
import json

from absl import app
from absl import flags
from ml_collections import config_flags

from sapiens_jax import dry_run
from sapiens_jax import sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_CAPACITY = flags.DEFINE_list("capacity_gb", ["80", "141"], "Device memories to fit, in GB (1e9 bytes).")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  config = _CONFIG.value
  shards = sharding.batch_shards(sharding.make_mesh(config.mesh), sharding.rules(config))
  plans = {}

  def memory(per_device):
    if per_device not in plans:
      c = config.copy_and_resolve_references()
      c.batch_size = per_device * shards
      plan = dry_run.plan(c)
      plans[per_device] = plan["memory_per_device_bytes"]
      print(json.dumps({"per_device_batch": per_device, "memory_per_device_GiB": plans[per_device] / 2 ** 30,
                        "params_GiB": plan["param_bytes_per_device"] / 2 ** 30,
                        "optimizer_GiB": plan["optimizer_bytes_per_device"] / 2 ** 30,
                        "train_TFLOPs_per_step": plan["train_flops_per_step"] / 1e12}), flush=True)
    return plans[per_device]

  for capacity in sorted(float(c) * 1e9 for c in _CAPACITY.value):
    fits, over = 0, 1
    while memory(over) <= capacity:
      fits, over = over, 2 * over
    while over - fits > 1:
      middle = (fits + over) // 2
      fits, over = (middle, over) if memory(middle) <= capacity else (fits, middle)
    print(json.dumps({"capacity_GB": capacity / 1e9, "largest_per_device_batch": fits,
                      "memory_per_device_GiB": plans[fits] / 2 ** 30 if fits else None}), flush=True)


if __name__ == "__main__":
  app.run(main)
