"""Human matting (Sapiens2, sapiens2.md §3.6 and the transformers port's Sapiens2ForImageMatting): the
PixelShuffle head ending in a sigmoid, foreground RGB in channels 0-2 and alpha in channel 3, all in [0, 1].

Data: a dense folder of LAYOUT: alphas/NAME.png (8-bit grey), foregrounds/NAME.png (8-bit RGB, the person's
straight, not premultiplied, colour) and backgrounds/NAME.png (8-bit RGB, the plate behind the person), as the
synthetic humans write them (and the fg + alpha + bg matting sets ship). The network never sees images/NAME
(DenseSource lists samples by it): every example's image is the exact composite of its layers,
  image = round(255 (alpha fg + (1 - alpha) bg)),
made after the geometric augmentation, so the alpha and foreground targets explain every image pixel. On the
synthetic humans this is mattes/NAME.png to the bit (images/ has hard, point-sampled edges instead). With
data.backgrounds set, a training example's bg is a random photo (cover-cropped) with probability
BACKGROUND_PROB instead of its plate. No mask file: alpha > 0 is the person.

Training recipe (our choice: no matting recipe is published, sapiens2.md §3.6): the dense recipes' random
resize within data.scale_range, crop and stretch to config.image_size, a flip with probability 0.5, all on the
three layers and bilinear ("linear"), then the composite, then photometric distortion of the image only.
The foreground is resampled premultiplied (alpha fg, then / alpha): its files hold 0 where alpha is 0, and a
plain blend would darken the person's edge in the target and in the composite.

Loss: losses.sapiens2_matting_loss summed (L1 + gradient + Laplacian on alpha and on the foreground), the
foreground masked by losses.matting_foreground_mask; every sample here has a ground-truth foreground, so the
recipe's mask is every pixel (outside the person the target is the file's foreground: 0 on the synthetic humans).

Prediction on photos: the photo stretched to config.image_size (the port's Sapiens2ImageProcessor resizes
bilinearly to 1024x768, no padding) and the outputs resized back bilinearly to the photo's size.
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
from sapiens_jax.data import sapiens2_transforms
from sapiens_jax.data.photometric import photometric_distortion
from sapiens_jax.tasks import dense
from sapiens_jax.tasks import heads2

TORCH_PREFIX = heads2.TORCH_PREFIX
TARGET = "alpha"  # (H, W) in [0, 1]
LAYOUT = (dense_source.LabelFile("alphas", ".png", "alpha", channels=1),
          dense_source.LabelFile("foregrounds", ".png", "foreground", channels=3),
          dense_source.LabelFile("backgrounds", ".png", "background", channels=3))
# MattingMetrics on alpha (metrics.matting_metrics): sad, grad and conn are per-image sums / 1000, mse a mean.
METRICS = {"sad": "min", "mse": "min", "grad": "min", "conn": "min"}
FOREGROUND, ALPHA = slice(0, 3), 3  # the head's channels (the port's split)
BACKGROUND_PROB = 0.5  # a random photo behind the person, as the v1 depth and normal recipes paste one


def configure(config, dataset, size):
  del dataset, size
  config.best_metric = "sad"


def make_head(config):
  return heads2.head("matting", config.model.size, jnp.dtype(config.model.dtype))


def target_spec(config, batch_size):
  h, w = config.image_size
  return {"alpha": jax.ShapeDtypeStruct((batch_size, h, w), jnp.float32),
          "foreground": jax.ShapeDtypeStruct((batch_size, h, w, 3), jnp.float32)}


def loss(config, outputs, batch):
  """The recipe's terms summed; the foreground mask of samples that all have a ground-truth foreground."""
  del config
  alpha = batch["alpha"]
  mask = losses.matting_foreground_mask(alpha, jnp.ones(alpha.shape[:1], bool))
  return sum(losses.sapiens2_matting_loss(outputs, alpha, batch["foreground"], mask).values())


def eval_outputs(forward, images, config):
  """(B, H, W) predicted alpha at the label resolution."""
  return losses.resize_to(forward(images), tuple(config.image_size))[..., ALPHA]


# ---------------------------------------------------------------- data

def resample_layers(layers, size):
  """alpha, foreground and background at `size` (H, W), bilinear; the foreground premultiplied by alpha and
  divided back, so alpha' fg' is the resampled alpha fg (0 where alpha' is 0)."""
  if layers["alpha"].shape == tuple(size):
    return dict(layers)
  linear = functools.partial(sapiens2_transforms.resample, size=size, kind=sapiens2_transforms.LINEAR)
  alpha = np.clip(linear(layers["alpha"]), 0.0, 1.0)
  premultiplied = linear(layers["alpha"][..., None] * layers["foreground"])
  inside = alpha[..., None] > 0
  foreground = np.divide(premultiplied, alpha[..., None], out=np.zeros_like(premultiplied), where=inside)
  return {"alpha": alpha, "foreground": np.clip(foreground, 0.0, 1.0), "background": linear(layers["background"])}


