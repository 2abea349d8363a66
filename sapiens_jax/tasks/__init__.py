"""Fine-tuning tasks. Each task is one module that the generic code (the fine-tuning objective,
evaluation, prediction, baselines, the data pipeline, conversion, inspection) calls and never
names; `config.task` picks one from TASKS. A task serving both Sapiens and Sapiens2 recipes picks
its head, loss and evaluator by `config.recipe` (the dataset row's: default_config.DATASETS). To
add a task, write its module (docs/extending.md) and add it to TASKS, or register it at run time
with `TASKS[name] = module`.

A task module provides:
  configure(config, dataset, size)    its part of the reference recipe (config.loss, schedule, best_metric)
  TORCH_PREFIX, make_head(config)      its head and the head's key prefix in PyTorch task checkpoints
  TARGET, target_spec(config, batch)   the batch key a panel draws as the target; the target arrays
  loss(config, outputs, batch)         on the head's float32 outputs
  eval_outputs(forward, images, config), Evaluator(config, source), METRICS {name: "min" | "max"}
  baselines(config, train_batches)    {name: batch -> predictions} that never look at the image, fitted on train
  make_source(config, root, split), train_example(config, source), eval_example(config, source, i)
  convert_records(input_dir, annotations, output)   the dataset as ArrayRecord records
  panel(config, example, prediction)   a picture row: image | target | prediction
  predict_inputs, predict_outputs, finish, write_prediction   prediction on photos
  RECORDS_FILE (optional)              predict: one JSON of every photo's write_prediction records
  LABEL_SETS (optional)                the class or keypoint sets a head may be fine-tuned on (meta names)
"""
from sapiens_jax.tasks import albedo
from sapiens_jax.tasks import depth
from sapiens_jax.tasks import matting
from sapiens_jax.tasks import normal
from sapiens_jax.tasks import pointmap
from sapiens_jax.tasks import pose
from sapiens_jax.tasks import seg

TASKS = {"pose": pose, "seg": seg, "depth": depth, "normal": normal,  # Sapiens' tasks (Sapiens2 recipes too)
         "pointmap": pointmap, "albedo": albedo, "matting": matting}  # Sapiens2's


def get(name):
  """The task module named `name` (config.task)."""
  if name not in TASKS:
    raise ValueError(f"config.task={name!r}; expected one of {', '.join(TASKS)}")
  return TASKS[name]
