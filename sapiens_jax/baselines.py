"""The best predictions that never look at the image: each task's candidates (`baselines` in its
module: e.g. the per-pixel majority class, the mean normal map, ramps that the depth metric aligns
per image, the median pose), fitted on the training split and scored by the task's own evaluator on
the eval split, exactly as a model is scored.

A learning claim is a margin over the strongest of them: a model that ignores the image can do no
better than the best fixed prediction, so beating that by the margin needs the image.
"""
from sapiens_jax import tasks
from sapiens_jax.data import pipeline


def train_batches(config, workdir=""):
  """() -> every example of the training split through the eval recipe (un-augmented), in batches
  of config.eval_batch_size: what the baselines are fitted on."""
  train_config = config.copy_and_resolve_references()
  train_config.data.num_eval = 0  # eval_batches reads the whole source
  source = pipeline.make_task_source(config, "train", workdir)
  return lambda: pipeline.eval_batches(train_config, source, config.eval_batch_size)


def evaluate(config, workdir=""):
  """{name: eval metrics} of each of the task's baselines."""
  task = tasks.get(config.task)
  predictors = task.baselines(config, train_batches(config, workdir))
  source = pipeline.make_task_source(config, "eval", workdir)
  evaluators = {name: task.Evaluator(config, source) for name in predictors}
  for batch in pipeline.eval_batches(config, source, config.eval_batch_size):
    for name, predict in predictors.items():
      evaluators[name].add(predict(batch), batch)
  return {name: evaluator.result() for name, evaluator in evaluators.items()}


def strongest(config, results, metric):
  """(name, metrics) of the baseline in `results` (as `evaluate` returns them) that scores best on
  `metric`, in the direction the task's METRICS give it."""
  direction = tasks.get(config.task).METRICS[metric]
  best = (max if direction == "max" else min)(results, key=lambda name: results[name][metric])
  return best, results[best]
