"""Surface normals (reference §7): mmseg's VitNormalHead to raw (x, y, z), cosine + L1 losses on
unit targets, mean / median angular error and % under 11.25 / 22.5 / 30 degrees, RGB pictures."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sapiens_jax import losses
from sapiens_jax import metrics
from sapiens_jax import visualize
from sapiens_jax.data import dense_source
from sapiens_jax.data import dense_transforms
from sapiens_jax.tasks import dense
from sapiens_jax.tasks import heads

TORCH_PREFIX = "decode_head."  # mmseg's
TARGET = "normal"  # unit normals on the person, -1000 elsewhere
LAYOUT = (dense_source.LabelFile("masks", ".png", "mask"),
          dense_source.LabelFile("normals", ".npy", "normal", channels=3))
METRICS = {"mean_angle": "min", "median_angle": "min", "pct_11.25": "max", "pct_22.5": "max", "pct_30": "max"}
UNIT_EPS = 1e-5  # the reference demo's L2 normalisation of predicted normals


def configure(config, dataset, size):
  del dataset, size
  config.best_metric = "mean_angle"


def head(channels=768, dtype=jnp.float32):
  """VitNormalHead: the seg head with 3 raw (x, y, z) outputs, not normalised (64x48 -> 512x384)."""
  return heads.mmseg_head(3, 3, 3, channels, dtype)


def make_head(config):
  return head(config.model.head_channels, jnp.dtype(config.model.dtype))


def target_spec(config, batch_size):
  return {"normal": jax.ShapeDtypeStruct((batch_size, *config.image_size, 3), jnp.float32)}


def loss(config, outputs, batch):
  del config
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
train_example = functools.partial(dense.train_example, dense_transforms.normal_train_sample)
eval_example = functools.partial(dense.eval_example, dense_transforms.normal_eval_sample)
convert_records = functools.partial(dense.convert_records, LAYOUT)


class Evaluator(dense.MaskedEvaluator):
  """Angular errors in degrees on the person: mean, median and % under 11.25 / 22.5 / 30."""

  def __init__(self, config, source):
    del config, source
    super().__init__(TARGET, dense_transforms.normal_foreground, metrics.NormalMetrics())

  def result(self):
    out = super().result()
    out["mean_angle"], out["median_angle"] = out.pop("mean"), out.pop("median")
    return out


def baseline(config, source, batches):
  """The split's mean foreground normal, everywhere."""
  del config, source
  total = 0.0
  for batch in batches():
    normals = batch[TARGET][batch["valid"]].reshape(-1, 3)
    total = total + normals[dense_transforms.normal_foreground(normals)].sum(0)
  mean = (total / np.linalg.norm(total)).astype(np.float32)  # same direction as the mean
  return lambda batch: np.broadcast_to(mean, batch[TARGET].shape)


def panel(config, example, prediction=None):
  """[image | target | prediction] as (n + 1) / 2 colours on the target's person."""
  del config
  draw = lambda values, mask: visualize.colorize_normals(unit(values), mask)
  return dense.masked_panel(example, prediction, TARGET, dense_transforms.normal_foreground, draw)


predict_inputs = dense.predict_inputs
predict_outputs = dense.raw_outputs  # resized to each photo on the host


def finish(config, image, outputs, context):
  del config, context
  return {"normals": unit(dense.resize_map(outputs[0], *image.shape[:2]))}


def write_prediction(config, stem, file_name, image, prediction, context):
  """STEM_normal.npy (float32 (H, W, 3) unit normals) and STEM_normal.png."""
  del config, file_name, context
  np.save(stem + "_normal.npy", prediction["normals"])
  everywhere = np.ones(image.shape[:2], bool)  # no person mask without a seg prediction
  visualize.save_png(stem + "_normal.png", visualize.colorize_normals(prediction["normals"], everywhere))
  return []
