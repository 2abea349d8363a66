"""The training loop: build, resume, train, log, evaluate, checkpoint. Reads top to bottom.

What is trained is the run's objective (sapiens_jax.objectives: MAE pretraining, fine-tuning on
a task, ...): it builds the model, owns the loss, any extra train state and its data, and
evaluates. This loop only calls its hooks. The state and the jitted step are in step.py; the
data iterator position is checkpointed with the state, so a resumed run repeats an
uninterrupted one.
"""
import math
import os
import signal
import threading

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import numpy as np

from sapiens_jax import checkpoint
from sapiens_jax import init_from
from sapiens_jax import models
from sapiens_jax import objectives
from sapiens_jax import optim
from sapiens_jax import sharding
from sapiens_jax import step as train_step
from sapiens_jax import visualize
from sapiens_jax import writers


class PreemptionSignal:
  """SIGTERM (what schedulers and TPU maintenance send) asks the loop to checkpoint and stop.

  With several processes they must stop at the same step, so the flag is agreed on (a collective)
  only at logging steps; a single process checks it every step.
  """

  def __enter__(self):
    self._flag = threading.Event()
    self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())
    return self

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)

  def received(self, sync_point):
    if jax.process_count() == 1:
      return self._flag.is_set()
    if not sync_point:
      return False
    return bool(multihost_utils.process_allgather(np.int32(self._flag.is_set())).max())


def check_config(config):
  """Errors that name the key; the objective checks its own keys."""
  n = jax.process_count()
  if config.batch_size % n:
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the {n} processes")
  if config.batch_size % config.grad_accum_steps:
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by "
                     f"config.grad_accum_steps={config.grad_accum_steps}")
  for key in ("log_every_steps", "checkpoint_every_steps", "eval_every_steps", "total_steps"):
    if config[key] <= 0:
      raise ValueError(f"config.{key} must be positive, got {config[key]}")
  objective = objectives.get(config)
  objective.check_config(config)
  return objective


