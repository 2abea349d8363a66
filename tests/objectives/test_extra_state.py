"""An objective's own train state (here an EMA teacher, tests/ema_objective.py) lives in the one
train state: updated after every step by the objective's post_update, checkpointed, and resumed
bit for bit, with nothing in the trainer naming it."""
import shutil

import jax
import numpy as np

from sapiens_jax import objectives
from sapiens_jax import train
from sapiens_jax import writers
import ema_objective


def test_an_ema_teacher_is_updated_checkpointed_and_resumed(tiny_config, monkeypatch, tmp_path):
  monkeypatch.setitem(objectives.OBJECTIVES, "ema_mae", ema_objective)
  tiny_config.objective = "ema_mae"
  tiny_config.total_steps = 2
  tiny_config.checkpoint_every_steps = 1
  first = train.train_and_evaluate(tiny_config, str(tmp_path / "two"))
  tiny_config.total_steps = 1
  start = train.train_and_evaluate(tiny_config, str(tmp_path / "one"))
  # After each step: teacher = m * teacher + (1 - m) * params, from teacher = params at init.
  m = ema_objective.MOMENTUM
  for teacher, before, params in zip(jax.tree.leaves(first["teacher"]), jax.tree.leaves(start["teacher"]),
                                     jax.tree.leaves(first["params"])):
    np.testing.assert_allclose(teacher, m * np.asarray(before) + (1 - m) * np.asarray(params),
                               rtol=1e-6, atol=1e-7)
  assert any(not np.array_equal(t, p) for t, p in zip(jax.tree.leaves(first["teacher"]),
                                                      jax.tree.leaves(first["params"])))

  # Resumed from its step-2 checkpoint, a 4-step run ends where an uninterrupted one does.
  tiny_config.total_steps = 4
  full = train.train_and_evaluate(tiny_config, str(tmp_path / "full"))
  cut = tmp_path / "cut"
  shutil.copytree(tmp_path / "two", cut)
  resumed = train.train_and_evaluate(tiny_config, str(cut))
  for a, b in zip(jax.tree.leaves(full["teacher"]), jax.tree.leaves(resumed["teacher"])):
    np.testing.assert_array_equal(a, b)
  losses = lambda d: [r["loss"] for r in writers.read_metrics(d) if "loss" in r]
  assert losses(cut)[2:] == losses(tmp_path / "full")[2:]
