"""Augmentations and training targets for the dense tasks (seg, depth, normal).

One set of geometric functions serves all three tasks: each takes the uint8
RGB image and `targets`, a dict of per-pixel arrays with the image's height
and width, and returns both transformed the same way. Target names fix how a
target is treated:
  "label":  uint8/int (H, W) class ids (255 = ignored);
  "mask":   (H, W), > 0 on the person;
  "depth":  float (H, W), NaN where unknown;
  "normal": float (H, W, 3) (x, y, z), NaN where unknown.
The image is resampled bilinearly, targets nearest-neighbour (averaging labels
or depths across a boundary would invent values that are not there).

The reference's Random{Depth,Normal}ResizeCompensate steps have no equivalent
here: rescaling the image does not change the depth values, and even if one
scaled them to match, the depth target is min-max normalised per image, so a
global factor on depth cancels out; normals do not change under uniform scale.

Everything random takes an explicit `np.random.Generator`.
"""
import math

import cv2
import numpy as np

from sapiens_jax.data.photometric import photometric_distortion

TARGET_NAMES = ("label", "mask", "depth", "normal")
IGNORE_INDEX = 255
REFERENCE_RATIO_RANGE = (0.2, 2.0)  # random resize of all three recipes, for 1024x768 crops
# Background of the targets (the reference's values): depth -1 (the person's depth is in [0, 1]),
# normals -1000 in all three channels, recognised by x <= -100.
DEPTH_BACKGROUND = -1.0
NORMAL_BACKGROUND = -1000.0
NORMAL_VALID_ABOVE = -100.0

# What rotation fills in outside the original image: labels get class 0
# (background; the reference's seg_pad_val=0), masks 0, and depth and normals
# NaN, which `depth_target` / `normal_target` turn into background.
_ROTATE_FILL = {"label": 0, "mask": 0, "depth": np.nan, "normal": np.nan}


def check_targets(image, targets, required):
  """Raises ValueError unless `targets` holds `required`, sized like `image`."""
  missing = [name for name in required if name not in targets]
  unknown = [name for name in targets if name not in TARGET_NAMES]
  if missing or unknown:
    raise ValueError(
        f"targets must hold {list(required)} (known names: {TARGET_NAMES});"
        f" missing {missing}, unknown {unknown}")
  for name, array in targets.items():
    if array.shape[:2] != image.shape[:2]:
      raise ValueError(
          f"target {name!r} is {array.shape[:2]} (H, W) but the image is"
          f" {image.shape[:2]}")


def _resize(array, size, interpolation):
  height, width = size
  return cv2.resize(array, (width, height), interpolation=interpolation)


def resize_to(image, targets, size):
  """Stretches image and targets to `size` (H, W), aspect not kept."""
  image = _resize(image, size, cv2.INTER_LINEAR)
  targets = {name: _resize(array, size, cv2.INTER_NEAREST)
             for name, array in targets.items()}
  return image, targets


def fit_size(height, width, scale):
  """(H, W) scaled to fit within `scale` with the aspect kept.

  `scale` is (edge, edge) in either order: the long side is bounded by the
  larger number and the short side by the smaller, as in mmcv's rescale.
  """
  factor = min(max(scale) / max(height, width),
               min(scale) / min(height, width))
  return (max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5)))


def random_resize(image, targets, rng, scale=(768, 1024),
                  ratio_range=REFERENCE_RATIO_RANGE):
  """Resizes to fit `scale` times a ratio drawn from U(ratio_range)."""
  ratio = rng.uniform(*ratio_range)
  target_scale = (int(scale[0] * ratio), int(scale[1] * ratio))
  size = fit_size(image.shape[0], image.shape[1], target_scale)
  return resize_to(image, targets, size)


def crop_box(height, width, crop_size, rng):
  """Random (top, left, bottom, right), at most `crop_size` big."""
  top = int(rng.integers(0, max(height - crop_size[0], 0) + 1))
  left = int(rng.integers(0, max(width - crop_size[1], 0) + 1))
  return top, left, top + crop_size[0], left + crop_size[1]


def _one_class_dominates(label, max_ratio, ignore_index):
  classes, counts = np.unique(label, return_counts=True)
  counts = counts[classes != ignore_index]
  return len(counts) <= 1 or counts.max() / counts.sum() >= max_ratio


