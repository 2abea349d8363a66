"""Random-access source of dense-task samples (images + per-pixel labels) on disk.

A dataset folder holds `images/NAME.{jpg,jpeg,png}` and, per image name stem, one file for each
`LabelFile` of the task's layout (the task module declares it), e.g.
  segs/NAME.png      class ids, single-channel uint8 (L or P mode)        -> target "label"
  masks/NAME.png     0 background, > 0 person                            -> target "mask"
  depths/NAME.npy    float (H, W), any units                             -> a float map
  normals/NAME.npy   float (H, W, 3)                                     -> a float map
  albedos/NAME.png   8-bit RGB (a LabelFile with channels=3; 1 for grey)  -> a float map in [0, 1]
`source[i]` only names the files (cheap, picklable); `source.load(element)` reads and checks them
and returns `(image, targets)` ready for the `sapiens_jax.data.dense_transforms` recipes.
"""
import os
from typing import NamedTuple

import numpy as np
from PIL import Image

from sapiens_jax.data.sources import IMAGE_EXTENSIONS
from sapiens_jax.data.transforms import decode_image
from sapiens_jax.data.transforms import ImageDecodeError
from sapiens_jax.data.transforms import MAX_IMAGE_PIXELS

# How many missing files an error message lists before "...".
_MAX_LISTED = 5
_CLASS_MODES = ("L", "P")
_MASK_MODES = ("1", "L", "P", "RGB")
_PICTURE_MODES = {1: "L", 3: "RGB"}  # LabelFile.channels -> the 8-bit PNG mode of a picture label


class LabelFile(NamedTuple):
  """One label file per image: `folder`/NAME`extension`, read as the target `name`.

  A ".png" is class ids ("label") or, for the name "mask", a person mask, or with `channels` (3: RGB,
  1: grey) an 8-bit picture read as a float map in [0, 1] (albedo, alpha); a ".npy" is a float map
  of (H, W) or, with `channels`, (H, W, channels). Where a dataset has a mask, float-map pixels
  that are NaN/inf (or <= 0 with `positive`) are taken off it.
  """
  folder: str
  extension: str
  name: str
  channels: int = 0
  positive: bool = False

  @property
  def key(self):
    """The element key holding the file's path."""
    return f"{self.name}_path"


class DataError(ValueError):
  """A dataset file is missing, unreadable or inconsistent; names the file."""


