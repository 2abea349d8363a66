r"""Entry point: `python -m sapiens_jax.main --config=configs/X.py --workdir=DIR [--dry_run] [--mode=eval]`.

Config values are overridden with `--config.key=value`; the config is locked, so a misspelt key
is an error that names it. A run resumes from the newest checkpoint in --workdir by itself.

Multi-process runs (several hosts, or several processes on one host) start the same command in
every process: see launch/ for SLURM, Cloud TPU VMs and localhost.
"""
import json
import logging as pylogging
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and images go.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print sizes, FLOPs and memory as JSON; train nothing.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train (resuming if the workdir has a checkpoint), or eval: evaluate the newest "
                          "checkpoint once (metrics.jsonl, TensorBoard, pictures) and exit.")
# Multi-process runs: launch/local.sh passes all three, launch/tpu_vm.sh the address (JAX reads
# the rest from the TPU metadata), and under SLURM JAX finds all three by itself.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
flags.mark_flags_as_required(["config"])


class _QuietLibraries(pylogging.Filter):
  """Keeps our INFO lines and everyone's warnings; Orbax and JAX log every save at INFO."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or "sapiens_jax" in record.pathname


def initialize_distributed():
  """Joins a multi-process run; must come before anything touches the devices.

  Only when the flags or SLURM say there are several processes: a plain run must not wait for a
  coordinator, and in a one-task SLURM allocation JAX would hide all GPUs but the first.
  """
  flagged = any(f.value is not None for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID))
  if flagged or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  if _DRY_RUN.value:
    from sapiens_jax import dry_run  # pylint: disable=g-import-not-at-top
    print(json.dumps(dry_run.plan(config)), flush=True)
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (except with --dry_run)")
  initialize_distributed()
  from sapiens_jax import train  # pylint: disable=g-import-not-at-top
  logging.info("JAX %s, process %d of %d, %d of %d device(s): %s", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  train.train_and_evaluate(config, _WORKDIR.value, eval_only=_MODE.value == "eval")


if __name__ == "__main__":
  app.run(main)
