"""The task losses with exactly the reference reductions (reference §4.1, §5.2, §6, §7; gotcha §10.8).

Pure jax functions on NHWC arrays, computed in float32 whatever the model's compute dtype. Dense
predictions come out of the heads smaller than the labels and are first resized bilinearly to the
label size, as the reference does before every dense loss.
"""
import jax
import jax.numpy as jnp

from sapiens_jax.data import dense_transforms


def resize_to(x, hw):
  """(B, h, w, C) -> (B, H, W, C) float32, bilinear with half-pixel centres and no antialiasing:
  PyTorch's F.interpolate(mode="bilinear", align_corners=False), upsampling and downsampling."""
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 4:
    raise ValueError(f"expected an NHWC prediction (B, h, w, C), got shape {x.shape}")
  if tuple(x.shape[1:3]) == tuple(hw):
    return x
  return jax.image.resize(x, (x.shape[0], *hw, x.shape[3]), "linear", antialias=False)


def _check_shape(name, x, expected):
  if tuple(x.shape) != tuple(expected):
    raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(expected)}")


def keypoint_mse(pred, target, target_weight):
  """mmpose KeypointMSELoss(use_target_weight=True): mean over B*H*W*K of (pred - gt)^2 * w_k.

  A plain mean: invisible keypoints (w = 0) still count in the denominator.
  pred, target (B, H, W, K) heatmaps; target_weight (B, K).
  """
  pred, target = jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32)
  _check_shape("keypoint target", target, pred.shape)
  _check_shape("keypoint target_weight", target_weight, (pred.shape[0], pred.shape[3]))
  weight = jnp.asarray(target_weight, jnp.float32)[:, None, None, :]
  return jnp.mean(jnp.square(pred - target) * weight)


def keypoint_ohkm_mse(pred, target, target_weight, topk):
  """mmpose KeypointOHKMMSELoss(use_target_weight=True): online hard keypoint mining.

  Per keypoint the mean over H*W of ((pred * w) - (gt * w))^2; per sample the `topk` largest of
  those are kept; the result is their mean over the batch.
  """
  pred, target = jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32)
  _check_shape("keypoint target", target, pred.shape)
  _check_shape("keypoint target_weight", target_weight, (pred.shape[0], pred.shape[3]))
  if not 0 < topk <= pred.shape[3]:
    raise ValueError(f"OHKM topk={topk} must be in [1, number of keypoints={pred.shape[3]}]")
  weight = jnp.asarray(target_weight, jnp.float32)[:, None, None, :]
  per_keypoint = jnp.mean(jnp.square(pred * weight - target * weight), axis=(1, 2))  # (B, K)
  hardest, _ = jax.lax.top_k(per_keypoint, topk)
  return jnp.mean(hardest)


def seg_cross_entropy(logits, labels, class_weight=None, ignore_index=255):
  """mmseg CrossEntropyLoss as Sapiens reduces it: per pixel w[y] * CE (0 where y == ignore_index),
  then a plain mean over all B*H*W pixels (ignored pixels count; not divided by the sum of weights).

  logits (B, h, w, C) are resized to the size of labels (B, H, W) first.
  """
  if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
    raise ValueError(f"seg labels must be (B, H, W) with B={logits.shape[0]}, got shape {labels.shape}")
  num_classes = logits.shape[-1]
  log_probs = jax.nn.log_softmax(resize_to(logits, labels.shape[1:]), axis=-1)
  labels = jnp.asarray(labels, jnp.int32)
  valid = labels != ignore_index
  safe_labels = jnp.where(valid, labels, 0)
  nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  if class_weight is not None:
    class_weight = jnp.asarray(class_weight, jnp.float32)
    _check_shape("class_weight", class_weight, (num_classes,))
    nll = nll * class_weight[safe_labels]
  return jnp.mean(jnp.where(valid, nll, 0.0))


