"""Fine-tuning on a task: the backbone without cls token, its patch tokens as a (h, w) feature map,
and the head of `config.task`, trained with the task's loss and evaluated with its metrics.

Everything task-specific comes from the task module (sapiens_jax.tasks); this module only wires
it into the trainer's hooks. The encoder is built by the same family function as in pretraining,
under the same param name ("encoder"), so a pretrained encoder drops straight in (its cls token
and position grid are adapted by init_from).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sapiens_jax import evaluate
from sapiens_jax import models
from sapiens_jax import sharding
from sapiens_jax import step as train_step
from sapiens_jax import tasks
from sapiens_jax import visualize
from sapiens_jax.data import pipeline
from sapiens_jax.data import transforms
from sapiens_jax.models import layers
from sapiens_jax.tasks import heads
from sapiens_jax.tasks import heads2

PICTURES = "predictions"
WEIGHTS = "params"  # the state entry that export, predict and init_from read


class TaskModel(nn.Module):
  encoder: nn.Module
  head: nn.Module

  def __call__(self, images, train=False):
    """(B, H, W, 3) normalised images -> the head's float32 NHWC output (size set by the head; a
    tuple of arrays for a head with two outputs, pointmap's map and scale)."""
    tokens = self.encoder(images)[:, self.encoder.num_prefix_tokens:]
    features = layers.tokens_to_map(tokens, self.encoder.grid)
    outputs = self.head(features, deterministic=not train)
    return jax.tree.map(lambda x: x.astype(jnp.float32), outputs)


def check_config(config):
  task = tasks.get(config.task)
  if config.best_metric not in task.METRICS:
    raise ValueError(f"config.best_metric={config.best_metric!r}; the {config.task} task reports "
                     f"{', '.join(task.METRICS)}")
  if config.eval_batch_size % jax.process_count():
    raise ValueError(f"config.eval_batch_size={config.eval_batch_size} must be divisible by the "
                     f"{jax.process_count()} processes")


def encoder(config):
  """The backbone as the task fine-tunes read it: no cls token (reference §1.3)."""
  return models.family(config.model).build(config.model, config.image_size, cls_token=False)


def build_model(config):
  return TaskModel(encoder=encoder(config), head=tasks.get(config.task).make_head(config))


def init_params(model, config, key):
  return model.init(key, jnp.zeros((1, *config.image_size, 3), jnp.float32))["params"]


init_extra_state = train_step.no_extra_state
post_update = train_step.no_post_update
step_outputs = train_step.no_step_outputs
alerts = train_step.no_alerts


def loss(model, params, state, batch, keys, config):
  """The task's loss on the head's outputs; the first example key drives the head's dropout."""
  del state
  images = transforms.normalize(batch["image"])
  outputs = model.apply({"params": params}, images, train=True, rngs={"dropout": keys[0]})
  return tasks.get(config.task).loss(config, outputs, batch), outputs


def batch_spec(config, batch_size):
  return {"image": jax.ShapeDtypeStruct((batch_size, *config.image_size, 3), jnp.uint8),
          **tasks.get(config.task).target_spec(config, batch_size)}


def activation_bytes_per_example(config):
  """Rough activation bytes of one example in the encoder (every patch token; heads not counted)."""
  h, w = models.family(config.model).grid(config.model, config.image_size)
  return models.family(config.model).encoder_activation_bytes(config.model, h * w)


# ---------------------------------------------------------------- data

def prepare_data(config, workdir):
  """Renders the synthetic-humans splits into the workdir the first time, when asked for."""
  if config.data.source == "synthetic":
    pipeline.ensure_synthetic_data(config, workdir)


def train_iterator(config, workdir, *, batch_size, seed, process_index=0, process_count=1):
  return pipeline.make_task_iterator(config, workdir=workdir, batch_size=batch_size, seed=seed,
                                     process_index=process_index, process_count=process_count)


def _train_panel(config, example, index, rng):
  return tasks.get(config.task).panel(config, example(index, rng))


