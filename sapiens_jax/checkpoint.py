"""Orbax checkpoints of one run, and everything that reads a run back.

Every checkpoint holds three items: `state` (step, params, optimizer state and whatever state the
objective adds), `data` (the Grain iterator position, so a resumed run sees exactly the samples an
uninterrupted run would) and `config` (JSON: used to refuse resuming a different model into this
workdir, and to rebuild the model for export, prediction and init_from). Configs saved in an older
layout are brought to today's (default_config.upgrade), so their checkpoints keep restoring.
"""
import os
import time

from absl import logging
import flax.linen as nn
import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from sapiens_jax import default_config
from sapiens_jax import objectives

# Config entries that change the shapes of the saved state, and the model keys among them that only
# choose how it is computed (a run may resume with another attention path or remat policy).
_SHAPE_KEYS = ("model", "image_size")
_COMPUTE_ONLY = ("attention", "remat_policy", "dtype", "rope_dtype")


class MismatchError(ValueError):
  """The workdir holds a checkpoint of another model: never fall back, never overwrite."""


def make_manager(workdir, config):
  # The train loop decides when to save (every checkpoint_every_steps and at the end).
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                         async_options=_test_hold_save(directory))
  return ocp.CheckpointManager(directory, options=options)


# Test-only (tests/test_checkpoints.py), never set in a real run: SAPIENS_TEST_HOLD_SAVE=STEP:PATH
# stops the background commit of checkpoint STEP after its files are written and before Orbax
# renames its tmp dir into place, writes that tmp dir's name to PATH, and sleeps there for good.
# So a test can SIGKILL the process with that save provably in flight. Unset: no hook at all.
HOLD_SAVE_ENV = "SAPIENS_TEST_HOLD_SAVE"


def _test_hold_save(directory):
  spec = os.environ.get(HOLD_SAVE_ENV)
  if not spec:
    return None
  step, marker = spec.split(":", 1)

  def hold():  # Orbax's post_finalization_callback: in the save thread, just before the commit.
    # One save of a manager is in flight at a time; its tmp dir is named "STEP.orbax-checkpoint-tmp...".
    in_flight = [name for name in os.listdir(directory) if name.startswith(f"{step}.orbax-checkpoint-tmp")]
    if not in_flight:
      return
    with open(marker + ".tmp", "w") as f:
      f.write(in_flight[0])
    os.replace(marker + ".tmp", marker)  # the test never reads half a marker
    while True:
      time.sleep(60)

  return ocp.AsyncOptions(post_finalization_callback=hold)


def make_best_manager(workdir, metric, mode):
  """Keeps the one checkpoint with the best `metric` ("min" or "max" is best), in DIR/best_checkpoint."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=1, create=True, best_fn=lambda metrics: metrics[metric], best_mode=mode)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "best_checkpoint"), options=options)


def save(manager, step, state, data_iterator, config, metrics=None):
  """Asynchronous: returns once the arrays are copied off the devices; files are written behind."""
  return manager.save(step, force=True, metrics=metrics, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator),
      config=ocp.args.JsonSave(config.to_dict())))


def saved_config(manager, step):
  """The config saved with checkpoint `step`, in today's layout."""
  saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  return ml_collections.ConfigDict(default_config.upgrade(saved))


def check_compatible(manager, step, config):
  """Raise a clear error if the checkpoint at `step` was written for another model or image size."""
  saved = saved_config(manager, step).to_dict()
  wanted = config.to_dict()
  diffs = []
  for key in _SHAPE_KEYS:
    old, new = saved.get(key), wanted.get(key)
    if isinstance(old, dict) and isinstance(new, dict):
      keys = sorted((set(old) | set(new)) - set(_COMPUTE_ONLY))
      diffs += [f"{key}.{k}: checkpoint has {old.get(k)!r}, config has {new.get(k)!r}"
                for k in keys if _norm(old.get(k)) != _norm(new.get(k))]
    elif _norm(old) != _norm(new):
      diffs.append(f"{key}: checkpoint has {old!r}, config has {new!r}")
  if diffs:
    raise MismatchError(
        f"{manager.directory} holds a checkpoint (step {step}) of a different model:\n  " + "\n  ".join(diffs)
        + "\nUse a fresh --workdir, or the config the checkpoint was trained with.")


def _norm(value):
  return list(value) if isinstance(value, (tuple, list)) else value


