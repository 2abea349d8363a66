"""The best predictions that never look at the image, scored by the task's own evaluator.

Each task says what its baseline is (`baseline` in its module: e.g. the mean pose, the majority
class, the mean normal). Statistics are taken from the eval split itself, so each is an oracle
constant, harder to beat than one learned from the training split. The split is streamed: memory
stays at one batch whatever its size.
"""
from sapiens_jax import tasks
from sapiens_jax.data import pipeline


def evaluate_baseline(config, workdir=""):
  """The task's eval metrics for its baseline on the eval split of `config`."""
  task = tasks.get(config.task)
  source = pipeline.make_task_source(config, "eval", workdir)
  batches = lambda: pipeline.eval_batches(config, source, config.eval_batch_size)
  constant = task.baseline(config, source, batches)
  evaluator = task.Evaluator(config, source)
  for batch in batches():
    evaluator.add(constant(batch), batch)
  return evaluator.result()
