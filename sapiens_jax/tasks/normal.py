"""Surface normals (reference §7): mmseg's VitNormalHead to raw (x, y, z), cosine + L1 losses on
unit targets, mean / median angular error and % under 11.25 / 22.5 / 30 degrees, RGB pictures.
The Sapiens2 recipe (`config.recipe`, sapiens2.md §3.2): its pixel-shuffle head, 10 cosine + L1 +
10 gradient losses, its evaluator's keys (normal_mae, ..., within 5 degrees too), and photos
resized with their aspect kept and padded."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sapiens_jax import losses
from sapiens_jax import metrics
from sapiens_jax import visualize
from sapiens_jax.data import dense_source
from sapiens_jax.data import dense_transforms
from sapiens_jax.data import sapiens2_augment
from sapiens_jax.tasks import dense
from sapiens_jax.tasks import heads
from sapiens_jax.tasks import heads2

TORCH_PREFIX = "decode_head."  # mmseg's
TARGET = "normal"  # unit normals on the person, -1000 elsewhere
LAYOUT = (dense_source.LabelFile("masks", ".png", "mask"),
          dense_source.LabelFile("normals", ".npy", "normal", channels=3))
METRICS = {"mean_angle": "min", "median_angle": "min", "pct_11.25": "max", "pct_22.5": "max", "pct_30": "max",
           # the Sapiens2 recipe's (metrics.Sapiens2NormalMetrics)
           "normal_mae": "min", "normal_median_deg": "min", "normal_rmse": "min",
           **{f"within_{t:g}_deg": "max" for t in metrics.SAPIENS2_NORMAL_THRESHOLDS}}
UNIT_EPS = 1e-5  # the reference demo's L2 normalisation of predicted normals


def configure(config, dataset, size):
  del dataset, size
  config.best_metric = "normal_mae" if config.recipe == "sapiens2" else "mean_angle"


def head(channels=768, dtype=jnp.float32):
  """VitNormalHead: the seg head with 3 raw (x, y, z) outputs, not normalised (64x48 -> 512x384)."""
  return heads.mmseg_head(3, 3, 3, channels, dtype)


def make_head(config):
  if config.recipe == "sapiens2":
    return heads2.normal_head(config.model.size, jnp.dtype(config.model.dtype))
  return head(config.model.head_channels, jnp.dtype(config.model.dtype))


def target_spec(config, batch_size):
  return {"normal": jax.ShapeDtypeStruct((batch_size, *config.image_size, 3), jnp.float32)}


def loss(config, outputs, batch):
  if config.recipe == "sapiens2":
    return sum(losses.sapiens2_normal_loss(outputs, batch["normal"]).values())
  return losses.normal_loss(outputs, batch["normal"])


def eval_outputs(forward, images, config):
  """(B, H, W, 3) raw normals at the label resolution (the metrics normalise them)."""
  return losses.resize_to(forward(images), tuple(config.image_size))


def unit(normals):
  """Normals scaled to unit length, as the reference's demo does before drawing or saving them."""
  length = np.linalg.norm(normals, axis=-1, keepdims=True)
  return normals / np.maximum(length, UNIT_EPS)


# Data: a dense folder of LAYOUT (or its shards), through the reference recipes (§7).
make_source = functools.partial(dense.make_source, LAYOUT)


def train_example(config, source):
  """The reference recipe (§7), or Sapiens2's (sapiens2.md §3.2) under its recipe."""
  sapiens2 = config.recipe == "sapiens2"
  recipe = sapiens2_augment.normal_train_sample if sapiens2 else dense_transforms.normal_train_sample
  return dense.train_example(recipe, config, source)


eval_example = functools.partial(dense.eval_example, dense_transforms.normal_eval_sample)
convert_records = functools.partial(dense.convert_records, LAYOUT)


class Evaluator(dense.MaskedEvaluator):
  """Angular errors in degrees on the person: mean, median and % under 11.25 / 22.5 / 30."""

  def __init__(self, config, source):
    del source
    self.sapiens2 = config.recipe == "sapiens2"
    accumulator = metrics.Sapiens2NormalMetrics() if self.sapiens2 else metrics.NormalMetrics()
    super().__init__(TARGET, dense_transforms.normal_foreground, accumulator)

  def result(self):
    out = super().result()
    if not self.sapiens2:
      out["mean_angle"], out["median_angle"] = out.pop("mean"), out.pop("median")
    return out


def baselines(config, train_batches):
  """{name: batch -> normals} of the image-independent predictions fitted on the training split's
  un-augmented examples (`train_batches()`): the mean foreground normal everywhere, and each pixel's
  mean foreground normal, renormalised (pixels never on a person in training take the overall mean)."""
  del config
  per_pixel = 0.0
  for batch in train_batches():
    normals = batch[TARGET][batch["valid"]].astype(np.float64)
    foreground = dense_transforms.normal_foreground(normals)[..., None]
    per_pixel = per_pixel + np.where(foreground, normals, 0.0).sum(0)
  total = per_pixel.reshape(-1, 3).sum(0)
  mean = (total / np.linalg.norm(total)).astype(np.float32)
  length = np.linalg.norm(per_pixel, axis=-1, keepdims=True)
  pixel_map = np.where(length > 0, per_pixel / np.maximum(length, 1e-12), mean).astype(np.float32)
  return {"mean_normal": lambda b: np.broadcast_to(mean, b[TARGET].shape),
          "per_pixel_mean_normal": lambda b: np.broadcast_to(pixel_map, b[TARGET].shape)}


def panel(config, example, prediction=None):
  """[image | target | prediction] as (n + 1) / 2 colours on the target's person."""
  del config
  draw = lambda values, mask: visualize.colorize_normals(unit(values), mask)
  return dense.masked_panel(example, prediction, TARGET, dense_transforms.normal_foreground, draw)


def predict_inputs(config, image, boxes):
  if config.recipe == "sapiens2":
    return dense.padded_inputs(config, image, boxes)
  return dense.predict_inputs(config, image, boxes)


predict_outputs = dense.raw_outputs  # resized to each photo on the host


def finish(config, image, outputs, context):
  if config.recipe == "sapiens2":
    return {"normals": unit(dense.unpad_map(config, outputs[0], context, image))}
  return {"normals": unit(dense.resize_map(outputs[0], *image.shape[:2]))}


def write_prediction(config, stem, file_name, image, prediction, context):
  """STEM_normal.npy (float32 (H, W, 3) unit normals) and STEM_normal.png."""
  del config, file_name, context
  np.save(stem + "_normal.npy", prediction["normals"])
  everywhere = np.ones(image.shape[:2], bool)  # no person mask without a seg prediction
  visualize.save_png(stem + "_normal.png", visualize.colorize_normals(prediction["normals"], everywhere))
  return []