def _eval_panel(config, source, index, rng):
  del rng  # eval inputs are not random
  task = tasks.get(config.task)
  return task.panel(config, task.eval_example(config, source, index))


def inspect_samples(config, split, workdir):
  """(index, rng) -> [image | target] of `split`, and the number of records."""
  if config.data.source == "synthetic":
    if not (config.data.path or workdir):
      raise ValueError("a synthetic dataset without data.path is rendered into --workdir: set one")
    pipeline.ensure_synthetic_data(config, workdir)
  source = pipeline.make_task_source(config, split, workdir)
  if split == "eval":
    return functools.partial(_eval_panel, config, source), len(source)
  example = tasks.get(config.task).train_example(config, source)
  return functools.partial(_train_panel, config, example), len(source)


# ---------------------------------------------------------------- evaluation

def best_metric(config):
  """(name, "min" | "max") of the metric whose best checkpoint is kept."""
  return config.best_metric, tasks.get(config.task).METRICS[config.best_metric]


class Evaluation:
  """The task's metrics over the whole eval split, and a picture of the first predictions
  (image | target | prediction, one eval example per row)."""

  def __init__(self, config, workdir, model, mesh, rules, param_shardings):
    shards = sharding.batch_shards(mesh, rules)
    if config.eval_batch_size % shards:
      raise ValueError(f"config.eval_batch_size={config.eval_batch_size} must be divisible by the {shards} "
                       f"devices the batch is split over (mesh {dict(mesh.shape)})")
    self.config = config
    self.task = tasks.get(config.task)
    self.source = pipeline.make_task_source(config, "eval", workdir)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.to_global = functools.partial(jax.make_array_from_process_local_data, batch_sharding)
    self.predict = jax.jit(functools.partial(evaluate.eval_outputs, model=model, config=config),
                           in_shardings=(param_shardings, batch_sharding), out_shardings=replicated)
    forward = lambda params, images: model.apply({"params": params}, transforms.normalize(images))
    self.forward = jax.jit(forward, in_shardings=(param_shardings, batch_sharding), out_shardings=replicated)
    self.viz_batch = next(pipeline.eval_batches(config, self.source, config.eval_batch_size))

  def __call__(self, step, state):
    """(the task's metrics, the picture on process 0, else None)."""
    del step
    params = state["params"]
    results = evaluate.evaluate(self.config, params, self.predict, self.source, self.to_global)
    rows = self.config.eval_batch_size // jax.process_count()
    p = jax.process_index()
    images = self.to_global(self.viz_batch["image"][p * rows:(p + 1) * rows])
    outputs = jax.device_get(self.forward(params, images))
    if p:
      return results, None
    count = min(self.config.num_viz_images, int(self.viz_batch["valid"].sum()))
    examples = [{k: v[i] for k, v in self.viz_batch.items()} for i in range(count)]
    one = lambda i: jax.tree.map(lambda x: np.asarray(x[i]), outputs)  # pointmap's head gives (map, scale)
    panels = [self.task.panel(self.config, example, one(i)) for i, example in enumerate(examples)]
    return results, visualize.stack_rows(panels)


# ---------------------------------------------------------------- weights

def torch_parts(config, include_decoder=True):
  """`backbone.*` plus the head under the task's prefix, as the reference's task checkpoints.

  A pretrained file without the head (or with another task's) starts the head fresh. Every
  Sapiens2 head is under heads2.TORCH_PREFIX (decode_head., pose's too)."""
  del include_decoder
  sapiens2 = config.get("recipe") == "sapiens2"
  head = heads.torch_part(heads2.TORCH_PREFIX if sapiens2 else tasks.get(config.task).TORCH_PREFIX)
  return [models.family(config.model).torch_part("backbone."),
          head._replace(fresh_if_absent=True, fresh_if_misfit=True)]


def adapt_state_dict(state_dict, expected, prefix, source_grid, config, what):
  family = models.family(config.model)
  target_grid = family.grid(config.model, config.image_size)
  return family.adapt_state_dict(state_dict, expected, prefix, source_grid, target_grid, what)


def predict_task(config):
  return config.task
