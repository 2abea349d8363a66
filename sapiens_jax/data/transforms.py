"""Image decoding and MAE pretraining augmentations, as plain numpy/PIL functions.

Everything random takes an explicit `np.random.Generator`, so the pipeline can
hand each element its own generator and a resumed run reproduces every sample.
"""
import io
import math

import cv2
import numpy as np
from PIL import Image
from PIL import ImageOps

# ImageNet statistics on the 0..255 scale, as used by the Sapiens reference.
MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)

# Refuse images above this many pixels before decoding them, so a hostile or
# broken header cannot make a worker allocate gigabytes. 8192^2 stays below
# Pillow's own warning threshold (~89M pixels), so ours is the limit that bites.
MAX_IMAGE_PIXELS = 8192 * 8192

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_EXIF_ORIENTATION = 0x0112

RESIZE_BACKENDS = ("pil", "cv2")  # see `resize`


class ImageDecodeError(ValueError):
  """An image file could not be turned into pixels; the message names the file."""


def decode_image(data, name):
  """Encoded bytes -> uint8 (H, W, 3) RGB, upright according to its EXIF tag.

  Any failure (empty, truncated, not an image, too large) raises
  `ImageDecodeError` naming `name`, so a bad file in a dataset of millions can
  be found (or skipped) instead of surfacing as an anonymous Pillow error.
  """
  if not data:
    raise ImageDecodeError(f"cannot decode image {name!r}: file is empty")
  try:
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
      raise ImageDecodeError(
          f"cannot decode image {name!r}: {width}x{height} pixels exceeds the"
          f" decompression-bomb limit of {MAX_IMAGE_PIXELS} pixels"
          " (MAX_IMAGE_PIXELS in sapiens_jax/data/transforms.py)")
    image.load()  # Decodes everything now, so a truncated file fails here.
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
      # Only for rotated photos: exif_transpose copies even upright ones (half the decode time).
      image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
      # Pillow's own conversion clips 16-bit values at 255; keep the top byte.
      pixels = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
      image = Image.fromarray(pixels)
    if image.mode != "RGB":
      image = image.convert("RGB")
    pixels = np.asarray(image, dtype=np.uint8)
  except ImageDecodeError:
    raise
  except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ...).
    raise ImageDecodeError(
        f"cannot decode image {name!r}: {type(e).__name__}: {e}") from e
  if pixels.ndim != 3 or pixels.shape[2] != 3 or 0 in pixels.shape:
    raise ImageDecodeError(
        f"cannot decode image {name!r}: unexpected pixel array shape"
        f" {pixels.shape}")
  return pixels


def sample_crop_box(height, width, rng, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
  """Draws a RandomResizedCrop box (top, left, h, w), torchvision's algorithm.

  Up to 10 tries at an area fraction in `scale` and a log-uniform aspect
  (w/h) in `ratio`; if none fits, a centre crop with the aspect clamped to
  `ratio`. Split out of `random_resized_crop` so the box can be tested alone.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    crop_w = int(round(math.sqrt(target_area * aspect)))
    crop_h = int(round(math.sqrt(target_area / aspect)))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      top = int(rng.integers(0, height - crop_h + 1))
      left = int(rng.integers(0, width - crop_w + 1))
      return top, left, crop_h, crop_w
  image_ratio = width / height
  if image_ratio < min(ratio):
    crop_w = width
    crop_h = int(round(crop_w / min(ratio)))
  elif image_ratio > max(ratio):
    crop_h = height
    crop_w = int(round(crop_h * max(ratio)))
  else:
    crop_h, crop_w = height, width
  return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def random_resized_crop(image, rng, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                        backend="pil"):
  """Crops a random box (see `sample_crop_box`) and resizes it to `size` (H, W); see `resize`."""
  top, left, crop_h, crop_w = sample_crop_box(
      image.shape[0], image.shape[1], rng, scale, ratio)
  return resize(image[top:top + crop_h, left:left + crop_w], size, backend)


def resize(image, size, backend="pil"):
  """Bicubic resize of uint8 (h, w, 3) to `size` (H, W), with a backend of RESIZE_BACKENDS.

  "pil": Pillow's bicubic (a = -0.5, antialiased when shrinking), as the reference does it.
  "cv2": OpenCV's bicubic (a = -0.75) when enlarging in either direction, area averaging when
  shrinking in both. On the crops MAE draws from photo-sized images the two differ by ~0.2 grey
  levels on average (a few at sharp edges); cv2 takes ~2 ms where Pillow takes ~24 ms at 1024².
  """
  out_h, out_w = size
  if backend == "pil":
    resized = Image.fromarray(image).resize((out_w, out_h), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)
  if backend == "cv2":
    shrinking = out_h <= image.shape[0] and out_w <= image.shape[1]
    return cv2.resize(image, (out_w, out_h),
                      interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
  raise ValueError(f"unknown resize backend {backend!r}; expected one of"
                   f" {', '.join(RESIZE_BACKENDS)}")


def stretch(image, size):
  """A whole photo stretched (aspect not kept) to `size` (H, W), bilinear: the network input of
  the reference's dense-task and feature demos."""
  height, width = size
  return cv2.resize(image, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)


def random_flip(image, rng, prob=0.5):
  """Mirrors left-right with probability `prob`."""
  if rng.uniform() < prob:
    return image[:, ::-1]
  return image


def normalize(image):
  """uint8 RGB -> float32 with per-channel (x - MEAN_RGB) / STD_RGB.

  Pipelines ship uint8 (a quarter of the bytes) and the jitted steps call this on the device: a
  jax array (or tracer) in gives a jax array out. The division is a multiplication by the float32
  reciprocal, which is what XLA turns a division by a constant into, so host and device results
  are bit-identical.
  """
  mean = np.asarray(MEAN_RGB, dtype=np.float32)
  inverse_std = np.float32(1) / np.asarray(STD_RGB, dtype=np.float32)
  if not hasattr(image, "astype"):  # lists, scalars
    image = np.asarray(image)
  return (image.astype(np.float32) - mean) * inverse_std


def denormalize(x):
  """Inverse of `normalize`, rounded and clipped to uint8 for display."""
  mean = np.asarray(MEAN_RGB, dtype=np.float32)
  std = np.asarray(STD_RGB, dtype=np.float32)
  pixels = np.asarray(x, dtype=np.float32) * std + mean
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)
