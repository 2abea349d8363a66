"""Sapiens2's training augmentations of body-part segmentation and surface normals (sapiens2.md §3.1, §3.2).

The same call as the v1 recipes in dense_transforms (which `tasks.dense.train_example` makes), built from
their geometric helpers, so targets are treated as there: labels and normals resampled nearest, rotation
filling labels with class 0, a flip swapping left/right labels or negating the normals' x, 255 kept as
ignored, and the normal target made last by `normal_target` (unit length on the person, -1000 elsewhere).

Each step happens with its own probability, drawn from the explicit `np.random.Generator` in the order the
facts list the steps, so a seed fixes the sample. Where the facts give a step but not its parameters, the
constants below say which values are ours.
"""
import math

import cv2
import numpy as np

from sapiens_jax.data import dense_transforms
from sapiens_jax.data import transforms
from sapiens_jax.data import views
from sapiens_jax.data.photometric import photometric_distortion
from sapiens_jax.data.sapiens2_transforms import INPUT_SIZE

# §3.1, body-part segmentation.
SEG_BACKGROUND_PROB = 0.8
SEG_RATIO_RANGE = (0.4, 2.0)
SEG_CROP_PROB = 0.3
SEG_CAT_MAX_RATIO = 0.75
SEG_ROTATE_PROB = 0.5
SEG_MAX_DEGREES = 60
SEG_FLIP_PROB = 0.5

# §3.2, surface normals.
DOWN_UP_PROB = 0.2
DOWN_UP_FACTOR_RANGE = (0.1, 0.7)
NORMAL_SCALE_PROB = 0.3
NORMAL_RATIO_RANGE = (0.5, 2.0)
NORMAL_CROP_PROB = 0.3
CROP_AREA_RANGE = (0.4, 1.0)
CROP_ASPECT_RANGE = (0.5, 2.0)  # width / height of the crop box
NORMAL_FLIP_PROB = 0.3
SOLARIZE_PROB = 0.3

# Both (§3.1 and §3.2 give the same odds).
BLUR_PROB = 0.3
NOISE_PROB = 0.3

# Our choices; sapiens2.md gives no parameters for these steps.
# Blur: torchvision-style GaussianBlur(kernel 9, sigma ~ U(0.1, 2)), the values views.py uses for DINO.
BLUR_KERNEL_SIZE = 9
BLUR_SIGMA_RANGE = (0.1, 2.0)
# Noise: albumentations 1.x GaussNoise's default, variance ~ U(10, 50) grey levels^2 (std ~3-7), per channel.
NOISE_VARIANCE_RANGE = (10.0, 50.0)
# Solarize: 128, the threshold of albumentations' Solarize default and of DINO's RandomSolarize.
SOLARIZE_THRESHOLD = 128
# Down-up sampling: area averaging down (what a lower-resolution sensor records), bilinear back up (how the
# image is resampled everywhere else here).
DOWNSAMPLE_INTERPOLATION = cv2.INTER_AREA
UPSAMPLE_INTERPOLATION = cv2.INTER_LINEAR


def ratio_range_within(recipe_range, scale_range):
  """The recipe's resize ratios narrowed to data.scale_range (`scale_range`).

  data.scale_range is the v1 recipes' resize range; Sapiens2's read it as a bound. Its default, v1's
  (0.2, 2), holds both Sapiens2 ranges whole, so a Sapiens2 run draws its own; a config that narrows it for
  small images (configs/synthetic.py's (0.8, 1.25) at 128x96) narrows Sapiens2's too; a wider one does not
  widen them.
  """
  low, high = max(recipe_range[0], scale_range[0]), min(recipe_range[1], scale_range[1])
  if low > high:
    raise ValueError(f"data.scale_range {tuple(scale_range)} leaves none of the Sapiens2 recipe's resize"
                     f" ratios {recipe_range}")
  return low, high


def gaussian_noise(image, rng):
  """Zero-mean Gaussian noise on every pixel and channel (sensor noise), rounded back to uint8."""
  std = math.sqrt(rng.uniform(*NOISE_VARIANCE_RANGE))
  noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(std)
  return np.clip(np.rint(image.astype(np.float32) + noise), 0, 255).astype(np.uint8)


def down_up_sample(image, factor):
  """The image shrunk by `factor` and enlarged back: the detail a low-resolution photo lacks."""
  height, width = image.shape[:2]
  small = (max(1, round(width * factor)), max(1, round(height * factor)))
  image = cv2.resize(image, small, interpolation=DOWNSAMPLE_INTERPOLATION)
  return cv2.resize(image, (width, height), interpolation=UPSAMPLE_INTERPOLATION)


