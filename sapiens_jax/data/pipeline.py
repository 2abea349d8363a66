"""The MAE pretraining input pipeline, built with Grain's Dataset API.

Index-based all the way down: element k of the infinite stream is fully
determined by (seed, k) (which record, which crop, which flip), so the
iterator's checkpointable state is a single position and a resumed run sees
exactly the samples the uninterrupted run would have seen.
"""
import functools
import logging

from absl import flags
import grain
import numpy as np

from sapiens_jax.data import sources
from sapiens_jax.data import transforms

ON_ERROR_POLICIES = ("raise", "skip")

# A bad record under on_error="skip" is replaced by the next index; this many
# failures in a row means something bigger is wrong (e.g. a wrong path or
# format), so we stop instead of silently scanning the whole dataset.
MAX_CONSECUTIVE_BAD_RECORDS = 100

# Elements of the MapDataset are whole batches, so Grain's defaults (16
# threads, 500 buffered elements) would hold hundreds of batches in memory.
# One thread building up to two batches ahead overlaps input with the train
# step; more parallelism comes from `num_workers` processes.
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


def load_pretrain_example(source, image_size, skip_bad, record_index, rng):
  """Reads, decodes and augments record `record_index` of `source`.

  With `skip_bad`, an unreadable record is replaced by the next readable one
  (wrapping around) and `skipped` counts how many were passed over, so shapes
  stay static and the number of bad files stays visible in the metrics.
  """
  num_records = len(source)
  for skipped in range(MAX_CONSECUTIVE_BAD_RECORDS):
    index = (int(record_index) + skipped) % num_records
    try:
      record = source[index]
      image = transforms.decode_image(record["data"], record["name"])
    except (transforms.ImageDecodeError, OSError) as e:
      if not skip_bad:
        raise
      logging.warning("skipping unreadable record %d: %s", index, e)
      last_error = e
      continue
    image = transforms.random_resized_crop(image, rng, image_size)
    image = transforms.random_flip(image, rng)
    return {"image": transforms.normalize(image), "skipped": np.int32(skipped)}
  raise RuntimeError(
      f"{MAX_CONSECUTIVE_BAD_RECORDS} consecutive records starting at index"
      f" {record_index} could not be read; last error: {last_error}"
  ) from last_error


def make_pretrain_iterator(data_config, *, image_size, batch_size, seed,
                           process_index=0, process_count=1):
  """Infinite, checkpointable iterator of this process's pretraining batches.

  Yields {"image": float32 (batch_size, H, W, 3) normalised,
          "skipped": int32 (batch_size,)}; `batch_size` is per process, and
  process p's batches are rows [p * batch_size, (p + 1) * batch_size) of the
  global batches that one process with process_count * batch_size would read.
  The result is a `grain.DatasetIterator`: save/restore it with
  `get_state()`/`set_state()` or Orbax's `grain.checkpoint.CheckpointSave`.
  """
  if data_config.on_error not in ON_ERROR_POLICIES:
    raise ValueError(
        f"unknown on_error policy {data_config.on_error!r}; expected one of"
        f" {', '.join(ON_ERROR_POLICIES)}")
  image_size = tuple(int(s) for s in image_size)
  source = sources.make_source(data_config, image_size, seed)
  load = functools.partial(
      load_pretrain_example, source, image_size,
      data_config.on_error == "skip")

  dataset = grain.MapDataset.range(len(source)).seed(seed)
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
  if data_config.num_workers > 0:
    # Grain's worker start-up reads an absl flag (once jax is imported), which
    # fails outside absl.app.run (notebooks, pytest) unless flags count as
    # parsed; all its flags then simply keep their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_dataset = iter_dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=data_config.num_workers))
  return iter(iter_dataset)
