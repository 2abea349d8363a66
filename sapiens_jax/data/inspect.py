r"""Look at what the model will be fed: a grid PNG of samples with their labels drawn.

`python -m sapiens_jax.data.inspect --config=configs/X.py --num=16 --output=grid.png
[--workdir=DIR] [--split=train|eval]`

Train samples go through the training augmentation exactly as the pipeline draws them, sample i
with the generator np.random.default_rng([config.seed, i]); eval samples are the un-augmented
eval inputs. Each run's objective draws its own samples: a fine-tuning run its task's panel
(image | target), a pretraining run its augmented crops. A synthetic dataset is rendered into the
workdir first if the config asks for one that is not there yet.
"""
from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from sapiens_jax import objectives
from sapiens_jax import visualize

SPLITS = ("train", "eval")
PANELS_PER_ROW = 4


def sample_panels(config, num, split="train", workdir=""):
  """The first `num` samples of `split` (cycling through the records), each drawn as a uint8 panel."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  if num < 1:
    raise ValueError(f"num must be at least 1, got {num}")
  draw, num_records = objectives.get(config).inspect_samples(config, split, workdir)
  return [draw(i % num_records, np.random.default_rng([config.seed, i])) for i in range(num)]


def render(config, num, output, split="train", workdir=""):
  """Draws `num` samples of `split` and writes them as one grid PNG to `output`."""
  picture = visualize.stack_rows(sample_panels(config, num, split, workdir), PANELS_PER_ROW)
  visualize.save_png(output, picture)
  return picture


def cli():
  """Flags are defined here, not at import, so importing this module never clashes with main.py's."""
  config = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
  num = flags.DEFINE_integer("num", 16, "Number of samples to draw.")
  output = flags.DEFINE_string("output", None, "PNG file to write.")
  workdir = flags.DEFINE_string("workdir", "", "Run folder (where a synthetic dataset is rendered).")
  split = flags.DEFINE_enum("split", "train", SPLITS, "train: augmented samples; eval: eval inputs.")
  flags.mark_flags_as_required(["config", "output"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    picture = render(config.value, num.value, output.value, split.value, workdir.value)
    print(f"Wrote {num.value} {split.value} samples ({picture.shape[1]}x{picture.shape[0]}) to"
          f" {output.value}", flush=True)

  app.run(main)


if __name__ == "__main__":
  cli()
