"""Body-part segmentation (reference §5): mmseg's VitHead over 20 / 28 classes, class-weighted
cross-entropy, mIoU / mAcc / aAcc from one confusion matrix over the split, palette overlays.
The Sapiens2 recipe (`config.recipe`, sapiens2.md §3.1): its x16 head (29 classes) and class-weighted
cross-entropy + Dice."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sapiens_jax import losses
from sapiens_jax import metrics
from sapiens_jax import visualize
from sapiens_jax.data import dense_source
from sapiens_jax.data import dense_transforms
from sapiens_jax.data import meta
from sapiens_jax.data import sapiens2_augment
from sapiens_jax.tasks import dense
from sapiens_jax.tasks import heads
from sapiens_jax.tasks import heads2

TORCH_PREFIX = "decode_head."  # mmseg's
TARGET = "label"
LAYOUT = (dense_source.LabelFile("segs", ".png", "label"),)
LABEL_SETS = meta.SEG_CLASS_SETS  # a head may be fine-tuned on any of them (init_from reads which)
METRICS = {"mIoU": "max", "mAcc": "max", "aAcc": "max"}


def configure(config, dataset, size):
  del dataset, size
  config.best_metric = "mIoU"


def classes(config):
  return meta.seg_classes(config.data.labels)


def head(num_classes, channels=768, dtype=jnp.float32):
  """mmseg VitHead: x8 upsampling to class logits (64x48 -> 512x384)."""
  return heads.mmseg_head(3, 3, num_classes, channels, dtype)


def make_head(config):
  if config.recipe == "sapiens2":
    return heads2.seg_head(config.model.size, classes(config).num_classes, jnp.dtype(config.model.dtype))
  return head(classes(config).num_classes, config.model.head_channels, jnp.dtype(config.model.dtype))


def target_spec(config, batch_size):
  return {"label": jax.ShapeDtypeStruct((batch_size, *config.image_size), jnp.int32)}


def loss(config, outputs, batch):
  class_weight = jnp.asarray(classes(config).class_weight)
  if config.recipe == "sapiens2":
    return sum(losses.sapiens2_seg_loss(outputs, batch["label"], class_weight).values())
  return losses.seg_cross_entropy(outputs, batch["label"], class_weight)


def eval_outputs(forward, images, config):
  """Class ids at the label resolution."""
  return jnp.argmax(losses.resize_to(forward(images), tuple(config.image_size)), axis=-1).astype(jnp.int32)


# Data: a dense folder of LAYOUT (or its shards), through the reference recipes (§5).
make_source = functools.partial(dense.make_source, LAYOUT)


def train_example(config, source):
  """The reference recipe (§5.3), or Sapiens2's (sapiens2.md §3.1) under its recipe; the flip swaps left
  and right part labels."""
  sapiens2 = config.recipe == "sapiens2"
  recipe = sapiens2_augment.seg_train_sample if sapiens2 else dense_transforms.seg_train_sample
  return dense.train_example(recipe, config, source, swap_pairs=classes(config).swap_pairs)


eval_example = functools.partial(dense.eval_example, dense_transforms.seg_eval_sample)
convert_records = functools.partial(dense.convert_records, LAYOUT)


class Evaluator:
  def __init__(self, config, source):
    del source
    self.num_classes = classes(config).num_classes
    self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)

  def add(self, labels, batch):
    for i in np.flatnonzero(batch["valid"]):
      self.confusion += metrics.confusion_matrix(labels[i], batch["label"][i], self.num_classes)

  def result(self):
    return {k: v for k, v in metrics.seg_metrics(self.confusion).items() if np.ndim(v) == 0}


def baselines(config, train_batches):
  """{name: batch -> class ids} of the image-independent predictions fitted on the training split's
  un-augmented examples (`train_batches()`): the majority class everywhere, and each pixel's
  majority class (pixels never labelled in training take the overall majority)."""
  num_classes = classes(config).num_classes
  per_pixel = None
  for batch in train_batches():
    labels = batch["label"][batch["valid"]]
    if per_pixel is None:
      per_pixel = np.zeros((labels.shape[1] * labels.shape[2], num_classes), np.int64)
    pixel = np.broadcast_to(np.arange(per_pixel.shape[0]).reshape(labels.shape[1:]), labels.shape)
    keep = labels != dense_transforms.IGNORE_INDEX
    np.add.at(per_pixel, (pixel[keep], labels[keep]), 1)
  majority = int(np.argmax(per_pixel.sum(0)))
  pixel_map = np.where(per_pixel.sum(1) > 0, np.argmax(per_pixel, 1), majority).reshape(labels.shape[1:])
  pixel_map = pixel_map.astype(np.int32)
  return {"majority_class": lambda b: np.full(b["label"].shape, majority, np.int32),
          "per_pixel_majority": lambda b: np.broadcast_to(pixel_map, b["label"].shape)}


def resize_labels(logits, height, width):
  """Argmax of the logits resized (bilinear, half-pixel centres) to (height, width), a channel at a
  time, so a large photo never holds all C resized channels at once."""
  best = np.full((height, width), -np.inf, np.float32)
  labels = np.zeros((height, width), np.uint8)
  for c in range(logits.shape[-1]):
    channel = dense.resize_map(logits[..., c:c + 1], height, width)[..., 0]
    better = channel > best  # strict: ties keep the lower class, as argmax
    labels[better], best[better] = c, channel[better]
  return labels


def panel(config, example, prediction=None):
  """[image | target parts | predicted parts], the palette blended over the image."""
  image = example["image"]
  palette = classes(config).palette
  tiles = [image]
  if TARGET in example:
    tiles.append(visualize.overlay_parts(image, example[TARGET], palette))
  if prediction is not None:
    tiles.append(visualize.overlay_parts(image, resize_labels(prediction, *image.shape[:2]), palette))
  return visualize.row(tiles)


predict_inputs = dense.predict_inputs
predict_outputs = dense.raw_outputs  # resized to each photo on the host


def finish(config, image, outputs, context):
  del config, context
  return {"labels": resize_labels(outputs[0], *image.shape[:2])}


def write_prediction(config, stem, file_name, image, prediction, context):
  """STEM_seg.png (uint8 class ids) and STEM_seg_overlay.png (the palette over the photo)."""
  del file_name, context
  visualize.save_png(stem + "_seg.png", prediction["labels"])
  palette = classes(config).palette
  visualize.save_png(stem + "_seg_overlay.png", visualize.overlay_parts(image, prediction["labels"], palette))
  return []
