r"""What a pretrained backbone's frozen features know of a scene: linear probes for properties the generator knows.

  python -m sapiens_jax.probe --workdir=DIR [--step=N] [--num_train=2048] [--num_test=1024]

The probe images are synthetic-humans scenes (1-3 people on a ground plane: sapiens_jax.data.synthetic_humans)
rendered at the run's image size from a seed no run's data uses. Each is labelled with what the generator knows
of it (PROPERTIES): how many people it annotates (those with at least 20 visible pixels), how much of the image
the people cover and how bright the background is (each in tertiles, cut on the train split). The backbone is
the run's WEIGHTS (the teacher of a self-distillation run), frozen; a ridge-regression classifier on its
standardised features (the CLS token, and the mean of the patch tokens) is fitted on one split and scored on the
other. Chance is the test accuracy of answering the train split's most frequent class: what a probe that ignores
the image scores at best. Prints one JSON line.
"""
import json

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from sapiens_jax import checkpoint
from sapiens_jax import objectives
from sapiens_jax.data import synthetic_humans
from sapiens_jax.data import transforms

PROBE_SEED = 2_000_003  # no run draws its pretraining or task data from it (task eval splits: seed + 1_000_003)
PROPERTIES = ("people", "person_cover", "background_brightness")
NUM_CLASSES = {"people": 4, "person_cover": 3, "background_brightness": 3}  # people: 0-3 (0 is rare)
RIDGE = 1.0  # on standardised features; a few thousand examples of a few hundred dimensions need little


def scenes(num_images, image_size, seed=PROBE_SEED, first=0):
  """(images uint8 (N, H, W, 3), {property: float (N,)}): scenes `first`.. `first + N - 1` of `seed`; the
  properties as measured (people counted, cover and brightness as fractions), before any binning."""
  images, values = [], {name: [] for name in PROPERTIES}
  for i in range(first, first + num_images):
    sample = synthetic_humans.render_sample(seed, i, *image_size, sapiens2=False)
    mask, grey = sample["mask"], sample["image"].mean(axis=-1) / 255
    images.append(sample["image"])
    values["people"].append(len(sample["instance_ids"]))
    values["person_cover"].append(mask.mean())
    values["background_brightness"].append(grey[~mask].mean() if (~mask).any() else 0.0)
  return np.stack(images), {name: np.asarray(v, np.float64) for name, v in values.items()}


def labels(values, num_train):
  """Classes per property: people as counted; the others in tertiles cut on the first `num_train` values."""
  out = {"people": values["people"].astype(np.int32)}
  for name in ("person_cover", "background_brightness"):
    cuts = np.quantile(values[name][:num_train], [1 / 3, 2 / 3])
    out[name] = np.digitize(values[name], cuts).astype(np.int32)
  return out


def features(config, params, images, batch_size=64):
  """{"cls": (N, C), "patch_mean": (N, C)} float32: the final-norm CLS token and mean patch token of the
  backbone `params["encoder"]` (as the pretraining objective of `config` builds it) on uint8 images."""
  encoder = objectives.get(config).encoder(config)

  @jax.jit
  def forward(encoder_params, batch):
    tokens = encoder.apply({"params": encoder_params}, transforms.normalize(batch)).astype(jnp.float32)
    return tokens[:, 0], tokens[:, encoder.num_prefix_tokens:].mean(axis=1)

  outputs = {"cls": [], "patch_mean": []}
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    padded = np.pad(chunk, [(0, batch_size - len(chunk))] + [(0, 0)] * 3)  # one compiled shape
    cls, patch_mean = jax.device_get(forward(params["encoder"], padded))
    outputs["cls"].append(cls[:len(chunk)])
    outputs["patch_mean"].append(patch_mean[:len(chunk)])
  return {k: np.concatenate(v) for k, v in outputs.items()}


def ridge_classifier(train_x, train_y, num_classes, ridge=RIDGE):
  """x -> predicted class: least squares onto one-hot targets, features standardised on the train split."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  design = lambda v: np.concatenate([(v - mean) / std, np.ones((len(v), 1))], axis=1).astype(np.float64)
  x = design(train_x)
  targets = np.eye(num_classes)[train_y]
  penalty = ridge * np.eye(x.shape[1])
  penalty[-1, -1] = 0.0  # the bias is not shrunk
  weights = np.linalg.solve(x.T @ x + penalty, x.T @ targets)
  return lambda test_x: np.argmax(design(test_x) @ weights, axis=1)


def chance(train_y, test_y):
  """Accuracy of always answering the train split's most frequent class (no image looked at)."""
  return float(np.mean(test_y == np.bincount(train_y).argmax()))


def evaluate(config, params, num_train=2048, num_test=1024, seed=PROBE_SEED):
  """{"PROPERTY": {"chance", "cls", "patch_mean"}} test accuracies of the backbone `params["encoder"]`."""
  images, values = scenes(num_train + num_test, tuple(config.image_size), seed)
  classes = labels(values, num_train)
  feats = features(config, params, images)
  result = {}
  for name, y in classes.items():
    result[name] = {"chance": chance(y[:num_train], y[num_train:])}
    for kind, x in feats.items():
      predict = ridge_classifier(x[:num_train], y[:num_train], NUM_CLASSES[name])
      result[name][kind] = float(np.mean(predict(x[num_train:]) == y[num_train:]))
  return result


def cli():
  """Flags are defined here, not at import, so importing this module never clashes with main.py's."""
  workdir = flags.DEFINE_string("workdir", None, "A pretraining run's directory (its newest checkpoint unless --step).")
  step = flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest.")
  num_train = flags.DEFINE_integer("num_train", 2048, "Scenes the probe is fitted on.")
  num_test = flags.DEFINE_integer("num_test", 1024, "Scenes the probe is scored on.")
  flags.mark_flag_as_required("workdir")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every read at INFO
    params, config, done = checkpoint.restore_params(workdir.value, step.value)
    result = evaluate(config, params, num_train.value, num_test.value)
    print(json.dumps({"workdir": workdir.value, "step": int(done), "num_train": num_train.value,
                      "num_test": num_test.value, **result}), flush=True)

  app.run(main)


if __name__ == "__main__":
  cli()
