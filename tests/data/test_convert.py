"""Tests for sapiens_jax.data.convert and record_sources: every kind round-trips through ArrayRecord
shards, the pipeline picks converted folders up, and the TFDS pretraining source works without TF."""
import io
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest

from sapiens_jax import default_config
from sapiens_jax import tasks
from sapiens_jax.data import coco_source
from sapiens_jax.data import convert
from sapiens_jax.data import dense_source
from sapiens_jax.data import pipeline
from sapiens_jax.data import record_sources
from sapiens_jax.data import sources
from sapiens_jax.data import synthetic_humans

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_IMAGES = 6
PER_SHARD = 4  # 6 images -> shards of 4 and 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("humans"))
  synthetic_humans.write_dataset(root, NUM_IMAGES, 64, 48, seed=3)
  return root


def task_config(task, path, **data):
  dataset_name = {"pose": "coco", "seg": "goliath_seg", "depth": "render_people_depth",
                  "normal": "render_people_normal"}[task]
  config = default_config.finetune(dataset_name, "tiny")
  config.image_size = (64, 48)
  if task == "pose":
    config.loss.heatmap_sigma = 1.0
  config.data.labels = "coco17" if task == "pose" else config.data.labels
  config.data.path = path
  config.data.update(data)
  return config


def check_manifest(out, kind, num):
  with open(os.path.join(out, record_sources.MANIFEST)) as f:
    manifest = json.load(f)
  assert manifest["format"] == record_sources.FORMAT and manifest["kind"] == kind
  assert manifest["version"] == record_sources.FORMAT_VERSION
  counts = [PER_SHARD, num - PER_SHARD]
  assert manifest["shards"] == [
      {"file": f"{kind}-0000{i}-of-00002.array_record", "num_records": c}
      for i, c in enumerate(counts)]
  assert manifest["num_records"] == num
  assert all(os.path.isfile(os.path.join(out, s["file"])) for s in manifest["shards"])
  return manifest


@pytest.mark.parametrize("task", ["seg", "depth", "normal"])
def test_dense_round_trip_equals_the_folder_source(task, dataset, tmp_path):
  out = str(tmp_path / "records")
  convert.convert(task, dataset, out, records_per_shard=PER_SHARD)
  manifest = check_manifest(out, task, NUM_IMAGES)
  folder = dense_source.DenseSource(dataset, tasks.get(task).LAYOUT)
  records = record_sources.RecordDenseSource(out, task, tasks.get(task).LAYOUT)
  assert manifest["names"] == [e["name"] for e in folder.elements]
  assert len(records) == len(folder) == NUM_IMAGES
  for i in range(NUM_IMAGES):
    assert records[i]["name"] == folder[i]["name"]
    image, targets = records.load(records[i])
    expected_image, expected_targets = folder.load(folder[i])
    np.testing.assert_array_equal(image, expected_image)
    assert targets.keys() == expected_targets.keys()
    for key in targets:
      assert targets[key].dtype == expected_targets[key].dtype
      np.testing.assert_array_equal(targets[key], expected_targets[key])


def test_pose_round_trip_equals_the_coco_source(dataset, tmp_path):
  out = str(tmp_path / "records")
  annotations = os.path.join(dataset, "person_keypoints.json")
  coco = coco_source.CocoKeypointSource(annotations, dataset)
  used = sorted({coco[i]["image_id"] for i in range(len(coco))})
  if len(used) <= PER_SHARD:
    pytest.skip("this seed left too few images with people for two shards")
  convert.convert("pose", dataset, out, records_per_shard=PER_SHARD, annotations=annotations)
  manifest = check_manifest(out, "pose", len(used))
  assert manifest["image_ids"] == used
  records = record_sources.RecordPoseSource(out)
  with open(records.annotation_json, "rb") as a, open(annotations, "rb") as b:
    assert a.read() == b.read()
  assert records.images == coco.images and len(records) == len(coco)
  for i in range(len(coco)):
    got, expected = records[i], coco[i]
    assert got.keys() == expected.keys()
    for key in ("image_id", "annotation_id", "bbox", "keypoints", "visible"):
      np.testing.assert_array_equal(got[key], expected[key])
    record = manifest["image_ids"].index(got["image_id"])
    shard = record // PER_SHARD
    assert got["image_name"] == (
        f"{out}/pose-0000{shard}-of-00002.array_record#{record % PER_SHARD}"
        f" (images/{got['image_id']:06d}.jpg)")
    assert records.read_bytes(got) == coco.read_bytes(expected)


def test_images_kind_is_read_by_the_mae_array_record_source(dataset, tmp_path):
  out = str(tmp_path / "records")
  convert.convert("images", os.path.join(dataset, "images"), out, records_per_shard=PER_SHARD)
  check_manifest(out, "images", NUM_IMAGES)
  config = ml_collections.ConfigDict(dict(source="array_record", path=out))
  source = sources.make_source(config, (16, 16), 0)
  folder = sources.ImageFolderSource(os.path.join(dataset, "images"))
  assert [source[i]["data"] for i in range(len(source))] == [
      folder[i]["data"] for i in range(len(folder))]
  assert source[5]["name"] == f"{out}/images-00001-of-00002.array_record#1"


