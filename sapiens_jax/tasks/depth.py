"""Relative depth (reference §6): mmseg's VitDepthHead to one unbounded channel at full resolution,
the scale-invariant log loss on person-normalised targets, RMSE / AbsRel / delta1 after per-image
least-squares scale-and-shift alignment (scale >= 0), inferno pictures."""
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
TARGET = "depth"  # min-max normalised over the person, background -1
LAYOUT = (dense_source.LabelFile("masks", ".png", "mask"),
          dense_source.LabelFile("depths", ".npy", "depth", positive=True))
METRICS = {"rmse": "min", "abs_rel": "min", "delta1": "max",
           "rmse_raw": "min", "abs_rel_raw": "min", "delta1_raw": "max"}


def configure(config, dataset, size):
  del dataset, size
  config.model.head_channels = 384
  config.best_metric = "rmse"


def head(channels=384, dtype=jnp.float32):
  """VitDepthHead: x16 upsampling to one unbounded relative-depth channel (64x48 -> 1024x768)."""
  return heads.mmseg_head(4, 2, 1, channels, dtype)


def make_head(config):
  return head(config.model.head_channels, jnp.dtype(config.model.dtype))


def target_spec(config, batch_size):
  return {"depth": jax.ShapeDtypeStruct((batch_size, *config.image_size), jnp.float32)}


def loss(config, outputs, batch):
  del config
  return losses.silog_loss(outputs, batch["depth"])


def eval_outputs(forward, images, config):
  """(B, H, W) depth at the label resolution."""
  return losses.resize_to(forward(images), tuple(config.image_size))[..., 0]


# Data: a dense folder of LAYOUT (or its shards), through the reference recipes (§6).
make_source = functools.partial(dense.make_source, LAYOUT)
train_example = functools.partial(dense.train_example, dense_transforms.depth_train_sample)
eval_example = functools.partial(dense.eval_example, dense_transforms.depth_eval_sample)
convert_records = functools.partial(dense.convert_records, LAYOUT)


class Evaluator(dense.MaskedEvaluator):
  """RMSE / AbsRel / delta1 per image on the person, after scale-and-shift alignment, averaged."""

  def __init__(self, config, source):
    del config, source
    super().__init__(TARGET, dense_transforms.depth_foreground, metrics.DepthMetrics())


RAMP_ANGLES = 72  # directions tried for the best fixed ramp, every 5 degrees over a full turn
RAMPS = {"down": 0.0, "right": 90.0, "up": 180.0, "left": 270.0}


def ramp(shape, degrees):
  """(H, W) cos(a) * row + sin(a) * column: 0 degrees rises down the image (row index), 90 to the
  right (column index), 180 up, 270 to the left. The metric's scale is >= 0, so a ramp and its
  reverse are different predictions."""
  rows, columns = np.mgrid[:shape[0], :shape[1]].astype(np.float32)
  angle = np.radians(degrees)
  return (np.cos(angle) * rows + np.sin(angle) * columns).astype(np.float32)


def baselines(config, train_batches):
  """{name: batch -> depth} of the image-independent predictions fitted on the training split's
  un-augmented examples (`train_batches()`), for the evaluator's per-image scale-and-shift
  alignment: a constant; the mean aligned depth map (each training target standardised over its
  person, averaged per pixel over the images where the pixel is on the person; 0 elsewhere); the
  ramps rising down, up, right and left; and the fixed ramp direction that scores best on the
  training split."""
  del config
  total = count = 0.0
  directions = np.arange(RAMP_ANGLES) * 360.0 / RAMP_ANGLES
  scores, shape = None, None
  for batch in train_batches():
    targets = batch[TARGET][batch["valid"]]
    if shape is None:
      shape = targets.shape[1:]
      ramps = [ramp(shape, a) for a in directions]
      scores = [metrics.DepthMetrics() for _ in directions]
    for target in targets:
      foreground = dense_transforms.depth_foreground(target)
      values = target[foreground].astype(np.float64)
      if values.size < 2 or values.std() == 0:
        continue
      standard = np.zeros(shape)
      standard[foreground] = (values - values.mean()) / values.std()
      total, count = total + standard, count + foreground
      for score, r in zip(scores, ramps):
        score.add(r, target, foreground)
  mean_map = np.where(count > 0, total / np.maximum(count, 1), 0.0).astype(np.float32)
  best = directions[int(np.argmin([s.result()["rmse"] for s in scores]))]
  fixed = lambda values: lambda b: np.broadcast_to(values, b[TARGET].shape)
  return {"constant": fixed(np.zeros(shape, np.float32)), "mean_aligned_map": fixed(mean_map),
          **{f"ramp_{name}": fixed(ramp(shape, degrees)) for name, degrees in RAMPS.items()},
          f"best_ramp_{best:g}deg": fixed(ramp(shape, best))}


def panel(config, example, prediction=None):
  """[image | target | prediction], each min-max normalised over the target's person (inferno)."""
  del config
  return dense.masked_panel(example, prediction, TARGET, dense_transforms.depth_foreground,
                            visualize.colorize_depth)


predict_inputs = dense.predict_inputs
predict_outputs = dense.raw_outputs  # resized to each photo on the host


def finish(config, image, outputs, context):
  del config, context
  return {"depth": dense.resize_map(outputs[0], *image.shape[:2])[..., 0]}


def write_prediction(config, stem, file_name, image, prediction, context):
  """STEM_depth.npy (float32 (H, W) relative depth) and STEM_depth.png (inferno colours)."""
  del config, file_name, context
  np.save(stem + "_depth.npy", prediction["depth"])
  everywhere = np.ones(image.shape[:2], bool)  # no person mask without a seg prediction
  visualize.save_png(stem + "_depth.png", visualize.colorize_depth(prediction["depth"], everywhere))
  return []
