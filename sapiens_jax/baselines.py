"""Trivial predictions a fine-tuned model has to beat, scored by the task's own evaluator.

Each baseline is the strongest constant of its kind, taken from the eval split itself (so it is an
oracle constant, harder to beat than one learned from the training split): pose = the mean pose of
the eval people in crop coordinates; seg = the split's most frequent class everywhere; depth = a
constant (after the per-image scale-and-shift alignment any constant scores the same); normals =
the mean foreground normal of the split.
"""
import numpy as np

from sapiens_jax import evaluate
from sapiens_jax.data import heatmaps
from sapiens_jax.data import pipeline
from sapiens_jax.data import pose_transforms


def _batches(config, source):
  """The eval split, streamed: called once for the statistics and once to score, so memory stays
  at one batch whatever the split's size."""
  return pipeline.eval_batches(config, source, config.eval_batch_size)


def _mean_pose_heatmaps(config, source):
  """Heatmaps of the eval people's mean pose, each person mapped into its own eval crop."""
  h, w = config.image_size
  total, count, i = 0.0, 0.0, 0  # eval batches hold the split in source order
  for batch in _batches(config, source):
    for center, scale in zip(batch["center"][batch["valid"]], batch["scale"][batch["valid"]]):
      matrix = pose_transforms.udp_affine_matrix(center, scale, 0.0, (w, h))
      visible = (source[i]["visible"] > 0)[:, None]
      total = total + pose_transforms.transform_points(source[i]["keypoints"], matrix) * visible
      count, i = count + visible, i + 1
  mean = total / np.maximum(count, 1)
  maps, _ = heatmaps.encode(mean, np.ones(len(mean)), (w, h), (w // 4, h // 4),
                            config.heatmap_sigma)
  return maps


def evaluate_baseline(config, workdir=""):
  """The task's eval metrics for its trivial baseline on the eval split of `config`."""
  source = pipeline.make_task_source(config, "eval", workdir)
  evaluator = evaluate.make_evaluator(config, source)
  if config.task == "pose":
    maps = _mean_pose_heatmaps(config, source)
    constant = lambda batch: np.broadcast_to(maps, (len(batch["image"]), *maps.shape))
  elif config.task == "seg":
    counts = 0
    for batch in _batches(config, source):
      labels = batch["label"][batch["valid"]].ravel()
      counts = counts + np.bincount(labels[labels != 255], minlength=256)
    majority = np.argmax(counts)
    constant = lambda batch: np.full(batch["label"].shape, majority, np.int32)
  elif config.task == "depth":
    constant = lambda batch: np.zeros(batch["depth"].shape, np.float32)
  else:
    total = 0.0
    for batch in _batches(config, source):
      normals = batch["normal"][batch["valid"]].reshape(-1, 3)
      total = total + normals[normals[:, 0] > -100].sum(0)
    mean = (total / np.linalg.norm(total)).astype(np.float32)  # same direction as the mean
    constant = lambda batch: np.broadcast_to(mean, batch["normal"].shape)
  for batch in _batches(config, source):
    evaluator.add(constant(batch), batch)
  return evaluator.result()
