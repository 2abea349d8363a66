"""Fine-tuning evaluation over the whole held-out split, with the task's own metrics.

The network's answer comes from the task (`eval_outputs`: e.g. flip-tested heatmaps, class ids
at the label resolution) and goes into the task's `Evaluator`, which accumulates over the whole
split, so results do not depend on the batch size or on how the last batch is padded.
"""
import jax
import numpy as np

from sapiens_jax import tasks
from sapiens_jax.data import pipeline
from sapiens_jax.data import transforms


def eval_outputs(params, images, *, model, config):
  """What the task's evaluator reads, for uint8 RGB `images` (normalised here, on the device)."""
  forward = lambda x: model.apply({"params": params}, x)
  return tasks.get(config.task).eval_outputs(forward, transforms.normalize(images), config)


def make_evaluator(config, source):
  return tasks.get(config.task).Evaluator(config, source)


def evaluate(config, params, predict_fn, source, to_global):
  """Metrics of `params` over the eval split. `predict_fn(params, images)` is the jitted
  `eval_outputs` with replicated outputs; `to_global` turns this process's rows of a host batch
  into a global array. Every process loads whole global batches (their targets feed the metrics)
  and ends up with the same numbers."""
  evaluator = make_evaluator(config, source)
  n, p = jax.process_count(), jax.process_index()
  rows = config.eval_batch_size // n
  for batch in pipeline.eval_batches(config, source, config.eval_batch_size):
    images = to_global(batch["image"][p * rows:(p + 1) * rows])
    evaluator.add(np.asarray(jax.device_get(predict_fn(params, images))), batch)
  return evaluator.result()