def random_crop(image, targets, rng, crop_size=(1024, 768), cat_max_ratio=1.0,
                ignore_index=IGNORE_INDEX):
  """Crops a random `crop_size` (H, W) window (mmseg RandomCrop).

  With `cat_max_ratio` < 1 and a "label" target, the window is redrawn up to
  10 times while a single class (ignoring `ignore_index`) covers
  `cat_max_ratio` or more of it, or only one class is present; the last draw
  is kept whatever it holds. A side shorter than the crop is kept whole, not
  padded: the reference stretches every crop to the network size right after,
  so small images end up upsampled, not padded.
  """
  height, width = image.shape[:2]
  box = crop_box(height, width, crop_size, rng)
  if cat_max_ratio < 1 and "label" in targets:
    for _ in range(10):
      top, left, bottom, right = box
      window = targets["label"][top:bottom, left:right]
      if not _one_class_dominates(window, cat_max_ratio, ignore_index):
        break
      box = crop_box(height, width, crop_size, rng)
  top, left, bottom, right = box
  return (image[top:bottom, left:right],
          {name: array[top:bottom, left:right]
           for name, array in targets.items()})


def rotate(image, targets, angle):
  """Rotates by `angle` degrees (clockwise as displayed) about the centre.

  The centre is ((W - 1) / 2, (H - 1) / 2) and the output keeps the input
  size, so corners are cut off and the uncovered border is filled: image 0,
  targets as in `_ROTATE_FILL`.
  """
  height, width = image.shape[:2]
  center = ((width - 1) * 0.5, (height - 1) * 0.5)
  # OpenCV's positive angle is counter-clockwise on screen; ours is clockwise.
  matrix = cv2.getRotationMatrix2D(center, -angle, 1.0)

  def warp(array, interpolation, fill):
    channels = 1 if array.ndim == 2 else array.shape[2]
    return cv2.warpAffine(array, matrix, (width, height), flags=interpolation,
                          borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(fill,) * channels)

  image = warp(image, cv2.INTER_LINEAR, 0)
  targets = {name: warp(array, cv2.INTER_NEAREST, _ROTATE_FILL[name])
             for name, array in targets.items()}
  return image, targets


def random_rotate(image, targets, rng, prob=0.5, max_degrees=45):
  """`rotate` by U(-max_degrees, max_degrees) with probability `prob`."""
  if rng.uniform() < prob:
    return rotate(image, targets, rng.uniform(-max_degrees, max_degrees))
  return image, targets


def swap_labels(label, swap_pairs):
  """Exchanges the ids of each (left, right) pair, e.g. Left_Hand <-> Right_Hand."""
  swapped = label.copy()
  for left, right in swap_pairs:
    swapped[label == left] = right
    swapped[label == right] = left
  return swapped


def flip(image, targets, swap_pairs=()):
  """Mirrors left-right; a mirrored person's left parts become right parts.

  Labels swap ids by `swap_pairs`, and normals negate x (a surface facing the
  camera's right faces its left in the mirror).
  """
  flipped = {}
  for name, array in targets.items():
    array = np.ascontiguousarray(array[:, ::-1])
    if name == "label":
      array = swap_labels(array, swap_pairs)
    elif name == "normal":
      array[..., 0] = -array[..., 0]
    flipped[name] = array
  return np.ascontiguousarray(image[:, ::-1]), flipped


def random_flip(image, targets, rng, prob=0.5, swap_pairs=()):
  """`flip` with probability `prob`."""
  if rng.uniform() < prob:
    return flip(image, targets, swap_pairs)
  return image, targets


def composite_background(image, mask, backgrounds, rng, prob):
  """With probability `prob`, puts the person (mask > 0) on a random background.

  The background, one of `backgrounds` (uint8 RGB images without people), is
  scaled to cover the image with its aspect kept and randomly cropped to it.
  The reference's optional colour harmonisation (libcom) is not done.
  """
  if not backgrounds or rng.uniform() >= prob:
    return image
  background = backgrounds[int(rng.integers(len(backgrounds)))]
  height, width = image.shape[:2]
  factor = max(height / background.shape[0], width / background.shape[1])
  cover = (max(height, math.ceil(background.shape[0] * factor)),
           max(width, math.ceil(background.shape[1] * factor)))
  background = _resize(background, cover, cv2.INTER_LINEAR)
  top = int(rng.integers(0, cover[0] - height + 1))
  left = int(rng.integers(0, cover[1] - width + 1))
  background = background[top:top + height, left:left + width]
  return np.where(np.asarray(mask)[..., None] > 0, image, background)


def depth_foreground(target):
  """Where a depth target holds the person (numpy or jax arrays)."""
  return target >= 0


def normal_foreground(target):
  """Where a normal target (..., 3) holds a normal (numpy or jax arrays)."""
  return target[..., 0] > NORMAL_VALID_ABOVE


def depth_target(depth, mask):
  """Foreground depth min-max normalised to [0, 1]; background -1.

  Foreground is mask > 0 with a finite, positive depth. The target is
  relative, so the source's depth units do not matter. A flat foreground
  (max == min) carries no relative depth and becomes 0 (the reference would
  leave such raw values in place).
  """
  depth = np.asarray(depth, dtype=np.float32)
  with np.errstate(invalid="ignore"):
    valid = (np.asarray(mask) > 0) & np.isfinite(depth) & (depth > 0)
  target = np.full(depth.shape, DEPTH_BACKGROUND, dtype=np.float32)
  if valid.any():
    values = depth[valid]
    low, high = values.min(), values.max()
    target[valid] = (values - low) / (high - low) if high > low else 0.0
  return target


