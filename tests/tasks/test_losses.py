"""Task losses against direct numpy computations of the reference formulas (sapiens_v1.md §4.1, §5.2, §6, §7)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sapiens_jax import losses


def torch_resize(x, hw):
  """The reference resize: F.interpolate(bilinear, align_corners=False) on NCHW (only this needs torch)."""
  torch = pytest.importorskip("torch")
  t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  out = torch.nn.functional.interpolate(t, size=hw, mode="bilinear", align_corners=False)
  return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("src,dst", [((4, 3), (16, 12)), ((5, 3), (12, 7)), ((8, 6), (4, 3)), ((9, 7), (4, 3))])
def test_resize_matches_torch_bilinear(src, dst):
  x = np.random.default_rng(0).standard_normal((2, *src, 3), dtype=np.float32)
  np.testing.assert_allclose(losses.resize_to(x, dst), torch_resize(x, dst), atol=1e-5, rtol=0)


def heatmaps(rng, b=2, h=4, w=3, k=5):
  return (rng.random((b, h, w, k), dtype=np.float32), rng.random((b, h, w, k), dtype=np.float32))


def test_keypoint_mse_is_a_plain_mean_with_weights():
  rng = np.random.default_rng(1)
  pred, gt = heatmaps(rng)
  weight = np.array([[1, 0, 1, 0.5, 1], [0, 0, 1, 1, 1]], np.float32)
  b, h, w, k = pred.shape
  total = 0.0
  for i in range(b):
    for j in range(k):
      total += np.sum((pred[i, :, :, j] - gt[i, :, :, j]) ** 2) * weight[i, j]
  np.testing.assert_allclose(losses.keypoint_mse(pred, gt, weight), total / (b * h * w * k), rtol=1e-6)


def test_keypoint_ohkm_keeps_the_hardest_keypoints_per_sample():
  rng = np.random.default_rng(2)
  pred, gt = heatmaps(rng, k=6)
  pred[0, ..., 4] += 3.0  # a very wrong but invisible keypoint: its weight 0 must keep it out of the top-k
  weight = np.array([[1, 1, 0.5, 1, 0, 1], [1, 0, 1, 1, 1, 0.25]], np.float32)
  topk = 3
  per_sample = []
  for i in range(pred.shape[0]):
    per_keypoint = [np.mean((pred[i, ..., j] * weight[i, j] - gt[i, ..., j] * weight[i, j]) ** 2)
                    for j in range(pred.shape[3])]
    per_sample.append(sum(sorted(per_keypoint, reverse=True)[:topk]) / topk)
  expected = sum(per_sample) / len(per_sample)
  np.testing.assert_allclose(losses.keypoint_ohkm_mse(pred, gt, weight, topk), expected, rtol=1e-6)
  # topk = K is the weighted mean over everything.
  np.testing.assert_allclose(losses.keypoint_ohkm_mse(pred, gt, weight, 6),
                             np.mean(((pred - gt) * weight[:, None, None, :]) ** 2), rtol=1e-6)
  with pytest.raises(ValueError, match="topk"):
    losses.keypoint_ohkm_mse(pred, gt, weight, 7)
  with pytest.raises(ValueError, match="target_weight"):
    losses.keypoint_mse(pred, gt, weight[:, :5])


def numpy_cross_entropy(logits, labels, class_weight, ignore_index):
  """Per pixel w[y] * (logsumexp - logit_y), 0 at ignored pixels; plain mean over all pixels."""
  b, h, w, _ = logits.shape
  total = 0.0
  for i in range(b):
    for y in range(h):
      for x in range(w):
        label = labels[i, y, x]
        if label == ignore_index:
          continue
        z = logits[i, y, x].astype(np.float64)
        lse = z.max() + np.log(np.sum(np.exp(z - z.max())))
        total += class_weight[label] * (lse - z[label])
  return total / (b * h * w)


def test_seg_cross_entropy_weights_ignores_and_averages_over_all_pixels():
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((2, 3, 4, 5), dtype=np.float32) * 3
  labels = rng.integers(0, 5, (2, 6, 8))
  labels[0, :2] = 255
  labels[1, 5, 7] = 255
  class_weight = np.array([0.1, 10, 3, 2, 4], np.float32)
  expected = numpy_cross_entropy(torch_resize(logits, (6, 8)), labels, class_weight, 255)
  np.testing.assert_allclose(losses.seg_cross_entropy(logits, labels, class_weight), expected, rtol=1e-5)
  same_size = rng.standard_normal((2, 6, 8, 5), dtype=np.float32)
  np.testing.assert_allclose(losses.seg_cross_entropy(same_size, labels),
                             numpy_cross_entropy(same_size, labels, np.ones(5), 255), rtol=1e-5)
  with pytest.raises(ValueError, match="class_weight"):
    losses.seg_cross_entropy(logits, labels, class_weight[:4])


def numpy_silog(pred, gt, eps=1e-6, variance_focus=0.5):
  """Per image over valid pixels (gt > eps, finite d): sqrt(mean d^2 - lambda mean(d)^2); batch mean."""
  values = []
  for p, g in zip(pred.astype(np.float64), gt.astype(np.float64)):
    d = []
    for pv, gv in zip(p.ravel(), g.ravel()):
      if gv > eps and np.isfinite(gv):
        d.append(np.log(gv) - np.log(max(pv, eps)))
    d = np.array(d)
    n = max(len(d), eps)
    values.append(np.sqrt(np.sum(d ** 2) / n - variance_focus * (np.sum(d) / n) ** 2))
  return np.mean(values)


def depth_case(rng):
  gt = rng.random((2, 6, 8)).astype(np.float32)
  gt[0, 0] = -1.0        # background
  gt[0, 1, 2] = 0.0      # the foreground minimum, normalised to 0: excluded by gt > eps
  gt[1, 3, :4] = np.nan  # missing ground truth
  gt[1, 4, 5] = np.inf
  pred = rng.random((2, 6, 8)).astype(np.float32) + 0.05
  pred[0, 2, 3] = -0.5   # non-positive predictions are clamped to eps
  return pred, gt


def test_silog_matches_the_reference_formula():
  pred, gt = depth_case(np.random.default_rng(4))
  np.testing.assert_allclose(losses.silog_loss(pred[..., None], gt), numpy_silog(pred, gt), rtol=1e-5)
  small = np.random.default_rng(5).random((2, 3, 4, 1), dtype=np.float32) + 0.1
  np.testing.assert_allclose(losses.silog_loss(small, gt), numpy_silog(torch_resize(small, (6, 8))[..., 0], gt),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="depth target"):
    losses.silog_loss(small, gt[..., None])


def test_silog_gradient_is_finite_at_sqrt_zero():
  gt = np.random.default_rng(6).random((2, 4, 3)).astype(np.float32) + 0.1
  gt[1] = -1.0  # an image with no valid pixel at all
  grad_fn = jax.value_and_grad(losses.silog_loss)
  value, grad = grad_fn(jnp.asarray(gt[..., None]), gt)  # perfect prediction: d = 0 everywhere
  assert value == 0 and np.all(np.isfinite(grad))
  # All differences equal: sqrt(0) again once the mean is fully subtracted (lambda = 1).
  value, grad = jax.value_and_grad(lambda p: losses.silog_loss(p, gt, variance_focus=1.0))(2 * gt[..., None])
  assert abs(float(value)) < 1e-3 and np.all(np.isfinite(grad))


def numpy_normal_losses(pred, gt):
  """(cosine, l1): sums over valid pixels (gt x > -100) divided by max(#valid, 1), NaN/inf -> 0."""
  cos_sum, l1_sum, valid = 0.0, 0.0, 0
  for p, g in zip(pred.reshape(-1, 3).astype(np.float64), gt.reshape(-1, 3).astype(np.float64)):
    if not g[0] > -100:
      continue
    valid += 1
    pn = p / max(np.sqrt(np.sum(p ** 2)), 1e-6)
    gn = g / max(np.sqrt(np.sum(g ** 2)), 1e-6)
    cos_sum += 1 - np.sum(pn * gn)
    l1_sum += np.sum(np.abs(p - g))
  parts = [cos_sum / max(valid, 1), l1_sum / max(valid, 1)]
  return [v if np.isfinite(v) else 0.0 for v in parts]


def test_normal_loss_matches_the_reference_formula():
  rng = np.random.default_rng(7)
  gt = rng.standard_normal((2, 6, 8, 3)).astype(np.float32)
  gt /= np.linalg.norm(gt, axis=-1, keepdims=True)
  gt[0, :3] = -1000.0  # background sentinel
  pred = 2 * rng.standard_normal((2, 6, 8, 3)).astype(np.float32)
  pred[1, 2, 2] = 0.0  # a zero prediction: normalised with eps, no NaN
  cosine, l1 = numpy_normal_losses(pred, gt)
  terms = losses.normal_loss_terms(pred, gt)
  np.testing.assert_allclose([terms["cosine"], terms["l1"]], [cosine, l1], rtol=1e-5)
  np.testing.assert_allclose(losses.normal_loss(pred, gt), cosine + l1, rtol=1e-5)
  small = rng.standard_normal((2, 3, 4, 3)).astype(np.float32)
  np.testing.assert_allclose(losses.normal_loss(small, gt), sum(numpy_normal_losses(torch_resize(small, (6, 8)), gt)),
                             rtol=1e-5)
  assert np.all(np.isfinite(jax.grad(losses.normal_loss)(pred, gt)))


def test_normal_loss_non_finite_and_empty_cases_are_zero():
  gt = np.full((1, 2, 2, 3), -1000.0, np.float32)
  pred = np.ones((1, 2, 2, 3), np.float32)
  assert float(losses.normal_loss(pred, gt)) == 0.0  # no valid pixel
  gt[0, 0, 0] = (0.0, 0.0, 1.0)
  pred[0, 0, 0, 2] = np.inf
  terms = losses.normal_loss_terms(pred, gt)
  assert float(terms["cosine"]) == 0.0 and float(terms["l1"]) == 0.0
  with pytest.raises(ValueError, match="normal target"):
    losses.normal_loss(pred, gt[..., :2])