def check_shapes(manager, step, abstract_state, limit=5):
  """Raise MismatchError if the arrays saved at `step` differ in shape or structure from `abstract_state`.

  The config check cannot see everything that shapes the state (a code change, an edited config
  file, a hand-built abstract state). Orbax's own error for it is a ValueError like any damage, so
  without this check `restore_newest` would move good checkpoints aside as damaged. Reads only the
  `state` item's metadata file, never the arrays.
  """
  # make_manager keeps Orbax's default step names: the step number itself.
  metadata = ocp.StandardCheckpointHandler().metadata(manager.directory / str(step) / "state")
  saved, wanted = _shapes(metadata), _shapes(abstract_state)
  if saved == wanted:
    return
  missing = lambda shape: "none" if shape is None else shape
  # Parameters first (named as in the model), then the optimizer state that mirrors them.
  names = sorted(set(saved) | set(wanted), key=lambda k: (not k.startswith("params/"), k))
  diffs = [f"{name.removeprefix('params/')}: checkpoint {missing(saved.get(name))}, "
           f"model {missing(wanted.get(name))}" for name in names if saved.get(name) != wanted.get(name)]
  more = f"\n  ... and {len(diffs) - limit} more" if len(diffs) > limit else ""
  raise MismatchError(
      f"{manager.directory} holds a checkpoint (step {step}) whose arrays do not fit the model "
      f"({len(diffs)} differ):\n  " + "\n  ".join(diffs[:limit]) + more
      + "\nUse a fresh --workdir, or the config and code the checkpoint was trained with.")


def _shapes(tree):
  """{"params/encoder/ln1/scale": (64,), ...}: namedtuple fields, dict keys and indices alike."""
  def name(key):
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(map(name, path)): tuple(leaf.shape) for path, leaf in leaves}


def restore(manager, step, abstract_state, data_iterator):
  """Restore state (into the shardings of `abstract_state`) and the iterator position, in place."""
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iterator)))
  return restored["state"]


def restore_newest(manager, abstract_state, data_iterator, config):
  """(step, state) of the newest checkpoint that restores completely, or (0, None) if none exist.

  A damaged newest checkpoint (truncated or missing files) is reported with a warning naming both
  steps and moved aside to `checkpoints_damaged/` (kept for inspection, out of the way of the
  re-save), and the next older one is used. Partial data is never loaded silently.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  damaged = []
  for i, step in enumerate(steps):
    try:
      check_compatible(manager, step, config)
      check_shapes(manager, step, abstract_state)
      state = restore(manager, step, abstract_state, data_iterator)
    except MismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (Orbax/TensorStore raise many types)
      if i + 1 == len(steps):
        raise RuntimeError(f"no checkpoint in {manager.directory} could be restored; the oldest, "
                           f"step {step}, failed with: {e}") from e
      logging.warning("Checkpoint step %d in %s is damaged (%s: %s); falling back to step %d.",
                      step, manager.directory, type(e).__name__, str(e)[:300], steps[i + 1])
      damaged.append(step)
      continue
    _move_aside(manager, damaged)
    return step, state
  return 0, None


def _move_aside(manager, steps):
  if not steps:
    return
  aside = os.path.join(os.path.dirname(str(manager.directory)), "checkpoints_damaged")
  if jax.process_index() == 0:
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      os.replace(os.path.join(str(manager.directory), str(step)), os.path.join(aside, str(step)))
      logging.warning("Moved damaged checkpoint step %d to %s.", step, aside)
  multihost_utils.sync_global_devices("sapiens_jax: damaged checkpoints moved")
  manager.reload()


# ---------------------------------------------------------------- reading a run back

def checkpoint_steps(workdir):
  """(read-only manager, sorted steps) of `workdir`/checkpoints; an error naming the dir if empty."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {workdir!r}: {directory} does not exist")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True, create=False, save_interval_steps=0))
  steps = sorted(manager.all_steps())
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {workdir!r}: {directory} holds no saved step")
  return manager, steps


def abstract_weights(config):
  """Shapes and dtypes of the weights a run hands out (its objective's WEIGHTS entry: the params, or an EMA
  teacher), traced (never allocated), built by the objective's own init as training builds them."""
  objective = objectives.get(config)
  model = objective.build_model(config)

  def weights(key):
    params = objective.init_params(model, config, key)
    return nn.unbox({"params": params, **objective.init_extra_state(params, config)}[objective.WEIGHTS])
  return jax.eval_shape(weights, jax.random.key(0))


def restore_params(workdir, step=None):
  """(weights as numpy arrays, saved config, step) of checkpoint `step` (default: the newest) of a run.

  Reads only the weights the objective hands out (its WEIGHTS: the params, or the EMA teacher of a
  self-distillation run; not the optimizer state), onto one CPU device, whatever the run was trained
  on: the shapes come from the config saved with the checkpoint.
  """
  manager, steps = checkpoint_steps(workdir)
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ValueError(f"no checkpoint for step {step} in {manager.directory}; available steps: {steps}")
  config = saved_config(manager, step)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  entry = objectives.get(config).WEIGHTS
  target = {entry: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu),
                                abstract_weights(config))}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
  return jax.tree.map(np.asarray, restored["state"][entry]), config, step
