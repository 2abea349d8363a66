"""A task written outside the package, as a user would write one: the person's silhouette (its mask)
regressed with a tiny head and an L2 loss. tests/tasks/test_extending.py registers it and runs it
through every generic path; nothing in sapiens_jax knows about it."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sapiens_jax import losses
from sapiens_jax import visualize
from sapiens_jax.data import dense_source
from sapiens_jax.data import dense_transforms
from sapiens_jax.tasks import dense
from sapiens_jax.tasks import heads

TORCH_PREFIX = "decode_head."
TARGET = "silhouette"
LAYOUT = (dense_source.LabelFile("masks", ".png", "mask"),)
METRICS = {"mse": "min"}


def configure(config, dataset, size):
  del dataset, size
  config.model.head_channels = 8
  config.best_metric = "mse"


def make_head(config):
  """One 4x4 stride-2 deconv stage and the final 1x1 conv: 1/8 of the input size."""
  return heads.DenseHead((config.model.head_channels,), (), 1, "conv_seg", dtype=jnp.dtype(config.model.dtype))


def target_spec(config, batch_size):
  return {TARGET: jax.ShapeDtypeStruct((batch_size, *config.image_size), jnp.float32)}


def loss(config, outputs, batch):
  del config
  return jnp.mean(jnp.square(losses.resize_to(outputs, batch[TARGET].shape[1:])[..., 0] - batch[TARGET]))


def eval_outputs(forward, images, config):
  return losses.resize_to(forward(images), tuple(config.image_size))[..., 0]


def predict_outputs(forward, images, config):
  del config
  return forward(images)


def make_source(config, root, split):
  return dense.make_source(LAYOUT, config, root, split)


def _sample(source, size, index, rng):
  image, targets = source.load(source[index])
  image, targets = dense_transforms.resize_to(image, targets, size)
  image, targets = dense_transforms.random_flip(image, targets, rng)
  return {"image": image, TARGET: (targets["mask"] > 0).astype(np.float32)}


def train_example(config, source):
  return functools.partial(_sample, source, tuple(config.image_size))


def eval_example(config, source, index):
  return _sample(source, tuple(config.image_size), index, np.random.default_rng(0))


def convert_records(input_dir, annotations, output):
  return dense.convert_records(LAYOUT, input_dir, annotations, output)


class Evaluator:
  def __init__(self, config, source):
    del config, source
    self.total, self.count = 0.0, 0

  def add(self, predictions, batch):
    for i in np.flatnonzero(batch["valid"]):
      self.total += float(np.sum(np.square(predictions[i] - batch[TARGET][i])))
      self.count += predictions[i].size

  def result(self):
    return {"mse": self.total / self.count}


def baselines(config, train_batches):
  del config, train_batches
  return {"empty": lambda batch: np.zeros(batch[TARGET].shape, np.float32)}


def panel(config, example, prediction=None):
  del config
  image = example["image"]
  everywhere = np.ones(image.shape[:2], bool)
  tiles = [image]
  if TARGET in example:
    tiles.append(visualize.colorize_depth(example[TARGET], everywhere))
  if prediction is not None:
    tiles.append(visualize.colorize_depth(dense.resize_map(prediction, *image.shape[:2])[..., 0], everywhere))
  return visualize.row(tiles)


predict_inputs = dense.predict_inputs


def finish(config, image, outputs, context):
  del config, context
  return {TARGET: dense.resize_map(outputs[0], *image.shape[:2])[..., 0]}


def write_prediction(config, stem, file_name, image, prediction, context):
  del config, file_name, image, context
  np.save(stem + "_silhouette.npy", prediction[TARGET])
  return []
