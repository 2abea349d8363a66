"""Evaluation metrics for the Sapiens tasks, in plain numpy (plus pycocotools).

Every metric accumulates over a whole dataset instead of averaging per-batch
numbers, so the result does not depend on the batch size or on how the last
batch is padded. Units:
  * segmentation: mIoU / mAcc / aAcc in percent (as mmseg's IoUMetric);
  * depth: rmse in target units, abs_rel and delta1 as fractions (as mmseg's
    DepthMetric), averaged per image;
  * normals: angles in degrees, pct_* in percent of all valid pixels;
  * pose: pycocotools' AP / AR as fractions (as mmpose's CocoMetric).
"""
import contextlib
import copy
import io
import warnings

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# ---------------------------------------------------------------- segmentation


def confusion_matrix(pred, label, num_classes, ignore_index=255):
  """(C, C) int64 counts, rows = ground-truth class, columns = predicted class.

  Pixels labelled `ignore_index` are skipped. Matrices of several images add
  up, so summing them gives the dataset matrix that `seg_metrics` expects.
  """
  pred = np.asarray(pred)
  label = np.asarray(label)
  if pred.shape != label.shape:
    raise ValueError(
        f"pred shape {pred.shape} does not match label shape {label.shape}")
  keep = label != ignore_index
  pred = pred[keep].astype(np.int64)
  label = label[keep].astype(np.int64)
  for what, values in (("label", label), ("pred", pred)):
    if values.size and (values.min() < 0 or values.max() >= num_classes):
      raise ValueError(
          f"{what} has class ids outside 0..{num_classes - 1} (other than"
          f" ignore_index={ignore_index}): min {values.min()}, max"
          f" {values.max()}")
  counts = np.bincount(label * num_classes + pred, minlength=num_classes ** 2)
  return counts.reshape(num_classes, num_classes)


def seg_metrics(confusion):
  """mmseg IoUMetric semantics on a dataset confusion matrix, in percent.

  IoU_c = TP / (TP + FP + FN) and Acc_c = TP / (TP + FN). A class with no
  ground-truth pixels has Acc NaN; if it is also never predicted its IoU is NaN
  too, and NaN classes are left out of the means (a class that is predicted but
  absent from the ground truth has IoU 0 and does count). aAcc = sum TP / all
  labelled pixels. Returns mIoU, mAcc, aAcc and per-class IoU, Acc arrays.
  """
  confusion = np.asarray(confusion, dtype=np.float64)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f"confusion must be square (C, C), got {confusion.shape}")
  tp = np.diag(confusion)
  gt_area = confusion.sum(axis=1)
  pred_area = confusion.sum(axis=0)
  union = gt_area + pred_area - tp
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = 100.0 * tp / union
    acc = 100.0 * tp / gt_area
  total = gt_area.sum()
  return dict(
      mIoU=float(np.nanmean(iou)) if np.any(union > 0) else float("nan"),
      mAcc=float(np.nanmean(acc)) if np.any(gt_area > 0) else float("nan"),
      aAcc=float(100.0 * tp.sum() / total) if total else float("nan"),
      IoU=iou, Acc=acc)


# ----------------------------------------------------------------------- depth


def _masked(pred, gt, valid):
  pred = np.asarray(pred, dtype=np.float64)
  gt = np.asarray(gt, dtype=np.float64)
  valid = np.asarray(valid, dtype=bool)
  if not pred.shape == gt.shape == valid.shape:
    raise ValueError(
        f"pred {pred.shape}, gt {gt.shape} and valid {valid.shape} must have"
        " the same shape")
  return pred[valid], gt[valid]


def align_scale_shift(pred, gt, valid):
  """Least-squares (s, t) minimising sum over valid of (s * pred + t - gt)^2.

  Closed form: s = cov(pred, gt) / var(pred), t = mean(gt) - s * mean(pred).
  A constant prediction has no defined scale; then s = 0 and t = mean(gt).
  """
  p, g = _masked(pred, gt, valid)
  if not p.size:
    raise ValueError("align_scale_shift needs at least one valid pixel")
  p_mean, g_mean = p.mean(), g.mean()
  p_var = np.mean((p - p_mean) ** 2)
  scale = np.mean((p - p_mean) * (g - g_mean)) / p_var if p_var > 0 else 0.0
  return float(scale), float(g_mean - scale * p_mean)