@pytest.mark.parametrize("task", ["pose", "seg"])
def test_pipeline_reads_converted_folders_like_the_originals(task, dataset, tmp_path):
  out = str(tmp_path / "records")
  annotations = os.path.join(dataset, "person_keypoints.json") if task == "pose" else ""
  convert.convert(task, dataset, out, records_per_shard=PER_SHARD, annotations=annotations)
  folder_config = task_config(task, dataset, annotations=annotations)
  record_config = task_config(task, out)
  source = pipeline.make_task_source(record_config, "train")
  assert isinstance(source, (record_sources.RecordPoseSource, record_sources.RecordDenseSource))
  batches = [pipeline.make_task_iterator(c, batch_size=2, seed=5)
             for c in (folder_config, record_config)]
  for _ in range(2):
    expected, got = (next(b) for b in batches)
    assert got.keys() == expected.keys()
    for key in got:
      np.testing.assert_array_equal(got[key], expected[key])


def test_cli_writes_shards_and_manifest(dataset, tmp_path):
  out = str(tmp_path / "cli")
  result = subprocess.run(
      [sys.executable, "-m", "sapiens_jax.data.convert", "--kind=seg", f"--input={dataset}",
       f"--output={out}", f"--records_per_shard={PER_SHARD}"],
      cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert f"Wrote {NUM_IMAGES} seg records in 2 shards" in result.stdout
  check_manifest(out, "seg", NUM_IMAGES)


def test_converter_refuses_bad_arguments(dataset, tmp_path):
  with pytest.raises(ValueError, match="annotations"):
    convert.convert("pose", dataset, str(tmp_path / "a"))
  with pytest.raises(ValueError, match="kind must be one of"):
    convert.convert("video", dataset, str(tmp_path / "b"))
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "old.array_record").write_bytes(b"")
  with pytest.raises(ValueError, match="not empty"):
    convert.convert("seg", dataset, str(tmp_path / "full"))


def test_record_errors_name_the_shard_record_and_original_file(dataset, tmp_path):
  out = str(tmp_path / "records")
  convert.convert("seg", dataset, out, records_per_shard=PER_SHARD)
  with pytest.raises(record_sources.RecordError, match="holds 'seg' records; expected 'depth'"):
    record_sources.RecordDenseSource(out, "depth", tasks.get("depth").LAYOUT)
  with pytest.raises(ValueError, match="holds 'seg' records"):
    sources.make_source(ml_collections.ConfigDict(dict(source="array_record", path=out)), (8, 8), 0)
  shard = os.path.join(out, "seg-00001-of-00002.array_record")
  records = record_sources.RecordDenseSource(out, "seg", tasks.get("seg").LAYOUT)
  good = records._shards._records[PER_SHARD]  # pylint: disable=protected-access
  sources.write_array_record(shard, [good, b"\x00 not msgpack"])
  records = record_sources.RecordDenseSource(out, "seg", tasks.get("seg").LAYOUT)
  with pytest.raises(record_sources.RecordError, match=f"{shard}#1"):
    records.load(records[PER_SHARD + 1])
  # A record whose label bytes are broken names the record and the label's original path.
  record = records._shards.read(PER_SHARD, ("label",))  # pylint: disable=protected-access
  record["label"] = record["label"][:20]
  from flax import serialization  # pylint: disable=g-import-not-at-top
  sources.write_array_record(shard, [serialization.msgpack_serialize(record), good])
  with pytest.raises(dense_source.DataError, match=rf"{shard}#0 \(segs/000004.png\)"):
    records.load(records[PER_SHARD])


class _TinyImages:
  """A 5-image TFDS dataset prepared as array_record, built without TensorFlow."""

  @staticmethod
  def build(data_dir):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    class TinyHumanImages(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"image": tfds.features.Image(shape=(None, None, 3), encoding_format="png")}))

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

      def _generate_examples(self):
        for i in range(5):
          buffer = io.BytesIO()  # Encoded bytes: encoding arrays would need TensorFlow.
          Image.fromarray(np.full((8, 6 + i, 3), 40 * i, np.uint8)).save(buffer, format="PNG")
          yield i, {"image": buffer.getvalue()}

    builder = TinyHumanImages(data_dir=data_dir, file_format="array_record")
    # try_download_gcs=False: no look for a prepared copy on Google's servers; nothing here needs the network.
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder.data_dir


def test_tfds_source_reads_array_record_datasets_without_tensorflow(tmp_path):
  prepared = _TinyImages.build(str(tmp_path / "tfds"))
  config = ml_collections.ConfigDict(dict(source="tfds", path=prepared))
  source = sources.make_source(config, (8, 8), 0)
  assert len(source) == 5
  widths = set()
  for i in range(5):
    record = source[i]
    assert record["name"] == f"tfds:tiny_human_images/1.0.0/train#{i}"
    pixels = np.asarray(Image.open(io.BytesIO(record["data"])))
    assert pixels.shape[0] == 8 and np.all(pixels == pixels[0, 0, 0])
    assert pixels[0, 0, 0] == 40 * (pixels.shape[1] - 6)  # image i is 6 + i wide, value 40 i
    widths.add(pixels.shape[1])
  assert widths == {6, 7, 8, 9, 10}
  batch = next(pipeline.make_pretrain_iterator(
      ml_collections.ConfigDict(dict(config, on_error="raise", num_workers=0, resize="pil")),
      image_size=(8, 8), batch_size=5, seed=0))
  assert batch["image"].shape == (5, 8, 8, 3) and not batch["skipped"].any()
  assert "tensorflow" not in sys.modules
  with pytest.raises(ValueError, match="no split 'validation'"):
    sources.TfdsImageSource(prepared, split="validation")
  with pytest.raises(FileNotFoundError, match="no_such_dataset_xyz"):
    sources.TfdsImageSource("no_such_dataset_xyz")
