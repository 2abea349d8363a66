"""Random-access image sources for Grain: `len(source)` and `source[i]`.

Every record is `{"name": str, "data": bytes}` holding an encoded JPEG/PNG, so
all sources share one decode path and errors can name the offending file.
"""
import bisect
import glob
import io
import json
import math
import os

from array_record.python import array_record_module
import grain
import numpy as np
from PIL import Image
from PIL import ImageDraw

from sapiens_jax.data import synthetic_humans

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SOURCE_NAMES = ("generated", "synthetic_humans", "folder", "array_record", "tfds")

# Synthetic images are rendered this much larger than the training crop, so
# that random_resized_crop still has something to choose from.
GENERATED_OVERSIZE = 1.25


class ImageFolderSource:
  """Every .jpg/.jpeg/.png under `root` (recursive), in sorted path order.

  Sorting makes index -> file identical on every host and every run, which the
  per-process slicing and checkpoint resumption rely on.
  """

  def __init__(self, root):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"image folder {root!r} does not exist")
    paths = []
    for dirpath, _, filenames in os.walk(root):
      for filename in filenames:
        if os.path.splitext(filename)[1].lower() in IMAGE_EXTENSIONS:
          paths.append(os.path.join(dirpath, filename))
    if not paths:
      raise ValueError(
          f"no images found under {root!r} (looked recursively for"
          f" {', '.join(IMAGE_EXTENSIONS)}, any case)")
    self.root = root
    self.paths = sorted(paths)

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, index):
    path = self.paths[index]
    with open(path, "rb") as f:
      return {"name": path, "data": f.read()}

  def __repr__(self):
    return f"ImageFolderSource({self.root!r}, {len(self)} images)"


def find_array_record_files(path):
  """`path` as a file, a directory (its *.array_record* files) or a glob."""
  if os.path.isdir(path):
    files = glob.glob(os.path.join(path, "*.array_record*"))
  elif os.path.isfile(path):
    files = [path]
  else:
    files = glob.glob(path)
  files = sorted(f for f in files if os.path.isfile(f))
  if not files:
    raise FileNotFoundError(
        f"no ArrayRecord files match {path!r} (expected a file, a directory"
        " containing *.array_record* files, or a glob pattern)")
  return files


class ArrayRecordImageSource:
  """ArrayRecord files whose records are raw encoded images.

  Reading is delegated to Grain's ArrayRecordDataSource (lazy readers, safe to
  pickle into worker processes); this class only adds the record names.
  """

  def __init__(self, path):
    self.files = find_array_record_files(path)
    self._records = grain.sources.ArrayRecordDataSource(self.files)
    # First global index of each file, to name records "<file>#<index in file>".
    self._file_starts = [0]
    for f in self.files[:-1]:
      self._file_starts.append(self._file_starts[-1] + _count_records(f))

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    index = int(index)
    file_index = bisect.bisect_right(self._file_starts, index) - 1
    local_index = index - self._file_starts[file_index]
    return {
        "name": f"{self.files[file_index]}#{local_index}",
        "data": self._records[index],
    }

  def __repr__(self):
    return f"ArrayRecordImageSource({len(self.files)} files, {len(self)} images)"


def _count_records(path):
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return reader.num_records()
  finally:
    reader.close()


def write_array_record(path, encoded_images):
  """Writes one record per encoded image; returns how many were written.

  group_size:1 keeps every record independently addressable, which random
  access (and Grain's reader) needs for good performance.
  """
  writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
  count = 0
  try:
    for data in encoded_images:
      writer.write(bytes(data))
      count += 1
  finally:
    writer.close()
  return count


