"""The input pipelines (MAE pretraining and the four fine-tuning tasks), built with Grain's Dataset API.

Index-based all the way down: element k of the infinite stream is fully
determined by (seed, k) (which record, which crop, which flip), so the
iterator's checkpointable state is a single position and a resumed run sees
exactly the samples the uninterrupted run would have seen.
"""
import functools
import json
import logging
import os

from absl import flags
import cv2
import grain
import numpy as np

from sapiens_jax.data import coco_source
from sapiens_jax.data import dense_source
from sapiens_jax.data import dense_transforms
from sapiens_jax.data import meta
from sapiens_jax.data import photometric
from sapiens_jax.data import pose_transforms
from sapiens_jax.data import record_sources
from sapiens_jax.data import sources
from sapiens_jax.data import synthetic_humans
from sapiens_jax.data import transforms

ON_ERROR_POLICIES = ("raise", "skip")

# A bad record under on_error="skip" is replaced by the next index; this many
# failures in a row means something bigger is wrong (e.g. a wrong path or
# format), so we stop instead of silently scanning the whole dataset.
MAX_CONSECUTIVE_BAD_RECORDS = 100
# What a bad file raises (corrupt image, missing or mismatched label, unreadable array); anything
# else is a bug and always propagates.
BAD_RECORD_ERRORS = (transforms.ImageDecodeError, dense_source.DataError, OSError)

# Elements of the MapDataset are whole batches, so Grain's defaults (16
# threads, 500 buffered elements) would hold hundreds of batches in memory.
# One thread building up to two batches ahead overlaps input with the train
# step; more parallelism comes from `num_workers` processes.
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


def load_with_skips(load, num_records, skip_bad, record_index):
  """load(index) for `record_index`, or with `skip_bad` for the next loadable record (wrapping).

  Returns the example with "skipped" (how many bad records were passed over) added, so shapes
  stay static and the number of bad files stays visible in the metrics.
  """
  for skipped in range(MAX_CONSECUTIVE_BAD_RECORDS):
    index = (int(record_index) + skipped) % num_records
    try:
      example = load(index)
    except BAD_RECORD_ERRORS as e:
      if not skip_bad:
        raise
      logging.warning("skipping unreadable record %d: %s", index, e)
      last_error = e
      continue
    return {**example, "skipped": np.int32(skipped)}
  raise RuntimeError(
      f"{MAX_CONSECUTIVE_BAD_RECORDS} consecutive records starting at index"
      f" {record_index} could not be read; last error: {last_error}"
  ) from last_error


def load_pretrain_example(source, image_size, resize, skip_bad, record_index, rng):
  """Reads, decodes and augments record `record_index` of `source` (MAE recipe)."""
  def load(index):
    record = source[index]
    image = transforms.decode_image(record["data"], record["name"])
    image = transforms.random_resized_crop(image, rng, image_size, backend=resize)
    return {"image": transforms.random_flip(image, rng)}  # uint8: the step normalises on the device
  return load_with_skips(load, len(source), skip_bad, record_index)


def _check_on_error(data_config):
  if data_config.on_error not in ON_ERROR_POLICIES:
    raise ValueError(
        f"unknown on_error policy {data_config.on_error!r}; expected one of"
        f" {', '.join(ON_ERROR_POLICIES)}")


def _single_threaded_opencv(worker_index, worker_count):
  """Each worker is one core of decoding; OpenCV's own pool would start a thread per core in each."""
  del worker_index, worker_count
  cv2.setNumThreads(1)


def _stream(num_records, load, *, batch_size, seed, process_index,
            process_count, num_workers):
  """Infinite, checkpointable batches of load(record_index, rng) over a shuffled, repeated index.

  Process p's batches are rows [p * batch_size, (p + 1) * batch_size) of the
  global batches that one process with process_count * batch_size would read.
  The result is a `grain.DatasetIterator`: save/restore it with
  `get_state()`/`set_state()` or Orbax's `grain.checkpoint.CheckpointSave`.
  """
  dataset = grain.MapDataset.range(num_records).seed(seed)
  # Shuffle folds the epoch (index // len) into its seed, and repeat passes
  # global indices through, so every epoch gets a fresh permutation.
  dataset = dataset.shuffle().repeat()
  # Augment before slicing per process: random_map seeds each element's RNG
  # with its index in the stream, so every process gets distinct random draws.
  dataset = dataset.random_map(load)
  # Batch, then deal whole batches round-robin: global batch s is stream
  # elements [s * global, (s + 1) * global) with process p holding the p-th
  # block, in row order, so any process count trains on the same batches
  # (and mask keys, which follow the row). Batching is lazy: a process only
  # decodes its own blocks.
  dataset = dataset.batch(batch_size, drop_remainder=True)
  dataset = dataset[process_index::process_count]
  iter_dataset = dataset.to_iter_dataset(_READ_OPTIONS)
  if num_workers > 0:
    # Grain's worker start-up reads an absl flag (once jax is imported), which
    # fails outside absl.app.run (notebooks, pytest) unless flags count as
    # parsed; all its flags then simply keep their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_dataset = iter_dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers),
        worker_init_fn=_single_threaded_opencv)
  return iter(iter_dataset)