def normal_target(normals, mask, background=NORMAL_BACKGROUND):
  """Foreground normals rescaled to unit length; `background` elsewhere.

  Pixels with mask 0, a non-finite component or a zero vector are background
  in all three channels (the losses recognise them by x <= -100).
  """
  normals = np.asarray(normals, dtype=np.float32)
  with np.errstate(invalid="ignore"):
    length = np.linalg.norm(normals, axis=-1)
    valid = (np.asarray(mask) > 0) & np.isfinite(length) & (length > 1e-6)
  target = np.full(normals.shape, background, dtype=np.float32)
  target[valid] = normals[valid] / length[valid][:, None]
  return target


def _random_fit(image, targets, rng, size, ratio_range, cat_max_ratio=1.0):
  """The resize -> crop -> stretch front shared by the three recipes."""
  image, targets = random_resize(image, targets, rng, scale=size, ratio_range=ratio_range)
  image, targets = random_crop(image, targets, rng, size, cat_max_ratio)
  return resize_to(image, targets, size)


def masked_targets(image, targets, name):
  """Just the mask (as uint8 0/1, which OpenCV can warp) and target `name`."""
  check_targets(image, targets, ("mask", name))
  return {"mask": (np.asarray(targets["mask"]) > 0).astype(np.uint8),
          name: targets[name]}


def seg_train_sample(image, targets, rng, *, swap_pairs, size=(1024, 768),
                     background_images=None, ratio_range=REFERENCE_RATIO_RANGE):
  """Body-part segmentation training sample (reference recipe, 5.3).

  `swap_pairs` is required: a flip without the left/right swap silently
  teaches the model to confuse the sides.
  """
  check_targets(image, targets, ("label",))
  label = targets["label"]
  image = composite_background(image, label != 0, background_images, rng, 0.8)
  image, targets = _random_fit(image, {"label": label}, rng, size,
                               ratio_range, cat_max_ratio=0.75)
  image, targets = random_rotate(image, targets, rng, 0.5, max_degrees=45)
  image, targets = random_flip(image, targets, rng, 0.5, swap_pairs)
  image = photometric_distortion(image, rng)
  return {"image": image, "label": targets["label"].astype(np.int32)}


def _masked_train_sample(image, targets, rng, name, size, background_images,
                         ratio_range, max_degrees):
  """The depth and normal recipes: they differ only in rotation and target."""
  targets = masked_targets(image, targets, name)
  image = composite_background(image, targets["mask"], background_images, rng,
                               0.5)
  image, targets = _random_fit(image, targets, rng, size, ratio_range)
  if max_degrees:
    image, targets = random_rotate(image, targets, rng, 0.5, max_degrees)
  image, targets = random_flip(image, targets, rng, 0.5)
  make_target = depth_target if name == "depth" else normal_target
  target = make_target(targets[name], targets["mask"])
  return {"image": photometric_distortion(image, rng), name: target}


def depth_train_sample(image, targets, rng, *, size=(1024, 768),
                       background_images=None, ratio_range=REFERENCE_RATIO_RANGE):
  """Relative-depth training sample (reference recipe, 6)."""
  return _masked_train_sample(image, targets, rng, "depth", size,
                              background_images, ratio_range, max_degrees=60)


def normal_train_sample(image, targets, rng, *, size=(1024, 768),
                        background_images=None, ratio_range=REFERENCE_RATIO_RANGE):
  """Surface-normal training sample (reference recipe, 7; no rotation)."""
  return _masked_train_sample(image, targets, rng, "normal", size,
                              background_images, ratio_range, max_degrees=0)


def seg_eval_sample(image, targets, *, size=(1024, 768)):
  """Image and labels stretched to `size`, so eval batches stack."""
  check_targets(image, targets, ("label",))
  image, targets = resize_to(image, {"label": targets["label"]}, size)
  return {"image": image, "label": targets["label"].astype(np.int32)}


def depth_eval_sample(image, targets, *, size=(1024, 768)):
  """Image and depth target stretched to `size`."""
  image, targets = resize_to(
      image, masked_targets(image, targets, "depth"), size)
  return {"image": image,
          "depth": depth_target(targets["depth"], targets["mask"])}


def normal_eval_sample(image, targets, *, size=(1024, 768)):
  """Image and normal target stretched to `size`."""
  image, targets = resize_to(
      image, masked_targets(image, targets, "normal"), size)
  return {"image": image,
          "normal": normal_target(targets["normal"], targets["mask"])}
