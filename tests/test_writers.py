"""Tests for writers.py."""
import io
import json
import logging
import math
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator

from sapiens_jax import writers


def _load_events(workdir):
  accumulator = event_accumulator.EventAccumulator(
      str(workdir / writers.TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0})
  accumulator.Reload()
  return accumulator


def test_importing_writers_does_not_import_tensorflow():
  code = ("import sys, sapiens_jax.writers, sapiens_jax.visualize; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_scalars_go_to_jsonl_and_tensorboard(tmp_path):
  writer = writers.MetricWriter(tmp_path)
  writer.write_scalars(10, {"loss": np.float32(0.5), "lr": jnp.asarray(1e-4)})
  writer.write_scalars(20, {"loss": 0.25, "lr": 2e-4})
  writer.close()

  lines = (tmp_path / writers.METRICS_FILE).read_text().splitlines()
  assert [json.loads(line) for line in lines] == [
      {"step": 10, "loss": 0.5, "lr": pytest.approx(1e-4)},
      {"step": 20, "loss": 0.25, "lr": 2e-4},
  ]
  events = _load_events(tmp_path)
  assert set(events.Tags()["scalars"]) == {"loss", "lr"}
  assert [(e.step, e.value) for e in events.Scalars("loss")] == [(10, 0.5), (20, 0.25)]


def test_image_is_readable_from_tensorboard(tmp_path):
  image = np.random.default_rng(0).integers(0, 256, size=(12, 20, 3), dtype=np.uint8)
  writer = writers.MetricWriter(tmp_path)
  writer.write_image(7, "reconstructions", image)
  writer.close()

  (event,) = _load_events(tmp_path).Images("reconstructions")
  assert (event.step, event.height, event.width) == (7, 12, 20)
  decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
  np.testing.assert_array_equal(decoded, image)


def test_write_image_rejects_float_images(tmp_path):
  writer = writers.MetricWriter(tmp_path)
  with pytest.raises(ValueError, match="uint8"):
    writer.write_image(0, "bad", np.zeros((4, 4, 3), np.float32))
  writer.close()


def test_non_finite_values_are_null_in_json_and_nan_when_read(tmp_path):
  writer = writers.MetricWriter(tmp_path)
  writer.write_scalars(1, {"loss": float("nan"), "grad_norm": np.inf, "lr": 0.1})
  writer.close()

  line = (tmp_path / writers.METRICS_FILE).read_text()

  def reject(constant):
    raise AssertionError(f"non-standard JSON constant {constant}")

  assert json.loads(line, parse_constant=reject) == {
      "step": 1, "loss": None, "grad_norm": None, "lr": 0.1}
  (record,) = writers.read_metrics(tmp_path)
  assert math.isnan(record["loss"]) and math.isnan(record["grad_norm"]) and record["lr"] == 0.1
  (event,) = _load_events(tmp_path).Scalars("loss")
  assert math.isnan(event.value)


def test_read_metrics_keeps_last_record_of_a_relogged_step(tmp_path):
  first = writers.MetricWriter(tmp_path)
  for step in (0, 10, 20):
    first.write_scalars(step, {"loss": step + 0.5})
  first.close()
  resumed = writers.MetricWriter(tmp_path)  # resumed from a step-10 checkpoint
  resumed.write_scalars(20, {"loss": 99.0})
  resumed.write_scalars(30, {"loss": 98.0})
  resumed.write_scalars(30, {"eval_loss": 1.0})  # eval written separately at the same step
  resumed.close()

  assert writers.read_metrics(tmp_path) == [
      {"step": 0, "loss": 0.5},
      {"step": 10, "loss": 10.5},
      {"step": 20, "loss": 99.0},
      {"step": 30, "loss": 98.0, "eval_loss": 1.0},
  ]


def test_partial_line_from_a_crash_loses_no_later_record(tmp_path):
  (tmp_path / writers.METRICS_FILE).write_text('{"step": 0, "loss": 1.0}\n{"step": 5, "lo')
  writer = writers.MetricWriter(tmp_path)
  writer.write_scalars(5, {"loss": 0.5})
  writer.close()
  assert writers.read_metrics(tmp_path) == [{"step": 0, "loss": 1.0}, {"step": 5, "loss": 0.5}]


def test_disabled_writer_creates_nothing(tmp_path):
  workdir = tmp_path / "workdir"
  writer = writers.MetricWriter(workdir, enabled=False)
  writer.write_scalars(0, {"loss": 1.0})
  writer.write_image(0, "image", np.zeros((2, 2, 3), np.uint8))
  writer.flush()
  writer.close()
  assert not workdir.exists()


def test_progress_stats():
  steps_per_sec, examples_per_sec, eta = writers.progress_stats(
      steps_done=40, elapsed_secs=10.0, steps_left=180, batch_size=64)
  assert (steps_per_sec, examples_per_sec, eta) == (4.0, 256.0, 45.0)
  assert writers.progress_stats(0, 10.0, 100, 64) == (0.0, 0.0, None)
  assert writers.progress_stats(5, 0.0, 100, 64) == (0.0, 0.0, None)


def test_progress_logs_line_and_respects_interval(monkeypatch, caplog):
  clock = [1000.0]
  monkeypatch.setattr(writers.time, "monotonic", lambda: clock[0])
  progress = writers.Progress(total_steps=300, batch_size=64, first_step=100, every_secs=30)

  clock[0] += 6.25
  assert progress.rates(120) == (3.2, 204.8)
  with caplog.at_level(logging.INFO):
    progress.update(120, loss=jnp.asarray(0.43121))  # too early: nothing logged
    assert not caplog.messages
    clock[0] += 30 - 6.25
    progress.update(200, loss=0.4312)
  assert caplog.messages == [
      "step 200/300 (66.7%) | 3.3 steps/s | 213.3 examples/s | ETA 0:00:30 | loss 0.4312"]
  assert progress.rates(200) == (0.0, 0.0)  # rates restart from the report just made
