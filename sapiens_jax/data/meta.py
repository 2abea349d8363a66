"""Dataset metadata (keypoint sets, body-part classes) shipped as JSON files.

The facts (names, flip pairs, OKS sigmas, skeletons, palettes, class weights)
live in sapiens_jax/data/meta/*.json, each with a "source" field naming the
upstream file it was transcribed from. This module only loads and checks them,
so a corrupted or hand-edited file fails at load time, naming the file, rather
than as a silently wrong flip or metric.
"""
import dataclasses
import functools
import json
import os

import numpy as np

META_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "meta")
SKELETONS = ("coco17", "coco_wholebody133", "goliath308")
SEG_CLASS_SETS = ("seg28", "seg20", "seg29")


class MetadataError(ValueError):
  """A metadata JSON file is missing, malformed or inconsistent."""


@dataclasses.dataclass(frozen=True, eq=False)
class Skeleton:
  """A keypoint set. Index k everywhere is the k-th heatmap channel.

  flip_indices[k] is the keypoint that k becomes under a horizontal flip
  (k itself for midline points). upper/lower_body_ids are the keypoints whose
  upstream `type` is 'upper'/'lower' (what a half-body crop chooses from);
  face points and, except for Goliath's hands, hand points have no type.
  """
  name: str
  names: tuple[str, ...]
  flip_indices: np.ndarray  # int32 (K,)
  sigmas: np.ndarray  # float32 (K,), OKS per-keypoint sigmas
  links: tuple[tuple[int, int], ...]
  keypoint_colors: np.ndarray  # uint8 (K, 3) RGB
  link_colors: np.ndarray  # uint8 (len(links), 3) RGB
  upper_body_ids: tuple[int, ...]
  lower_body_ids: tuple[int, ...]
  # The parts a whole-body evaluation also scores on their own (body, foot, face, left_hand,
  # right_hand): ((name, keypoint ids), ...); none for COCO-17, which is the body alone.
  subsets: tuple[tuple[str, tuple[int, ...]], ...] = ()

  @property
  def num_keypoints(self):
    return len(self.names)


@dataclasses.dataclass(frozen=True, eq=False)
class SegClasses:
  """A body-part label set; label c is channel c of the logits."""
  name: str
  names: tuple[str, ...]
  palette: np.ndarray  # uint8 (C, 3) RGB
  swap_pairs: tuple[tuple[int, int], ...]  # labels exchanged by a horizontal flip
  class_weight: np.ndarray  # float32 (C,), weighted cross-entropy

  @property
  def num_classes(self):
    return len(self.names)


def _load_json(name, choices):
  if name not in choices:
    raise MetadataError(f"unknown metadata set {name!r}; expected one of {choices}")
  path = os.path.join(META_DIR, name + ".json")
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise MetadataError(f"cannot read metadata file {path}: {e}") from e
  if not isinstance(data, dict) or not data.get("source"):
    raise MetadataError(f"{path}: expected a JSON object with a 'source' field")
  return path, data


def _field(path, data, key):
  if key not in data:
    raise MetadataError(f"{path}: missing field {key!r}")
  return data[key]


def _array(path, data, key, dtype=None):
  try:
    return np.asarray(_field(path, data, key), dtype=dtype)
  except (TypeError, ValueError) as e:  # Ragged or non-numeric lists.
    raise MetadataError(f"{path}: {key!r} is not a numeric array: {e}") from e


def _colors(path, data, key, count):
  colors = _array(path, data, key)
  if (colors.shape != (count, 3) or colors.dtype.kind not in "iu"
      or colors.min() < 0 or colors.max() > 255):
    raise MetadataError(
        f"{path}: {key!r} must be {count} RGB triples of 0..255 integers,"
        f" got shape {colors.shape}")
  return colors.astype(np.uint8)


def _positive(path, data, key, count):
  values = _array(path, data, key, np.float32)
  if values.shape != (count,) or not np.all(values > 0):
    raise MetadataError(
        f"{path}: {key!r} must be {count} positive numbers, got shape"
        f" {values.shape}")
  return values