def make_pretrain_iterator(data_config, *, image_size, batch_size, seed,
                           process_index=0, process_count=1):
  """Infinite, checkpointable iterator of this process's pretraining batches.

  Yields {"image": uint8 (batch_size, H, W, 3) RGB (normalised on the device by the step),
          "skipped": int32 (batch_size,)}; `batch_size` is per process (see _stream).
  """
  _check_on_error(data_config)
  if data_config.resize not in transforms.RESIZE_BACKENDS:
    raise ValueError(f"unknown data.resize {data_config.resize!r}; expected one of"
                     f" {', '.join(transforms.RESIZE_BACKENDS)}")
  image_size = tuple(int(s) for s in image_size)
  source = sources.make_source(data_config, image_size, seed)
  load = functools.partial(
      load_pretrain_example, source, image_size, data_config.resize,
      data_config.on_error == "skip")
  return _stream(len(source), load, batch_size=batch_size, seed=seed,
                 process_index=process_index, process_count=process_count,
                 num_workers=data_config.num_workers)


# ---------------------------------------------------------------- fine-tuning

SYNTHETIC_DIR = "synthetic_humans"  # under the workdir, when data.path is empty
SYNTHETIC_EVAL_FRACTION = 8  # the eval split has num_generated // 8 images


def data_root(config, split, workdir=""):
  """Where `split` ("train" | "eval") of a fine-tuning dataset lives."""
  d = config.data
  if d.source == "synthetic":
    return os.path.join(d.path or os.path.join(workdir, SYNTHETIC_DIR), split)
  return (d.eval_path or d.path) if split == "eval" else d.path