class DenseSource:
  """The samples of one dense dataset under `root`, sorted by image name.

  Args:
    root: dataset folder with the layout in the module docstring.
    layout: the task's LabelFile tuple.
    on_missing: "raise" (an image lacks one of its files -> DataError listing
      the first few) or "skip" (drop such images; `num_skipped` counts them).
  """

  def __init__(self, root, layout, on_missing="raise"):
    if on_missing not in ("raise", "skip"):
      raise ValueError(f"on_missing must be 'raise' or 'skip', got {on_missing!r}")
    image_dir = os.path.join(root, "images")
    if not os.path.isdir(image_dir):
      raise DataError(f"image folder {image_dir!r} does not exist")
    images = {}
    for filename in sorted(os.listdir(image_dir)):
      stem, extension = os.path.splitext(filename)
      if extension.lower() not in IMAGE_EXTENSIONS:
        continue
      if stem in images:
        raise DataError(
            f"two images share the name {stem!r} in {image_dir!r}:"
            f" {os.path.basename(images[stem])!r} and {filename!r}")
      images[stem] = os.path.join(image_dir, filename)
    if not images:
      raise DataError(
          f"no images in {image_dir!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    self.root = root
    self.layout = tuple(layout)
    self.elements = []
    missing = []
    for stem in sorted(images):
      element = {"name": stem, "image_path": images[stem]}
      for file in self.layout:
        element[file.key] = os.path.join(root, file.folder, stem + file.extension)
      absent = [element[file.key] for file in self.layout if not os.path.isfile(element[file.key])]
      if absent:
        missing.extend(absent)
      else:
        self.elements.append(element)
    self.num_skipped = len(images) - len(self.elements)
    folders = "/".join(file.folder for file in self.layout)
    if missing and on_missing == "raise":
      listed = ", ".join(repr(path) for path in missing[:_MAX_LISTED])
      more = " ..." if len(missing) > _MAX_LISTED else ""
      raise DataError(
          f"{len(missing)} label files ({folders}) missing under {root!r}: {listed}{more}"
          " (pass on_missing='skip' to drop those images)")
    if not self.elements:
      raise DataError(f"no complete samples (images with {folders}) under {root!r}")

  def __len__(self):
    return len(self.elements)

  def __getitem__(self, index):
    return self.elements[index]

  def __repr__(self):
    folders = "/".join(file.folder for file in self.layout)
    return (f"DenseSource({self.root!r}, {folders}, {len(self)} samples,"
            f" {self.num_skipped} skipped)")

  def load(self, element):
    """Reads one element's files -> (uint8 RGB image, targets dict), see `decode_sample`."""
    image_path = element["image_path"]
    with open(image_path, "rb") as f:
      data = f.read()
    files = {file.name: (element[file.key], element[file.key]) for file in self.layout}
    return decode_sample(self.layout, data, image_path, files)


def decode_sample(layout, image_data, image_name, files):
  """Encoded image + label files -> (uint8 RGB image, targets dict), checked.

  `files` maps each LabelFile name of `layout` to (path or file object, name for errors), so
  folders and record shards share one decoder. Targets: "label" uint8 (H, W); "mask" uint8 0/1;
  float maps float32. With a mask, float-map pixels that are NaN/inf (or <= 0 where the file is
  `positive`) are taken off the mask, so they train as background; a mask left with no person at
  all is an error.
  """
  try:
    image = decode_image(image_data, image_name)
  except ImageDecodeError as e:
    raise DataError(str(e)) from e
  size = image.shape[:2]
  targets, valid, value_names = {}, np.ones(size, bool), []
  for file in layout:
    data, name = files[file.name]
    if file.extension == ".png" and file.channels:
      values = _read_png(data, name, (_PICTURE_MODES[file.channels],)).astype(np.float32) / 255
    elif file.extension == ".png":
      values = _read_png(data, name, _MASK_MODES if file.name == "mask" else _CLASS_MODES)
      if values.ndim == 3:
        values = values.max(axis=-1)
    else:
      values = _read_npy(data, name, size + ((file.channels,) if file.channels else ()))
    _check_size(values, name, size, image_name)
    if file.extension == ".npy":
      with np.errstate(invalid="ignore"):
        finite = np.isfinite(values) & ((values > 0) if file.positive else True)
      valid &= finite.all(axis=-1) if file.channels else finite
      value_names.append(name)
    targets[file.name] = values
  if "mask" in targets:
    mask = ((targets["mask"] > 0) & valid).astype(np.uint8)
    if not mask.any():
      raise DataError(
          f"{', '.join(map(repr, value_names))}: no valid foreground pixel (mask"
          f" {files['mask'][1]!r} is empty or every value under it is NaN/inf"
          f"{' or <= 0' if any(f.positive for f in layout) else ''})")
    targets["mask"] = mask
  return image, targets


def _read_png(file, path, modes):
  """A PNG's pixel values (palette indices for P), refusing other modes; `path` names `file`."""
  try:
    with Image.open(file) as png:
      width, height = png.size
      if width * height > MAX_IMAGE_PIXELS:
        raise DataError(
            f"{path!r}: {width}x{height} pixels exceeds MAX_IMAGE_PIXELS")
      if png.mode not in modes:
        kind = "an 8-bit RGB" if modes == ("RGB",) else "a single-channel 8-bit"
        raise DataError(f"{path!r}: expected {kind} PNG (mode one of {modes}), got mode {png.mode!r}")
      return np.array(png, dtype=np.uint8)
  except DataError:
    raise
  except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ...).
    raise DataError(f"cannot read {path!r}: {type(e).__name__}: {e}") from e


def _read_npy(file, path, shape):
  """A float .npy array as float32, checked against `shape`; `path` names `file`."""
  try:
    values = np.load(file, allow_pickle=False)
  except Exception as e:  # Truncated or foreign files raise assorted errors.
    raise DataError(f"cannot read {path!r}: {type(e).__name__}: {e}") from e
  if not np.issubdtype(values.dtype, np.floating):
    raise DataError(f"{path!r}: expected a float array, got {values.dtype}")
  if values.ndim != len(shape) or values.shape[2:] != shape[2:]:
    expected = f"(H, W, {shape[2]})" if len(shape) == 3 else "(H, W)"
    raise DataError(f"{path!r}: expected shape {expected}, got {values.shape}")
  return values.astype(np.float32)


def _check_size(array, path, size, image_path):
  if array.shape[:2] != size:
    raise DataError(
        f"{path!r} is {array.shape[1]}x{array.shape[0]} (WxH) but its image"
        f" {image_path!r} is {size[1]}x{size[0]}")
