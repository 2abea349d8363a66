"""Fine-tuning evaluation over the whole held-out split, with the field's metrics.

Pose: OKS AP/AR (pycocotools, the skeleton's sigmas) on ground-truth person boxes, with the
reference's flip test. Seg: mIoU / mAcc / aAcc from one confusion matrix over the split. Depth:
RMSE, AbsRel, delta1 on the foreground after least-squares scale-and-shift alignment (and raw).
Normals: mean / median angular error and % within 11.25, 22.5, 30 degrees.
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from sapiens_jax import losses
from sapiens_jax import metrics
from sapiens_jax.data import heatmaps as heatmap_codec
from sapiens_jax.data import meta
from sapiens_jax.data import pipeline
from sapiens_jax.data import transforms

KEYPOINT_SCORE_THRESHOLD = 0.2  # mmpose CocoMetric: keypoints above it make the instance score


def predict(params, images, *, model, config):
  """The network's answer for uint8 RGB `images` (normalised here, on the device) at the label
  resolution: pose heatmaps (flip-tested), seg labels, depth (B, H, W), normals (B, H, W, 3)."""
  images = transforms.normalize(images)
  outputs = model.apply({"params": params}, images)
  if config.task == "pose":
    flip_indices = jnp.asarray(meta.skeleton(config.data.labels).flip_indices)
    flipped = model.apply({"params": params}, images[:, :, ::-1])
    # Back to the original orientation, left and right channels swapped, no shift (reference §4.1).
    return 0.5 * (outputs + flipped[:, :, ::-1][..., flip_indices])
  hw = tuple(config.image_size)
  if config.task == "seg":
    return jnp.argmax(losses.resize_to(outputs, hw), axis=-1).astype(jnp.int32)
  resized = losses.resize_to(outputs, hw)
  return resized[..., 0] if config.task == "depth" else resized


def keypoints_from_heatmaps(heatmaps, centers, scales, input_size):
  """(N, h, w, K) heatmaps of N crops -> (keypoints (N, K, 2) in image pixels, scores (N, K))."""
  keypoints, scores = heatmap_codec.decode(heatmaps, input_size=input_size)
  in_image = [heatmap_codec.to_image_coords(k, c, s, input_size) for k, c, s in zip(keypoints, centers, scales)]
  return np.asarray(in_image, np.float32).reshape(keypoints.shape), scores


def pose_result(keypoints, scores, **ids):
  """One person as a COCO keypoint result; its score is the mean of its confident keypoints."""
  confident = scores[scores > KEYPOINT_SCORE_THRESHOLD]
  return {**ids, "category_id": 1,
          "keypoints": np.concatenate([keypoints, scores[:, None]], axis=1).ravel().tolist(),
          "score": float(confident.mean()) if confident.size else 0.0}


@functools.lru_cache(maxsize=2)
def _ground_truth(annotation_json):
  """The eval split's COCO JSON, read once per run rather than at every evaluation (never mutated)."""
  with open(annotation_json) as f:
    return json.load(f)


class PoseEvaluator:
  def __init__(self, config, source):
    self.sigmas = meta.skeleton(config.data.labels).sigmas
    self.input_size = tuple(config.image_size)[::-1]  # (W, H)
    self.ground_truth = _ground_truth(source.annotation_json)
    self.results = []

  def add(self, heatmaps, batch):
    valid = np.flatnonzero(batch["valid"])
    keypoints, scores = keypoints_from_heatmaps(heatmaps[valid], batch["center"][valid], batch["scale"][valid],
                                                self.input_size)
    for i, xy, s in zip(valid, keypoints, scores):
      self.results.append(pose_result(xy, s, image_id=int(batch["image_id"][i])))

  def result(self):
    seen = {r["image_id"] for r in self.results}  # data.num_eval may cover part of the split
    gt = dict(self.ground_truth)
    gt["images"] = [im for im in gt["images"] if im["id"] in seen]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in seen]
    return metrics.oks_ap(gt, self.results, self.sigmas)


class SegEvaluator:
  def __init__(self, config):
    self.num_classes = len(meta.seg_classes(config.data.labels).names)
    self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)

  def add(self, labels, batch):
    for i in np.flatnonzero(batch["valid"]):
      self.confusion += metrics.confusion_matrix(labels[i], batch["label"][i], self.num_classes)

  def result(self):
    return {k: v for k, v in metrics.seg_metrics(self.confusion).items() if np.ndim(v) == 0}


class DenseEvaluator:
  """Depth or normals: the metrics' own accumulator, fed each image's foreground (the targets mark
  background with -1 for depth and -1000 for normals)."""

  def __init__(self, task):
    self.task = task
    self.accumulator = metrics.DepthMetrics() if task == "depth" else metrics.NormalMetrics()

  def add(self, predictions, batch):
    for i in np.flatnonzero(batch["valid"]):
      gt = batch[self.task][i]
      self.accumulator.add(predictions[i], gt, gt >= 0 if self.task == "depth" else gt[..., 0] > -100)

  def result(self):
    out = self.accumulator.result()
    if self.task == "normal":
      out["mean_angle"], out["median_angle"] = out.pop("mean"), out.pop("median")
    return out


def make_evaluator(config, source):
  if config.task == "pose":
    return PoseEvaluator(config, source)
  if config.task == "seg":
    return SegEvaluator(config)
  return DenseEvaluator(config.task)


def evaluate(config, params, predict_fn, source, to_global):
  """Metrics of `params` over the eval split. `predict_fn(params, images)` is the jitted `predict`
  with replicated outputs; `to_global` turns this process's rows of a host batch into a global
  array. Every process loads whole global batches (their targets feed the metrics) and ends up
  with the same numbers."""
  evaluator = make_evaluator(config, source)
  n, p = jax.process_count(), jax.process_index()
  rows = config.eval_batch_size // n
  for batch in pipeline.eval_batches(config, source, config.eval_batch_size):
    images = to_global(batch["image"][p * rows:(p + 1) * rows])
    evaluator.add(np.asarray(jax.device_get(predict_fn(params, images))), batch)
  return evaluator.result()
