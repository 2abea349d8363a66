"""Metric logging: a JSON-lines file for scripts, TensorBoard events for humans, progress lines.

`clu.metric_writers` imports TensorFlow, which we do not install, so event files are written with
the `tensorboard` package's own writer and protos.

Non-finite values: `metrics.jsonl` stays strict JSON (readable by jq, pandas, browsers), so NaN
and +-inf are written as `null`; `read_metrics` turns `null` back into NaN. TensorBoard gets the
real value (it plots NaN/inf itself).
"""
import datetime
import io
import json
import math
import os
import time

from absl import logging
import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and `workdir/tensorboard/`, images to the latter.

  Pass `enabled=False` on every JAX process but the first: all methods then do nothing and no
  file is created, so callers need no `if process_index == 0` of their own.
  """

  def __init__(self, workdir, enabled=True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    metrics_path = os.path.join(workdir, METRICS_FILE)
    # A run killed mid-write may have left a partial last line; start on a fresh line so the
    # partial one does not swallow the first record of this session.
    ends_mid_line = False
    if os.path.exists(metrics_path) and os.path.getsize(metrics_path) > 0:
      with open(metrics_path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        ends_mid_line = f.read(1) != b"\n"
    self._jsonl = open(metrics_path, "a", encoding="utf-8")
    if ends_mid_line:
      self._jsonl.write("\n")
    self._events = EventFileWriter(os.path.join(workdir, TENSORBOARD_DIR))

  def write_scalars(self, step, scalars):
    """Appends `{"step": step, **scalars}` as one JSON line and one TensorBoard event."""
    if not self.enabled:
      return
    step = int(step)
    values = {name: float(value) for name, value in scalars.items()}
    record = {name: (v if math.isfinite(v) else None) for name, v in values.items()}
    self._jsonl.write(json.dumps({"step": step, **record}, allow_nan=False) + "\n")
    self._jsonl.flush()
    self._add_summary(step, [summary_pb2.Summary.Value(tag=name, simple_value=v)
                             for name, v in values.items()])

  def write_image(self, step, name, image_uint8_hwc):
    """Writes one (H, W, C) uint8 image, C in {1, 3, 4}, as a PNG TensorBoard image summary."""
    if not self.enabled:
      return
    image = np.asarray(image_uint8_hwc)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
      raise ValueError(f"Expected a uint8 (H, W, 1|3|4) image, got {image.dtype} {image.shape}.")
    png = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(png, format="PNG")
    height, width, channels = image.shape
    summary_image = summary_pb2.Summary.Image(
        height=height, width=width, colorspace=channels, encoded_image_string=png.getvalue())
    self._add_summary(int(step), [summary_pb2.Summary.Value(tag=name, image=summary_image)])

  def flush(self):
    if not self.enabled:
      return
    self._jsonl.flush()
    self._events.flush()

  def close(self):
    if not self.enabled:
      return
    self._jsonl.close()
    self._events.close()

  def _add_summary(self, step, values):
    summary = summary_pb2.Summary(value=values)
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))


def read_metrics(workdir):
  """Records of `workdir/metrics.jsonl`, one dict per step, sorted by step.

  Records of the same step are merged with later values winning, so a resumed run that re-logs a
  step replaces the old values instead of duplicating the step, while train and eval metrics
  written separately at one step both survive. `null` (a non-finite value) reads back as NaN.
  Lines that are not valid JSON (a write cut short by a crash) are skipped with a warning.
  """
  by_step = {}
  with open(os.path.join(workdir, METRICS_FILE), encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        logging.warning("Skipping unreadable line %d of %s.", line_number, METRICS_FILE)
        continue
      step = record.pop("step")
      record = {name: (math.nan if v is None else v) for name, v in record.items()}
      by_step.setdefault(step, {}).update(record)
  return [{"step": step, **by_step[step]} for step in sorted(by_step)]


def progress_stats(steps_done, elapsed_secs, steps_left, batch_size):
  """(steps/s, examples/s, ETA in seconds or None when no rate is known yet).

  Pure, so the arithmetic is testable without sleeping.
  """
  if steps_done <= 0 or elapsed_secs <= 0:
    return 0.0, 0.0, None
  steps_per_sec = steps_done / elapsed_secs
  return steps_per_sec, steps_per_sec * batch_size, max(steps_left, 0) / steps_per_sec


class Progress:
  """Logs `step 120/300 (40.0%) | 3.2 steps/s | 204.8 examples/s | ETA 0:00:56 | loss 0.4312`.

  Rates are measured since the previous report (or construction), so they follow the current
  speed rather than an average that includes compilation.
  """

  def __init__(self, total_steps, batch_size, first_step, every_secs=60.0):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.every_secs = every_secs
    self._last_step = first_step
    self._last_time = time.monotonic()

  def rates(self, step):
    """(steps/s, examples/s) since the previous report; (0, 0) if no step was taken since."""
    steps_per_sec, examples_per_sec, _ = self._stats(step, time.monotonic())
    return steps_per_sec, examples_per_sec

  def update(self, step, **scalars):
    """Logs a progress line if `every_secs` passed since the previous one (always if 0)."""
    now = time.monotonic()
    if now - self._last_time < self.every_secs:
      return
    steps_per_sec, examples_per_sec, eta_secs = self._stats(step, now)
    eta = "?" if eta_secs is None else str(datetime.timedelta(seconds=round(eta_secs)))
    parts = [
        f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.1f}%)",
        f"{steps_per_sec:.1f} steps/s",
        f"{examples_per_sec:.1f} examples/s",
        f"ETA {eta}",
    ]
    parts += [f"{name} {float(value):.4g}" for name, value in scalars.items()]
    logging.info(" | ".join(parts))
    self._last_step, self._last_time = step, now

  def _stats(self, step, now):
    return progress_stats(step - self._last_step, now - self._last_time,
                          self.total_steps - step, self.batch_size)
