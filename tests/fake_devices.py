"""The environment of a subprocess that splits this CPU into N JAX devices.

Besides `--xla_force_host_platform_device_count`, it turns off XLA:CPU's concurrency-optimised
scheduler. With it, the independent collectives of one step could start in a different order on
different device threads, and an FSDP step then deadlocked at random: one device waiting in an
all-gather, the others in an all-reduce, until XLA aborts ("Termination timeout ... only 3 of 4
arrived"). Measured with tests/mesh_runs.py's data2_fsdp4_scan_remat_qkv_proj setting, jaxlib
0.10.2, 2 cores: 3 of 4 runs deadlocked with it, 0 of 4 without. Real accelerators run one
program per device and are not affected; launch/local.sh sets the same flag.
"""
import os

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def env(count=8, base=None):
  """os.environ (or `base`) with JAX on the CPU split into `count` devices."""
  return dict(os.environ if base is None else base, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={count} {SCHEDULER_FLAG}")
