r"""Look at what the model will be fed: a grid PNG of samples with their labels drawn.

`python -m sapiens_jax.data.inspect --config=configs/X.py --num=16 --output=grid.png
[--workdir=DIR] [--split=train|eval]`

Train samples go through the training augmentation exactly as the pipeline draws them, sample i
with the generator np.random.default_rng([config.seed, i]); eval samples are the un-augmented
eval inputs. Pose shows the skeleton decoded from the target heatmaps, seg the part colours, depth
and normal their colour maps, MAE the augmented crops. A synthetic dataset is rendered into the
workdir first if the config asks for one that is not there yet.
"""
import functools

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from sapiens_jax import visualize
from sapiens_jax.data import heatmaps as heatmap_codec
from sapiens_jax.data import pipeline
from sapiens_jax.data import pose_transforms
from sapiens_jax.data import sources

SPLITS = ("train", "eval")
PANELS_PER_ROW = 4
_TARGET_KEY = {"pose": "heatmaps", "seg": "label", "depth": "depth", "normal": "normal"}


def _pose_eval_example(config, source, index):
  """The eval crop with target heatmaps encoded from the annotation (the eval pipeline has none,
  its metric reads the annotation file)."""
  image_size = tuple(int(s) for s in config.image_size)
  input_size = image_size[::-1]
  example = pipeline.load_task_eval_example("pose", source, image_size, index)
  element = source[index]
  matrix = pose_transforms.udp_affine_matrix(example["center"], example["scale"], 0.0, input_size)
  keypoints_in = pose_transforms.transform_points(element["keypoints"], matrix)
  heatmap_size = pipeline._heatmap_size(image_size)  # pylint: disable=protected-access
  example["heatmaps"], _ = heatmap_codec.encode(
      keypoints_in, element["visible"], input_size, heatmap_size, config.heatmap_sigma)
  return example


def _task_loader(config, split, workdir):
  """(record index, rng) -> example dict for a pose/seg/depth/normal config; number of records."""
  if config.data.source == "synthetic":
    if not (config.data.path or workdir):
      raise ValueError("a synthetic dataset without data.path is rendered into --workdir: set one")
    pipeline.ensure_synthetic_data(config, workdir)
  source = pipeline.make_task_source(config, split, workdir)
  image_size = tuple(int(s) for s in config.image_size)
  if split == "eval":
    if config.task == "pose":
      example = functools.partial(_pose_eval_example, config, source)
    else:
      example = functools.partial(pipeline.load_task_eval_example, config.task, source, image_size)
    return (lambda index, rng: example(index)), len(source)  # eval inputs are not random
  return pipeline.task_train_example(config, source), len(source)


def _mae_loader(config):
  image_size = tuple(int(s) for s in config.image_size)
  source = sources.make_source(config.data, image_size, config.seed)
  return functools.partial(pipeline.load_pretrain_example, source, image_size, config.data.resize,
                           config.data.on_error == "skip"), len(source)


def sample_panels(config, num, split="train", workdir=""):
  """The first `num` samples of `split` (cycling through the records), each drawn as a uint8
  panel: [image | target] for the tasks, the augmented crop for MAE."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  if num < 1:
    raise ValueError(f"num must be at least 1, got {num}")
  if config.task == "mae":
    if split != "train":
      raise ValueError("MAE pretraining has no eval split to inspect; use split='train'")
    load, num_records = _mae_loader(config)
  elif config.task in _TARGET_KEY:
    load, num_records = _task_loader(config, split, workdir)
  else:
    raise ValueError(f"unknown config.task {config.task!r}; expected mae or one of {tuple(_TARGET_KEY)}")
  panels = []
  for i in range(num):
    example = load(i % num_records, np.random.default_rng([config.seed, i]))
    image = example["image"]  # uint8, as the pipeline ships it
    if config.task == "mae":
      panels.append(image)
    else:
      panels.append(visualize.task_panel(config.task, image, target=example[_TARGET_KEY[config.task]],
                                         labels=config.data.labels))
  return panels


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
