"""The train state and the train step: what the loop in train.py runs and `--dry_run` lowers.

The state is one dict {step, params, opt_state} plus whatever the objective adds (an EMA teacher,
say), created already sharded on the mesh (abstract shapes -> shardings -> jitted init). The
randomness of step s is fold_in(seed, s), one key per example, so a resumed run repeats an
uninterrupted one and no example depends on how the batch is split.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sapiens_jax import optim
from sapiens_jax import prng
from sapiens_jax import sharding


def no_extra_state(params, config):
  """`init_extra_state` of an objective that keeps no state besides params and optimizer state."""
  del params, config
  return {}


def no_post_update(state, outputs, config):
  """`post_update` of an objective that changes nothing after the optimizer step."""
  del outputs, config
  return state


def no_step_outputs(outputs, config):
  """`step_outputs` of an objective whose train step keeps nothing of the loss's outputs."""
  del outputs, config
  return {}


def no_alerts(step, metrics, config):
  """`alerts` of an objective whose training metrics need no warning."""
  del step, metrics, config
  return []


def extra_state(state):
  """The entries an objective added to a train state (or to its shardings, shapes, ...): an EMA teacher, ..."""
  return {k: v for k, v in state.items() if k not in ("step", "params", "opt_state")}


def init_state(objective, model, tx, config, key):
  """The train state with logically-annotated (boxed) params; use under jax.eval_shape or jit."""
  params = objective.init_params(model, config, key)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          **objective.init_extra_state(params, config)}


def abstract_train_state(objective, model, tx, config, mesh, rules):
  """The train state as ShapeDtypeStructs carrying their target shardings; nothing is allocated."""
  init = functools.partial(init_state, objective, model, tx, config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init, jax.random.key(config.seed))
  return sharding.abstract_arrays(boxed, sharding.tree_shardings(boxed, mesh, rules))


def init_train_state(objective, model, tx, config, mesh, rules, abstract_state):
  """A fresh state from config.seed, born sharded as `abstract_state` says (never gathered)."""
  init = functools.partial(init_state, objective, model, tx, config)
  shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(jax.random.key(config.seed))


def loss_and_grads(objective, model, state, batch, keys, config):
  """(Mean loss, the step outputs) and gradients over the batch, in `config.grad_accum_steps` sequential
  micro-batches. The step outputs (`objective.step_outputs`: its metrics, EMA centres, ...) are averaged too.

  Every example keeps its own key and every micro-batch holds the same number of examples, so an
  objective whose loss is a mean over equal micro-batches (MAE's masks included) gets the result
  of one pass over the whole batch (only the heads' dropout draws differ). Micro-batch i takes
  rows i, i+k, i+2k, ... so each one stays spread over all devices of the batch axis.
  """
  def loss_fn(params, batch, keys):
    value, outputs = objective.loss(model, params, state, batch, keys, config)
    return value, objective.step_outputs(outputs, config)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  k = config.grad_accum_steps
  if k == 1:
    return grad_fn(state["params"], batch, keys)
  split = lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

  def accumulate(carry, micro_batch):
    return jax.tree.map(jnp.add, carry, grad_fn(state["params"], *micro_batch)), None

  micro_batches = jax.tree.map(split, (batch, keys))
  shapes = jax.eval_shape(grad_fn, state["params"], *jax.tree.map(lambda x: x[0], micro_batches))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total, _ = jax.lax.scan(accumulate, zeros, micro_batches)
  return jax.tree.map(lambda x: x / k, total)


def train_step(state, batch, *, objective, model, tx, config):
  step_key = jax.random.fold_in(jax.random.key(config.seed), state["step"])
  keys = prng.example_keys(step_key, batch["image"].shape[0])
  (loss, outputs), grads = loss_and_grads(objective, model, state, batch, keys, config)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  trainable = jax.tree.map(lambda g, label: g if label == "train" else None,  # None: left out
                           grads, optim.frozen_labels(grads, config.optim.frozen))
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(trainable),
             "learning_rate": optim.schedule(config)(state["step"]), **outputs.get("metrics", {})}
  state = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}
  return objective.post_update(state, outputs, config), metrics


def jit_train_step(objective, model, tx, config, mesh, rules, state_shardings):
  """The train step, jitted with explicit shardings; the old state's buffers are donated.

  Call it under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)` so activation
  constraints resolve.
  """
  batch_sharding = sharding.batch_sharding(mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_keys = objective.batch_spec(config, 1)
  return jax.jit(functools.partial(train_step, objective=objective, model=model, tx=tx, config=config),
                 in_shardings=(state_shardings, {k: batch_sharding for k in batch_keys}),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)
