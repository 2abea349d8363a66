"""MAE pretraining: build, resume, train, log, checkpoint, visualise. Reads top to bottom.

The train state is one dict {step, params, opt_state}, created already sharded on the mesh
(abstract shapes -> shardings -> jitted init). Randomness of step s is fold_in(seed, s), and the
data iterator position is checkpointed, so a resumed run repeats an uninterrupted one.
"""
import functools
import math
import os
import signal
import threading

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from sapiens_jax import checkpoint
from sapiens_jax import default_config
from sapiens_jax import evaluate
from sapiens_jax import init_from
from sapiens_jax import mae
from sapiens_jax import optim
from sapiens_jax import sharding
from sapiens_jax import task_model
from sapiens_jax import visualize
from sapiens_jax import writers
from sapiens_jax.data import pipeline
from sapiens_jax.data import transforms


def build_model(config):
  return mae.mae_from_config(config) if config.task == "mae" else task_model.model_from_config(config)


def batch_keys(config):
  """The arrays a training batch holds, each with the batch on its leading axis."""
  return ("image",) if config.task == "mae" else ("image", *task_model.target_keys(config.task))


def init_state(model, tx, config, rng):
  """The train state with logically-annotated (boxed) params; use under jax.eval_shape or jit."""
  dummy = jnp.zeros((1, *config.image_size, 3), jnp.float32)
  extra = (mae.example_keys(rng, 1),) if config.task == "mae" else ()
  params = model.init(rng, dummy, *extra)["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def abstract_train_state(model, tx, config, mesh, rules):
  """The train state as ShapeDtypeStructs carrying their target shardings; nothing is allocated."""
  init = functools.partial(init_state, model, tx, config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init, jax.random.key(config.seed))
  return sharding.abstract_arrays(boxed, sharding.tree_shardings(boxed, mesh, rules))


def init_train_state(model, tx, config, mesh, rules, abstract_state):
  """A fresh state from config.seed, born sharded as `abstract_state` says (never gathered)."""
  init = functools.partial(init_state, model, tx, config)
  shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(jax.random.key(config.seed))


def create_train_state(model, tx, config, mesh, rules):
  """Returns (state, abstract_state) of a fresh run."""
  abstract = abstract_train_state(model, tx, config, mesh, rules)
  return init_train_state(model, tx, config, mesh, rules, abstract), abstract


def loss_fn(params, model, batch, keys, config):
  """Loss and model outputs; `keys` holds one PRNG key per example (MAE masks, head dropout).

  batch["image"] is uint8 RGB as the pipelines ship it; it is normalised here, on the device.
  """
  images = transforms.normalize(batch["image"])
  if config.task == "mae":
    pred, mask = model.apply({"params": params}, images, keys)
    return mae.mae_loss(pred, images, mask, config.model.patch_size, config.model.norm_pix_loss), (pred, mask)
  outputs = model.apply({"params": params}, images, train=True, rngs={"dropout": keys[0]})
  return task_model.loss(config, outputs, batch), outputs


def loss_and_grads(params, model, batch, keys, config):
  """Mean loss and gradients over the batch, in `config.grad_accum_steps` sequential micro-batches.

  Every example keeps its own mask key and every micro-batch masks the same number of tokens, so
  the MAE result equals one pass over the whole batch (fine-tuning losses are means over equal
  micro-batches too; only the heads' dropout draws differ). Micro-batch i takes rows i, i+k,
  i+2k, ... so each one stays spread over all devices of the batch axis.
  """
  grad_fn = jax.value_and_grad(lambda p, b, k: loss_fn(p, model, b, k, config)[0])
  k = config.grad_accum_steps
  if k == 1:
    return grad_fn(params, batch, keys)
  split = lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

  def accumulate(carry, micro_batch):
    loss, grads = grad_fn(params, *micro_batch)
    return jax.tree.map(jnp.add, carry, (loss, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, grads), _ = jax.lax.scan(accumulate, zeros, jax.tree.map(split, (batch, keys)))
  return jax.tree.map(lambda x: x / k, (loss, grads))


def train_step(state, batch, *, model, tx, config):
  step_key = jax.random.fold_in(jax.random.key(config.seed), state["step"])
  keys = mae.example_keys(step_key, batch["image"].shape[0])
  loss, grads = loss_and_grads(state["params"], model, batch, keys, config)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  trainable = jax.tree.map(lambda g, label: g if label == "train" else None,  # None: left out
                           grads, optim.frozen_labels(grads, config.optim.frozen))
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(trainable),
             "learning_rate": optim.schedule(config)(state["step"])}
  return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def jit_train_step(model, tx, config, mesh, rules, state_shardings):
  """The train step, jitted with explicit shardings; the old state's buffers are donated.

  Call it under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)` so activation
  constraints resolve.
  """
  batch_sharding = sharding.batch_sharding(mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(functools.partial(train_step, model=model, tx=tx, config=config),
                 in_shardings=(state_shardings, {k: batch_sharding for k in batch_keys(config)}),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


def eval_step(params, batch, *, model, config):
  """Loss on a small fixed batch with fixed masks, comparable across steps, and the first
  `num_viz_images` examples (normalised, as the reconstruction grid expects) with their
  reconstruction (small enough to hand to every device)."""
  keys = mae.example_keys(jax.random.key(config.seed + 1), batch["image"].shape[0])
  loss, (pred, mask) = loss_fn(params, model, batch, keys, config)
  n = config.num_viz_images
  return loss, transforms.normalize(batch["image"][:n]), pred[:n], mask[:n]


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
  n = jax.process_count()
  if config.batch_size % n:
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the {n} processes")
  if config.batch_size % config.grad_accum_steps:
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by "
                     f"config.grad_accum_steps={config.grad_accum_steps}")
  if config.task not in default_config.TASKS:
    raise ValueError(f"config.task={config.task!r}; expected one of {', '.join(default_config.TASKS)}")
  if config.task != "mae" and config.eval_batch_size % n:
    raise ValueError(f"config.eval_batch_size={config.eval_batch_size} must be divisible by the {n} processes")
  for key in ("log_every_steps", "checkpoint_every_steps", "eval_every_steps", "total_steps"):
    if config[key] <= 0:
      raise ValueError(f"config.{key} must be positive, got {config[key]}")


def train_and_evaluate(config, workdir, eval_only=False):
  """Trains (resuming from the workdir's newest checkpoint, if any), evaluating as it goes.

  With `eval_only`, evaluates the newest checkpoint (metrics, pictures) and returns.
  """
  check_config(config)
  image_size = tuple(config.image_size)
  is_chief = jax.process_index() == 0

  # Mesh and sharding rules.
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shards = sharding.batch_shards(mesh, rules)
  for key in ("batch_size",) + (("eval_batch_size",) if config.task != "mae" else ()):
    if config[key] % shards:
      raise ValueError(f"config.{key}={config[key]} must be divisible by the {shards} devices the batch "
                       f"is split over (mesh {dict(mesh.shape)})")

  # Model, optimizer, state.
  model = build_model(config)
  tx = optim.make_optimizer(config)
  abstract_state = abstract_train_state(model, tx, config, mesh, rules)
  state_shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
  num_params = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract_state["params"]))
  logging.info("%s %s: %s parameters, mesh %s", config.task, config.model.size, f"{num_params:,}",
               dict(mesh.shape))

  # Data: each process reads its own slice of every global batch.
  local_batch = config.batch_size // jax.process_count()
  if config.task == "mae":
    make_iterator = functools.partial(pipeline.make_pretrain_iterator, config.data, image_size=image_size)
  else:
    if config.data.source == "synthetic":
      if is_chief:
        pipeline.ensure_synthetic_data(config, workdir)
      multihost_utils.sync_global_devices("sapiens_jax: synthetic data written")
    make_iterator = functools.partial(pipeline.make_task_iterator, config, workdir=workdir)
  make_iterator = functools.partial(make_iterator, process_index=jax.process_index(),
                                    process_count=jax.process_count())
  data_iter = make_iterator(seed=config.seed, batch_size=local_batch)

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
    state = init_train_state(model, tx, config, mesh, rules, abstract_state)
    if config.init_from:
      params = init_from.load_params(config.init_from, state["params"], config)
      state["params"] = jax.device_put(params, state_shardings["params"])
      logging.info("Initialised the params from %s", config.init_from)

  p_train_step = jit_train_step(model, tx, config, mesh, rules, state_shardings)
  writer = writers.MetricWriter(workdir, enabled=is_chief)

  # Evaluation. MAE: the loss on a small fixed batch (the smallest multiple of the batch shards and
  # processes that holds num_viz_images) and its reconstructions. Fine-tuning: the task's metrics
  # over the eval split, pictures of the first predictions, and the best checkpoint kept.
  if config.task == "mae":
    unit = math.lcm(sharding.batch_shards(mesh, rules), jax.process_count())
    viz_batch = next(make_iterator(seed=config.seed + 1,
                                   batch_size=unit * -(-config.num_viz_images // unit) // jax.process_count()))
    p_eval_step = jax.jit(functools.partial(eval_step, model=model, config=config),
                          in_shardings=(state_shardings["params"], {"image": batch_sharding}),
                          out_shardings=replicated)

    def run_eval(step, params):
      loss, images, pred, mask = jax.device_get(p_eval_step(params, to_global(viz_batch)))
      writer.write_scalars(step, {"eval_loss": float(loss)})
      if is_chief:
        grid = visualize.reconstruction_grid(images, pred, mask, config.model.patch_size,
                                             config.model.norm_pix_loss, max_rows=config.num_viz_images)
        visualize.save_png(os.path.join(workdir, "reconstructions", f"step_{step:07d}.png"), grid)
        writer.write_image(step, "reconstruction", grid)
  else:
    eval_source = pipeline.make_task_source(config, "eval", workdir)
    p_predict = jax.jit(functools.partial(evaluate.predict, model=model, config=config),
                        in_shardings=(state_shardings["params"], batch_sharding), out_shardings=replicated)
    best_manager = checkpoint.make_best_manager(workdir, config)
    forward = lambda params, images: model.apply({"params": params}, transforms.normalize(images))
    p_forward = jax.jit(forward, in_shardings=(state_shardings["params"], batch_sharding),
                        out_shardings=replicated)
    viz_batch = next(pipeline.eval_batches(config, eval_source, config.eval_batch_size))
    rows = config.eval_batch_size // jax.process_count()
    viz_images = viz_batch["image"][jax.process_index() * rows:(jax.process_index() + 1) * rows]
    target_key = None if config.task == "pose" else task_model.target_keys(config.task)[0]  # pose eval: boxes only

    def run_eval(step, params):
      results = evaluate.evaluate(
          config, params, p_predict, eval_source,
          lambda local: jax.make_array_from_process_local_data(batch_sharding, local))
      writer.write_scalars(step, {f"eval_{k}": float(v) for k, v in results.items()})
      logging.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
      outputs = jax.device_get(p_forward(params, jax.make_array_from_process_local_data(batch_sharding, viz_images)))
      if is_chief:  # image | target | prediction, one eval example per row
        n = min(config.num_viz_images, int(viz_batch["valid"].sum()))
        grid = visualize.stack_rows([visualize.task_panel(
            config.task, viz_batch["image"][i],
            viz_batch[target_key][i] if target_key else None, outputs[i], config.data.labels)
            for i in range(n)])
        visualize.save_png(os.path.join(workdir, "predictions", f"step_{step:07d}.png"), grid)
        writer.write_image(step, "predictions", grid)
      if step not in best_manager.all_steps():  # a resumed run may evaluate a step again
        checkpoint.save(best_manager, step, state, data_iter, config, metrics=results)
  if eval_only:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      run_eval(start_step, state["params"])
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

      if step % config.eval_every_steps == 0 or step == config.total_steps:
        run_eval(step, state["params"])

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
  if config.task != "mae":
    best_manager.wait_until_finished()
  writer.close()
  logging.info("Done at step %d. Checkpoints: %s; metrics: %s; pictures: %s", config.total_steps,
               manager.directory, os.path.join(workdir, writers.METRICS_FILE),
               os.path.join(workdir, "reconstructions" if config.task == "mae" else "predictions"))
  return state
