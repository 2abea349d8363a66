"""Photometric distortion (mmseg `PhotoMetricDistortion` semantics) in numpy/cv2.

Shared by the pose and dense pipelines. Each step rounds back to uint8 (by
truncation, like the reference) before the next one, so the result is the
same as chaining four separate uint8 -> uint8 transforms.
"""
import cv2
import numpy as np


def _scale_and_shift(pixels, alpha=1.0, beta=0.0):
  """alpha * x + beta, clipped to 0..255 and truncated to uint8."""
  values = pixels.astype(np.float32) * alpha + beta
  return np.clip(values, 0, 255).astype(np.uint8)


def photometric_distortion(image, rng, brightness_delta=32,
                           contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta=18):
  """Random brightness, contrast, saturation and hue of a uint8 RGB image.

  Every step happens with probability 0.5. Contrast comes either first or
  last (a coin decides), so it sometimes sees the saturation/hue changes and
  sometimes not. Saturation and hue act in OpenCV's uint8 HSV space, where hue
  runs 0..179 (degrees / 2) and wraps around.

  Args:
    image: uint8 (H, W, 3) RGB.
    rng: np.random.Generator.
    brightness_delta: brightness offset drawn from U(-delta, delta).
    contrast_range: contrast factor drawn from U(low, high).
    saturation_range: saturation factor drawn from U(low, high).
    hue_delta: hue offset, an integer in [-delta, delta).

  Returns:
    uint8 (H, W, 3) RGB.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(
        "photometric_distortion expects a uint8 (H, W, 3) RGB image, got"
        f" {image.dtype} {image.shape}")

  def contrast(pixels):
    if rng.integers(2):
      return _scale_and_shift(pixels, alpha=rng.uniform(*contrast_range))
    return pixels

  if rng.integers(2):
    image = _scale_and_shift(
        image, beta=rng.uniform(-brightness_delta, brightness_delta))
  contrast_first = rng.integers(2) == 1
  if contrast_first:
    image = contrast(image)
  if rng.integers(2):
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = _scale_and_shift(
        hsv[..., 1], alpha=rng.uniform(*saturation_range))
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if rng.integers(2):
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    shift = int(rng.integers(-hue_delta, hue_delta))
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + shift) % 180
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if not contrast_first:
    image = contrast(image)
  return image
