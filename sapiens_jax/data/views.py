"""DINO-style multi-view augmentations (two global views, N local crops), as plain numpy/cv2 functions.

Same conventions as transforms.py: uint8 (H, W, 3) RGB in and out, and every random draw from an
explicit `np.random.Generator`, so a view is a function of the element's seed and a resumed run
reproduces it. The recipe is DINOv2's (dinov2/data/augmentations.py, DataAugmentationDINO; crop
scales from dinov2/configs/ssl_default_config.yaml).
"""
import cv2
import numpy as np

from sapiens_jax.data import transforms

# Area fractions of RandomResizedCrop (ssl_default_config.yaml: crops.global_crops_scale and
# crops.local_crops_scale) and its aspect range (torchvision's default, which DINOv2 keeps).
GLOBAL_SCALE = (0.32, 1.0)
LOCAL_SCALE = (0.05, 0.32)
CROP_RATIO = (3 / 4, 4 / 3)
FLIP_PROB = 0.5

# augmentations.py: RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8), RandomGrayscale(p=0.2).
JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
JITTER_PROB = 0.8
GRAYSCALE_PROB = 0.2

# transforms.py: GaussianBlur(kernel_size=9, sigma=(radius_min=0.1, radius_max=2.0)).
BLUR_KERNEL_SIZE = 9
BLUR_SIGMA = (0.1, 2.0)

# Blur probabilities as augmentations.py writes them: GaussianBlur(p=1.0) on global view 1,
# GaussianBlur(p=0.1) + RandomSolarize(128, p=0.2) on global view 2, GaussianBlur(p=0.5) on locals.
# DINOv2's GaussianBlur hands 1 - p to RandomApply, so as executed the blur probabilities are
# 0.0 / 0.9 / 0.5 (a known bug, dinov2 PR #411). We follow the written intent, which is also what
# DINO v1 executes (its blur applies with the probability it is given).
GLOBAL_BLUR_PROBS = (1.0, 0.1)  # indexed by `which` in global_view
GLOBAL_SOLARIZE_PROBS = (0.0, 0.2)
LOCAL_BLUR_PROB = 0.5
SOLARIZE_THRESHOLD = 128

# ITU-R 601-2 luma, what PIL's convert("L") and torchvision's rgb_to_grayscale use.
LUMA = (0.299, 0.587, 0.114)


def _luma(pixels):
  """float (H, W, 3) -> float (H, W)."""
  return pixels @ np.asarray(LUMA, dtype=pixels.dtype)


def _blend(pixels, other, factor):
  """factor * pixels + (1 - factor) * other, clipped to 0..255: torchvision's `_blend`."""
  return np.clip(factor * pixels + (1 - factor) * other, 0, 255)


def _brightness(pixels, factor):
  return _blend(pixels, 0.0, factor)


def _contrast(pixels, factor):
  """Blends towards the mean grey level of the whole image."""
  return _blend(pixels, _luma(pixels).mean(), factor)


def _saturation(pixels, factor):
  """Blends towards each pixel's own grey level."""
  return _blend(pixels, _luma(pixels)[..., None], factor)


def _hue(pixels, shift):
  """Rotates hue by `shift` of a full turn; cv2's float HSV has H in degrees [0, 360)."""
  hsv = cv2.cvtColor(pixels / np.float32(255), cv2.COLOR_RGB2HSV)
  hsv[..., 0] = np.mod(hsv[..., 0] + np.float32(360 * shift), 360)
  return np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * np.float32(255), 0, 255)


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)
_IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)


def _apply_jitter(image, order, factors):
  """The deterministic half of `color_jitter`: ops `order` (0 brightness, 1 contrast, 2 saturation,
  3 hue) with `factors` (b, c, s, hue shift); identity factors are skipped, as torchvision does."""
  pixels = image.astype(np.float32)
  for op in order:
    if factors[op] != _IDENTITY_FACTORS[op]:
      pixels = _JITTER_OPS[op](pixels, np.float32(factors[op]))
  return np.rint(pixels).astype(np.uint8)