class TfdsImageSource:
  """The encoded "image" feature of a TFDS dataset prepared in the array_record format.

  Read through `tfds.data_source`-style random access, which needs no
  TensorFlow. `dataset` is a prepared dataset's folder (the one holding
  dataset_info.json, e.g. ~/tensorflow_datasets/imagenet2012/5.1.0) or a TFDS
  name such as "imagenet2012:5.1.0", looked up in TFDS's data dir
  ($TFDS_DATA_DIR). Datasets prepared as TFRecord must be prepared again
  with `--file_format=array_record`: reading those needs TensorFlow.
  """

  def __init__(self, dataset, split="train"):
    # Imported here: TFDS takes ~0.5 s to import, which the other sources need not pay.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    dataset = os.fspath(dataset)
    try:
      if os.path.isfile(os.path.join(dataset, "dataset_info.json")):
        builder = tfds.builder_from_directory(dataset)
      else:
        builder = tfds.builder(dataset)
    except Exception as e:  # TFDS raises its own not-found errors, and more.
      raise FileNotFoundError(
          f"TFDS dataset {dataset!r} not found (expected a prepared dataset folder holding"
          f" dataset_info.json, or a TFDS name prepared in $TFDS_DATA_DIR):"
          f" {type(e).__name__}: {e}") from e
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if file_format != "array_record":
      raise ValueError(
          f"TFDS dataset {dataset!r} is stored as {file_format!r}; random access without"
          " TensorFlow needs array_record (prepare it with `tfds build --file_format=array_record`)")
    if "image" not in builder.info.features:
      raise ValueError(f"TFDS dataset {dataset!r} has no 'image' feature (features:"
                       f" {', '.join(builder.info.features)})")
    if split not in builder.info.splits:
      raise ValueError(f"TFDS dataset {dataset!r} has no split {split!r} (splits:"
                       f" {', '.join(builder.info.splits)})")
    self.name = f"{builder.info.full_name}/{split}"
    # SkipDecoding keeps the encoded bytes, so decoding (and its errors) is decode_image's.
    self._records = builder.as_data_source(
        split=split, decoders={"image": tfds.decode.SkipDecoding()})

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    index = int(index)
    return {"name": f"tfds:{self.name}#{index}", "data": self._records[index]["image"]}

  def __repr__(self):
    return f"TfdsImageSource({self.name!r}, {len(self)} images)"


class GeneratedSource:
  """Synthetic PNGs of crude stick figures on gradient backgrounds.

  Lets the quickstart and tests train without downloading data, while still
  giving a masked autoencoder structure to learn (smooth regions, edges,
  parts whose position predicts each other). Image i depends only on
  (seed, i); `image_size` (H, W) is the size of the generated image itself.
  """

  def __init__(self, num_images, image_size, seed=0):
    if num_images <= 0:
      raise ValueError(f"num_images must be positive, got {num_images}")
    self.num_images = int(num_images)
    self.image_size = tuple(int(s) for s in image_size)
    self.seed = int(seed)

  def __len__(self):
    return self.num_images

  def __getitem__(self, index):
    index = int(index)
    if not 0 <= index < self.num_images:
      raise IndexError(f"index {index} out of range [0, {self.num_images})")
    buffer = io.BytesIO()
    Image.fromarray(self.render(index)).save(buffer, format="PNG", compress_level=0)
    return {"name": f"{self.NAME}#{index}", "data": buffer.getvalue()}

  NAME = "generated"

  def render(self, index):
    return render_synthetic_image(np.random.default_rng((self.seed, index)), *self.image_size)

  def __repr__(self):
    return (f"{type(self).__name__}({self.num_images} images of {self.image_size},"
            f" seed={self.seed})")


class SyntheticHumansSource(GeneratedSource):
  """PNGs of synthetic-humans scenes: 1-3 ray-cast people on a ground plane (the task data's generator).

  Image i is `synthetic_humans.render_sample(seed, i, H, W)`'s image, so whatever the generator
  knows of it (how many people, where, how bright the background) can label a probe of what
  pretraining on these images learned (sapiens_jax.probe).
  """

  NAME = "synthetic_humans"

  def render(self, index):
    return synthetic_humans.render_sample(self.seed, index, *self.image_size, sapiens2=False)["image"]


def _random_colour(rng):
  return tuple(int(c) for c in rng.integers(0, 256, size=3))


def _capsule(draw, start, end, thickness, colour):
  """A thick line with round ends: a limb segment."""
  draw.line([start, end], fill=colour, width=int(thickness))
  radius = thickness / 2
  for x, y in (start, end):
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)


def _limb(draw, rng, root, length, thickness, colour, base_angle):
  """Two capsules (upper + lower segment) hanging from `root` at a random bend."""
  angle = base_angle + rng.uniform(-0.8, 0.8)
  knee = (root[0] + length * math.cos(angle), root[1] + length * math.sin(angle))
  angle += rng.uniform(-0.9, 0.9)
  foot = (knee[0] + length * math.cos(angle), knee[1] + length * math.sin(angle))
  _capsule(draw, root, knee, thickness, colour)
  _capsule(draw, knee, foot, thickness * 0.85, colour)