def _depth_errors(p, g, eps):
  """rmse over all given pixels; abs_rel and delta1 over pixels with g > eps.

  The min-max normalised target is 0 at the nearest foreground pixel, where a
  relative error is undefined, hence the eps cut. delta1 = share of those
  pixels with max(p/g, g/p) < 1.25; a prediction <= 0 counts as a miss.
  """
  rmse = float(np.sqrt(np.mean((p - g) ** 2)))
  positive = g > eps
  if not np.any(positive):
    return dict(rmse=rmse, abs_rel=float("nan"), delta1=float("nan"))
  p, g = p[positive], g[positive]
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = np.maximum(p / g, g / p)
  hit = (p > 0) & (ratio < 1.25)
  return dict(rmse=rmse, abs_rel=float(np.mean(np.abs(p - g) / g)),
              delta1=float(np.mean(hit)))


def depth_metrics(pred, gt, valid, align=True, eps=1e-6):
  """One image's depth errors over the valid (foreground) pixels.

  Keys rmse, abs_rel, delta1 are computed after least-squares scale/shift
  alignment of `pred` to `gt` when `align` (Sapiens depth is relative), and
  rmse_raw, abs_rel_raw, delta1_raw always on the raw prediction. abs_rel and
  delta1 skip pixels with gt <= eps (NaN if none are left).
  """
  p, g = _masked(pred, gt, valid)
  if not p.size:
    raise ValueError("depth_metrics needs at least one valid pixel")
  raw = _depth_errors(p, g, eps)
  if align:
    scale, shift = align_scale_shift(p, g, np.ones(p.shape, bool))
    result = _depth_errors(scale * p + shift, g, eps)
  else:
    result = dict(raw)
  result.update({key + "_raw": value for key, value in raw.items()})
  return result


class DepthMetrics:
  """Dataset depth metrics: each image's `depth_metrics`, then a mean per image.

  Every image weighs the same whatever its foreground size (as mmseg's
  DepthMetric). Images without valid pixels are skipped and counted; an image
  whose abs_rel/delta1 is NaN is left out of those two means only.
  """

  def __init__(self, align=True, eps=1e-6):
    self.align = align
    self.eps = eps
    self.per_image = []
    self.num_skipped = 0

  def add(self, pred, gt, valid):
    if not np.any(valid):
      self.num_skipped += 1
      return
    self.per_image.append(
        depth_metrics(pred, gt, valid, align=self.align, eps=self.eps))

  def result(self):
    keys = ("rmse", "abs_rel", "delta1")
    keys += tuple(k + "_raw" for k in keys)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # All-NaN column -> NaN.
      out = {k: float(np.nanmean([m[k] for m in self.per_image]))
             if self.per_image else float("nan") for k in keys}
    out.update(num_images=len(self.per_image), num_skipped=self.num_skipped)
    return out


# --------------------------------------------------------------------- normals

NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)
_HIST_BINS_PER_DEGREE = 100  # Dataset median exact to within 0.005 degrees.


def angular_errors(pred, gt, valid, eps=1e-6):
  """Degrees between pred and gt (H, W, 3) normals at valid pixels, (N,).

  Both are renormalised to unit length first: the network output is raw and
  unnormalised, and a GT normal a little off unit length should not count.
  """
  pred = np.asarray(pred, dtype=np.float64)
  gt = np.asarray(gt, dtype=np.float64)
  valid = np.asarray(valid, dtype=bool)
  if pred.shape != gt.shape or pred.shape[-1:] != (3,):
    raise ValueError(
        f"pred {pred.shape} and gt {gt.shape} must both be (..., 3) normals")
  if valid.shape != pred.shape[:-1]:
    raise ValueError(
        f"valid {valid.shape} must match the normal maps' {pred.shape[:-1]}")
  p, g = pred[valid], gt[valid]
  p = p / np.maximum(np.linalg.norm(p, axis=-1, keepdims=True), eps)
  g = g / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), eps)
  cosine = np.clip(np.sum(p * g, axis=-1), -1.0, 1.0)
  return np.degrees(np.arccos(cosine))


def _normal_summary(mean, median, below, count):
  out = dict(mean=mean, median=median)
  for threshold, hits in zip(NORMAL_THRESHOLDS, below):
    out[f"pct_{threshold:g}"] = 100.0 * hits / count if count else float("nan")
  return out


def normal_metrics(pred, gt, valid):
  """One image: mean and median angle (degrees), % of pixels under 11.25/22.5/30."""
  angles = angular_errors(pred, gt, valid)
  if not angles.size:
    raise ValueError("normal_metrics needs at least one valid pixel")
  return _normal_summary(
      float(angles.mean()), float(np.median(angles)),
      [np.count_nonzero(angles < t) for t in NORMAL_THRESHOLDS], angles.size)