def _factor(rng, strength):
  """U(max(0, 1 - strength), 1 + strength), or no draw at all for strength 0 (torchvision's None)."""
  return rng.uniform(max(0.0, 1 - strength), 1 + strength) if strength else 1.0


def color_jitter(image, rng, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
  """torchvision's ColorJitter: brightness, contrast, saturation and hue in a random order.

  Draws in torchvision's order: the permutation, then the b, c, s factors and the hue shift
  (U(-hue, hue), a fraction of a turn). Pixels stay float32 through all four ops, clipped to
  0..255 after each and rounded to uint8 once at the end; torchvision's uint8 tensors truncate
  after each op and DINOv2's PIL images round after each, so results differ by a grey level or so.
  """
  order = rng.permutation(4)
  factors = (_factor(rng, brightness), _factor(rng, contrast), _factor(rng, saturation),
             rng.uniform(-hue, hue) if hue else 0.0)
  return _apply_jitter(image, order, factors)


def grayscale(image):
  """Luma (LUMA) rounded to uint8 and repeated into 3 channels, as RandomGrayscale outputs RGB."""
  grey = np.rint(_luma(image.astype(np.float32)))
  return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)


def gaussian_blur(image, rng, sigma=BLUR_SIGMA, kernel_size=BLUR_KERNEL_SIZE):
  """A kernel_size² Gaussian with sigma ~ U(sigma), via cv2 (separable).

  Borders reflect without repeating the edge pixel (cv2's REFLECT_101, torch's "reflect"), as
  torchvision's gaussian_blur pads. cv2 rounds between its two passes on uint8, so a pixel can be a
  grey level off an exact float blur. At sigma 0.1 the off-centre taps are ~e^-50, so blurs drawn near
  the bottom of the range leave uint8 pixels (nearly) unchanged, in DINOv2 too.
  """
  s = rng.uniform(*sigma)
  return cv2.GaussianBlur(np.ascontiguousarray(image), (kernel_size, kernel_size), sigmaX=s,
                          sigmaY=s, borderType=cv2.BORDER_REFLECT_101)


def solarize(image, threshold=SOLARIZE_THRESHOLD):
  """Inverts the pixels at or above `threshold` (torchvision's and PIL's solarize)."""
  return np.where(image >= threshold, 255 - image, image).astype(np.uint8)


def dino_photometric(image, rng, blur_prob, solarize_prob, jitter_prob=JITTER_PROB,
                     grayscale_prob=GRAYSCALE_PROB, blur_sigma=BLUR_SIGMA):
  """DINO's colour pipeline in its order: jitter, grayscale, blur, solarize, each by a coin flip.

  The keyword probabilities default to DINOv2's; they exist so each step can be tested alone.
  """
  if rng.uniform() < jitter_prob:
    image = color_jitter(image, rng, *JITTER)
  if rng.uniform() < grayscale_prob:
    image = grayscale(image)
  if rng.uniform() < blur_prob:
    image = gaussian_blur(image, rng, blur_sigma)
  if rng.uniform() < solarize_prob:
    image = solarize(image)
  return np.ascontiguousarray(image)


def _crop_and_flip(image, rng, size, scale, resize):
  image = transforms.random_resized_crop(image, rng, size, scale, CROP_RATIO, backend=resize)
  return transforms.random_flip(image, rng, FLIP_PROB)


def global_view(image, rng, size, which, scale=GLOBAL_SCALE, resize="pil"):
  """One of the two global views: crop, flip, then view `which`'s (0 or 1) blur and solarize odds."""
  if which not in (0, 1):
    raise ValueError(f"global view {which!r}: expected 0 or 1")
  image = _crop_and_flip(image, rng, size, scale, resize)
  return dino_photometric(image, rng, GLOBAL_BLUR_PROBS[which], GLOBAL_SOLARIZE_PROBS[which])


def local_view(image, rng, size, scale=LOCAL_SCALE, resize="pil"):
  """A small local crop: crop, flip, colour, blur with LOCAL_BLUR_PROB, never solarized."""
  image = _crop_and_flip(image, rng, size, scale, resize)
  return dino_photometric(image, rng, LOCAL_BLUR_PROB, 0.0)
