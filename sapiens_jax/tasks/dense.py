"""What the dense tasks (body-part segmentation, depth, normals) share: their folder or converted
sources, background photos pasted behind people, their conversion to shards, and the resizes
between a photo and the network at prediction time. Each task module calls these with its own
label layout; none of it names a task.
"""
import functools
import os

import cv2
import numpy as np
from flax import serialization

from sapiens_jax import visualize
from sapiens_jax.data import dense_source
from sapiens_jax.data import record_sources
from sapiens_jax.data import sapiens2_transforms
from sapiens_jax.data import sources
from sapiens_jax.data import transforms


def make_source(layout, config, root, split):
  """A converted folder (its manifest says so) is read from its shards, any other as a DenseSource
  of `layout`; both splits have the same layout."""
  del split
  if record_sources.read_manifest(root) is not None:
    return record_sources.RecordDenseSource(root, config.task, layout)
  on_missing = "skip" if config.data.on_error == "skip" else "raise"
  return dense_source.DenseSource(root, layout, on_missing=on_missing)


class BackgroundImages:
  """Non-human photos to paste behind people, decoded on demand (a folder may be large)."""

  def __init__(self, folder):
    self._source = sources.ImageFolderSource(folder)

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    record = self._source[index]
    return transforms.decode_image(record["data"], record["name"])


def scale_range(data_config):
  """data.scale_range, checked: the (low, high) random-resize ratios of the dense recipes."""
  try:
    low, high = (float(v) for v in data_config.scale_range)
  except (TypeError, ValueError):
    low = high = 0.0
  if not 0 < low <= high:
    raise ValueError(f"data.scale_range must be (low, high) with 0 < low <= high, got"
                     f" {data_config.scale_range!r}")
  return low, high


def recipe_settings(config):
  """The keyword arguments every dense training recipe takes from the config."""
  backgrounds = BackgroundImages(config.data.backgrounds) if config.data.backgrounds else None
  return {"size": tuple(int(s) for s in config.image_size), "background_images": backgrounds,
          "ratio_range": scale_range(config.data)}


def _train_sample(recipe, source, settings, index, rng):
  image, targets = source.load(source[index])
  return recipe(image, targets, rng, **settings)


def train_example(recipe, config, source, **recipe_kwargs):
  """`(index, rng) -> training sample` of `source` through `recipe` (a dense_transforms recipe);
  picklable, for Grain's worker processes."""
  return functools.partial(_train_sample, recipe, source, {**recipe_settings(config), **recipe_kwargs})


def eval_example(recipe, config, source, index):
  image, targets = source.load(source[index])
  return recipe(image, targets, size=tuple(int(s) for s in config.image_size))


def predict_inputs(config, image, boxes):
  """The whole photo stretched to the network's size, as the reference's demos do (no boxes)."""
  del boxes
  return [transforms.stretch(image, config.image_size)], None


def padded_inputs(config, image, boxes):
  """The whole photo resized to fit the network's size with its aspect kept, then zero-padded
  around (Sapiens2's test pipeline for normal, pointmap, albedo); the padding is the context."""
  del boxes
  padded, _, padding = sapiens2_transforms.resize_pad(image, {}, tuple(config.image_size))
  return [padded], padding


def unpad_map(config, outputs, padding, image):
  """(h, w, C) outputs of a `padded_inputs` photo -> (H, W, C) at the photo's size, bilinear: first
  to the network's input size (a head's x16 of a grid that rounded the size down is smaller)."""
  canvas = resize_map(outputs, *(int(s) for s in config.image_size))
  return sapiens2_transforms.unpad(canvas, padding, image.shape[:2])


class MaskedEvaluator:
  """A per-pixel metrics accumulator (metrics.DepthMetrics, metrics.NormalMetrics) fed each eval
  image's person pixels, which `foreground(target)` tells from the target itself."""

  def __init__(self, target_key, foreground, accumulator):
    self.target_key, self.foreground, self.accumulator = target_key, foreground, accumulator

  def add(self, predictions, batch):
    for i in np.flatnonzero(batch["valid"]):
      target = batch[self.target_key][i]
      self.accumulator.add(predictions[i], target, self.foreground(target))

  def result(self):
    return self.accumulator.result()


def masked_panel(example, prediction, target_key, foreground, draw):
  """[image | target | prediction], each drawn by `draw(values at the image's size, person mask)`;
  the prediction on the target's person (everywhere when the example has no target)."""
  image = example["image"]
  mask = np.ones(image.shape[:2], bool)
  tiles = [image]
  if target_key in example:
    mask = foreground(example[target_key])
    tiles.append(draw(example[target_key], mask))
  if prediction is not None:
    tiles.append(draw(resize_map(prediction, *image.shape[:2]), mask))
  return visualize.row(tiles)


def raw_outputs(forward, images, config):
  """The head's outputs as they are; resized to each photo on the host (`resize_map`)."""
  del config
  return forward(images)


def resize_map(outputs, height, width):
  """(h, w, C) float outputs -> (height, width, C), bilinear with half-pixel centres (as the
  losses' and the reference's align_corners=False resize)."""
  outputs = np.ascontiguousarray(outputs, np.float32)
  if outputs.ndim != 3:
    raise ValueError(f"a prediction must be one example's (h, w, C) outputs, got shape {outputs.shape}")
  resized = cv2.resize(outputs, (width, height), interpolation=cv2.INTER_LINEAR)
  return resized.reshape(height, width, outputs.shape[-1])


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def convert_records(layout, input_dir, annotations, output):
  """(count, msgpack records, manifest extras) of every complete sample of a dense folder."""
  del output
  if annotations:
    raise ValueError(f"--annotations={annotations!r}: a dense dataset's labels are files beside its images")
  source = dense_source.DenseSource(input_dir, layout)

  def records():
    for element in source.elements:
      paths = {"image": element["image_path"], **{file.name: element[file.key] for file in layout}}
      record = {field: _read(path) for field, path in paths.items()}
      record["files"] = {field: os.path.relpath(path, input_dir) for field, path in paths.items()}
      yield serialization.msgpack_serialize(record)
  return len(source), records(), {"names": [element["name"] for element in source.elements]}
