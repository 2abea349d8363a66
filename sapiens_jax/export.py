r"""Export a checkpoint's weights as a PyTorch state dict with the original Sapiens key names.

  python -m sapiens_jax.export --workdir=DIR [--step=N] --output=FILE.safetensors|FILE.pth \
      [--dtype=float32|bfloat16] [--include_decoder]
  python -m sapiens_jax.export --workdir=DIR --format=transformers --output=DIR   (Sapiens2)

Runs on a laptop CPU whatever the run was trained on: the parameter shapes come from the config
saved in the checkpoint, and only the parameters are read (not the optimizer state), onto one CPU
device. The run's objective names the parts: a pretraining run gives the bare backbone keys, like
the released `*_clean.pth` files (with --include_decoder the MAE decoder is added under `neck.*`);
a fine-tuning run gives `backbone.*` plus its task's head (`head.*` for mmpose's, `decode_head.*`
for mmseg's), like the task checkpoints. A Sapiens2 backbone also gets its `rope_embed.periods`
buffer, so upstream's module loads the file with strict=True.

--format=transformers writes the backbone as a directory `config.json` + `model.safetensors` that
`transformers.Sapiens2Model.from_pretrained(DIR)` loads (upstream key names, which the port
converts on load, as its own save_pretrained writes them). The port rotates RoPE in the model's
dtype (float32), upstream in bfloat16: its features equal ours with config.model.rope_dtype
"float32". Needs `pip install -e .[torch]`.
"""
import json
import os

from absl import app
from absl import flags
from absl import logging
import numpy as np

from sapiens_jax import checkpoint
from sapiens_jax import models
from sapiens_jax import objectives
from sapiens_jax import torch_names

EXTENSIONS = (".safetensors", ".pth")
DTYPES = ("float32", "bfloat16")
FORMATS = ("pytorch", "transformers")


def check_output(output, dtype, output_format="pytorch"):
  if output_format not in FORMATS:
    raise ValueError(f"--format={output_format!r}; expected one of {FORMATS}")
  if output_format == "transformers":
    if output.endswith(EXTENSIONS):
      raise ValueError(f"--format=transformers writes a directory; --output={output!r} names a file")
  elif not output.endswith(EXTENSIONS):
    raise ValueError(f"--output={output!r} has an unknown extension; expected one of {EXTENSIONS}")
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r} is not supported; expected one of {DTYPES}")


def save(state_dict, output, dtype):
  """Write {key: numpy array} as `dtype` tensors: safetensors, or torch.save of a plain dict.

  Empties `state_dict` as it goes, so a 2B model is not held three times over in host memory.
  """
  import torch  # pylint: disable=g-import-not-at-top
  tensors = {}
  for k in list(state_dict):
    value = state_dict.pop(k)
    # Buffers keep their own dtype (Sapiens2's RoPE periods are bfloat16 upstream).
    keep = value.dtype.name == "bfloat16"
    tensors[k] = torch.tensor(np.asarray(value, np.float32)).to(torch.bfloat16 if keep else getattr(torch, dtype))
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  if output.endswith(".safetensors"):
    from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
    save_file(tensors, output, metadata={"format": "pt"})
  else:
    torch.save(tensors, output)


def export(workdir, output, step=None, dtype="float32", include_decoder=False, output_format="pytorch"):
  """Checkpoint -> PyTorch file (or transformers directory); returns (step exported, number of tensors)."""
  check_output(output, dtype, output_format)
  params, config, step = checkpoint.restore_params(workdir, step)
  family = models.family(config.model)
  parts = objectives.get(config).torch_parts(config, include_decoder=include_decoder)
  if output_format == "transformers":
    hf_config = family.transformers_config(config.model, config.image_size)
    parts = [part._replace(prefix="") for part in parts if part.group == "encoder"]
  state_dict = torch_names.to_torch(params, parts)
  if output_format == "transformers":
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "config.json"), "w") as f:
      json.dump({**hf_config, "dtype": dtype}, f, indent=2)
    output = os.path.join(output, "model.safetensors")
  else:
    for part in parts:
      if part.group == "encoder":
        state_dict.update(family.torch_buffers(config.model, part.prefix))
  count = len(state_dict)
  save(state_dict, output, dtype)
  return step, count


def cli():
  """Flags are defined here, not at import, so importing this module never clashes with main.py's."""
  workdir = flags.DEFINE_string("workdir", None, "Run directory whose checkpoints/ to read.")
  step = flags.DEFINE_integer("step", None, "Checkpoint step to export; default: the newest.")
  output = flags.DEFINE_string("output", None, "Output file, .safetensors or .pth (a directory with "
                               "--format=transformers).")
  output_format = flags.DEFINE_enum("format", "pytorch", FORMATS, "pytorch: upstream's state dict; transformers: "
                                    "a Sapiens2Model directory.")
  dtype = flags.DEFINE_enum("dtype", "float32", DTYPES, "Dtype of the written tensors.")
  include_decoder = flags.DEFINE_bool("include_decoder", False, "Pretraining: also write the decoder (neck.*).")
  flags.mark_flags_as_required(["workdir", "output"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every read at INFO
    done, count = export(workdir.value, output.value, step.value, dtype.value, include_decoder.value,
                         output_format.value)
    print(f"Wrote {count} {dtype.value} tensors of step {done} to {output.value}", flush=True)

  app.run(main)


if __name__ == "__main__":
  cli()
