r"""Export a checkpoint's weights as a PyTorch state dict with the original Sapiens key names.

  python -m sapiens_jax.export --workdir=DIR [--step=N] --output=FILE.safetensors|FILE.pth \
      [--dtype=float32|bfloat16] [--include_decoder]

Runs on a laptop CPU whatever the run was trained on: the parameter shapes come from the config
saved in the checkpoint, and only the parameters are read (not the optimizer state), onto one CPU
device. The run's objective names the parts: a pretraining run gives the bare backbone keys, like
the released `*_clean.pth` files (with --include_decoder the MAE decoder is added under `neck.*`);
a fine-tuning run gives `backbone.*` plus its task's head (`head.*` for mmpose's, `decode_head.*`
for mmseg's), like the task checkpoints. Needs `pip install -e .[torch]`.
"""
import os

from absl import app
from absl import flags
from absl import logging

from sapiens_jax import checkpoint
from sapiens_jax import objectives
from sapiens_jax import torch_names

EXTENSIONS = (".safetensors", ".pth")
DTYPES = ("float32", "bfloat16")


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
  params, config, step = checkpoint.restore_params(workdir, step)
  parts = objectives.get(config).torch_parts(config, include_decoder=include_decoder)
  state_dict = torch_names.to_torch(params, parts)
  count = len(state_dict)
  save(state_dict, output, dtype)
  return step, count


def cli():
  """Flags are defined here, not at import, so importing this module never clashes with main.py's."""
  workdir = flags.DEFINE_string("workdir", None, "Run directory whose checkpoints/ to read.")
  step = flags.DEFINE_integer("step", None, "Checkpoint step to export; default: the newest.")
  output = flags.DEFINE_string("output", None, "Output file, .safetensors or .pth.")
  dtype = flags.DEFINE_enum("dtype", "float32", DTYPES, "Dtype of the written tensors.")
  include_decoder = flags.DEFINE_bool("include_decoder", False, "Pretraining: also write the decoder (neck.*).")
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
