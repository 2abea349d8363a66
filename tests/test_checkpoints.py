"""Checkpoints you can trust: a SIGKILL anywhere costs only time, a checkpoint moves between meshes
and onto a CPU-only host bit for bit, and one of another model is refused by name.

Runs are real `python -m sapiens_jax.main` processes. They share the test run's persistent
compilation cache, so a restart does not recompile; a cached executable is the same code, so results stay bitwise.
This file is also its own helper for processes with 8 CPU devices:
`python tests/test_checkpoints.py save|restore SOURCE TARGET DATA FSDP OUT.npz` (see `_helper`).
"""
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

from sapiens_jax import checkpoint
from sapiens_jax import objectives
from sapiens_jax import optim
from sapiens_jax import sharding
from sapiens_jax import step as train_step
from sapiens_jax import writers
from sapiens_jax.data import pipeline

import fake_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 12, 4
# As the other subprocess tests: tiny model, 32x32, batch 8, 64 generated images (an epoch is 8 steps).
TINY = {"model.size": "tiny", "image_size": (32, 32), "batch_size": 8, "total_steps": STEPS,
        "log_every_steps": 1, "checkpoint_every_steps": EVERY, "eval_every_steps": 1000,
        "num_viz_images": 2, "model.decoder_width": 32, "model.decoder_depth": 1,
        "model.decoder_heads": 2, "data.num_generated": 64}


