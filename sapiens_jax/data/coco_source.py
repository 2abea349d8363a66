"""COCO-format keypoint annotations as a random-access source of person instances.

One element per usable person (not crowd, a box of positive area, at least one
labelled keypoint), for top-down training. The JSON is read and checked once,
up front, so a broken annotation file fails at start-up with the file and the
annotation id in the message, not hours into training. Image bytes are read
by the pipeline (`read_bytes`), which decodes them with transforms.decode_image.
"""
import json
import os

import numpy as np


class CocoAnnotationError(ValueError):
  """An annotation file is unusable; the message names the file and the entry."""


def _finite_numbers(values, count, what, path):
  """`values` as float64 (count,), or CocoAnnotationError naming `what`."""
  try:
    array = np.asarray(values, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise CocoAnnotationError(
        f"{path}: {what} must be a list of numbers, got {values!r}") from e
  if array.shape != (count,):
    raise CocoAnnotationError(
        f"{path}: {what} must hold {count} numbers, got shape {array.shape}")
  if not np.all(np.isfinite(array)):
    raise CocoAnnotationError(f"{path}: {what} contains NaN or inf")
  return array


def _load_json(path):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"COCO annotation file {path!r} does not exist")
  try:
    with open(path, "rb") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CocoAnnotationError(f"{path}: malformed JSON: {e}") from e
  if not isinstance(data, dict):
    raise CocoAnnotationError(f"{path}: expected a JSON object at the top")
  for key in ("images", "annotations", "categories"):
    if not isinstance(data.get(key), list):
      raise CocoAnnotationError(f"{path}: missing or non-list {key!r}")
  return data


class CocoKeypointSource:
  """Person instances of a COCO keypoint file: `len(source)`, `source[i]`.

  Elements are dicts: image_name (full path), image_id, annotation_id, bbox
  (4,) float32 xywh, keypoints (K, 2) float32, visible (K,) float32 (1 where
  COCO's v > 0). Boxes are clipped to the image (x, y in [0, W - 1] and
  [0, H - 1]), as mmpose does; keypoints are left as they are, even outside
  the image (the crop's codec gives them weight 0). `images` lists every
  image entry (id, file_name, width, height) for evaluation.
  """

  def __init__(self, annotation_json, image_root):
    path = os.fspath(annotation_json)
    data = _load_json(path)
    self.annotation_json = path
    self.image_root = os.fspath(image_root)

    num_keypoints = {}
    for category in data["categories"]:
      names = category.get("keypoints") if isinstance(category, dict) else None
      if not isinstance(names, list) or not names:
        raise CocoAnnotationError(
            f"{path}: category {category!r} has no 'keypoints' name list")
      num_keypoints[category.get("id")] = len(names)

    self.images = []
    images_by_id = {}
    for image in data["images"]:
      try:
        entry = dict(id=image["id"], file_name=str(image["file_name"]),
                     width=int(image["width"]), height=int(image["height"]))
      except (KeyError, TypeError, ValueError) as e:
        raise CocoAnnotationError(
            f"{path}: image entry {image!r} needs id, file_name and integer"
            f" width/height ({type(e).__name__}: {e})") from e
      if entry["width"] <= 0 or entry["height"] <= 0:
        raise CocoAnnotationError(
            f"{path}: image {entry['id']} has size {entry['width']}x"
            f"{entry['height']}; expected positive width and height")
      self.images.append(entry)
      images_by_id[entry["id"]] = entry

    self._elements = []
    for annotation in data["annotations"]:
      element = self._parse(annotation, path, num_keypoints, images_by_id)
      if element is not None:
        self._elements.append(element)

  def _parse(self, annotation, path, num_keypoints, images_by_id):
    """One annotation -> element dict, None if unusable, or an error."""
    if not isinstance(annotation, dict) or "id" not in annotation:
      raise CocoAnnotationError(
          f"{path}: annotation without an id: {annotation!r}")
    where = f"annotation id {annotation['id']}"
    image = images_by_id.get(annotation.get("image_id"))
    if image is None:
      raise CocoAnnotationError(
          f"{path}: {where} refers to image id {annotation.get('image_id')!r},"
          " which has no entry in 'images'")
    category = annotation.get("category_id")
    if category not in num_keypoints:
      raise CocoAnnotationError(
          f"{path}: {where} has category_id {category!r}, which is not a"
          " keypoint category in 'categories'")
    count = num_keypoints[category]
    values = _finite_numbers(annotation.get("keypoints"), 3 * count,
                             f"{where} 'keypoints' (3 x {count} keypoints)",
                             path)
    x, y, w, h = _finite_numbers(annotation.get("bbox"), 4, f"{where} 'bbox'",
                                 path)
    values = values.reshape(count, 3)
    visible = values[:, 2] > 0
    if annotation.get("iscrowd", 0) or not visible.any():
      return None
    x1, x2 = np.clip([x, x + w], 0, image["width"] - 1)
    y1, y2 = np.clip([y, y + h], 0, image["height"] - 1)
    if not (x2 > x1 and y2 > y1):
      return None
    return dict(
        image_name=os.path.join(self.image_root, image["file_name"]),
        image_id=image["id"], annotation_id=annotation["id"],
        bbox=np.array([x1, y1, x2 - x1, y2 - y1], dtype=np.float32),
        keypoints=values[:, :2].astype(np.float32),
        visible=visible.astype(np.float32))

  def __len__(self):
    return len(self._elements)

  def __getitem__(self, index):
    element = self._elements[int(index)]
    # Fresh arrays, so a transform that writes in place cannot corrupt the source.
    return {k: v.copy() if isinstance(v, np.ndarray) else v
            for k, v in element.items()}

  def read_bytes(self, element):
    """The encoded image file of an element."""
    with open(element["image_name"], "rb") as f:
      return f.read()

  def __repr__(self):
    return (f"CocoKeypointSource({self.annotation_json!r}, {len(self)} persons"
            f" in {len(self.images)} images)")
