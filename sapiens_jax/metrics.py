"""Evaluation metrics for the Sapiens tasks, in plain numpy (plus pycocotools).

Every metric accumulates over a whole dataset instead of averaging per-batch
numbers, so the result does not depend on the batch size or on how the last
batch is padded. Units:
  * segmentation: mIoU / mAcc / aAcc in percent (as mmseg's IoUMetric);
  * depth: rmse in target units, abs_rel and delta1 as fractions (as mmseg's
    DepthMetric), averaged per image;
  * normals: angles in degrees, pct_* in percent of all valid pixels;
  * pose: pycocotools' AP / AR as fractions (as mmpose's CocoMetric);
  * Sapiens2 normals, pointmaps (metres, pooled over pixels), albedo (fractions of the data range,
    PSNR in dB, per image) and matting (SAD / Grad / Conn / 1000, as the matting literature reports).
"""
import contextlib
import copy
import io
import warnings

import cv2
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
  """Least-squares (s, t) with s >= 0 minimising sum over valid of (s * pred + t - gt)^2.

  Closed form: s = max(cov(pred, gt), 0) / var(pred), t = mean(gt) - s * mean(pred). The scale may
  stretch a relative depth map but not turn it upside down: a map that puts the far hand in front
  is wrong, and an unconstrained fit would score it as right (and give any fixed map, a ramp, the
  right slope sign of every image for free). A constant prediction, or one that correlates
  negatively with gt, gets s = 0 and t = mean(gt).
  """
  p, g = _masked(pred, gt, valid)
  if not p.size:
    raise ValueError("align_scale_shift needs at least one valid pixel")
  p_mean, g_mean = p.mean(), g.mean()
  p_var = np.mean((p - p_mean) ** 2)
  covariance = np.mean((p - p_mean) * (g - g_mean))
  scale = max(covariance, 0.0) / p_var if p_var > 0 else 0.0
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


class _AngleAccumulator:
  """Angle sums, threshold counts and a histogram of `bins_per_degree` bins per degree: memory does not grow
  with the dataset. Bins are [k, k + 1) / bins_per_degree (180 itself falls in the last one)."""

  def __init__(self, thresholds, bins_per_degree):
    self.thresholds = thresholds
    self.bins_per_degree = bins_per_degree
    self.histogram = np.zeros(180 * bins_per_degree, np.int64)
    self.total = 0.0
    self.total_sq = 0.0
    self.below = np.zeros(len(thresholds), np.int64)

  @property
  def count(self):
    return int(self.histogram.sum())

  def add(self, angles):
    bins = np.minimum((angles * self.bins_per_degree).astype(np.int64), self.histogram.size - 1)
    self.histogram += np.bincount(bins, minlength=self.histogram.size)
    self.total += float(angles.sum())
    self.total_sq += float(np.sum(angles ** 2))
    self.below += [np.count_nonzero(angles < t) for t in self.thresholds]

  def median_bin(self, rank):
    """Centre (degrees) of the bin holding the `rank`-th smallest angle (1-based)."""
    return (float(np.searchsorted(np.cumsum(self.histogram), rank)) + 0.5) / self.bins_per_degree

  def percent_below(self):
    count = self.count
    return [100.0 * hits / count if count else float("nan") for hits in self.below]