class NormalMetrics:
  """Dataset normal metrics over all valid pixels pooled (pixel-weighted).

  The mean and the threshold percentages are exact; the median comes from a
  0.01-degree histogram (bin centre), so it is within 0.005 degrees.
  """

  def __init__(self):
    self.histogram = np.zeros(180 * _HIST_BINS_PER_DEGREE, np.int64)
    self.angle_sum = 0.0
    self.below = np.zeros(len(NORMAL_THRESHOLDS), np.int64)

  def add(self, pred, gt, valid):
    angles = angular_errors(pred, gt, valid)
    bins = np.minimum((angles * _HIST_BINS_PER_DEGREE).astype(np.int64),
                      self.histogram.size - 1)
    self.histogram += np.bincount(bins, minlength=self.histogram.size)
    self.angle_sum += float(angles.sum())
    self.below += [np.count_nonzero(angles < t) for t in NORMAL_THRESHOLDS]

  def result(self):
    count = int(self.histogram.sum())
    if not count:
      return _normal_summary(float("nan"), float("nan"), self.below, 0)
    # Like np.median: mean of the two middle angles (ranks are 1-based), each
    # taken as its bin's centre.
    ranks = ((count + 1) // 2, count // 2 + 1)
    middle_bins = np.searchsorted(np.cumsum(self.histogram), ranks)
    median = float(np.mean(middle_bins) + 0.5) / _HIST_BINS_PER_DEGREE
    return _normal_summary(self.angle_sum / count, median, self.below, count)


# ------------------------------------------------------------------------ pose

COCO_KEYPOINT_STATS = ("AP", "AP50", "AP75", "AP_M", "AP_L",
                       "AR", "AR50", "AR75", "AR_M", "AR_L")


def _num_keypoints(keypoints, what):
  if len(keypoints) % 3:
    raise ValueError(
        f"{what}: 'keypoints' must be a flat list of x, y, v triples, got"
        f" {len(keypoints)} numbers")
  return len(keypoints) // 3


def _checked_ground_truth(gt_coco_dict, num_keypoints):
  for key in ("images", "annotations", "categories"):
    if key not in gt_coco_dict:
      raise ValueError(f"ground-truth COCO dict has no {key!r} list")
  gt = copy.deepcopy(gt_coco_dict)
  for ann in gt["annotations"]:
    name = f"ground-truth annotation id={ann.get('id')!r}"
    for key in ("id", "image_id", "category_id", "keypoints", "bbox", "area"):
      if key not in ann:
        raise ValueError(f"{name} has no {key!r} field")
    if _num_keypoints(ann["keypoints"], name) != num_keypoints:
      raise ValueError(
          f"{name} has {len(ann['keypoints']) // 3} keypoints, but"
          f" {num_keypoints} sigmas were given")
    ann.setdefault("iscrowd", 0)
    ann.setdefault(
        "num_keypoints", int(np.count_nonzero(np.asarray(ann["keypoints"])[2::3])))
  return gt


def oks_ap(gt_coco_dict, results, sigmas):
  """COCO keypoint AP/AR (pycocotools, OKS with the given per-keypoint sigmas).

  gt_coco_dict: an in-memory COCO keypoint dataset (images, annotations with
  keypoints/bbox/area, categories); `iscrowd` defaults to 0 and
  `num_keypoints` to the count of labelled points. results: a non-empty list
  of {image_id, category_id, keypoints (3K), score}. Works for any K as long as
  len(sigmas) == K (pycocotools reads K from the sigmas). Returns the ten
  COCOeval keypoint stats as fractions (-1 where a range has no ground truth).
  """
  sigmas = np.asarray(sigmas, dtype=np.float64).reshape(-1)
  num_keypoints = sigmas.size
  gt = _checked_ground_truth(gt_coco_dict, num_keypoints)
  if not results:
    raise ValueError("oks_ap got no results to evaluate")
  for i, res in enumerate(results):
    for key in ("image_id", "category_id", "keypoints", "score"):
      if key not in res:
        raise ValueError(f"result #{i} has no {key!r} field")
    if _num_keypoints(res["keypoints"], f"result #{i}") != num_keypoints:
      raise ValueError(
          f"result #{i} has {len(res['keypoints']) // 3} keypoints, but"
          f" {num_keypoints} sigmas were given")
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints a lot.
    coco_gt = COCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes(copy.deepcopy(list(results)))
    evaluator = COCOeval(coco_gt, coco_dt, iouType="keypoints")
    evaluator.params.kpt_oks_sigmas = sigmas
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return {name: float(value)
          for name, value in zip(COCO_KEYPOINT_STATS, evaluator.stats)}
