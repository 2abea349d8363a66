"""Multi-process training is real: 2 processes x 4 CPU devices (launch/local.sh) train like 1 x 8.

Same global batches, masks and shardings, so the same losses and parameters; only process 0
writes metrics and pictures, and every process writes its part of the checkpoint.
"""
import os
import signal
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from sapiens_jax import checkpoint
from sapiens_jax import writers

import fake_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
TINY = ["--config=configs/quickstart.py", "--config.model.size=tiny", "--config.image_size=(32, 32)",
        "--config.batch_size=8", f"--config.total_steps={STEPS}", "--config.log_every_steps=1",
        f"--config.eval_every_steps={STEPS}", f"--config.checkpoint_every_steps={STEPS}",
        "--config.num_viz_images=2", "--config.model.decoder_width=32",
        "--config.model.decoder_depth=1", "--config.model.decoder_heads=2",
        "--config.data.num_generated=64"]


def start(command, env, log):
  """Runs in its own session, so a timeout can stop the launcher together with its processes."""
  with open(log, "w") as f:
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(process, log, timeout):
  try:
    process.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
  with open(log) as f:
    output = f.read()
  assert process.returncode == 0, output[-4000:]
  return output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(workdir of 1 process x 8 devices, workdir of 2 x 4, launcher output); both run at once."""
  root = tmp_path_factory.mktemp("multihost")
  # launch/local.sh runs the `python` on PATH: this interpreter's.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  one = start([sys.executable, "-m", "sapiens_jax.main", *TINY, f"--workdir={root / 'one'}"],
              fake_devices.env(8, env), root / "one.log")
  two = start([os.path.join(REPO, "launch", "local.sh"), "2", "4", "--", *TINY,
               f"--workdir={root / 'two'}"], env, root / "two.log")
  finish(one, root / "one.log", timeout=300)
  output = finish(two, root / "two.log", timeout=300)
  return root / "one", root / "two", output


def test_both_processes_joined_one_run(runs):
  _, _, output = runs
  for i in range(2):
    assert f"[process {i}] " in output
    assert f"process {i} of 2, 4 of 8 device(s)" in output


def test_two_processes_reach_the_losses_and_parameters_of_one(runs):
  one, two, _ = runs
  a, b = writers.read_metrics(one), writers.read_metrics(two)
  assert [r["step"] for r in b] == list(range(1, STEPS + 1))
  for key in ("loss", "grad_norm", "learning_rate"):
    np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=2e-5, err_msg=key)
  np.testing.assert_allclose(b[-1]["eval_loss"], a[-1]["eval_loss"], rtol=2e-5)
  params_one, _, _ = checkpoint.restore_params(one, STEPS)
  params_two, _, _ = checkpoint.restore_params(two, STEPS)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5),
               params_two, params_one)


def test_only_process_zero_writes_metrics_and_pictures(runs):
  one, two, _ = runs
  # Two writers would double every line and leave two event files.
  with open(one / writers.METRICS_FILE) as f, open(two / writers.METRICS_FILE) as g:
    assert len(g.readlines()) == len(f.readlines()) == STEPS + 1  # train steps + one eval
  assert len(os.listdir(two / writers.TENSORBOARD_DIR)) == 1
  assert os.listdir(two / "reconstructions") == [f"step_{STEPS:07d}.png"]
  # Process 0 pictures its own rows of the eval batch: the first rows, as one process does.
  png = f"reconstructions/step_{STEPS:07d}.png"
  picture_one = np.asarray(Image.open(one / png), np.int16)
  picture_two = np.asarray(Image.open(two / png), np.int16)
  assert picture_two.shape == picture_one.shape
  assert np.abs(picture_two - picture_one).max() <= 2


def test_every_process_wrote_its_part_of_the_final_checkpoint(runs):
  _, two, _ = runs
  step = two / "checkpoints" / str(STEPS)
  assert os.listdir(two / "checkpoints") == [str(STEPS)]
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(step / "data"))
  assert checkpoint.restore_params(two)[2] == STEPS  # complete: every parameter reads back
