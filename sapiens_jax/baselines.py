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


def _mean_pose_heatmaps(config, source, batches):
  """Heatmaps of the eval people's mean pose, each person mapped into its own eval crop."""
  h, w = config.image_size
  crops = [(c, s) for b in batches for c, s in zip(b["center"][b["valid"]], b["scale"][b["valid"]])]
  points, visible = [], []
  for i, (center, scale) in enumerate(crops):  # eval batches hold the split in source order
    matrix = pose_transforms.udp_affine_matrix(center, scale, 0.0, (w, h))
    points.append(pose_transforms.transform_points(source[i]["keypoints"], matrix))
    visible.append(source[i]["visible"] > 0)
  points, visible = np.asarray(points), np.asarray(visible)[..., None]
  mean = (points * visible).sum(0) / np.maximum(visible.sum(0), 1)
  maps, _ = heatmaps.encode(mean, np.ones(len(mean)), (w, h), (w // 4, h // 4),
                            config.heatmap_sigma)
  return maps


def evaluate_baseline(config, workdir=""):
  """The task's eval metrics for its trivial baseline on the eval split of `config`."""
  source = pipeline.make_task_source(config, "eval", workdir)
  batches = list(pipeline.eval_batches(config, source, config.eval_batch_size))
  evaluator = evaluate.make_evaluator(config, source)
  if config.task == "pose":
    maps = _mean_pose_heatmaps(config, source, batches)
    constant = lambda batch: np.broadcast_to(maps, (len(batch["image"]), *maps.shape))
  elif config.task == "seg":
    labels = np.concatenate([b["label"][b["valid"]].ravel() for b in batches])
    majority = np.argmax(np.bincount(labels[labels != 255]))
    constant = lambda batch: np.full(batch["label"].shape, majority, np.int32)
  elif config.task == "depth":
    constant = lambda batch: np.zeros(batch["depth"].shape, np.float32)
  else:
    normals = np.concatenate([b["normal"][b["valid"]] for b in batches]).reshape(-1, 3)
    mean = normals[normals[:, 0] > -100].mean(0)
    mean = (mean / np.linalg.norm(mean)).astype(np.float32)
    constant = lambda batch: np.broadcast_to(mean, batch["normal"].shape)
  for batch in batches:
    evaluator.add(constant(batch), batch)
  return evaluator.result()