def _index_pairs(path, data, key, size):
  pairs = _array(path, data, key, np.int64)
  if pairs.ndim != 2 or pairs.shape[1:] != (2,):
    if pairs.size:
      raise MetadataError(f"{path}: {key!r} must be a list of index pairs")
    pairs = pairs.reshape(0, 2)
  if pairs.size and (pairs.min() < 0 or pairs.max() >= size):
    raise MetadataError(f"{path}: {key!r} has an index outside 0..{size - 1}")
  return tuple((int(a), int(b)) for a, b in pairs)


def _flip_indices(path, key, pairs, size):
  """Pairs -> permutation; must be an involution (a point has one mirror)."""
  flip = np.arange(size, dtype=np.int32)
  seen = set()
  for a, b in pairs:
    if a == b or a in seen or b in seen:
      raise MetadataError(
          f"{path}: {key!r} entry ({a}, {b}) repeats an index or pairs an"
          " entry with itself; each may have at most one mirror")
    seen.update((a, b))
    flip[a], flip[b] = b, a
  if not np.array_equal(flip[flip], np.arange(size)):
    raise MetadataError(f"{path}: flip map is not an involution")
  return flip


def _frozen(array):
  array.setflags(write=False)  # Results are cached and shared by all callers.
  return array


@functools.cache
def skeleton(name):
  """Keypoint metadata for 'coco17' | 'coco_wholebody133' | 'goliath308'."""
  path, data = _load_json(name, SKELETONS)
  names = tuple(_field(path, data, "keypoint_names"))
  count = len(names)
  if count != int(_field(path, data, "num_keypoints")):
    raise MetadataError(
        f"{path}: {count} keypoint_names but num_keypoints ="
        f" {data['num_keypoints']}")
  if len(set(names)) != count:
    raise MetadataError(f"{path}: keypoint_names are not unique")
  sigmas = _positive(path, data, "sigmas", count)
  links = _index_pairs(path, data, "links", count)
  upper = tuple(int(i) for i in _field(path, data, "upper_body_ids"))
  lower = tuple(int(i) for i in _field(path, data, "lower_body_ids"))
  if set(upper) & set(lower) or not set(upper + lower) <= set(range(count)):
    raise MetadataError(
        f"{path}: upper_body_ids and lower_body_ids must be disjoint indices"
        f" in 0..{count - 1}")
  subsets = tuple((part, tuple(int(i) for i in ids)) for part, ids in data.get("subsets", {}).items())
  listed = [i for _, ids in subsets for i in ids]
  if len(set(listed)) != len(listed) or not set(listed) <= set(range(count)) or not all(ids for _, ids in subsets):
    raise MetadataError(f"{path}: subsets must be non-empty, disjoint lists of indices in 0..{count - 1}")
  return Skeleton(
      name=name, names=names,
      flip_indices=_frozen(_flip_indices(
          path, "flip_pairs", _index_pairs(path, data, "flip_pairs", count),
          count)),
      sigmas=_frozen(sigmas), links=links,
      keypoint_colors=_frozen(_colors(path, data, "keypoint_colors", count)),
      link_colors=_frozen(_colors(path, data, "link_colors", len(links))),
      upper_body_ids=upper, lower_body_ids=lower, subsets=subsets)


@functools.cache
def seg_classes(name):
  """Body-part class metadata for 'seg28' (Goliath) | 'seg20' (CIHP/LIP) | 'seg29' (Sapiens2)."""
  path, data = _load_json(name, SEG_CLASS_SETS)
  names = tuple(_field(path, data, "class_names"))
  count = len(names)
  weight = _positive(path, data, "class_weight", count)
  swaps = _index_pairs(path, data, "swap_pairs", count)
  _flip_indices(path, "swap_pairs", swaps, count)  # Same check as keypoints.
  return SegClasses(
      name=name, names=names,
      palette=_frozen(_colors(path, data, "palette", count)),
      swap_pairs=swaps, class_weight=_frozen(weight))
