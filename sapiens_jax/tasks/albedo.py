"""Albedo (Sapiens2, reference sapiens2.md §3.4): the PixelShuffle head with RMSNorm to raw RGB, L1 +
forward-difference + chromaticity losses on the person, mae / rmse / psnr / ssim / grad_l1 on the person
at the label's size, RGB pictures.

Samples whose albedo is flat on the person (`sapiens2_transforms.albedo_sample_ok`) are dropped upstream.
Here they raise a DataError naming the file: training passes over them with data.on_error="skip" (counted in
data_skipped, as unreadable files are), and evaluation, which never skips, stops on them.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sapiens_jax import losses
from sapiens_jax import metrics
from sapiens_jax import visualize
from sapiens_jax.data import dense_source
from sapiens_jax.data import dense_transforms
from sapiens_jax.data import photometric
from sapiens_jax.data import sapiens2_transforms
from sapiens_jax.tasks import dense
from sapiens_jax.tasks import heads2

TORCH_PREFIX = heads2.TORCH_PREFIX
TARGET = "albedo"  # RGB in [0, 1] on the person, 0 elsewhere; "mask" (bool) says where the person is
LAYOUT = (dense_source.LabelFile("masks", ".png", "mask"),
          dense_source.LabelFile("albedos", ".png", "albedo", channels=3))
METRICS = {"mae": "min", "rmse": "min", "psnr": "max", "ssim": "max", "grad_l1": "min"}
BACKGROUND_PROB = 0.5  # v1's masked recipes' chance of a random background behind the person


def configure(config, dataset, size):
  del dataset, size
  config.best_metric = "mae"


def make_head(config):
  return heads2.head("albedo", config.model.size, jnp.dtype(config.model.dtype))


def target_spec(config, batch_size):
  return {TARGET: jax.ShapeDtypeStruct((batch_size, *config.image_size, 3), jnp.float32),
          "mask": jax.ShapeDtypeStruct((batch_size, *config.image_size), jnp.bool_)}


def loss(config, outputs, batch):
  del config
  return sum(losses.sapiens2_albedo_loss(outputs, batch[TARGET], batch["mask"]).values())


def eval_outputs(forward, images, config):
  """(B, H, W, 3) raw albedo on the network's canvas (the Evaluator un-pads it)."""
  return losses.resize_to(forward(images), tuple(config.image_size))


# ---------------------------------------------------------------- data

make_source = functools.partial(dense.make_source, LAYOUT)
convert_records = functools.partial(dense.convert_records, LAYOUT)


def _load(source, index):
  """(image, {"mask", "albedo"}) of sample `index`; a flat albedo is a DataError naming its file."""
  element = source[index]
  image, targets = source.load(element)
  if not sapiens2_transforms.albedo_sample_ok(targets[TARGET], targets["mask"]):
    name = element.get("albedo_path") or f"sample {element['name']!r} of {source.root}"
    raise dense_source.DataError(
        f"{name}: the albedo is flat on the person (every channel's std under"
        f" {sapiens2_transforms.ALBEDO_MIN_STD}); Sapiens2 drops such samples: data.on_error='skip' skips them"
        " in training")
  return image, targets


def _sample(image, targets):
  """The batch row: the albedo zeroed off the person, the mask as bool."""
  mask = np.asarray(targets["mask"]) > 0
  return {"image": image, TARGET: np.where(mask[..., None], targets[TARGET], 0).astype(np.float32), "mask": mask}


def train_sample(image, targets, rng, *, size, background_images=None,
                 ratio_range=dense_transforms.REFERENCE_RATIO_RANGE):
  """v1's masked recipe with the albedo resampled bilinearly (the mask nearest): a random background behind
  the person, random resize within `ratio_range`, crop, stretch to `size`, flip, photometric distortion of the
  image. No rotation (the reference's albedo augmentations are not known)."""
  targets = {"mask": (np.asarray(targets["mask"]) > 0).astype(np.uint8), TARGET: targets[TARGET]}
  image = dense_transforms.composite_background(image, targets["mask"], background_images, rng, BACKGROUND_PROB)
  ratio = rng.uniform(*ratio_range)
  scaled = dense_transforms.fit_size(*image.shape[:2], (int(size[0] * ratio), int(size[1] * ratio)))
  image, targets = sapiens2_transforms.resize(image, targets, scaled)
  image, targets = dense_transforms.random_crop(image, targets, rng, size)
  image, targets = sapiens2_transforms.resize(image, targets, size)
  image, targets = dense_transforms.random_flip(image, targets, rng, 0.5)
  return _sample(photometric.photometric_distortion(image, rng), targets)