def train_and_evaluate(config, workdir, eval_only=False):
  """Trains (resuming from the workdir's newest checkpoint, if any), evaluating as it goes.

  With `eval_only`, evaluates the newest checkpoint (metrics, pictures) and returns.
  """
  objective = check_config(config)
  is_chief = jax.process_index() == 0

  # Mesh and sharding rules.
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  shards = sharding.batch_shards(mesh, rules)
  if config.batch_size % shards:
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the {shards} devices the "
                     f"batch is split over (mesh {dict(mesh.shape)})")

  # Model, optimizer, state.
  model = objective.build_model(config)
  tx = optim.make_optimizer(config)
  abstract_state = train_step.abstract_train_state(objective, model, tx, config, mesh, rules)
  state_shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
  num_params = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract_state["params"]))
  logging.info("%s %s %s: %s parameters, mesh %s", config.objective, models.family_name(config.model),
               config.model.size, f"{num_params:,}", dict(mesh.shape))

  # Data: each process reads its own slice of every global batch.
  if is_chief:
    objective.prepare_data(config, workdir)  # e.g. render a synthetic dataset, once
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("sapiens_jax: data prepared")
  data_iter = objective.train_iterator(config, workdir, batch_size=config.batch_size // jax.process_count(),
                                       seed=config.seed, process_index=jax.process_index(),
                                       process_count=jax.process_count())

  def to_global(local):
    return {k: jax.make_array_from_process_local_data(batch_sharding, v)
            for k, v in local.items() if k != "skipped"}

  # Resume from the newest checkpoint in the workdir, if any; else start from config.init_from, if set.
  manager = checkpoint.make_manager(workdir, config)
  # A fresh state is only built when there is nothing to resume (a 2B state is not made twice).
  start_step, state = checkpoint.restore_newest(manager, abstract_state, data_iter, config)
  if start_step:
    logging.info("Resumed from %s at step %d", manager.directory, start_step)
  elif eval_only:
    raise FileNotFoundError(f"nothing to evaluate: no checkpoint in {manager.directory}")
  else:
    state = train_step.init_train_state(objective, model, tx, config, mesh, rules, abstract_state)
    if config.init_from:
      params = init_from.load_params(config.init_from, state["params"], config)
      state["params"] = jax.device_put(params, state_shardings["params"])
      # The objective's own state follows (an EMA teacher starts as the loaded student), made on the
      # devices where it lives, in buffers of its own.
      extra = train_step.extra_state(state_shardings)
      if extra:
        state.update(jax.jit(lambda p: objective.init_extra_state(p, config), out_shardings=extra)(state["params"]))
      logging.info("Initialised the params from %s", config.init_from)

  p_train_step = train_step.jit_train_step(objective, model, tx, config, mesh, rules, state_shardings)
  writer = writers.MetricWriter(workdir, enabled=is_chief)

  # Evaluation, as the objective does it; where it names a best metric, the best checkpoint is kept.
  evaluation = objective.Evaluation(config, workdir, model, mesh, rules, state_shardings["params"])
  best = objective.best_metric(config)
  best_manager = checkpoint.make_best_manager(workdir, *best) if best else None
  pictures = os.path.join(workdir, objective.PICTURES)

  def run_eval(step, state):
    results, picture = evaluation(step, state)
    writer.write_scalars(step, {f"eval_{k}": float(v) for k, v in results.items()})
    logging.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
    if is_chief and picture is not None:
      visualize.save_png(os.path.join(pictures, f"step_{step:07d}.png"), picture)
      writer.write_image(step, objective.PICTURES, picture)
    if best_manager and step not in best_manager.all_steps():  # a resumed run may evaluate a step again
      checkpoint.save(best_manager, step, state, data_iter, config, metrics=results)

  if eval_only:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      run_eval(start_step, state)
    writer.close()
    return state

  progress = writers.Progress(config.total_steps, config.batch_size, start_step, every_secs=0)
  skipped = 0
  preemption = PreemptionSignal()
  with preemption, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for step in range(start_step + 1, config.total_steps + 1):
      batch = next(data_iter)
      skipped += int(np.sum(batch["skipped"]))
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = p_train_step(state, to_global(batch))

      if step % config.log_every_steps == 0 or step == config.total_steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(metrics["loss"]):
          raise FloatingPointError(
              f"loss is {metrics['loss']} at step {step}; the newest checkpoint is step "
              f"{manager.latest_step()} in {manager.directory}. Lower optim.base_lr or raise "
              f"optim.warmup_steps and resume.")
        steps_per_sec, examples_per_sec = progress.rates(step)
        all_skipped = multihost_utils.process_allgather(np.int64(skipped)).sum()  # every process
        metrics.update(steps_per_sec=steps_per_sec, examples_per_sec=examples_per_sec,
                       data_skipped=float(all_skipped))
        writer.write_scalars(step, metrics)
        progress.update(step, loss=metrics["loss"], lr=metrics["learning_rate"])
        for alert in objective.alerts(step, metrics, config):
          logging.warning("step %d: %s", step, alert)

      if step % config.eval_every_steps == 0 or step == config.total_steps:
        run_eval(step, state)

      stop = preemption.received(sync_point=step % config.log_every_steps == 0)
      if stop or step % config.checkpoint_every_steps == 0 or step == config.total_steps:
        checkpoint.save(manager, step, state, data_iter, config)
      if stop:
        manager.wait_until_finished()
        logging.warning("Preempted (SIGTERM) at step %d: checkpoint saved in %s. Run the same "
                        "command to resume.", step, manager.directory)
        writer.close()
        return state

  manager.wait_until_finished()
  if best_manager:
    best_manager.wait_until_finished()
  writer.close()
  logging.info("Done at step %d. Checkpoints: %s; metrics: %s; pictures: %s", config.total_steps,
               manager.directory, os.path.join(workdir, writers.METRICS_FILE), pictures)
  return state
