r"""Entry point: `python -m sapiens_jax.main --config=configs/X.py --workdir=DIR [--dry_run]`.

Config values are overridden with `--config.key=value`; the config is locked, so a misspelt key
is an error that names it. A run resumes from the newest checkpoint in --workdir by itself.
"""
import json
import logging as pylogging

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and images go.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print sizes, FLOPs and memory as JSON; train nothing.")
flags.mark_flags_as_required(["config"])


class _QuietLibraries(pylogging.Filter):
  """Keeps our INFO lines and everyone's warnings; Orbax and JAX log every save at INFO."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or "sapiens_jax" in record.pathname


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
  from sapiens_jax import train  # pylint: disable=g-import-not-at-top
  logging.info("JAX %s, %d process(es), %d device(s): %s", jax.__version__, jax.process_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