def _safe_sqrt(x):
  """sqrt with value and gradient 0 at x <= 0 (a perfect prediction), instead of an infinite gradient."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def silog_loss(pred, target, eps=1e-6, variance_focus=0.5):
  """Scale-invariant log loss (SiLogLoss, eps 1e-6): per image sqrt(mean d^2 - lambda * (mean d)^2), batch mean.

  d = log(gt) - log(max(pred, eps)) over valid pixels: gt > eps (so the -1 background and the
  foreground minimum, normalised to 0, drop out) and d finite (NaN / inf ground truth or
  prediction). pred (B, h, w, 1) is resized to target (B, H, W) first.
  """
  if target.ndim != 3 or target.shape[0] != pred.shape[0]:
    raise ValueError(f"depth target must be (B, H, W) with B={pred.shape[0]}, got shape {target.shape}")
  if pred.shape[-1] != 1:
    raise ValueError(f"depth prediction must have 1 channel, got shape {pred.shape}")
  pred = resize_to(pred, target.shape[1:])[..., 0]
  target = jnp.asarray(target, jnp.float32)
  usable = target > eps  # False for NaN too
  diff = jnp.log(jnp.where(usable, target, 1.0)) - jnp.log(jnp.maximum(pred, eps))
  valid = usable & jnp.isfinite(diff)
  diff = jnp.where(valid, diff, 0.0)
  count = jnp.maximum(valid.sum(axis=(1, 2)).astype(jnp.float32), eps)
  mean_sq = jnp.sum(jnp.square(diff), axis=(1, 2)) / count
  mean = jnp.sum(diff, axis=(1, 2)) / count
  return jnp.mean(_safe_sqrt(mean_sq - variance_focus * jnp.square(mean)))


NORMALIZE_EPS = 1e-6


def unit(v, eps=NORMALIZE_EPS):
  """F.normalize(dim=-1, eps): v / max(|v|, eps), with a finite gradient at v = 0."""
  return v / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(v), axis=-1, keepdims=True), eps ** 2))


def _finite_or_zero(x):
  return jnp.where(jnp.isfinite(x), x, 0.0)


def _masked_pixel_mean(per_pixel, valid):
  """sum over valid pixels / max(#valid pixels in the whole batch, 1): upstream's masked mean, one count
  for the batch (not a mean of per-sample means). jnp.where keeps masked-out NaN/inf out of value and grad."""
  count = jnp.maximum(valid.sum().astype(jnp.float32), 1.0)
  return jnp.sum(jnp.where(valid, per_pixel, 0.0)) / count


def normal_loss_terms(pred, target):
  """The two surface-normal losses: {"cosine": ..., "l1": ...}, each a sum over valid pixels divided
  by max(#valid pixels, 1), and replaced by 0 if it is NaN or inf.

  cosine: 1 - cos between the L2-normalised vectors; l1: |pred - gt| summed over the 3 channels,
  on the unnormalised prediction. Valid pixels: target x > -100. pred (B, h, w, 3) is resized to
  target (B, H, W, 3) first.
  """
  if target.ndim != 4 or target.shape[-1] != 3 or target.shape[0] != pred.shape[0]:
    raise ValueError(f"normal target must be (B, H, W, 3) with B={pred.shape[0]}, got shape {target.shape}")
  if pred.shape[-1] != 3:
    raise ValueError(f"normal prediction must have 3 channels, got shape {pred.shape}")
  pred = resize_to(pred, target.shape[1:3])
  target = jnp.asarray(target, jnp.float32)
  valid = dense_transforms.normal_foreground(target)
  cosine = jnp.sum(unit(pred) * unit(target), axis=-1)
  cosine_loss = _masked_pixel_mean(1.0 - cosine, valid)
  l1_loss = _masked_pixel_mean(jnp.abs(pred - target).sum(axis=-1), valid)
  return {"cosine": _finite_or_zero(cosine_loss), "l1": _finite_or_zero(l1_loss)}


def normal_loss(pred, target):
  """Total surface-normal loss: cosine + L1 with weights 1:1 (see `normal_loss_terms`)."""
  terms = normal_loss_terms(pred, target)
  return terms["cosine"] + terms["l1"]


# ------------------------------------------------------------------------------------------------
# Sapiens2 fine-tuning losses (sapiens2.md §3). Each `sapiens2_*_loss` returns a dict of weighted scalar
# terms keyed by the upstream loss_name, so each term can be logged; the task's loss is the sum of the
# values (§3.0: upstream .mean()s every returned tensor and sums the keys). Masks are (B, H, W) bool.

POINTMAP_CLAMP = 4.0  # upper bound on each weighted depth-normalised pointmap term (§3.3)


def _check_mask(mask, hw_shape):
  if tuple(mask.shape) != tuple(hw_shape):
    raise ValueError(f"mask has shape {tuple(mask.shape)}, expected (B, H, W) = {tuple(hw_shape)}")
  return jnp.asarray(mask, bool)


def masked_l1(pred, target, mask):
  """Upstream L1Loss: |pred - gt| summed over channels per pixel, mean over the batch's valid pixels, 0 if not
  finite. pred, target (B, H, W, C); mask (B, H, W)."""
  _check_shape("target", target, pred.shape)
  valid = _check_mask(mask, pred.shape[:3])
  return _finite_or_zero(_masked_pixel_mean(jnp.abs(pred - target).sum(axis=-1), valid))


def seg_dice_loss(logits, labels, ignore_index=255, eps=1e-3):
  """Upstream DiceLoss (softmax, include_background=False, reduction "none", then batch mean).

  Per sample and foreground class c: dice_c = (2 sum p*g + eps) / (sum p^2 + sum g^2 + eps); the sample's loss
  is 1 - mean of dice_c over the classes present in its GT, or 0 when none is present; the result is the mean
  over all B samples. Softmax runs over all classes before background is dropped. Ignored pixels
  (ignore_index) are zeroed in both p and g, so they leave the intersection and both sums (upstream
  multiplies pred and one-hot by the valid mask). Labels above C - 1 are clamped to C - 1, as upstream.
  logits (B, h, w, C) are resized to labels (B, H, W) first.
  """
  if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
    raise ValueError(f"seg labels must be (B, H, W) with B={logits.shape[0]}, got shape {labels.shape}")
  num_classes = logits.shape[-1]
  if num_classes < 2:
    raise ValueError(f"the softmax Dice loss needs at least 2 classes, got {num_classes}")
  probs = jax.nn.softmax(resize_to(logits, labels.shape[1:]), axis=-1)
  labels = jnp.asarray(labels, jnp.int32)
  valid = (labels != ignore_index)[..., None]
  one_hot = jax.nn.one_hot(jnp.clip(jnp.where(valid[..., 0], labels, 0), 0, num_classes - 1), num_classes)
  p = jnp.where(valid, probs, 0.0)[..., 1:]
  g = jnp.where(valid, one_hot, 0.0)[..., 1:]
  inter = jnp.sum(p * g, axis=(1, 2))
  dice = (2.0 * inter + eps) / (jnp.sum(p * p, axis=(1, 2)) + jnp.sum(g * g, axis=(1, 2)) + eps)  # (B, C - 1)
  present = jnp.sum(g, axis=(1, 2)) > 0
  num_present = present.sum(axis=1)
  mean_dice = jnp.sum(jnp.where(present, dice, 0.0), axis=1) / jnp.maximum(num_present, 1)
  return jnp.mean(jnp.where(num_present > 0, 1.0 - mean_dice, 0.0))


def sapiens2_seg_loss(logits, labels, class_weight, ignore_index=255):
  """Body-part segmentation (§3.1): {"loss_ce": CE weighted by class (seg29's class_weight in data/meta), mean
  over all B*H*W pixels (the v1 `seg_cross_entropy`), "loss_dice": `seg_dice_loss`}, both weight 1."""
  return {"loss_ce": seg_cross_entropy(logits, labels, class_weight, ignore_index),
          "loss_dice": seg_dice_loss(logits, labels, ignore_index)}


def _forward_difference_mse(pred, target, valid):
  """(along x, along y): squared error of forward differences summed over channels, averaged over the pairs of
  neighbours that are both valid (one count for the batch). Upstream NormalGradL1Loss / AlbedoGradL1Loss."""
  valid_x = valid[:, :, 1:] & valid[:, :, :-1]
  valid_y = valid[:, 1:, :] & valid[:, :-1, :]
  err_x = jnp.square(jnp.diff(pred, axis=2) - jnp.diff(target, axis=2)).sum(axis=-1)
  err_y = jnp.square(jnp.diff(pred, axis=1) - jnp.diff(target, axis=1)).sum(axis=-1)
  return _masked_pixel_mean(err_x, valid_x), _masked_pixel_mean(err_y, valid_y)


def sapiens2_normal_loss(pred, target):
  """Surface normals (§3.2): {"loss_cosine_sim": 10 (1 - cos), "loss_l1": 1 L1, "loss_grad_l1": 10 grad}.

  Cosine and L1 are exactly v1's `normal_loss_terms` (same masked means, F.normalize eps 1e-6, channel-summed
  L1 on the raw prediction), reused. grad (upstream's misnamed NormalGradL1Loss) is the MSE of forward
  differences, x plus y (`_forward_difference_mse`). Valid: target x > -100 (background -1000).
  pred (B, h, w, 3) is resized to target (B, H, W, 3) first.
  """
  terms = normal_loss_terms(pred, target)
  pred = resize_to(pred, target.shape[1:3])
  target = jnp.asarray(target, jnp.float32)
  grad_x, grad_y = _forward_difference_mse(pred, target, dense_transforms.normal_foreground(target))
  return {"loss_cosine_sim": 10.0 * terms["cosine"], "loss_l1": 1.0 * terms["l1"],
          "loss_grad_l1": 10.0 * _finite_or_zero(grad_x + grad_y)}


def pointmap_mean_depth(target, mask):
  """(B,) mean GT Z over each sample's valid pixels (upstream gt_mean_depth); 1 for a sample with none."""
  valid = _check_mask(mask, target.shape[:3])
  count = valid.sum(axis=(1, 2)).astype(jnp.float32)
  total = jnp.sum(jnp.where(valid, jnp.asarray(target, jnp.float32)[..., 2], 0.0), axis=(1, 2))
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 1.0)


def multiscale_l1(pred, target, mask, scale_factor=2):
  """Upstream MultiscaleL1Loss(scale_factor=2): one extra scale, finer, not a pyramid. pred and target are
  upsampled x2 bilinearly (align_corners=False, `resize_to`), the mask x2 by nearest (each pixel a 2x2
  block), then `masked_l1` at that size. Near mask edges the upsampled values blend in background."""
  b, h, w, _ = pred.shape
  valid = _check_mask(mask, (b, h, w))
  size = (h * scale_factor, w * scale_factor)
  valid = jnp.repeat(jnp.repeat(valid, scale_factor, axis=1), scale_factor, axis=2)
  return masked_l1(resize_to(pred, size), resize_to(target, size), valid)


def shift_invariant_l1(pred, target, mask):
  """Upstream PointmapShiftInvariantL1Loss: each sample's pred and gt minus their own centroid over valid pixels
  (sum / (#valid + 1e-6)), then `masked_l1`."""
  valid = _check_mask(mask, pred.shape[:3])
  weights = valid[..., None].astype(jnp.float32)
  count = weights.sum(axis=(1, 2), keepdims=True) + 1e-6

  def centred(x):
    return x - jnp.sum(jnp.where(valid[..., None], x, 0.0), axis=(1, 2), keepdims=True) / count

  return masked_l1(centred(pred), centred(target), valid)


def pointmap_silog(pred_z, target_z, mask, clamp_eps=1e-4, variance_focus=0.5):
  """Upstream v2 SiLogLoss on canonical Z: per sample sqrt(mean d^2 - 0.5 (mean d)^2), batch mean.

  v1 `silog_loss`'s math with v2's constants: d = log max(gt, 1e-4) - log max(pred, 1e-4) over mask pixels with
  gt > -100 and d finite (upstream drops NaN d only); the count is clamped at 1e-4, so a sample with no valid
  pixel gives 0. sqrt is `_safe_sqrt` (upstream's has an infinite gradient at 0). (B, H, W) inputs.
  """
  _check_shape("depth target", target_z, pred_z.shape)
  valid = _check_mask(mask, pred_z.shape)
  target_z = jnp.asarray(target_z, jnp.float32)
  diff = jnp.log(jnp.maximum(target_z, clamp_eps)) - jnp.log(jnp.maximum(jnp.asarray(pred_z, jnp.float32), clamp_eps))
  valid = valid & (target_z > -100.0) & jnp.isfinite(diff)
  diff = jnp.where(valid, diff, 0.0)
  count = jnp.maximum(valid.sum(axis=(1, 2)).astype(jnp.float32), clamp_eps)
  mean_sq = jnp.sum(jnp.square(diff), axis=(1, 2)) / count
  mean = jnp.sum(diff, axis=(1, 2)) / count
  return jnp.mean(_safe_sqrt(mean_sq - variance_focus * jnp.square(mean)))


def intrinsics_consistency_l1(pred, mask, intrinsics):
  """Upstream PointmapIntrinsicsConsistencyLoss: |X - (u - cx) Z / fx| + |Y - (v - cy) Z / fy| per valid pixel,
  mean over the batch's valid pixels, 0 if not finite. u is the column index and v the row index, integers
  (pixel (0, 0) at u = v = 0, the convention the GT pointmap is built with). K is the original (pre-canonical)
  intrinsics: canonical scaling keeps X/Z and Y/Z. pred (B, H, W, 3) canonical XYZ; intrinsics (B, 3, 3)."""
  b, h, w, _ = pred.shape
  valid = _check_mask(mask, (b, h, w))
  k = jnp.asarray(intrinsics, jnp.float32)
  _check_shape("intrinsics", k, (b, 3, 3))
  fx, fy, cx, cy = (k[:, i, j][:, None, None] for i, j in ((0, 0), (1, 1), (0, 2), (1, 2)))
  u = jnp.arange(w, dtype=jnp.float32)[None, None, :]
  v = jnp.arange(h, dtype=jnp.float32)[None, :, None]
  z = pred[..., 2]
  err = jnp.abs(pred[..., 0] - (u - cx) * z / fx) + jnp.abs(pred[..., 1] - (v - cy) * z / fy)
  return _finite_or_zero(_masked_pixel_mean(err, valid))


def pointmap_normals(points, mask, scale, amplification=100.0, eps=1e-6):
  """Upstream PointmapNormalLoss.compute_normals: (unit normals (B, H, W, 3), validity (B, H, W)).

  On the metric pointmap points / scale, reflect-padded by 1: n = (amp dx) x (amp dy) with dx = right - centre,
  dy = below - centre (forward differences; on the last column / row the reflected neighbour makes them
  the negated backward difference). The amplification 100 scales dx and dy before the cross product, so it only
  moves the |n| > 1e-6 test (to |dx x dy| > 1e-10 in metric units). n / max(|n|, 1e-6), zeroed where
  invalid; valid = |n| > 1e-6 and the centre pixel in the mask (neighbours are not checked, as upstream).
  The cross product is taken as dx x (dy - dx), equal in exact arithmetic, so that it is exactly 0 when the two
  neighbours coincide (e.g. both masked-out zeros) even where the compiler fuses multiply-adds (XLA CPU does).
  """
  b, h, w, _ = points.shape
  valid = _check_mask(mask, (b, h, w))
  metric = points / jnp.asarray(scale, jnp.float32).reshape(b, 1, 1, 1)
  padded = jnp.pad(metric, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
  centre = padded[:, 1:-1, 1:-1]
  dx = (padded[:, 1:-1, 2:] - centre) * amplification
  dy = (padded[:, 2:, 1:-1] - centre) * amplification
  normal = jnp.cross(dx, dy - dx)
  magnitude = _safe_sqrt(jnp.sum(jnp.square(normal), axis=-1, keepdims=True))
  ok = (magnitude[..., 0] > eps) & valid
  return jnp.where(ok[..., None], normal / jnp.maximum(magnitude, eps), 0.0), ok


def pointmap_normal_loss(pred, target, mask, scale, l1_weight=1.0):
  """Upstream PointmapNormalLoss (unweighted): per pixel (1 - clip(cos, -1, 1)) + l1_weight * mean over the 3
  channels of |n_pred - n_gt|, mean over the pixels where the GT normal is valid (`pointmap_normals`).
  Both pointmaps are divided by the GT scale (canonical -> metric)."""
  pred_n, _ = pointmap_normals(pred, mask, scale)
  target_n, valid = pointmap_normals(target, mask, scale)
  cos = jnp.clip(jnp.sum(pred_n * target_n, axis=-1), -1.0, 1.0)
  per_pixel = (1.0 - cos) + l1_weight * jnp.mean(jnp.abs(pred_n - target_n), axis=-1)
  return _masked_pixel_mean(per_pixel, valid)


def sapiens2_pointmap_loss(pred, pred_scale, target, mask, scale, intrinsics):
  """Pointmap (§3.3), the weighted terms by upstream name (sum them for the task loss).

  loss_l1 (x2), loss_multiscale_l1_2 (x1) and loss_shift_invariant (x1) see pred and gt divided by the sample's
  mean GT depth, and each weighted scalar is clamped at <= 4 (so the unweighted L1 saturates at 2; the
  gradient is 0 above). Not depth-normalised nor clamped: loss_silog (x1, canonical Z), loss_K_consistency (x1,
  canonical pred, original K), loss_normal (x2, pred and gt / GT scale), loss_scale_l1 (x4, mean |s_hat - s|).
  pred (B, h, w, 3) canonical XYZ, resized to target (B, H, W, 3); pred_scale (B,) or (B, 1); mask (B, H, W);
  scale (B,) the GT canonical scale 768 / fx; intrinsics (B, 3, 3) the original K.
  """
  pred = resize_to(pred, target.shape[1:3])
  target = jnp.asarray(target, jnp.float32)
  _check_shape("pointmap prediction", pred, target.shape)
  mask = _check_mask(mask, target.shape[:3])
  b = target.shape[0]
  scale = jnp.asarray(scale, jnp.float32).reshape(b)
  depth = pointmap_mean_depth(target, mask)[:, None, None, None]
  pred_n, target_n = pred / depth, target / depth
  return {
      "loss_l1": jnp.minimum(2.0 * masked_l1(pred_n, target_n, mask), POINTMAP_CLAMP),
      "loss_multiscale_l1_2": jnp.minimum(1.0 * multiscale_l1(pred_n, target_n, mask), POINTMAP_CLAMP),
      "loss_silog": 1.0 * pointmap_silog(pred[..., 2], target[..., 2], mask),
      "loss_K_consistency": 1.0 * intrinsics_consistency_l1(pred, mask, intrinsics),
      "loss_shift_invariant": jnp.minimum(1.0 * shift_invariant_l1(pred_n, target_n, mask), POINTMAP_CLAMP),
      "loss_normal": 2.0 * pointmap_normal_loss(pred, target, mask, scale),
      "loss_scale_l1": 4.0 * jnp.mean(jnp.abs(jnp.asarray(pred_scale, jnp.float32).reshape(b) - scale)),
  }


def albedo_chromaticity_l1(pred, target, mask, eps=1e-6):
  """Upstream AlbedoChromaticityL1Loss (unweighted): chroma = rgb / (R + G + B + 1e-6), pred clamped to [0, 1]
  first (the target is not), then `masked_l1` of the chromas."""
  pred = jnp.clip(pred, 0.0, 1.0)
  return masked_l1(pred / (pred.sum(axis=-1, keepdims=True) + eps),
                   target / (target.sum(axis=-1, keepdims=True) + eps), mask)


def sapiens2_albedo_loss(pred, target, mask):
  """Albedo (§3.4): {"loss_l1": 2 `masked_l1`, "loss_grad_l1": 2 * 0.5 (forward-difference MSE x + y),
  "loss_chroma_l1": 1 `albedo_chromaticity_l1`}. pred (B, h, w, 3) resized to target (B, H, W, 3) in [0, 1];
  mask (B, H, W)."""
  pred = resize_to(pred, target.shape[1:3])
  target = jnp.asarray(target, jnp.float32)
  mask = _check_mask(mask, target.shape[:3])
  grad_x, grad_y = _forward_difference_mse(pred, target, mask)
  return {"loss_l1": 2.0 * masked_l1(pred, target, mask),
          "loss_grad_l1": 2.0 * 0.5 * _finite_or_zero(grad_x + grad_y),
          "loss_chroma_l1": 1.0 * albedo_chromaticity_l1(pred, target, mask)}


def sapiens2_keypoint_loss(pred, target, target_weight):
  """Pose-308 (§3.5): {"loss_kpt": 10 * `keypoint_mse`}. Upstream KeypointMSELoss with target weights is the
  v1 reduction (mean over B*H*W*K of w_k (pred - gt)^2); loss_weight 10 is the only difference."""
  return {"loss_kpt": 10.0 * keypoint_mse(pred, target, target_weight)}


# Matting. Not in sapiens2@3098c14 nor trainable in the transformers port. The default recipe follows a later
# Meta-headed `sapiens/dense` matting config and loss file seen in third-party copies of the repository
# (configs/matting/gss_p3m_metasim/sapiens2_1b_matting_*.py, models/losses/matting_loss.py): L1 + Sobel gradient
# + Laplacian pyramid, weight 1 each, on alpha (unmasked) and on foreground (masked). Composition L1 is the Deep
# Image Matting (Xu et al. 2017) loss, offered separately; that recipe does not use it.

_GAUSS_1D = (1.0 / 16, 4.0 / 16, 6.0 / 16, 4.0 / 16, 1.0 / 16)


def _masked_elementwise_mean(err, mask):
  """mean over all B*H*W*C elements of err * mask (masked-out elements count, as upstream's mean reduction)."""
  if mask is None:
    return jnp.mean(err)
  return jnp.mean(jnp.where(jnp.asarray(mask, bool)[..., None], err, 0.0))


def matting_l1(pred, target, mask=None):
  """Upstream MattingL1Loss: mean over all elements of |pred - gt| * mask. NHWC; mask (B, H, W) or None."""
  _check_shape("matting target", target, pred.shape)
  return _finite_or_zero(_masked_elementwise_mean(jnp.abs(pred - target), mask))


def _sobel_magnitude(x):
  """sqrt(gx^2 + gy^2 + 1e-6) of the 3x3 Sobel responses on a reflect-padded image (cross-correlation)."""
  p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
  h, w = x.shape[1:3]

  def shift(dy, dx):
    return p[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

  gx = (shift(-1, 1) + 2 * shift(0, 1) + shift(1, 1)) - (shift(-1, -1) + 2 * shift(0, -1) + shift(1, -1))
  gy = (shift(1, -1) + 2 * shift(1, 0) + shift(1, 1)) - (shift(-1, -1) + 2 * shift(-1, 0) + shift(-1, 1))
  return jnp.sqrt(jnp.square(gx) + jnp.square(gy) + 1e-6)


def matting_grad_loss(pred, target, mask=None):
  """Upstream MattingGradLoss: mean over all elements of |sobel_mag(pred) - sobel_mag(gt)| * mask."""
  _check_shape("matting target", target, pred.shape)
  return _masked_elementwise_mean(jnp.abs(_sobel_magnitude(pred) - _sobel_magnitude(target)), mask)


def _gauss_blur(x):
  """The 5x5 binomial blur [1 4 6 4 1]^T [1 4 6 4 1] / 256, per channel, with reflect padding 2: as two 1-D
  passes of shifted sums (XLA:CPU runs a depthwise conv's gradient slowly: benchmarks/matting_loss.py)."""
  h, w = x.shape[1:3]
  if min(h, w) < 3:
    raise ValueError(f"Laplacian pyramid level of size {(h, w)} is too small for a 5x5 reflect-padded blur")
  padded = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
  rows = sum(g * padded[:, k:k + h] for k, g in enumerate(_GAUSS_1D))
  return sum(g * rows[:, :, k:k + w] for k, g in enumerate(_GAUSS_1D))


def _laplacian_pyramid(x, levels):
  """levels - 1 band-pass levels (crop to even size, blur, take every 2nd pixel, zero-insert x4, blur) + the rest."""
  pyramid = []
  for _ in range(levels - 1):
    x = x[:, :x.shape[1] - x.shape[1] % 2, :x.shape[2] - x.shape[2] % 2]
    down = _gauss_blur(x)[:, ::2, ::2]
    up = jax.lax.pad(4.0 * down, jnp.zeros((), x.dtype), ((0, 0, 0), (0, 1, 1), (0, 1, 1), (0, 0, 0)))
    pyramid.append(x - _gauss_blur(up))
    x = down
  return pyramid + [x]


def _nearest_resize_mask(mask, hw):
  """F.interpolate(mode="nearest") of a (B, H, W) mask to hw: source index floor(dst * in / out), here in exact
  integer arithmetic (PyTorch multiplies by a float scale; they agree for the power-of-two ratios of a pyramid)."""
  rows = [min(i * mask.shape[1] // hw[0], mask.shape[1] - 1) for i in range(hw[0])]
  cols = [min(j * mask.shape[2] // hw[1], mask.shape[2] - 1) for j in range(hw[1])]
  return mask[:, jnp.asarray(rows)][:, :, jnp.asarray(cols)]


def matting_laplacian_loss(pred, target, mask=None, levels=5):
  """Upstream MattingLaplacianLoss (after the Laplacian loss of Hou & Liu 2019): sum over pyramid levels l of
  2^l * mean |lap_l(pred) * m_l - lap_l(gt) * m_l|, divided by the number of levels; m_l is the mask resized to
  level l by nearest."""
  _check_shape("matting target", target, pred.shape)
  pred_pyramid, target_pyramid = _laplacian_pyramid(pred, levels), _laplacian_pyramid(target, levels)
  total = 0.0
  for level, (p, t) in enumerate(zip(pred_pyramid, target_pyramid)):
    m = None if mask is None else _nearest_resize_mask(jnp.asarray(mask, bool), p.shape[1:3])
    total = total + 2.0 ** level * _masked_elementwise_mean(jnp.abs(p - t), m)
  return total / levels


def matting_foreground_mask(gt_alpha, has_foreground):
  """Where the recipe supervises the foreground (B, H, W): everywhere for samples with a GT foreground, else only
  where alpha >= 0.996 or alpha == 0 (upstream MattingPackInputs). gt_alpha (B, H, W); has_foreground (B,)."""
  known = (gt_alpha >= 0.996) | (gt_alpha == 0.0)
  return jnp.asarray(has_foreground, bool)[:, None, None] | known


def sapiens2_matting_loss(pred, gt_alpha, gt_foreground=None, foreground_mask=None):
  """Matting recipe (see above): {"loss_{l1,grad,lap}_pha": on alpha, unmasked; "loss_{l1,grad,lap}_fgr": on the
  foreground, masked by foreground_mask}, weight 1 each. pred (B, h, w, 4) RGB + alpha or (B, h, w, 1) alpha,
  after the sigmoid, resized to gt_alpha (B, H, W); gt_foreground (B, H, W, 3); foreground_mask (B, H, W)
  (`matting_foreground_mask`)."""
  pred = resize_to(pred, gt_alpha.shape[1:3])
  alpha, gt_alpha = pred[..., -1:], jnp.asarray(gt_alpha, jnp.float32)[..., None]
  out = {"loss_l1_pha": matting_l1(alpha, gt_alpha), "loss_grad_pha": matting_grad_loss(alpha, gt_alpha),
         "loss_lap_pha": matting_laplacian_loss(alpha, gt_alpha)}
  if pred.shape[-1] == 4:
    if gt_foreground is None or foreground_mask is None:
      raise ValueError("a 4-channel matting prediction needs gt_foreground and foreground_mask")
    fgr, gt_fgr = pred[..., :3], jnp.asarray(gt_foreground, jnp.float32)
    mask = _check_mask(foreground_mask, gt_fgr.shape[:3])
    out.update(loss_l1_fgr=matting_l1(fgr, gt_fgr, mask), loss_grad_fgr=matting_grad_loss(fgr, gt_fgr, mask),
               loss_lap_fgr=matting_laplacian_loss(fgr, gt_fgr, mask))
  elif pred.shape[-1] != 1:
    raise ValueError(f"matting prediction must have 1 (alpha) or 4 (RGB + alpha) channels, got {pred.shape}")
  return out


def matting_composition_l1(alpha, foreground, background, image, mask=None):
  """Deep Image Matting's composition loss (not in the recipe above): mean over all elements of
  |alpha * F + (1 - alpha) * B - I| * mask, with straight (not premultiplied) F. alpha (B, H, W, 1);
  foreground, background, image (B, H, W, 3)."""
  composite = alpha * foreground + (1.0 - alpha) * background
  return _masked_elementwise_mean(jnp.abs(composite - image), mask)
