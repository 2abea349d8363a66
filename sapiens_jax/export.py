r"""Export a checkpoint's weights as a PyTorch state dict with the original Sapiens key names.

  python -m sapiens_jax.export --workdir=DIR [--step=N] --output=FILE.safetensors|FILE.pth \
      [--dtype=float32|bfloat16] [--include_decoder]

Runs on a laptop CPU whatever the run was trained on: the parameter shapes come from the config
saved in the checkpoint, and only the parameters are read (not the optimizer state), onto one CPU
device. A pretraining run gives the bare backbone keys, like the released `*_clean.pth` files (with
--include_decoder the MAE decoder is added under `neck.*`); a fine-tuning run gives `backbone.*`
plus `head.*` (pose) or `decode_head.*` (seg, depth, normal), like the task checkpoints. Needs
`pip install -e .[torch]`.
"""
import os

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from sapiens_jax import torch_names
from sapiens_jax import train

EXTENSIONS = (".safetensors", ".pth")
DTYPES = ("float32", "bfloat16")


def checkpoint_steps(workdir):
  """(read-only manager, sorted steps) of `workdir`/checkpoints; an error naming the dir if empty."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {workdir!r}: {directory} does not exist")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True, create=False, save_interval_steps=0))
  steps = sorted(manager.all_steps())
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {workdir!r}: {directory} holds no saved step")
  return manager, steps


def abstract_params(config):
  """Shapes and dtypes of the model's params, traced (never allocated) from the run's config.

  Goes through train.init_state (with a stateless optimizer) so it builds params exactly as training does.
  """
  model = train.build_model(config)
  init = lambda rng: nn.unbox(train.init_state(model, optax.identity(), config, rng)["params"])
  return jax.eval_shape(init, jax.random.key(0))


def restore_params(workdir, step=None):
  """(params as numpy arrays, step) of checkpoint `step` (default: the newest) in `workdir`."""
  manager, steps = checkpoint_steps(workdir)
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ValueError(f"no checkpoint for step {step} in {manager.directory}; available steps: {steps}")
  saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  target = {"params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu),
                                   abstract_params(ml_collections.ConfigDict(saved)))}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
  return jax.tree.map(np.asarray, restored["state"]["params"]), step


def check_output(output, dtype):
  if not output.endswith(EXTENSIONS):
    raise ValueError(f"--output={output!r} has an unknown extension; expected one of {EXTENSIONS}")
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r} is not supported; expected one of {DTYPES}")


def save(state_dict, output, dtype):
  """Write {key: numpy array} as `dtype` tensors: safetensors, or torch.save of a plain dict.

  Empties `state_dict` as it goes, so a 2B model is not held three times over in host memory.
  """
  import torch  # pylint: disable=g-import-not-at-top
  tensors = {k: torch.tensor(state_dict.pop(k)).to(getattr(torch, dtype)) for k in list(state_dict)}
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  if output.endswith(".safetensors"):
    from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
    save_file(tensors, output, metadata={"format": "pt"})
  else:
    torch.save(tensors, output)


def export(workdir, output, step=None, dtype="float32", include_decoder=False):
  """Checkpoint -> PyTorch file; returns (step exported, number of tensors)."""
  check_output(output, dtype)
  params, step = restore_params(workdir, step)
  # A fine-tuning run is written as the reference's task checkpoints are: backbone.* + head.*.
  prefix = "backbone." if "head" in params else ""
  state_dict = torch_names.to_torch(params, prefix=prefix, include_decoder=include_decoder)
  count = len(state_dict)
  save(state_dict, output, dtype)
  return step, count


def cli():
  """Flags are defined here, not at import, so importing this module never clashes with main.py's."""
  workdir = flags.DEFINE_string("workdir", None, "Run directory whose checkpoints/ to read.")
  step = flags.DEFINE_integer("step", None, "Checkpoint step to export; default: the newest.")
  output = flags.DEFINE_string("output", None, "Output file, .safetensors or .pth.")
  dtype = flags.DEFINE_enum("dtype", "float32", DTYPES, "Dtype of the written tensors.")
  include_decoder = flags.DEFINE_bool("include_decoder", False, "Also write the MAE decoder (neck.*).")
  flags.mark_flags_as_required(["workdir", "output"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every read at INFO
    done, count = export(workdir.value, output.value, step.value, dtype.value, include_decoder.value)
    print(f"Wrote {count} {dtype.value} tensors of step {done} to {output.value}", flush=True)

  app.run(main)


if __name__ == "__main__":
  cli()
