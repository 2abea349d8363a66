"""Fine-tuning sources over the ArrayRecord shards written by `sapiens_jax.data.convert`.

A converted dataset is a folder: shards `KIND-00000-of-0000N.array_record` and a
`manifest.json` (written last, so a half-finished conversion is never read).
Records of kind "images" are the encoded images themselves, which
`sources.ArrayRecordImageSource` reads for pretraining. The other kinds (a
task's name) hold one msgpack dict per image (no pickle): "image" (the encoded
bytes as they were on disk), "files" (the original relative path of every
field, for error messages) and per kind: COCO keypoints "image_id"; dense
tasks the bytes of each label file of the task's layout, under its target name
("label", "mask", "depth", "normal", ...). Keypoint annotations stay in the COCO
JSON copied next to the shards, which evaluation reads as it is. The sources decode with the folder sources' own checks, and
errors name the shard, the record index and the original file.
"""
import bisect
import io
import json
import os

from flax import serialization
import grain
import numpy as np

from sapiens_jax.data import coco_source
from sapiens_jax.data import dense_source

MANIFEST = "manifest.json"
FORMAT = "sapiens_jax.data.convert"  # tells our manifest from synthetic_humans' one
FORMAT_VERSION = 1
POSE_ANNOTATIONS = "person_keypoints.json"  # the copied COCO JSON, next to the shards


class RecordError(dense_source.DataError):
  """A converted dataset is unusable; names the manifest, shard or record."""


def read_manifest(root):
  """The converter's manifest under `root`, or None when `root` is not a converted dataset."""
  path = os.path.join(root, MANIFEST)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, "rb") as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RecordError(f"{path}: malformed JSON: {e}") from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    return None
  return manifest


def load_manifest(root, kind):
  """The manifest of a converted dataset of `kind`, checked against its shards."""
  path = os.path.join(root, MANIFEST)
  manifest = read_manifest(root)
  if manifest is None:
    raise RecordError(f"{path} is missing or was not written by {FORMAT}")
  if manifest.get("version") != FORMAT_VERSION:
    raise RecordError(f"{path}: format version {manifest.get('version')!r}; this code reads"
                      f" version {FORMAT_VERSION} (convert the dataset again)")
  if manifest.get("kind") != kind:
    raise RecordError(f"{path}: holds {manifest.get('kind')!r} records; expected {kind!r}")
  for shard in manifest.get("shards", ()):
    shard_path = os.path.join(root, shard["file"])
    if not os.path.isfile(shard_path):
      raise RecordError(f"{path}: shard {shard_path!r} does not exist")
  return manifest


class _Shards:
  """Global record index -> the record's msgpack dict, read lazily (picklable for workers)."""

  def __init__(self, root, manifest):
    self.files = [os.path.join(root, shard["file"]) for shard in manifest["shards"]]
    counts = [int(shard["num_records"]) for shard in manifest["shards"]]
    self._records = grain.sources.ArrayRecordDataSource(self.files)
    if len(self._records) != sum(counts):
      raise RecordError(f"{os.path.join(root, MANIFEST)} lists {sum(counts)} records but the"
                        f" shards hold {len(self._records)}")
    self._starts = [0]
    for count in counts[:-1]:
      self._starts.append(self._starts[-1] + count)

  def __len__(self):
    return len(self._records)

  def where(self, index):
    """'<shard>#<index in shard>', for error messages."""
    shard = bisect.bisect_right(self._starts, index) - 1
    return f"{self.files[shard]}#{index - self._starts[shard]}"

  def read(self, index, fields):
    """Record `index` as a dict, checked to hold `fields` as bytes."""
    try:
      record = serialization.msgpack_restore(self._records[index])
    except Exception as e:  # msgpack raises assorted errors on damaged bytes.
      raise RecordError(f"cannot read record {self.where(index)}: {type(e).__name__}: {e}") from e
    if not isinstance(record, dict) or not all(
        isinstance(record.get(field), bytes) for field in fields):
      raise RecordError(f"record {self.where(index)} lacks one of the byte fields {fields}")
    return record

  def name(self, index, record, field):
    """'<shard>#<index> (<original file>)': where a field's bytes came from."""
    return f"{self.where(index)} ({record.get('files', {}).get(field, field)})"


class RecordPoseSource:
  """Person instances of a converted COCO keypoint dataset; same API as CocoKeypointSource.

  Elements are CocoKeypointSource's (same filtering and checks, from the
  copied JSON), with image_name naming the shard record of the image.
  """

  def __init__(self, root):
    manifest = load_manifest(root, "pose")
    self.root = root
    self.annotation_json = os.path.join(root, POSE_ANNOTATIONS)
    coco = coco_source.CocoKeypointSource(self.annotation_json, "")
    self.images = coco.images
    self._shards = _Shards(root, manifest)
    self._record_of_image = {image_id: i for i, image_id in enumerate(manifest["image_ids"])}
    file_names = {image["id"]: image["file_name"] for image in coco.images}
    self._elements = []
    for i in range(len(coco)):
      element = coco[i]
      record = self._record_of_image.get(element["image_id"])
      if record is None:
        raise RecordError(f"{self.annotation_json}: image {element['image_id']!r} has people but"
                          f" no record in {os.path.join(root, MANIFEST)}")
      element["image_name"] = (
          f"{self._shards.where(record)} ({file_names[element['image_id']]})")
      self._elements.append(element)

  def __len__(self):
    return len(self._elements)

  def __getitem__(self, index):
    element = self._elements[int(index)]
    # Fresh arrays, so a transform that writes in place cannot corrupt the source.
    return {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in element.items()}

  def read_bytes(self, element):
    """The encoded image of an element, as it was on disk."""
    index = self._record_of_image[element["image_id"]]
    record = self._shards.read(index, ("image",))
    if record.get("image_id") != element["image_id"]:
      raise RecordError(f"record {self._shards.where(index)} holds image"
                        f" {record.get('image_id')!r}; the manifest says {element['image_id']!r}")
    return record["image"]

  def __repr__(self):
    return f"RecordPoseSource({self.root!r}, {len(self)} persons in {len(self.images)} images)"


class RecordDenseSource:
  """A converted dense dataset (kind = the task it was converted for); same API as DenseSource.

  `source[i]` is {"name": image stem, "record": i}; `load(element)` reads the
  record and decodes it with dense_source.decode_sample and the task's `layout`.
  """

  def __init__(self, root, kind, layout):
    manifest = load_manifest(root, kind)
    self.root = root
    self.kind = kind
    self.layout = tuple(layout)
    self._shards = _Shards(root, manifest)
    self.elements = [{"name": name, "record": i} for i, name in enumerate(manifest["names"])]
    if len(self.elements) != len(self._shards):
      raise RecordError(f"{os.path.join(root, MANIFEST)} names {len(self.elements)} samples"
                        f" but the shards hold {len(self._shards)} records")

  def __len__(self):
    return len(self.elements)

  def __getitem__(self, index):
    return self.elements[index]

  def __repr__(self):
    return f"RecordDenseSource({self.root!r}, {self.kind!r}, {len(self)} samples)"

  def load(self, element):
    """(uint8 RGB image, targets) of an element, as DenseSource.load returns them."""
    index = element["record"]
    fields = tuple(file.name for file in self.layout)
    record = self._shards.read(index, ("image",) + fields)
    files = {field: (io.BytesIO(record[field]), self._shards.name(index, record, field)) for field in fields}
    return dense_source.decode_sample(
        self.layout, record["image"], self._shards.name(index, record, "image"), files)