def tiny_config(**overrides):
  """configs/quickstart.py with TINY and `overrides` ("mesh.fsdp": 8, ...) applied."""
  spec = importlib.util.spec_from_file_location("quickstart", os.path.join(REPO, "configs", "quickstart.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in {**TINY, **overrides}.items():
    *parents, leaf = key.split(".")
    functools.reduce(getattr, parents, config)[leaf] = value
  return config


def boxed_state(config):
  """The train state of `config`'s model as step.abstract_train_state traces it: shapes and logical
  axis names, never allocated."""
  objective = objectives.get(config)
  model, tx = objective.build_model(config), optim.make_optimizer(config)
  init = functools.partial(train_step.init_state, objective, model, tx, config)
  return jax.eval_shape(init, jax.random.key(config.seed))


@pytest.fixture(scope="module")
def env():
  """The run's compilation cache (conftest.py sets JAX_COMPILATION_CACHE_DIR), here for every program."""
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def run_main(workdir, env, kill_at=None, hold=None):
  """(return code, output) of one training run; SIGKILLed on its first output line holding `kill_at`.

  With `hold` = (STEP, MARKER), the save of checkpoint STEP stops just before its commit (the
  test-only checkpoint.HOLD_SAVE_ENV hook) and writes MARKER; without `kill_at`, the run is
  SIGKILLed as soon as MARKER exists: with that save provably in flight, whatever the speed.
  SIGKILL runs no handler and no `finally`: the process stops wherever it is, as on an OOM kill or
  a lost machine.
  """
  if hold:
    env = dict(env, **{checkpoint.HOLD_SAVE_ENV: f"{hold[0]}:{hold[1]}"})
  proc = subprocess.Popen(
      [sys.executable, "-m", "sapiens_jax.main", "--config=configs/quickstart.py", f"--workdir={workdir}",
       *[f"--config.{key}={value}" for key, value in TINY.items()]], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  lines = []

  def read():
    for line in proc.stdout:
      lines.append(line)
      if kill_at and kill_at in line:
        proc.kill()

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  deadline = time.monotonic() + 300
  try:
    while proc.poll() is None and time.monotonic() < deadline:
      if hold and not kill_at and os.path.exists(hold[1]):
        proc.kill()
        break
      time.sleep(0.05)
  finally:
    proc.kill()
    proc.wait()
    reader.join(timeout=30)
  return proc.returncode, "".join(lines)


def loss_lines(workdir, start=0):
  """[(step, loss)] of the metrics.jsonl lines from byte `start` on, in the order written (a line
  cut short by a kill is skipped, as writers.read_metrics does)."""
  with open(os.path.join(workdir, writers.METRICS_FILE), "rb") as f:
    f.seek(start)
    lines = f.read().decode().splitlines()
  records = []
  for line in lines:
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return [(r["step"], r["loss"]) for r in records if "loss" in r]


def listing(workdir):
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  code, output = run_main(workdir, env)
  assert code == 0, output[-3000:]
  return workdir


@pytest.fixture(scope="module")
def killed(env, uninterrupted, tmp_path_factory):  # after `uninterrupted`: restarts hit the cache
  """The same run SIGKILLed three times, then run to the end.

  Every killed run holds the save of step 8 before its commit (run_main's `hold`), so however fast
  the machine, step 4 is the newest committed checkpoint until the last run. Returns (workdir,
  {moment: (checkpoints/ after the kill, output)}, what the held save wrote to its marker, output
  of the last run, size of metrics.jsonl before the last run).
  """
  workdir = tmp_path_factory.mktemp("killed")
  markers = tmp_path_factory.mktemp("markers")
  moments = {
      # Killed once the marker exists: save(8) has written its files, not committed them.
      "while the step 8 save is in flight": None,
      "during startup, once restored": "Resumed from",
      "between saves": "step 6/",
  }
  seen = {}
  for i, (moment, trigger) in enumerate(moments.items()):
    marker = markers / f"held_{i}"
    code, output = run_main(workdir, env, kill_at=trigger, hold=(2 * EVERY, marker))
    assert code == -9, f"{moment}: expected SIGKILL, got {code}\n{output[-3000:]}"
    seen[moment] = (listing(workdir), output)
  first = markers / "held_0"
  assert first.exists(), "the step 8 save was never held in flight"
  held = first.read_text()
  offset = os.path.getsize(workdir / writers.METRICS_FILE)
  code, output = run_main(workdir, env)
  assert code == 0, output[-3000:]
  return workdir, seen, held, output, offset


def test_sigkill_during_a_save_leaves_only_a_tmp_dir_that_restart_ignores(killed):
  _, seen, held, final_output, _ = killed
  in_flight, _ = seen["while the step 8 save is in flight"]
  # The kill found the held save's tmp dir, and nothing of step 8 committed.
  assert held.startswith("8.orbax-checkpoint-tmp") and held in in_flight, (held, in_flight)
  assert "4" in in_flight and "8" not in in_flight, in_flight
  partial = [name for name in in_flight if not name.isdigit()]
  assert partial and all(name.startswith("8.") and "tmp" in name for name in partial), in_flight
  # Every restart resumed from the committed step 4, never from the partial step 8.
  assert "at step 4" in seen["during startup, once restored"][1]
  assert "at step 4" in seen["between saves"][1]
  assert "Resumed from" in final_output and "at step 4" in final_output
  assert "damaged" not in final_output  # the tmp dir was not even considered a checkpoint


def test_resumed_run_after_sigkills_repeats_the_uninterrupted_one_bitwise(uninterrupted, killed):
  workdir, _, _, _, offset = killed
  reference = dict(loss_lines(uninterrupted))
  assert sorted(reference) == list(range(1, STEPS + 1))
  # From the last restart on: exactly the uninterrupted losses.
  final = loss_lines(workdir, offset)
  assert [step for step, _ in final] == list(range(EVERY + 1, STEPS + 1))
  assert [loss for _, loss in final] == [reference[step] for step, _ in final]
  # Every step any killed attempt logged was exact too.
  assert all(loss == reference[step] for step, loss in loss_lines(workdir))
  ours, _, step = checkpoint.restore_params(workdir)
  theirs, _, _ = checkpoint.restore_params(uninterrupted)
  assert step == STEPS
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
  # The re-save of step 8 replaced its partial tmp dir: only committed steps are left.
  assert listing(workdir) == sorted(str(s) for s in range(EVERY, STEPS + 1, EVERY))


def flat_state(state):
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def sharded_leaves(state):
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return [jax.tree_util.keystr(path) for path, leaf in leaves if not leaf.sharding.is_fully_replicated]


def restore_on_mesh(workdir, data, fsdp):
  """(config, step, state, data iterator) that a run under mesh (data, fsdp) resumes with: the
  abstract state as train_and_evaluate builds it, and its restore_newest; nothing is compiled."""
  config = tiny_config(**{"mesh.data": data, "mesh.fsdp": fsdp})
  mesh, rules = sharding.make_mesh(config.mesh, devices=jax.devices()[:data * fsdp]), sharding.rules(config)
  objective = objectives.get(config)
  model, tx = objective.build_model(config), optim.make_optimizer(config)
  abstract = train_step.abstract_train_state(objective, model, tx, config, mesh, rules)
  data_iter = pipeline.make_pretrain_iterator(config.data, image_size=tuple(config.image_size),
                                              batch_size=config.batch_size, seed=config.seed)
  step, state = checkpoint.restore_newest(checkpoint.make_manager(workdir, config), abstract, data_iter, config)
  return config, step, state, data_iter


def assert_bitwise(a, b):
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key


QKV = "['params']['encoder']['layers_0']['attn']['qkv_kernel']"


def helper(env, tmp_path, *args):
  """Runs this file's helper mode (see `_helper`) in a process with 8 CPU devices; returns what it
  dumped: (state as {keystr: array}, keystrs of its sharded leaves)."""
  out = tmp_path / f"{args[0]}.npz"
  done = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, args), str(out)], cwd=REPO,
                        env=fake_devices.env(8, env),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  with np.load(out) as saved:
    return {k: saved[k] for k in saved.files if k != "sharded"}, list(saved["sharded"])


def test_fsdp8_checkpoint_restores_bitwise_on_other_meshes_and_for_export(uninterrupted, env, tmp_path):
  workdir = tmp_path / "fsdp8"
  # A process with 8 devices resumes the 1-device run under (data=1, fsdp=8) and saves it there.
  saved, sharded = helper(env, tmp_path, "save", uninterrupted, workdir, 1, 8)
  assert QKV in sharded and int(saved["['step']"]) == STEPS
  # Another one restores that checkpoint under (data=2, fsdp=4).
  restored, sharded = helper(env, tmp_path, "restore", workdir, "-", 2, 4)
  assert QKV in sharded
  assert_bitwise(restored, saved)
  _, step, state, _ = restore_on_mesh(workdir, 1, 1)  # this process has one CPU device
  assert step == STEPS and not sharded_leaves(state)
  assert_bitwise(flat_state(state), saved)
  # The CPU-only export path: params only, shapes from the saved config.
  params = {"['params']" + k: v for k, v in flat_state(checkpoint.restore_params(workdir)[0]).items()}
  assert_bitwise(params, {k: v for k, v in saved.items() if k.startswith("['params']")})
  # ... and they are the parameters the 1-device run trained.
  trained = {"['params']" + k: v for k, v in flat_state(checkpoint.restore_params(uninterrupted)[0]).items()}
  assert_bitwise(params, trained)


def abstract_state(config):
  return nn.unbox(boxed_state(config))


def test_restoring_into_a_model_of_other_shapes_is_a_mismatch_naming_them(uninterrupted, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(uninterrupted, workdir)
  saved_config = tiny_config()
  manager = checkpoint.make_manager(workdir, saved_config)
  checkpoint.check_shapes(manager, STEPS, abstract_state(saved_config))  # its own model fits
  other = abstract_state(tiny_config(**{"model.size": "small"}))
  with pytest.raises(checkpoint.MismatchError) as error:
    checkpoint.check_shapes(manager, STEPS, other)
  message = str(error.value)
  assert "encoder/cls_token: checkpoint (1, 1, 64), model (1, 1, 192)" in message
  assert "encoder/layers_0/attn/qkv_bias: checkpoint (3, 4, 16), model (3, 3, 64)" in message
  assert f"(step {STEPS})" in message and "more" in message
  assert len(message.splitlines()) <= 8  # the first few, not hundreds

  # Through restore_newest, with a config that passes the config check: refused, not "damaged".
  data = pipeline.make_pretrain_iterator(saved_config.data, image_size=(32, 32), batch_size=8,
                                         process_index=0, process_count=1, seed=0)
  with pytest.raises(checkpoint.MismatchError, match=r"encoder/cls_token: checkpoint \(1, 1, 64\)"):
    checkpoint.restore_newest(manager, other, data, saved_config)
  assert not os.path.exists(workdir / "checkpoints_damaged")
  assert listing(workdir) == listing(uninterrupted)

  # A structural difference: a decoder block the checkpoint does not have.
  deeper = abstract_state(tiny_config(**{"model.decoder_depth": 2}))
  with pytest.raises(checkpoint.MismatchError, match=r"decoder/decoder_blocks_1/attn/qkv_kernel: checkpoint none"):
    checkpoint.check_shapes(manager, STEPS, deeper)


def _helper(mode, source, target, data, fsdp, out):
  """Restores `source` under mesh (data, fsdp), then `save`: checkpoints it (same step) to `target`;
  `restore`: only that. Dumps the state and the names of its sharded leaves to `out`."""
  config, step, state, data_iter = restore_on_mesh(source, int(data), int(fsdp))
  if mode == "save":
    manager = checkpoint.make_manager(target, config)
    checkpoint.save(manager, step, state, data_iter, config)
    manager.wait_until_finished()
  np.savez(out, sharded=np.array(sharded_leaves(state)), **flat_state(state))


if __name__ == "__main__":
  _helper(*sys.argv[1:])