def ensure_synthetic_data(config, workdir):
  """Renders the synthetic-humans train and eval splits at config.image_size, once.

  A split counts as written when its manifest exists (the manifest is written last).
  """
  h, w = config.image_size
  num_eval = config.data.num_eval or max(config.data.num_generated // SYNTHETIC_EVAL_FRACTION, 1)
  for split, num, seed in (("train", config.data.num_generated, config.seed),
                           ("eval", num_eval, config.seed + 1_000_003)):
    root = data_root(config, split, workdir)
    manifest_path = os.path.join(root, "manifest.json")
    wanted = {"num": num, "height": h, "width": w, "seed": seed, "framing": config.data.framing}
    if not os.path.exists(manifest_path):
      logging.info("writing %d synthetic %dx%d humans (%s) to %s", num, h, w,
                   config.data.framing, root)
      synthetic_humans.write_dataset(root, num, h, w, seed=seed, framing=config.data.framing)
      continue
    with open(manifest_path) as f:
      manifest = json.load(f)
    have = {"framing": "scene", **manifest}  # manifests written before framing existed
    differs = {k: (have.get(k), v) for k, v in wanted.items() if have.get(k) != v}
    if differs:
      raise ValueError(f"{root} holds synthetic humans made with other settings "
                       f"(manifest vs config: {differs}); delete the folder or set data.path")


def make_task_source(config, split, workdir=""):
  """The random-access source of a pose (COCO keypoints) or dense (images + labels) split.

  A folder written by sapiens_jax.data.convert is read from its shards (pose
  then takes the COCO JSON stored there, not data.annotations).
  """
  root = data_root(config, split, workdir)
  if not root:
    raise ValueError(f"config.data.path is empty: set it to the {config.task} dataset folder")
  if record_sources.read_manifest(root) is not None:
    if config.task == "pose":
      return record_sources.RecordPoseSource(root)
    return record_sources.RecordDenseSource(root, config.task)
  if config.task == "pose":
    if config.data.source == "synthetic":
      annotations = os.path.join(root, "person_keypoints.json")
    else:
      annotations = config.data.eval_annotations if split == "eval" else config.data.annotations
    return coco_source.CocoKeypointSource(annotations, root)
  on_missing = "skip" if config.data.on_error == "skip" else "raise"
  return dense_source.DenseSource(root, config.task, on_missing=on_missing)


class BackgroundImages:
  """Non-human photos to paste behind people, decoded on demand (a folder may be large)."""

  def __init__(self, folder):
    self._source = sources.ImageFolderSource(folder)

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    record = self._source[index]
    return transforms.decode_image(record["data"], record["name"])


def _heatmap_size(image_size):
  """(W, H) of the pose heatmaps: the head upsamples the 1/16 grid 4x, so 1/4 of the input."""
  return image_size[1] // 4, image_size[0] // 4


def load_task_train_example(task, source, image_size, labels, sigma,
                            backgrounds, scale_range, index, rng):
  """Record `index` of `source` through the task's augmentation recipe; the image stays uint8."""
  if task == "pose":
    element = source[index]
    image = transforms.decode_image(source.read_bytes(element), element["image_name"])
    skeleton = meta.skeleton(labels)
    sample = pose_transforms.topdown_train_sample(
        image, element["bbox"], element["keypoints"], element["visible"], rng,
        flip_indices=skeleton.flip_indices, upper_ids=skeleton.upper_body_ids,
        lower_ids=skeleton.lower_body_ids, input_size=image_size[::-1],
        heatmap_size=_heatmap_size(image_size), sigma=sigma,
        photometric=photometric.photometric_distortion)
    return {"image": sample["image"], "heatmaps": sample["heatmaps"],
            "target_weight": sample["target_weight"]}
  image, targets = source.load(source[index])
  if task == "seg":
    sample = dense_transforms.seg_train_sample(
        image, targets, rng, swap_pairs=meta.seg_classes(labels).swap_pairs, size=image_size,
        background_images=backgrounds, ratio_range=scale_range)
  else:
    recipe = {"depth": dense_transforms.depth_train_sample,
              "normal": dense_transforms.normal_train_sample}[task]
    sample = recipe(image, targets, rng, size=image_size, background_images=backgrounds,
                    ratio_range=scale_range)
  return {"image": sample.pop("image"), **sample}


def _scale_range(data_config):
  """data.scale_range, checked: the (low, high) random-resize ratios of the dense recipes."""
  try:
    low, high = (float(v) for v in data_config.scale_range)
  except (TypeError, ValueError):
    low = high = 0.0
  if not 0 < low <= high:
    raise ValueError(f"data.scale_range must be (low, high) with 0 < low <= high, got"
                     f" {data_config.scale_range!r}")
  return low, high


def task_train_example(config, source):
  """`(index, rng) -> training sample` of `source` with the config's recipe settings."""
  backgrounds = BackgroundImages(config.data.backgrounds) if config.data.backgrounds else None
  return functools.partial(load_task_train_example, config.task, source,
                           tuple(int(s) for s in config.image_size), config.data.labels,
                           config.get("heatmap_sigma", 0.0), backgrounds,
                           _scale_range(config.data))


def _load_task_record(example, num_records, skip_bad, record_index, rng):
  return load_with_skips(lambda i: example(i, rng), num_records, skip_bad, record_index)


def make_task_iterator(config, *, batch_size, seed, workdir="", process_index=0,
                       process_count=1):
  """Infinite, checkpointable iterator of this process's fine-tuning batches.

  Yields "image" (uint8 RGB, normalised on the device by the step), the task's
  targets (pose: "heatmaps", "target_weight"; seg: "label"; depth: "depth";
  normal: "normal") and "skipped", each with `batch_size` (per process) rows.
  """
  _check_on_error(config.data)
  source = make_task_source(config, "train", workdir)
  load = functools.partial(_load_task_record, task_train_example(config, source), len(source),
                           config.data.on_error == "skip")
  return _stream(len(source), load, batch_size=batch_size, seed=seed,
                 process_index=process_index, process_count=process_count,
                 num_workers=config.data.num_workers)


def load_task_eval_example(task, source, image_size, index):
  """Record `index` without augmentation: the network input and what the metrics need."""
  if task == "pose":
    element = source[index]
    image = transforms.decode_image(source.read_bytes(element), element["image_name"])
    sample = pose_transforms.topdown_eval_sample(image, element["bbox"], image_size[::-1])
    sample["image_id"] = np.int64(element["image_id"])
  else:
    image, targets = source.load(source[index])
    recipe = {"seg": dense_transforms.seg_eval_sample, "depth": dense_transforms.depth_eval_sample,
              "normal": dense_transforms.normal_eval_sample}[task]
    sample = recipe(image, targets, size=image_size)
  return sample  # "image" stays uint8: evaluate.predict normalises on the device


def eval_batches(config, source, batch_size):
  """The eval split in order, in global batches of `batch_size` (the last one padded by
  repeating its first row); "image" is uint8 RGB and "valid" marks real rows. Bad records
  always raise: an eval that silently drops files would not be comparable across runs."""
  num = min(len(source), config.data.num_eval) if config.data.num_eval else len(source)
  image_size = tuple(int(s) for s in config.image_size)
  for start in range(0, num, batch_size):
    rows = [load_task_eval_example(config.task, source, image_size, i)
            for i in range(start, min(start + batch_size, num))]
    valid = np.arange(batch_size) < len(rows)
    rows += [rows[0]] * (batch_size - len(rows))
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    batch["valid"] = valid
    yield batch
