r"""Writes a dataset into ArrayRecord shards (images kept encoded) plus a manifest.

  python -m sapiens_jax.data.convert --kind=images --input=DIR --output=OUT [--records_per_shard=N]
  python -m sapiens_jax.data.convert --kind=pose --input=IMAGE_ROOT --annotations=COCO.json \
      --output=OUT
  python -m sapiens_jax.data.convert --kind=seg|depth|normal --input=DIR --output=OUT

A few large shards stream from local disk or a mounted bucket much better than
millions of small files. Inputs are the layouts the folder sources read:
images: every image under DIR (sapiens_jax.data.sources.ImageFolderSource), in
sorted path order, one raw encoded image per record: train on them with
data.source="array_record", data.path=OUT. pose: the COCO JSON's images that
hold at least one usable person (the rules of CocoKeypointSource), and the
JSON itself is copied to OUT. seg/depth/normal: the DenseSource layout, every
complete sample. For pose and the dense tasks, set data.path (or
data.eval_path) to OUT and the pipeline reads the shards instead of the
folders (sapiens_jax.data.record_sources describes the records).
"""
import json
import math
import os

from absl import app
from absl import flags

from sapiens_jax import tasks
from sapiens_jax.data import record_sources
from sapiens_jax.data import sources

# ~1000 records of 0.1-1 MB: shards of a few hundred MB, as ArrayRecord and buckets like them.
DEFAULT_RECORDS_PER_SHARD = 1000
IMAGES = "images"  # raw images for pretraining; every other kind is a task's dataset


def kinds():
  return (IMAGES, *tasks.TASKS)


def _image_records(input_dir):
  folder = sources.ImageFolderSource(input_dir)
  return len(folder), (folder[i]["data"] for i in range(len(folder))), {}


def convert(kind, input_dir, output, records_per_shard=DEFAULT_RECORDS_PER_SHARD,
            annotations=""):
  """Writes `input_dir` as `kind` records into the new or empty folder `output`; returns the manifest."""
  if kind not in kinds():
    raise ValueError(f"kind must be one of {', '.join(kinds())}, got {kind!r}")
  if int(records_per_shard) != records_per_shard or records_per_shard < 1:
    raise ValueError(f"records_per_shard must be a positive integer, got {records_per_shard!r}")
  if kind == IMAGES and annotations:
    raise ValueError(f"--annotations is for task datasets, not kind={IMAGES}; got {annotations!r}")
  if os.path.isdir(output) and os.listdir(output):
    raise ValueError(f"output folder {output!r} is not empty; shards of another conversion"
                     " there would be read along with the new ones")
  os.makedirs(output, exist_ok=True)
  if kind == IMAGES:
    num, records, extra = _image_records(input_dir)
  else:
    num, records, extra = tasks.get(kind).convert_records(input_dir, annotations, output)
  num_shards = max(1, math.ceil(num / records_per_shard))
  shards = []
  for shard in range(num_shards):
    name = f"{kind}-{shard:05d}-of-{num_shards:05d}.array_record"
    count = min(records_per_shard, num - shard * records_per_shard)
    written = sources.write_array_record(
        os.path.join(output, name), (next(records) for _ in range(count)))
    shards.append({"file": name, "num_records": written})
  manifest = {"format": record_sources.FORMAT, "version": record_sources.FORMAT_VERSION,
              "kind": kind, "input": os.path.abspath(input_dir), "num_records": num,
              "shards": shards, **extra}
  with open(os.path.join(output, record_sources.MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest


def cli():
  """Flags are defined here, not at import, so importing this module never clashes with main.py's."""
  kind = flags.DEFINE_enum("kind", None, kinds(), "What the input folder holds: images, or a task's dataset.")
  input_dir = flags.DEFINE_string("input", None, "Dataset folder (COCO keypoints: the image root).")
  annotations = flags.DEFINE_string("annotations", "", "COCO keypoints: the annotation JSON.")
  output = flags.DEFINE_string("output", None, "New or empty folder for the shards and manifest.")
  per_shard = flags.DEFINE_integer("records_per_shard", DEFAULT_RECORDS_PER_SHARD,
                                   "Records (images) per shard.")
  flags.mark_flags_as_required(["kind", "input", "output"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    manifest = convert(kind.value, input_dir.value, output.value, per_shard.value,
                       annotations.value)
    print(f"Wrote {manifest['num_records']} {kind.value} records in {len(manifest['shards'])}"
          f" shards to {output.value}", flush=True)

  app.run(main)


if __name__ == "__main__":
  cli()