class NormalMetrics:
  """Dataset normal metrics over all valid pixels pooled (pixel-weighted).

  The mean and the threshold percentages are exact; the median comes from a
  0.01-degree histogram (bin centre), so it is within 0.005 degrees.
  """

  def __init__(self):
    self.angles = _AngleAccumulator(NORMAL_THRESHOLDS, _HIST_BINS_PER_DEGREE)

  def add(self, pred, gt, valid):
    self.angles.add(angular_errors(pred, gt, valid))

  def result(self):
    count = self.angles.count
    if not count:
      return _normal_summary(float("nan"), float("nan"), self.angles.below, 0)
    # Like np.median: mean of the two middle angles (ranks are 1-based), each
    # taken as its bin's centre.
    median = float(np.mean([self.angles.median_bin(r) for r in ((count + 1) // 2, count // 2 + 1)]))
    return _normal_summary(self.angles.total / count, median, self.angles.below, count)


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


# ---------------------------------------------------------- Sapiens2 normals
#
# The Sapiens2 normal evaluator's keys (normal_mae, normal_median_deg, normal_rmse, within_*_deg), pooled over
# all valid pixels of the dataset like NormalMetrics, whose outputs stay as they are.

SAPIENS2_NORMAL_THRESHOLDS = (5.0, 11.25, 22.5, 30.0)  # degrees; a pixel is "within" when its angle is < t
_SAPIENS2_BINS_PER_DEGREE = 2  # upstream's 0.5-degree median histogram


def _sapiens2_angles():
  return _AngleAccumulator(SAPIENS2_NORMAL_THRESHOLDS, _SAPIENS2_BINS_PER_DEGREE)


def _sapiens2_angle_summary(angles, median=True):
  """The Sapiens2 keys of an _AngleAccumulator. The median is the centre of the first 0.5-degree bin where the
  cumulative count reaches half of all angles (the ceil(N/2)-th smallest: the lower middle for an even N), a
  multiple of 0.5 plus 0.25, within 0.25 degrees of the true median of a single sample."""
  count = angles.count
  nan = float("nan")
  out = dict(normal_mae=angles.total / count if count else nan)
  if median:
    out["normal_median_deg"] = angles.median_bin((count + 1) // 2) if count else nan
  out["normal_rmse"] = float(np.sqrt(angles.total_sq / count)) if count else nan
  for threshold, percent in zip(SAPIENS2_NORMAL_THRESHOLDS, angles.percent_below()):
    out[f"within_{threshold:g}_deg"] = percent
  return out


class Sapiens2NormalMetrics:
  """Dataset normal metrics with the Sapiens2 evaluator's keys, all valid pixels pooled (pixel-weighted).

  normal_mae: mean angle; normal_rmse: sqrt of the mean squared angle (degrees, both exact);
  normal_median_deg: from a 0.5-degree histogram (see _AngleAccumulator.median); within_{5,11.25,22.5,30}_deg:
  percent of pixels with angle < t. Normals are renormalised first (angular_errors). Images without valid pixels
  are skipped and counted.
  """

  def __init__(self):
    self.angles = _sapiens2_angles()
    self.num_images = 0
    self.num_skipped = 0

  def add(self, pred, gt, valid):
    angles = angular_errors(pred, gt, valid)
    if not angles.size:
      self.num_skipped += 1
      return
    self.angles.add(angles)
    self.num_images += 1

  def result(self):
    out = _sapiens2_angle_summary(self.angles)
    out.update(num_images=self.num_images, num_skipped=self.num_skipped)
    return out


def _one_image(metrics, name, pred, gt, valid):
  """`metrics` after adding one image; an image without valid pixels is an error here, not a skip."""
  metrics.add(pred, gt, valid)
  if not metrics.num_images:
    raise ValueError(f"{name} needs at least one valid pixel")
  return metrics


def sapiens2_normal_metrics(pred, gt, valid):
  """One image's Sapiens2 normal metrics (a dataset of one, same histogram median)."""
  metrics = _one_image(Sapiens2NormalMetrics(), "sapiens2_normal_metrics", pred, gt, valid)
  return _sapiens2_angle_summary(metrics.angles)


# -------------------------------------------------------------------- pointmap
#
# Canonical-space XYZ maps (H, W, 3) in metres. Every number pools all valid pixels of the dataset (pixel-weighted,
# like NormalMetrics), so it is kept as running sums.

POINTMAP_DISTANCE_THRESHOLDS = ((0.05, "within_05_cm"), (0.10, "within_10_cm"), (0.20, "within_20_cm"))
POINTMAP_SOBEL_KSIZE = 5


def _pointmaps(pred, gt, valid):
  pred = np.asarray(pred, dtype=np.float64)
  gt = np.asarray(gt, dtype=np.float64)
  valid = np.asarray(valid, dtype=bool)
  if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 3:
    raise ValueError(f"pred {pred.shape} and gt {gt.shape} must both be (H, W, 3) pointmaps")
  if valid.shape != pred.shape[:-1]:
    raise ValueError(f"valid {valid.shape} must match the pointmaps' {pred.shape[:-1]}")
  return pred, gt, valid


def pointmap_normals(points, valid, ksize=POINTMAP_SOBEL_KSIZE):
  """Normals of an (H, W, 3) pointmap from Sobel derivatives, and where their whole window is valid.

  n = cross(dP/dx, dP/dy) / |...| with cv2.Sobel(ksize) on X, Y, Z along image x (columns) and y (rows). In
  OpenCV camera axes (x right, y down, z forward) a surface facing the camera gets n = +z (away from the camera);
  the sign cancels in pred-vs-gt angles. Invalid pixels are zeroed first and a normal counts only where all
  ksize x ksize neighbours lie inside the image and are valid, so no invalid value reaches it. Where the cross
  product is zero (a degenerate surface) the normal is the zero vector. Returns (normals, window_valid).
  """
  points = np.asarray(points, dtype=np.float64)
  valid = np.asarray(valid, dtype=bool)
  points = np.where(valid[..., None], points, 0.0)
  d_dx = np.stack([cv2.Sobel(points[..., c], cv2.CV_64F, 1, 0, ksize=ksize) for c in range(3)], axis=-1)
  d_dy = np.stack([cv2.Sobel(points[..., c], cv2.CV_64F, 0, 1, ksize=ksize) for c in range(3)], axis=-1)
  normals = np.cross(d_dx, d_dy)
  length = np.linalg.norm(normals, axis=-1, keepdims=True)
  normals = np.where(length > 0, normals / np.where(length > 0, length, 1.0), 0.0)
  window_valid = cv2.erode(valid.astype(np.uint8), np.ones((ksize, ksize), np.uint8),
                           borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
  return normals, window_valid


class PointmapMetrics:
  """Dataset pointmap metrics in canonical space, all valid pixels of all images pooled (pixel-weighted).

  With e = pred - gt at a valid pixel: l2_mean = mean |e| (m); x_mae, y_mae, z_mae = mean |e_x|, |e_y|, |e_z|;
  rmse = sqrt(mean |e|^2) (one root over the pooled squared Euclidean distances, not per axis or per image);
  within_{05,10,20}_cm = percent of pixels with |e| < 0.05 / 0.10 / 0.20 m. Normal stats (pointmap_normals, Sobel
  k=5) over pixels whose 5x5 window is valid and whose gt normal is defined; a degenerate predicted normal
  counts as 90 degrees: normal_mae, normal_rmse (degrees), within_{5,11.25,22.5,30}_deg (%, angle < t);
  num_normal_pixels says how many. Images without valid pixels are skipped and counted.
  """

  def __init__(self):
    self.count = 0
    self.l2_sum = 0.0
    self.sq_sum = 0.0
    self.abs_sum = np.zeros(3)
    self.below = np.zeros(len(POINTMAP_DISTANCE_THRESHOLDS), np.int64)
    self.angles = _sapiens2_angles()
    self.num_images = 0
    self.num_skipped = 0

  def add(self, pred, gt, valid):
    pred, gt, valid = _pointmaps(pred, gt, valid)
    if not np.any(valid):
      self.num_skipped += 1
      return
    error = pred[valid] - gt[valid]
    distance = np.linalg.norm(error, axis=-1)
    self.count += distance.size
    self.l2_sum += float(distance.sum())
    self.sq_sum += float(np.sum(distance ** 2))
    self.abs_sum += np.abs(error).sum(axis=0)
    self.below += [np.count_nonzero(distance < t) for t, _ in POINTMAP_DISTANCE_THRESHOLDS]
    pred_normals, window = pointmap_normals(pred, valid)
    gt_normals, _ = pointmap_normals(gt, valid)
    keep = window & np.any(gt_normals != 0, axis=-1)
    self.angles.add(angular_errors(pred_normals, gt_normals, keep))
    self.num_images += 1

  def result(self):
    n = self.count
    nan = float("nan")
    out = dict(l2_mean=self.l2_sum / n if n else nan)
    for axis, mae in zip("xyz", self.abs_sum):
      out[f"{axis}_mae"] = float(mae) / n if n else nan
    out["rmse"] = float(np.sqrt(self.sq_sum / n)) if n else nan
    for (_, key), hits in zip(POINTMAP_DISTANCE_THRESHOLDS, self.below):
      out[key] = 100.0 * hits / n if n else nan
    out.update(_sapiens2_angle_summary(self.angles, median=False))
    out.update(num_normal_pixels=self.angles.count, num_images=self.num_images, num_skipped=self.num_skipped)
    return out


def pointmap_metrics(pred, gt, valid):
  """One image's PointmapMetrics (a dataset of one)."""
  return _one_image(PointmapMetrics(), "pointmap_metrics", pred, gt, valid).result()


# ---------------------------------------------------------------------- albedo
#
# Each image's numbers first, then a mean over images (PSNR and SSIM are per-image quantities; the other three
# follow so that the class is consistent). Everything is computed on pred / R and gt / R, R the data range, so
# mae, rmse and grad_l1 are fractions of the range whether the albedo is stored as 0-1 or 0-255.

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def ssim_map(pred, gt, data_range=1.0):
  """Per-pixel SSIM of (H, W, C) images: Gaussian window 11 px, sigma 1.5, C1 = (0.01 R)^2, C2 = (0.03 R)^2.

  Local means, variances and covariance come from Gaussian filtering of each whole channel (cv2.GaussianBlur,
  symmetric-reflect border, as scipy's "reflect"), so every pixel, borders included, has a value.
  """
  pred = np.asarray(pred, dtype=np.float64)
  gt = np.asarray(gt, dtype=np.float64)
  c1 = (SSIM_K1 * data_range) ** 2
  c2 = (SSIM_K2 * data_range) ** 2

  def blur(image):
    return cv2.GaussianBlur(image, (SSIM_WINDOW, SSIM_WINDOW), SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)

  out = np.empty(pred.shape)
  for c in range(pred.shape[-1]):
    x, y = pred[..., c], gt[..., c]
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    out[..., c] = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
  return out


def albedo_metrics(pred, gt, valid, data_range=None):
  """One image's albedo errors over the valid pixels: mae, rmse, psnr, ssim, grad_l1.

  pred, gt: (H, W, C) or (H, W); valid: (H, W). R = data_range, or when None 1 if the largest valid gt value is
  <= 1 and 255 otherwise (upstream's auto-detection, here on valid pixels). On pred / R and gt / R:
  mae / rmse over valid pixels and channels (no clamping of pred); psnr = 10 log10(1 / mse) (inf when mse is 0);
  ssim = ssim_map of the whole images with invalid pixels zeroed in both, averaged over valid pixels and
  channels; grad_l1 = mean |d(pred) - d(gt)| over horizontal and vertical forward differences whose two pixels
  are both valid, all pooled (NaN if there are none).
  """
  pred = np.asarray(pred, dtype=np.float64)
  gt = np.asarray(gt, dtype=np.float64)
  valid = np.asarray(valid, dtype=bool)
  if pred.shape != gt.shape:
    raise ValueError(f"pred {pred.shape} and gt {gt.shape} must have the same shape")
  if pred.ndim == 2:
    pred, gt = pred[..., None], gt[..., None]
  if pred.ndim != 3 or valid.shape != pred.shape[:2]:
    raise ValueError(f"valid {valid.shape} must be the (H, W) of the (H, W[, C]) albedo {gt.shape}")
  if not np.any(valid):
    raise ValueError("albedo_metrics needs at least one valid pixel")
  if data_range is None:
    data_range = 1.0 if gt[valid].max() <= 1.0 else 255.0
  pred = np.where(valid[..., None], pred / data_range, 0.0)
  gt = np.where(valid[..., None], gt / data_range, 0.0)
  error = pred - gt  # zero outside the mask
  mse = float(np.mean(error[valid] ** 2))
  psnr = float(10.0 * np.log10(1.0 / mse)) if mse > 0 else float("inf")
  steps_x = np.abs(error[:, 1:] - error[:, :-1])[valid[:, 1:] & valid[:, :-1]]
  steps_y = np.abs(error[1:] - error[:-1])[valid[1:] & valid[:-1]]
  steps = steps_x.size + steps_y.size
  return dict(
      mae=float(np.mean(np.abs(error[valid]))),
      rmse=float(np.sqrt(mse)),
      psnr=psnr,
      ssim=float(np.mean(ssim_map(pred, gt, 1.0)[valid])),
      grad_l1=float(steps_x.sum() + steps_y.sum()) / steps if steps else float("nan"))


class AlbedoMetrics:
  """Dataset albedo metrics: each image's albedo_metrics, then a mean over images.

  Kept as per-key sums and counts (NaN values left out, as DepthMetrics's nanmean). A perfect image has
  psnr inf, and then so does the dataset mean. Images without valid pixels are skipped and counted.
  """

  KEYS = ("mae", "rmse", "psnr", "ssim", "grad_l1")

  def __init__(self, data_range=None):
    self.data_range = data_range
    self.sums = dict.fromkeys(self.KEYS, 0.0)
    self.counts = dict.fromkeys(self.KEYS, 0)
    self.num_images = 0
    self.num_skipped = 0

  def add(self, pred, gt, valid):
    if not np.any(valid):
      self.num_skipped += 1
      return
    for key, value in albedo_metrics(pred, gt, valid, self.data_range).items():
      if not np.isnan(value):
        self.sums[key] += value
        self.counts[key] += 1
    self.num_images += 1

  def result(self):
    out = {k: self.sums[k] / self.counts[k] if self.counts[k] else float("nan") for k in self.KEYS}
    out.update(num_images=self.num_images, num_skipped=self.num_skipped)
    return out


# --------------------------------------------------------------------- matting
#
# The matting literature's four errors (Rhemann et al. 2009, with Deep Image Matting's evaluation code) on
# alpha in [0, 1], each image then a mean over images. `valid` is the evaluated region: the trimap's unknown
# pixels, or the whole image when there is no trimap. Scales: sad, grad and conn are sums over the region
# divided by 1000; mse is the plain mean over the region (papers often print it times 1000).

MATTING_GRAD_SIGMA = 1.4
MATTING_CONN_STEP = 0.1
MATTING_CONN_THETA = 0.15


def _gauss_gradient_kernel(sigma, epsilon=1e-2):
  """hx[i, j] = G(i) G'(j) on a square of half-size ceil(sigma sqrt(-2 ln(sqrt(2 pi) sigma eps))), unit L2 norm.

  That half-size is where the Gaussian falls below eps of its peak: 4 for sigma 1.4, so the kernel is 9 x 9.
  """
  half = int(np.ceil(sigma * np.sqrt(-2.0 * np.log(np.sqrt(2.0 * np.pi) * sigma * epsilon))))
  r = np.arange(-half, half + 1, dtype=np.float64)
  gauss = np.exp(-r ** 2 / (2.0 * sigma ** 2)) / (sigma * np.sqrt(2.0 * np.pi))
  kernel = np.outer(gauss, -r * gauss / sigma ** 2)  # rows smooth (y), columns differentiate (x)
  return kernel / np.sqrt(np.sum(kernel ** 2))


def gaussian_gradient_magnitude(alpha, sigma=MATTING_GRAD_SIGMA):
  """|grad alpha| from first-derivative-of-Gaussian filters (replicated border), as the Grad error uses."""
  alpha = np.asarray(alpha, dtype=np.float64)
  kernel = _gauss_gradient_kernel(sigma)
  # Correlation instead of convolution flips the kernel, which only negates it: magnitudes are the same.
  grad_x = cv2.filter2D(alpha, cv2.CV_64F, kernel, borderType=cv2.BORDER_REPLICATE)
  grad_y = cv2.filter2D(alpha, cv2.CV_64F, kernel.T, borderType=cv2.BORDER_REPLICATE)
  return np.sqrt(grad_x ** 2 + grad_y ** 2)


def _largest_component(mask):
  """The largest 4-connected component of a boolean mask (all False when the mask is empty)."""
  count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
  if count < 2:
    return np.zeros(mask.shape, bool)
  return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))  # label 0 is the background


def _connectivity_phi(alpha, level, theta):
  d = alpha - level
  return 1.0 - d * (d >= theta)


def connectivity_levels(pred, gt, step=MATTING_CONN_STEP):
  """Per pixel, the last threshold at which it is still in the largest common component (Rhemann et al.).

  For t_i = i * step (i = 1..1/step, computed as i / n so 0.3 is 0.3): omega_i = largest 4-connected
  component of (pred >= t_i) & (gt >= t_i). A pixel first missing from omega_i gets t_{i-1}; one never missing
  gets 1.
  """
  n = int(round(1.0 / step))
  thresholds = np.arange(n + 1) / n
  level = np.full(gt.shape, -1.0)
  for i in range(1, n + 1):
    omega = _largest_component((pred >= thresholds[i]) & (gt >= thresholds[i]))
    level[(level < 0) & ~omega] = thresholds[i - 1]
  level[level < 0] = 1.0
  return level


def matting_metrics(pred, gt, valid=None):
  """One image's sad, mse, grad, conn on (H, W) alpha in [0, 1] over the region `valid` (default: all).

  sad = sum |pred - gt| / 1000; mse = mean (pred - gt)^2 (not scaled); grad = sum (|grad pred| - |grad gt|)^2
  / 1000 with gaussian_gradient_magnitude (sigma 1.4); conn = sum |phi(pred) - phi(gt)| / 1000 with
  phi(a) = 1 - d [d >= 0.15], d = a - connectivity_levels (step 0.1). Sums run over the region; the filters and
  the components see the whole image. Outside the region pred is replaced by gt (as trimap evaluation fixes
  the known pixels), so no prediction there changes any number.
  """
  pred = np.asarray(pred, dtype=np.float64)
  gt = np.asarray(gt, dtype=np.float64)
  valid = np.ones(gt.shape, bool) if valid is None else np.asarray(valid, dtype=bool)
  if not pred.shape == gt.shape == valid.shape or gt.ndim != 2:
    raise ValueError(f"pred {pred.shape}, gt {gt.shape} and valid {valid.shape} must be the same (H, W)")
  if not np.any(valid):
    raise ValueError("matting_metrics needs at least one valid pixel")
  if gt.max() > 1.0 or gt.min() < 0.0:
    raise ValueError(f"gt alpha must lie in [0, 1] (got {gt.min()}..{gt.max()}); divide 0-255 mattes by 255")
  pred = np.where(valid, pred, gt)
  error = (pred - gt)[valid]
  grad_diff = (gaussian_gradient_magnitude(pred) - gaussian_gradient_magnitude(gt))[valid]
  level = connectivity_levels(pred, gt)
  conn_diff = (_connectivity_phi(pred, level, MATTING_CONN_THETA)
               - _connectivity_phi(gt, level, MATTING_CONN_THETA))[valid]
  return dict(sad=float(np.abs(error).sum()) / 1000.0,
              mse=float(np.mean(error ** 2)),
              grad=float(np.sum(grad_diff ** 2)) / 1000.0,
              conn=float(np.abs(conn_diff).sum()) / 1000.0)


class MattingMetrics:
  """Dataset matting errors: each image's matting_metrics, then a mean over images.

  Kept as sums. `valid` (optional) is the evaluated region; images with an empty region are skipped and counted.
  """

  KEYS = ("sad", "mse", "grad", "conn")

  def __init__(self):
    self.sums = dict.fromkeys(self.KEYS, 0.0)
    self.num_images = 0
    self.num_skipped = 0

  def add(self, pred, gt, valid=None):
    if valid is not None and not np.any(valid):
      self.num_skipped += 1
      return
    for key, value in matting_metrics(pred, gt, valid).items():
      self.sums[key] += value
    self.num_images += 1

  def result(self):
    n = self.num_images
    out = {k: self.sums[k] / n if n else float("nan") for k in self.KEYS}
    out.update(num_images=n, num_skipped=self.num_skipped)
    return out