def _train_example(source, settings, index, rng):
  image, targets = _load(source, index)
  return train_sample(image, targets, rng, **settings)


def train_example(config, source):
  """`(index, rng) -> training sample`; picklable, for Grain's worker processes."""
  return functools.partial(_train_example, source, dense.recipe_settings(config))


def eval_example(config, source, index):
  """The test pipeline: image and targets resized with the aspect kept and zero padded to
  config.image_size (upstream's ResizePadImage), with the sample's index and its `Padding`, by which the
  Evaluator compares at the label's own size."""
  image, targets = _load(source, index)
  image, targets, padding = sapiens2_transforms.resize_pad(image, targets, tuple(int(s) for s in config.image_size))
  return {**_sample(image, targets), "index": np.int32(index), "padding": np.array(padding, np.float64)}


def _padding(row):
  """A `Padding` back from its eval-batch row (four widths, two scales)."""
  return sapiens2_transforms.Padding(*(int(v) for v in row[:4]), *(float(v) for v in row[4:]))


# ---------------------------------------------------------------- evaluation

class Evaluator:
  """metrics.AlbedoMetrics on each eval image's person at its label's size, as upstream: the prediction on
  the canvas is cut out of the pad and resized back to the label (bilinear), which is read again from
  `source` (eval batches hold the canvas, so that images of any size stack)."""

  def __init__(self, config, source):
    del config
    self.source = source
    self.accumulator = metrics.AlbedoMetrics(data_range=1.0)

  def add(self, predictions, batch):
    for i in np.flatnonzero(batch["valid"]):
      _, targets = self.source.load(self.source[int(batch["index"][i])])
      mask = targets["mask"] > 0
      prediction = sapiens2_transforms.unpad(predictions[i], _padding(batch["padding"][i]), mask.shape)
      self.accumulator.add(prediction, targets[TARGET], mask)

  def result(self):
    return self.accumulator.result()


def baselines(config, train_batches):
  """{name: batch -> albedo} of the image-independent predictions fitted on the training split's
  un-augmented examples (`train_batches()`): the mean person colour everywhere, and each pixel's mean
  person colour (pixels never on a person in training take the overall mean)."""
  del config
  sums, counts = 0.0, 0
  for batch in train_batches():
    mask = batch["mask"][batch["valid"]]
    sums = sums + np.where(mask[..., None], batch[TARGET][batch["valid"]], 0.0).astype(np.float64).sum(0)
    counts = counts + mask.sum(0)
  mean = (sums.reshape(-1, 3).sum(0) / np.sum(counts)).astype(np.float32)
  pixel_map = np.where(counts[..., None] > 0, sums / np.maximum(counts, 1)[..., None], mean).astype(np.float32)
  return {"mean_albedo": lambda b: np.broadcast_to(mean, b[TARGET].shape),
          "per_pixel_mean_albedo": lambda b: np.broadcast_to(pixel_map, b[TARGET].shape)}


# ---------------------------------------------------------------- pictures and prediction

def picture(albedo, mask=None):
  """uint8 RGB of an albedo clipped to [0, 1] (black off `mask`)."""
  rgb = np.round(np.clip(albedo, 0.0, 1.0) * 255).astype(np.uint8)
  return rgb if mask is None else np.where(np.asarray(mask)[..., None], rgb, 0).astype(np.uint8)


def panel(config, example, prediction=None):
  """[image | target | prediction] as RGB pictures on the target's person (everywhere without one)."""
  del config
  image = example["image"]
  mask = example["mask"] if "mask" in example else np.ones(image.shape[:2], bool)
  tiles = [image]
  if TARGET in example:
    tiles.append(picture(example[TARGET], mask))
  if prediction is not None:
    tiles.append(picture(dense.resize_map(prediction, *image.shape[:2]), mask))
  return visualize.row(tiles)


predict_inputs = dense.padded_inputs  # the photo resized with its aspect kept, zero padded; context: the Padding
predict_outputs = dense.raw_outputs  # un-padded to each photo on the host


def finish(config, image, outputs, context):
  """{"albedo": float32 (H, W, 3) in [0, 1]} at the photo's size: the pad cut off, resized back, clipped."""
  return {TARGET: np.clip(dense.unpad_map(config, outputs[0], context, image), 0.0, 1.0).astype(np.float32)}


def write_prediction(config, stem, file_name, image, prediction, context):
  """STEM_albedo.npy (float32 (H, W, 3) in [0, 1]) and STEM_albedo.png (8-bit RGB)."""
  del config, file_name, image, context
  np.save(stem + "_albedo.npy", prediction[TARGET])
  visualize.save_png(stem + "_albedo.png", picture(prediction[TARGET]))
  return []