def composite(alpha, foreground, background):
  """uint8 RGB alpha fg + (1 - alpha) bg (straight fg; layers in [0, 1]), rounded to the nearest level."""
  a = alpha[..., None]
  return np.clip(np.round(255 * (a * foreground + (1 - a) * background)), 0, 255).astype(np.uint8)


def _random_crop(layers, rng, size):
  """A random `size` window (the whole side where the layers are smaller), as dense_transforms.random_crop."""
  top, left, bottom, right = dense_transforms.crop_box(*layers["alpha"].shape, size, rng)
  return {name: array[top:bottom, left:right] for name, array in layers.items()}


def _sample(layers):
  return {"image": composite(layers["alpha"], layers["foreground"], layers["background"]),
          "alpha": layers["alpha"].astype(np.float32), "foreground": layers["foreground"].astype(np.float32)}


def train_sample(image, targets, rng, *, size, background_images=None,
                 ratio_range=dense_transforms.REFERENCE_RATIO_RANGE):
  """Random resize, crop, stretch and flip of the layers, a composite, photometric distortion (see above)."""
  del image  # the composite of the layers replaces it
  size = tuple(size)
  ratio = rng.uniform(*ratio_range)
  scaled = dense_transforms.fit_size(*targets["alpha"].shape, (int(size[0] * ratio), int(size[1] * ratio)))
  layers = resample_layers(_random_crop(resample_layers(targets, scaled), rng, size), size)
  if rng.uniform() < 0.5:
    layers = {name: np.ascontiguousarray(array[:, ::-1]) for name, array in layers.items()}
  if background_images:  # a zero mask keeps nothing of the plate: the plate, or a photo of its size
    nothing = np.zeros(size, np.uint8)
    layers["background"] = dense_transforms.composite_background(
        255 * layers["background"], nothing, background_images, rng, BACKGROUND_PROB) / 255
  sample = _sample(layers)
  sample["image"] = photometric_distortion(sample["image"], rng)
  return sample


def eval_sample(image, targets, *, size):
  """The layers stretched to `size` and their composite (on the synthetic humans: the matte file itself)."""
  del image
  return _sample(resample_layers(targets, tuple(size)))


make_source = functools.partial(dense.make_source, LAYOUT)
train_example = functools.partial(dense.train_example, train_sample)
eval_example = functools.partial(dense.eval_example, eval_sample)
convert_records = functools.partial(dense.convert_records, LAYOUT)


class Evaluator:
  """SAD, MSE, gradient and connectivity errors of alpha over each whole eval image, averaged over images."""

  def __init__(self, config, source):
    del config, source
    self.metrics = metrics.MattingMetrics()

  def add(self, predictions, batch):
    for i in np.flatnonzero(batch["valid"]):
      self.metrics.add(predictions[i], batch[TARGET][i])

  def result(self):
    return self.metrics.result()


def baselines(config, train_batches):
  """{name: batch -> alpha} fitted on the training split's un-augmented examples: its mean alpha everywhere,
  and each pixel's mean alpha."""
  del config
  total, count = 0.0, 0
  for batch in train_batches():
    alphas = batch[TARGET][batch["valid"]].astype(np.float64)
    total, count = total + alphas.sum(0), count + len(alphas)
  per_pixel = (total / count).astype(np.float32)
  mean = np.float32(per_pixel.mean())
  return {"constant_alpha": lambda b: np.full(b[TARGET].shape, mean, np.float32),
          "per_pixel_mean_alpha": lambda b: np.broadcast_to(per_pixel, b[TARGET].shape)}


# ---------------------------------------------------------------- pictures and photos

def _to_uint8(values):
  return np.clip(np.round(255 * np.asarray(values, np.float32)), 0, 255).astype(np.uint8)


def grey(alpha):
  """(H, W) alpha in [0, 1] as a grey RGB picture (black 0, white 1)."""
  return np.repeat(_to_uint8(alpha)[..., None], 3, axis=-1)


def panel(config, example, prediction=None):
  """[image | target alpha | predicted alpha], grey; `prediction` is the head's (h, w, 4) output."""
  del config
  image = example["image"]
  tiles = [image]
  if TARGET in example:
    tiles.append(grey(example[TARGET]))
  if prediction is not None:
    tiles.append(grey(dense.resize_map(prediction, *image.shape[:2])[..., ALPHA]))
  return visualize.row(tiles)


predict_inputs = dense.predict_inputs  # stretched to config.image_size, as the port's processor
predict_outputs = dense.raw_outputs  # resized to each photo on the host


def finish(config, image, outputs, context):
  del config, context
  out = np.clip(dense.resize_map(outputs[0], *image.shape[:2]), 0.0, 1.0)
  return {"alpha": out[..., ALPHA], "foreground": out[..., FOREGROUND]}


def write_prediction(config, stem, file_name, image, prediction, context):
  """STEM_alpha.png (8-bit grey alpha) and STEM_cutout.png (RGBA: the predicted foreground, the predicted
  alpha), at the photo's size."""
  del config, file_name, image, context
  alpha = _to_uint8(prediction["alpha"])
  visualize.save_png(stem + "_alpha.png", alpha)
  visualize.save_png(stem + "_cutout.png", np.dstack([_to_uint8(prediction["foreground"]), alpha]))
  return []
