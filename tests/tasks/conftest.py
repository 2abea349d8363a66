"""Fixtures of the learning tests (test_learning*.py): the studio renders they share, the small
models they fine-tune, the strongest baseline a bar is set over, and a fine-tuning run."""
import json

import pytest
from sapiens_jax import baselines
from sapiens_jax import train
from sapiens_jax import writers


@pytest.fixture(scope="module")
def learning_config(synthetic_config, studio_root):
  """(task, learning_bar.Bar) -> configs/synthetic.py:TASK on the studio renders with a 2-block,
  width-64 ViT of the recipe's family (`tiny` with a width-32 head, or `sapiens2_micro` with the
  test-size Sapiens2 heads) at the bar's steps and lr."""
  def make(task, bar):
    c = synthetic_config(task)
    c.data.path = studio_root
    c.model.size = "sapiens2_micro" if c.recipe == "sapiens2" else "tiny"
    c.model.head_channels = 32
    c.optim.base_lr = bar.lr
    c.total_steps = c.eval_every_steps = c.checkpoint_every_steps = bar.steps
    c.log_every_steps = 100
    return c
  return make


@pytest.fixture(scope="module")
def studio_root(tmp_path_factory, synthetic_config):
  """512 training and 64 held-out renders at 128x96 with every task's labels (albedo's config asks for
  the Sapiens2 ones too; the images are the same either way), shared by the tasks."""
  root = str(tmp_path_factory.mktemp("studio"))
  config = synthetic_config("albedo")
  config.data.path = root
  from sapiens_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.ensure_synthetic_data(config, "")
  return root


@pytest.fixture(scope="module")
def strongest_baseline(learning_config):
  """(task, learning_bar.Bar) -> (name, metrics) of the task's strongest baseline on the bar's metric, after
  checking that no baseline clears the bar itself."""
  found = {}

  def get(task, bar):
    if task not in found:
      config = learning_config(task, bar)
      results = baselines.evaluate(config)
      best = baselines.strongest(config, results, bar.metric)
      print(json.dumps({"task": task, "baselines": results}))  # RESULTS.md's figures: pytest -s
      for name, result in results.items():
        assert not bar.clears(result[bar.metric], best[1][bar.metric]), (task, name, result)
      found[task] = best
    return found[task]
  return get


@pytest.fixture
def fine_tune(learning_config, strongest_baseline, tmp_path):
  """(task, bar, kind) -> (the final eval metrics of the bar's run on the studio renders, and the
  (name, metrics) of the strongest baseline), for the test to hold against the bar."""
  def run(task, bar, kind):
    best = strongest_baseline(task, bar)
    config = learning_config(task, bar)
    train.train_and_evaluate(config, str(tmp_path))
    evals = [r for r in writers.read_metrics(tmp_path) if any(k.startswith("eval_") for k in r)]
    assert evals[-1]["step"] == config.total_steps
    final = {k[len("eval_"):]: v for k, v in evals[-1].items() if k.startswith("eval_")}
    print(json.dumps({"task": config.task, kind: final, "steps": config.total_steps}))
    return final, best
  return run
