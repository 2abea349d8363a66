r"""Input pipeline throughput (samples/s) for MAE 1024² crops and pose 1024x768 top-down samples.

  python benchmarks/input_pipeline.py [--data=/tmp/sapiens_input_bench] [--num_images=32] \
      [--workers=1,2] [--resize=pil,cv2] [--batch_size=8] [--batches=12] [--warmup=2]

The images are synthetic humans (sapiens_jax.data.synthetic_humans) rendered at 1280x1024 (HxW)
and stored as JPEG quality 95: photo-sized files with smooth shading and edges, rendered once into
--data. Each case runs the real iterator (pipeline.make_pretrain_iterator / make_task_iterator,
Grain worker processes; MAE once per crop resize backend, data.resize), skips --warmup batches (worker start-up), then times --batches batches.
Prints one JSON line per case.
"""
import functools
import json
import os
import time

from absl import app
from absl import flags

from sapiens_jax import default_config
from sapiens_jax.data import pipeline
from sapiens_jax.data import synthetic_humans

_DATA = flags.DEFINE_string("data", "/tmp/sapiens_input_bench", "Where the JPEGs are rendered.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 32, "Images to render (once).")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "Grain worker counts to time.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Samples per batch.")
_BATCHES = flags.DEFINE_integer("batches", 12, "Timed batches per case.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed batches first.")
_RESIZE = flags.DEFINE_list("resize", ["pil", "cv2"], "MAE crop resize backends (data.resize) to time.")

IMAGE_HW = (1280, 1024)


def ensure_images(root, num):
  if not os.path.exists(os.path.join(root, "manifest.json")):
    synthetic_humans.write_dataset(root, num, *IMAGE_HW, seed=0, workers=os.cpu_count())


def time_batches(iterator):
  """(samples/s of wall time, samples per CPU-second of this process) over --batches batches."""
  for _ in range(_WARMUP.value):
    next(iterator)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(_BATCHES.value):
    next(iterator)
  samples = _BATCHES.value * _BATCH_SIZE.value
  return samples / (time.perf_counter() - wall), samples / (time.process_time() - cpu)


def mae_iterator(root, workers, resize):
  data = default_config.pretrain("0.3b").data  # 1024² crops
  data.update(dict(source="folder", path=os.path.join(root, "images"), num_workers=workers,
                   resize=resize))
  return pipeline.make_pretrain_iterator(data, image_size=(1024, 1024),
                                         batch_size=_BATCH_SIZE.value, seed=0)


def pose_iterator(root, workers):
  config = default_config.finetune("coco", "0.3b")  # 1024x768 input, sigma 6 heatmaps
  config.data.path = root
  config.data.annotations = os.path.join(root, "person_keypoints.json")
  config.data.num_workers = workers
  return pipeline.make_task_iterator(config, batch_size=_BATCH_SIZE.value, seed=0)


def main(argv):
  del argv
  ensure_images(_DATA.value, _NUM_IMAGES.value)
  cases = [(f"mae_1024x1024_{resize}_resize", functools.partial(mae_iterator, resize=resize))
           for resize in _RESIZE.value]
  for name, make in cases + [("pose_1024x768", pose_iterator)]:
    for workers in (int(w) for w in _WORKERS.value):
      rate, per_cpu_second = time_batches(make(_DATA.value, workers))
      # In process, samples per CPU-second is the per-core rate, whatever else shares the cores.
      per_core = {"samples_per_cpu_sec": round(per_cpu_second, 1)} if workers == 0 else {}
      print(json.dumps({"case": name, "workers": workers, "samples_per_sec": round(rate, 1),
                        "samples_per_sec_per_worker": round(rate / max(workers, 1), 1),
                        **per_core, "cpus": os.cpu_count(),
                        "load_avg_1m": round(os.getloadavg()[0], 1),
                        "source_image_hw": IMAGE_HW, "batch_size": _BATCH_SIZE.value}),
            flush=True)


if __name__ == "__main__":
  app.run(main)
