"""The input pipelines (image pretraining and task fine-tuning), built with Grain's Dataset API.

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

from sapiens_jax import tasks
from sapiens_jax.data import dense_source
from sapiens_jax.data import sources
from sapiens_jax.data import synthetic_humans
from sapiens_jax.data import transforms
from sapiens_jax.data import views

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
  """Reads, decodes and augments record `record_index` of `source` (the MAE recipe's crops)."""
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


def _check_resize(data_config):
  if data_config.resize not in transforms.RESIZE_BACKENDS:
    raise ValueError(f"unknown data.resize {data_config.resize!r}; expected one of"
                     f" {', '.join(transforms.RESIZE_BACKENDS)}")


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
  _check_resize(data_config)
  image_size = tuple(int(s) for s in image_size)
  source = sources.make_source(data_config, image_size, seed)
  load = functools.partial(
      load_pretrain_example, source, image_size, data_config.resize,
      data_config.on_error == "skip")
  return _stream(len(source), load, batch_size=batch_size, seed=seed,
                 process_index=process_index, process_count=process_count,
                 num_workers=data_config.num_workers)


# ------------------------------------------------------------ multi-view (DINO)


def load_multiview_example(source, image_size, local_size, num_local, global_scale, local_scale,
                           resize, skip_bad, record_index, rng):
  """Reads and decodes record `record_index` once, then draws its two global views and
  `num_local` local crops (views.py); "local" is left out when there are none."""
  def load(index):
    record = source[index]
    image = transforms.decode_image(record["data"], record["name"])
    example = {"image": np.stack([views.global_view(image, rng, image_size, which, global_scale, resize)
                                  for which in (0, 1)])}
    if num_local:
      example["local"] = np.stack([views.local_view(image, rng, local_size, local_scale, resize)
                                   for _ in range(num_local)])
    return example
  return load_with_skips(load, len(source), skip_bad, record_index)


def make_multiview_iterator(data_config, *, image_size, local_size, num_local, global_scale,
                            local_scale, batch_size, seed, process_index=0, process_count=1):
  """Infinite, checkpointable iterator of this process's multi-view pretraining batches.

  Yields {"image": uint8 (batch_size, 2, H, W, 3) global views,
          "local": uint8 (batch_size, num_local, h, w, 3) local crops (absent when num_local is 0),
          "skipped": int32 (batch_size,)}; `batch_size` is per process (see _stream). The source is
  sized for the global views (`image_size`), which the local crops share.
  """
  _check_on_error(data_config)
  _check_resize(data_config)
  if num_local < 0:
    raise ValueError(f"num_local must be >= 0, got {num_local}")
  image_size = tuple(int(s) for s in image_size)
  local_size = tuple(int(s) for s in local_size)
  source = sources.make_source(data_config, image_size, seed)
  load = functools.partial(
      load_multiview_example, source, image_size, local_size, int(num_local), tuple(global_scale),
      tuple(local_scale), data_config.resize, data_config.on_error == "skip")
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

  A split counts as written when its manifest exists (the manifest is written last). The Sapiens2
  labels (albedo, matting) are rendered when the task's layout reads one of their folders.
  """
  h, w = config.image_size
  layout = getattr(tasks.get(config.task), "LAYOUT", ())
  sapiens2 = any(file.folder in synthetic_humans.SAPIENS2_SUBDIRS for file in layout)
  num_eval = config.data.num_eval or max(config.data.num_generated // SYNTHETIC_EVAL_FRACTION, 1)
  for split, num, seed in (("train", config.data.num_generated, config.seed),
                           ("eval", num_eval, config.seed + 1_000_003)):
    root = data_root(config, split, workdir)
    manifest_path = os.path.join(root, "manifest.json")
    wanted = {"num": num, "height": h, "width": w, "seed": seed, "framing": config.data.framing}
    if not os.path.exists(manifest_path):
      logging.info("writing %d synthetic %dx%d humans (%s) to %s", num, h, w,
                   config.data.framing, root)
      synthetic_humans.write_dataset(root, num, h, w, seed=seed, framing=config.data.framing,
                                     sapiens2=sapiens2)
      continue
    with open(manifest_path) as f:
      manifest = json.load(f)
    have = {"framing": "scene", **manifest}  # manifests written before framing existed
    differs = {k: (have.get(k), v) for k, v in wanted.items() if have.get(k) != v}
    missing = sorted(set(synthetic_humans.SAPIENS2_SUBDIRS) - set(have.get("folders", ()))) if sapiens2 else []
    if missing:
      differs["folders"] = f"{missing} missing (rendered without the Sapiens2 labels)"
    if differs:
      raise ValueError(f"{root} holds synthetic humans made with other settings "
                       f"(manifest vs config: {differs}); delete the folder or set data.path")


def make_task_source(config, split, workdir=""):
  """The random-access source of `split` of the task's dataset (the task reads its own layout; a
  folder written by sapiens_jax.data.convert is read from its shards)."""
  root = data_root(config, split, workdir)
  if not root:
    raise ValueError(f"config.data.path is empty: set it to the {config.task} dataset folder")
  return tasks.get(config.task).make_source(config, root, split)


def _load_task_record(example, num_records, skip_bad, record_index, rng):
  return load_with_skips(lambda i: example(i, rng), num_records, skip_bad, record_index)


def make_task_iterator(config, *, batch_size, seed, workdir="", process_index=0,
                       process_count=1):
  """Infinite, checkpointable iterator of this process's fine-tuning batches.

  Yields "image" (uint8 RGB, normalised on the device by the step), the task's
  targets (its `target_spec`) and "skipped", each with `batch_size` (per process) rows.
  """
  _check_on_error(config.data)
  source = make_task_source(config, "train", workdir)
  example = tasks.get(config.task).train_example(config, source)
  load = functools.partial(_load_task_record, example, len(source), config.data.on_error == "skip")
  return _stream(len(source), load, batch_size=batch_size, seed=seed,
                 process_index=process_index, process_count=process_count,
                 num_workers=config.data.num_workers)


def eval_batches(config, source, batch_size):
  """The eval split in order, in global batches of `batch_size` (the last one padded by
  repeating its first row); "image" is uint8 RGB and "valid" marks real rows. Bad records
  always raise: an eval that silently drops files would not be comparable across runs."""
  num = min(len(source), config.data.num_eval) if config.data.num_eval else len(source)
  task = tasks.get(config.task)
  for start in range(0, num, batch_size):
    rows = [task.eval_example(config, source, i) for i in range(start, min(start + batch_size, num))]
    valid = np.arange(batch_size) < len(rows)
    rows += [rows[0]] * (batch_size - len(rows))
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    batch["valid"] = valid
    yield batch
