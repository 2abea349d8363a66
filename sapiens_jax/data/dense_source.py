"""Random-access source of dense-task samples (seg, depth or normal) on disk.

Layout under `root`, one sample per image name stem:
  images/NAME.{jpg,jpeg,png}  the photo
  segs/NAME.png               seg: single-channel uint8 class ids (L or P mode)
  masks/NAME.png              depth, normal: 0 background, > 0 person
  depths/NAME.npy             depth: float (H, W), any units
  normals/NAME.npy            normal: float (H, W, 3)
`source[i]` only names the files (cheap, picklable); `source.load(element)`
reads and checks them and returns `(image, targets)` ready for the
`sapiens_jax.data.dense_transforms` recipes.
"""
import os

import numpy as np
from PIL import Image

from sapiens_jax.data.sources import IMAGE_EXTENSIONS
from sapiens_jax.data.transforms import decode_image
from sapiens_jax.data.transforms import ImageDecodeError
from sapiens_jax.data.transforms import MAX_IMAGE_PIXELS

# task -> the (folder, extension, element key) of each file besides the image.
TASK_FILES = {
    "seg": (("segs", ".png", "label_path"),),
    "depth": (("masks", ".png", "mask_path"), ("depths", ".npy", "depth_path")),
    "normal": (("masks", ".png", "mask_path"),
               ("normals", ".npy", "normal_path")),
}
# How many missing files an error message lists before "...".
_MAX_LISTED = 5


class DataError(ValueError):
  """A dataset file is missing, unreadable or inconsistent; names the file."""


class DenseSource:
  """The samples of one dense task under `root`, sorted by image name.

  Args:
    root: dataset folder with the layout in the module docstring.
    task: "seg", "depth" or "normal".
    on_missing: "raise" (an image lacks one of its files -> DataError listing
      the first few) or "skip" (drop such images; `num_skipped` counts them).
  """

  def __init__(self, root, task, on_missing="raise"):
    if task not in TASK_FILES:
      raise ValueError(f"task must be one of {sorted(TASK_FILES)}, got {task!r}")
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
    self.task = task
    self.elements = []
    missing = []
    for stem in sorted(images):
      element = {"name": stem, "image_path": images[stem]}
      for folder, extension, key in TASK_FILES[task]:
        element[key] = os.path.join(root, folder, stem + extension)
      absent = [element[key] for _, _, key in TASK_FILES[task]
                if not os.path.isfile(element[key])]
      if absent:
        missing.extend(absent)
      else:
        self.elements.append(element)
    self.num_skipped = len(images) - len(self.elements)
    if missing and on_missing == "raise":
      listed = ", ".join(repr(path) for path in missing[:_MAX_LISTED])
      more = " ..." if len(missing) > _MAX_LISTED else ""
      raise DataError(
          f"{len(missing)} {task} files missing under {root!r}: {listed}{more}"
          " (pass on_missing='skip' to drop those images)")
    if not self.elements:
      raise DataError(f"no complete {task} samples under {root!r}")

  def __len__(self):
    return len(self.elements)

  def __getitem__(self, index):
    return self.elements[index]

  def __repr__(self):
    return (f"DenseSource({self.root!r}, {self.task!r}, {len(self)} samples,"
            f" {self.num_skipped} skipped)")

  def load(self, element):
    """Reads one element's files -> (uint8 RGB image, targets dict), see `decode_sample`."""
    image_path = element["image_path"]
    with open(image_path, "rb") as f:
      data = f.read()
    files = {key: (element[key], element[key]) for _, _, key in TASK_FILES[self.task]}
    return decode_sample(self.task, data, image_path, files)


def decode_sample(task, image_data, image_name, files):
  """Encoded image + label files -> (uint8 RGB image, targets dict), checked.

  `files` maps each element key of TASK_FILES[task] (e.g. "label_path") to
  (path or file object, name for errors), so folders and record shards share
  one decoder. Targets: seg {"label": uint8 (H, W)}; depth {"mask": uint8
  0/1, "depth": float32}; normal {"mask", "normal": float32 (H, W, 3)}. Depth
  or normal pixels that are NaN/inf (or depth <= 0) are taken off the mask,
  so they train as background; a mask left with no person at all is an error.
  """
  try:
    image = decode_image(image_data, image_name)
  except ImageDecodeError as e:
    raise DataError(str(e)) from e
  size = image.shape[:2]
  if task == "seg":
    label_file, label_name = files["label_path"]
    label = _read_png(label_file, label_name, ("L", "P"))
    _check_size(label, label_name, size, image_name)
    return image, {"label": label}
  mask_file, mask_name = files["mask_path"]
  mask = _read_png(mask_file, mask_name, ("1", "L", "P", "RGB"))
  if mask.ndim == 3:
    mask = mask.max(axis=-1)
  _check_size(mask, mask_name, size, image_name)
  values_file, path = files[f"{task}_path"]
  values = _read_npy(values_file, path, size + ((3,) if task == "normal" else ()))
  _check_size(values, path, size, image_name)
  if task == "depth":
    with np.errstate(invalid="ignore"):
      valid = np.isfinite(values) & (values > 0)
  else:
    valid = np.isfinite(values).all(axis=-1)
  mask = ((mask > 0) & valid).astype(np.uint8)
  if not mask.any():
    raise DataError(
        f"{path!r}: no valid foreground pixel (mask {mask_name!r} is empty"
        f" or every {task} value under it is NaN/inf"
        f"{' or <= 0' if task == 'depth' else ''})")
  return image, {"mask": mask, task: values}


def _read_png(file, path, modes):
  """A PNG's pixel values (palette indices for P), refusing other modes; `path` names `file`."""
  try:
    with Image.open(file) as png:
      width, height = png.size
      if width * height > MAX_IMAGE_PIXELS:
        raise DataError(
            f"{path!r}: {width}x{height} pixels exceeds MAX_IMAGE_PIXELS")
      if png.mode not in modes:
        raise DataError(
            f"{path!r}: expected a single-channel 8-bit PNG (mode one of"
            f" {modes}), got mode {png.mode!r}")
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
    expected = "(H, W, 3)" if len(shape) == 3 else "(H, W)"
    raise DataError(f"{path!r}: expected shape {expected}, got {values.shape}")
  return values.astype(np.float32)


def _check_size(array, path, size, image_path):
  if array.shape[:2] != size:
    raise DataError(
        f"{path!r} is {array.shape[1]}x{array.shape[0]} (WxH) but its image"
        f" {image_path!r} is {size[1]}x{size[0]}")
