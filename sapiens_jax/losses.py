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


def _unit(v):
  """F.normalize(dim=-1, eps=1e-6): v / max(|v|, eps), with a finite gradient at v = 0."""
  return v / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(v), axis=-1, keepdims=True), NORMALIZE_EPS ** 2))


def _finite_or_zero(x):
  return jnp.where(jnp.isfinite(x), x, 0.0)


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
  count = jnp.maximum(valid.sum().astype(jnp.float32), 1.0)
  cosine = jnp.sum(_unit(pred) * _unit(target), axis=-1)
  cosine_loss = jnp.sum(jnp.where(valid, 1.0 - cosine, 0.0)) / count
  l1_loss = jnp.sum(jnp.where(valid, jnp.abs(pred - target).sum(axis=-1), 0.0)) / count
  return {"cosine": _finite_or_zero(cosine_loss), "l1": _finite_or_zero(l1_loss)}


def normal_loss(pred, target):
  """Total surface-normal loss: cosine + L1 with weights 1:1 (see `normal_loss_terms`)."""
  terms = normal_loss_terms(pred, target)
  return terms["cosine"] + terms["l1"]