def render_synthetic_image(rng, height, width):
  """uint8 (height, width, 3): gradient + faint waves, clutter, one figure."""
  ys = np.arange(height, dtype=np.float32)[:, None]
  xs = np.arange(width, dtype=np.float32)[None, :]
  angle = rng.uniform(0, 2 * math.pi)
  ramp = xs * math.cos(angle) + ys * math.sin(angle)
  ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
  colour_a, colour_b = rng.uniform(0, 255, size=(2, 3))
  wave_x, wave_y = rng.uniform(0.05, 0.3, size=2)
  waves = rng.uniform(2, 8) * np.sin(xs * wave_x + ys * wave_y)
  # Channel by channel: broadcasting against a trailing axis of 3 is ~5x slower.
  channels = [
      np.clip(a + (b - a) * ramp + waves, 0, 255).astype(np.uint8)
      for a, b in zip(colour_a, colour_b)]
  image = Image.fromarray(np.stack(channels, axis=-1))
  draw = ImageDraw.Draw(image)

  size = min(height, width)
  for _ in range(int(rng.integers(2, 6))):  # Background clutter.
    x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
    w, h = rng.uniform(0.1, 0.45, size=2) * size
    box = [x0, y0, x0 + w, y0 + h]
    if rng.uniform() < 0.5:
      draw.rectangle(box, fill=_random_colour(rng))
    else:
      draw.ellipse(box, fill=_random_colour(rng))

  # The figure: torso, head, two arms and two legs, each part its own colour.
  scale = rng.uniform(0.55, 0.95) * height
  cx = rng.uniform(0.3, 0.7) * width
  top = rng.uniform(0.02, 0.98 * height - scale)
  skin, shirt, trousers = (_random_colour(rng) for _ in range(3))
  head_r = 0.08 * scale
  head_cy = top + head_r
  torso_top, torso_h, torso_w = head_cy + head_r, 0.36 * scale, 0.2 * scale
  torso_bottom = torso_top + torso_h
  limb_t = 0.065 * scale
  leg_len = 0.5 * (top + scale - torso_bottom)
  for side in (-1, 1):
    hip = (cx + side * 0.25 * torso_w, torso_bottom - limb_t)
    _limb(draw, rng, hip, leg_len, 1.2 * limb_t, trousers,
          math.pi / 2 - side * 0.25)
  draw.ellipse([cx - torso_w / 2, torso_top, cx + torso_w / 2, torso_bottom],
               fill=shirt)
  for side in (-1, 1):
    shoulder = (cx + side * 0.4 * torso_w, torso_top + 0.12 * torso_h)
    _limb(draw, rng, shoulder, 0.16 * scale, limb_t, skin,
          math.pi / 2 - side * 0.6)
  draw.ellipse([cx - head_r, head_cy - head_r, cx + head_r, head_cy + head_r],
               fill=skin)
  return np.asarray(image)


def make_source(data_config, image_size, seed):
  """The source named by `data_config.source`; `image_size` is the crop (H, W)."""
  name = data_config.source
  if name in ("generated", "synthetic_humans"):
    generated_size = tuple(
        int(round(s * GENERATED_OVERSIZE)) for s in image_size)
    kind = GeneratedSource if name == "generated" else SyntheticHumansSource
    return kind(data_config.num_generated, generated_size, seed)
  if name == "folder":
    return ImageFolderSource(data_config.path)
  if name == "array_record":
    _check_converted_kind(data_config.path)
    return ArrayRecordImageSource(data_config.path)
  if name == "tfds":
    return TfdsImageSource(data_config.path)
  raise ValueError(
      f"unknown data source {name!r}; expected one of {', '.join(SOURCE_NAMES)}")


def _check_converted_kind(path):
  """A folder from sapiens_jax.data.convert must hold raw images (kind "images") for MAE."""
  manifest_path = os.path.join(path, "manifest.json")
  if not os.path.isfile(manifest_path):
    return
  with open(manifest_path, "rb") as f:
    try:
      manifest = json.load(f)
    except ValueError:
      return  # Not the converter's manifest; the shards speak for themselves.
  if isinstance(manifest, dict) and manifest.get("kind", "images") != "images":
    raise ValueError(
        f"{manifest_path}: holds {manifest['kind']!r} records; MAE pretraining reads"
        " `python -m sapiens_jax.data.convert --kind=images` output")