def continuous_crop(image, targets, rng):
  """A box of a random area fraction and aspect (torchvision's RandomResizedCrop draw), image and targets."""
  top, left, height, width = transforms.sample_crop_box(*image.shape[:2], rng, CROP_AREA_RANGE,
                                                        CROP_ASPECT_RANGE)
  window = (slice(top, top + height), slice(left, left + width))
  return image[window], {name: array[window] for name, array in targets.items()}


def _blur_and_noise(image, rng):
  """§3.1's and §3.2's GaussianBlur then GaussianNoise, each by its own coin."""
  if rng.uniform() < BLUR_PROB:
    image = views.gaussian_blur(image, rng, BLUR_SIGMA_RANGE, BLUR_KERNEL_SIZE)
  if rng.uniform() < NOISE_PROB:
    image = gaussian_noise(image, rng)
  return image


def seg_train_sample(image, targets, rng, *, swap_pairs, size=INPUT_SIZE, background_images=None,
                     ratio_range=SEG_RATIO_RANGE):
  """Body-part segmentation training sample, Sapiens2's steps in §3.1's order, each at its SEG_* odds.

  Background photo behind the person (label != 0, so ignored pixels count as person, as in v1; skipped
  without `background_images`), resize to fit `size` x U(SEG_RATIO_RANGE narrowed to `ratio_range`, see
  `ratio_range_within`), a `size` crop redrawn while one class covers 75% of it (mmseg's, up to 10 draws),
  blur, noise, rotation, flip with the left/right label swap, photometric distortion, stretch to `size`.
  `swap_pairs` is required, as in v1.
  """
  dense_transforms.check_targets(image, targets, ("label",))
  ratio_range = ratio_range_within(SEG_RATIO_RANGE, ratio_range)
  label = targets["label"]
  image = dense_transforms.composite_background(image, label != 0, background_images, rng, SEG_BACKGROUND_PROB)
  image, targets = dense_transforms.random_resize(image, {"label": label}, rng, scale=size,
                                                  ratio_range=ratio_range)
  if rng.uniform() < SEG_CROP_PROB:
    image, targets = dense_transforms.random_crop(image, targets, rng, size, SEG_CAT_MAX_RATIO)
  image = _blur_and_noise(image, rng)
  image, targets = dense_transforms.random_rotate(image, targets, rng, SEG_ROTATE_PROB, SEG_MAX_DEGREES)
  image, targets = dense_transforms.random_flip(image, targets, rng, SEG_FLIP_PROB, swap_pairs)
  image = photometric_distortion(image, rng)
  image, targets = dense_transforms.resize_to(image, targets, size)
  return {"image": image, "label": targets["label"].astype(np.int32)}


def normal_train_sample(image, targets, rng, *, size=INPUT_SIZE, background_images=None,
                        ratio_range=NORMAL_RATIO_RANGE):
  """Surface-normal training sample, Sapiens2's steps in §3.2's order, each at its odds above.

  Photometric distortion, down-up sampling of the image, resize to fit `size` x U(NORMAL_RATIO_RANGE
  narrowed to `ratio_range`, see `ratio_range_within`), continuous crop, then (our choice: §3.2 does not
  place it) the stretch to `size`, so blur and noise act on the network's pixels whatever the photo's
  resolution; flip (normals' x negated), blur, noise, solarize. §3.2 lists no background photo, so
  `background_images` goes unused.
  """
  del background_images
  targets = dense_transforms.masked_targets(image, targets, "normal")
  ratio_range = ratio_range_within(NORMAL_RATIO_RANGE, ratio_range)
  image = photometric_distortion(image, rng)
  if rng.uniform() < DOWN_UP_PROB:
    image = down_up_sample(image, rng.uniform(*DOWN_UP_FACTOR_RANGE))
  if rng.uniform() < NORMAL_SCALE_PROB:
    image, targets = dense_transforms.random_resize(image, targets, rng, scale=size, ratio_range=ratio_range)
  if rng.uniform() < NORMAL_CROP_PROB:
    image, targets = continuous_crop(image, targets, rng)
  image, targets = dense_transforms.resize_to(image, targets, size)
  image, targets = dense_transforms.random_flip(image, targets, rng, NORMAL_FLIP_PROB)
  image = _blur_and_noise(image, rng)
  if rng.uniform() < SOLARIZE_PROB:
    image = views.solarize(image, SOLARIZE_THRESHOLD)
  return {"image": image, "normal": dense_transforms.normal_target(targets["normal"], targets["mask"])}
