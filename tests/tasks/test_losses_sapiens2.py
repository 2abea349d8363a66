"""Sapiens2 fine-tuning losses (sapiens2.md §3) against direct float64 numpy computations written here with loops,
independently of sapiens_jax.losses; with masks, ignored labels, an empty sample and empty-mask gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sapiens_jax import losses
from sapiens_jax.data import meta

RTOL = 1e-5


def close(actual, expected, rtol=RTOL, atol=1e-6, name=""):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol, err_msg=name)


def grad(f, *args, argnums=0):
  """jax.grad under one jit (op-by-op gradients of the pyramid losses are slow on CPU)."""
  return jax.jit(jax.grad(f, argnums))(*(jnp.asarray(a) for a in args))


def all_finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(tree))


def reflect(i, n):
  """PyTorch / numpy "reflect" padding index (the edge is not repeated)."""
  return -i if i < 0 else (2 * (n - 1) - i if i > n - 1 else i)


def upsample_bilinear(x, factor):
  """F.interpolate(scale_factor=factor, mode="bilinear", align_corners=False) of NHWC, by the PyTorch formula."""
  b, h, w, c = x.shape
  out = np.zeros((b, h * factor, w * factor, c))

  def source(dst, n):
    s = max((dst + 0.5) / factor - 0.5, 0.0)
    i0 = int(np.floor(s))
    return i0, min(i0 + 1, n - 1), s - i0

  for y in range(h * factor):
    y0, y1, ly = source(y, h)
    for xx in range(w * factor):
      x0, x1, lx = source(xx, w)
      out[:, y, xx] = ((1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1])
                       + ly * ((1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]))
  return out


def masked_pixel_l1(p, g, m):
  """Sum over valid pixels of the channel-summed |p - g|, / max(#valid in the batch, 1)."""
  total, count = 0.0, 0
  for idx in zip(*np.nonzero(m)):
    total += np.sum(np.abs(p[idx] - g[idx]))
    count += 1
  return total / max(count, 1)


def forward_diff_mse(p, g, m):
  """(x, y): over neighbour pairs that are both valid, sum over channels of (dp - dg)^2, / max(#pairs, 1)."""
  b, h, w, _ = p.shape
  sx = sy = 0.0
  nx = ny = 0
  for i in range(b):
    for y in range(h):
      for x in range(w):
        if x + 1 < w and m[i, y, x] and m[i, y, x + 1]:
          sx += np.sum(((p[i, y, x + 1] - p[i, y, x]) - (g[i, y, x + 1] - g[i, y, x])) ** 2)
          nx += 1
        if y + 1 < h and m[i, y, x] and m[i, y + 1, x]:
          sy += np.sum(((p[i, y + 1, x] - p[i, y, x]) - (g[i, y + 1, x] - g[i, y, x])) ** 2)
          ny += 1
  return sx / max(nx, 1), sy / max(ny, 1)


# ------------------------------------------------------------------------------------------------ segmentation


SEG29_WEIGHT = meta.seg_classes("seg29").class_weight  # the one place the §3.1 weights live


def test_class_weight_constant():
  w = SEG29_WEIGHT
  assert len(w) == 29 and w[0] == 0.1
  assert [i for i, v in enumerate(w) if v == 10] == [1, 2, 10, 19, 24, 25, 26, 27, 28]
  assert [i for i, v in enumerate(w) if v == 1] == [13, 22, 23]


def numpy_dice(logits, labels, ignore_index=255, eps=1e-3):
  b, h, w, c = logits.shape
  z = logits.astype(np.float64)
  probs = np.exp(z - z.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  per_sample = []
  for i in range(b):
    dices = []
    for k in range(1, c):  # background excluded
      inter = psq = gsq = 0.0
      for y in range(h):
        for x in range(w):
          if labels[i, y, x] == ignore_index:
            continue
          p, g = probs[i, y, x, k], float(labels[i, y, x] == k)
          inter, psq, gsq = inter + p * g, psq + p * p, gsq + g * g
      if gsq > 0:  # present in this sample's GT
        dices.append((2 * inter + eps) / (psq + gsq + eps))
    per_sample.append(1 - np.mean(dices) if dices else 0.0)
  return np.mean(per_sample)


def seg_inputs():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((3, 6, 5, 5)).astype(np.float32) * 2
  labels = rng.integers(0, 5, (3, 6, 5))
  labels[0][labels[0] == 3] = 1  # class 3 absent from sample 0 (it still gets probability)
  labels[0, 0, :3] = 255
  labels[1] = np.where(rng.random((6, 5)) < 0.5, 0, 255)  # sample 1: background and ignored only -> 0
  labels[2, 2:4, 1:4] = 255
  return logits, labels


def test_seg_dice_matches_numpy():
  logits, labels = seg_inputs()
  close(losses.seg_dice_loss(logits, labels), numpy_dice(logits, labels))
  # The sample with no present class counts as 0 in the batch mean.
  close(losses.seg_dice_loss(logits[1:2], labels[1:2]), 0.0)
  close(losses.seg_dice_loss(logits[[0, 2]], labels[[0, 2]]) * 2 / 3, numpy_dice(logits, labels))


def test_seg_dice_ignored_pixels_do_not_count():
  logits, labels = seg_inputs()
  changed = logits.copy()
  changed[2, 2:4, 1:4] = np.random.default_rng(1).standard_normal((2, 3, 5)) * 5
  close(losses.seg_dice_loss(changed, labels), losses.seg_dice_loss(logits, labels))


def test_seg_dice_resizes_logits():
  logits, labels = seg_inputs()
  small = logits[:, ::2, ::2].copy()  # (3, 3, 3, 5) -> bilinear to (6, 5)
  resized = np.asarray(losses.resize_to(small, (6, 5)))
  close(losses.seg_dice_loss(small, labels), numpy_dice(resized, labels))


def test_sapiens2_seg_loss_is_weighted_ce_plus_dice():
  logits, labels = seg_inputs()
  logits, labels = np.concatenate([logits] * 10, -1)[..., :29], labels.copy()
  labels[2, 0, 0] = 28
  w = np.asarray(SEG29_WEIGHT, np.float64)
  b, h, wd, _ = logits.shape
  ce = 0.0
  for i in range(b):
    for y in range(h):
      for x in range(wd):
        if labels[i, y, x] != 255:
          z = logits[i, y, x].astype(np.float64)
          ce += w[labels[i, y, x]] * (np.log(np.sum(np.exp(z))) - z[labels[i, y, x]])
  out = losses.sapiens2_seg_loss(logits, labels, jnp.asarray(SEG29_WEIGHT))
  assert set(out) == {"loss_ce", "loss_dice"}
  close(out["loss_ce"], ce / (b * h * wd))  # mean over all pixels, ignored ones included
  close(out["loss_dice"], numpy_dice(logits, labels))


def test_seg_all_ignored_gives_zero_and_finite_gradients():
  logits = np.random.default_rng(2).standard_normal((2, 6, 5, 29)).astype(np.float32)
  labels = np.full((2, 6, 5), 255)
  grads = grad(lambda x: sum(losses.sapiens2_seg_loss(x, labels, jnp.asarray(SEG29_WEIGHT)).values()), logits)
  close(sum(losses.sapiens2_seg_loss(logits, labels, jnp.asarray(SEG29_WEIGHT)).values()), 0.0)
  assert all_finite(grads) and float(jnp.abs(grads).max()) == 0.0


# ------------------------------------------------------------------------------------------------ normals


def normal_inputs():
  rng = np.random.default_rng(3)
  target = rng.standard_normal((2, 6, 5, 3))
  target /= np.linalg.norm(target, axis=-1, keepdims=True)
  mask = rng.random((2, 6, 5)) < 0.7
  mask[1] = False  # sample 1 has no valid pixel
  target[~mask] = -1000.0
  pred = rng.standard_normal((2, 6, 5, 3)).astype(np.float32)
  return pred, target.astype(np.float32), mask


def test_sapiens2_normal_loss_matches_numpy():
  pred, target, mask = normal_inputs()
  p, g = pred.astype(np.float64), target.astype(np.float64)
  cos_sum, count = 0.0, 0
  for idx in zip(*np.nonzero(mask)):
    pu = p[idx] / max(np.linalg.norm(p[idx]), 1e-6)
    gu = g[idx] / max(np.linalg.norm(g[idx]), 1e-6)
    cos_sum += 1 - np.dot(pu, gu)
    count += 1
  gx, gy = forward_diff_mse(p, g, mask)
  out = losses.sapiens2_normal_loss(pred, target)
  assert set(out) == {"loss_cosine_sim", "loss_l1", "loss_grad_l1"}
  close(out["loss_cosine_sim"], 10 * cos_sum / count)
  close(out["loss_l1"], masked_pixel_l1(p, g, mask))
  close(out["loss_grad_l1"], 10 * (gx + gy))


def test_normal_v2_cosine_and_l1_are_v1_terms():
  pred, target, _ = normal_inputs()
  v1, v2 = losses.normal_loss_terms(pred, target), losses.sapiens2_normal_loss(pred, target)
  close(v2["loss_cosine_sim"], 10 * float(v1["cosine"]))
  close(v2["loss_l1"], float(v1["l1"]))


def test_normal_v2_empty_mask():
  pred, target, _ = normal_inputs()
  target[:] = -1000.0
  out = losses.sapiens2_normal_loss(pred, target)
  close(sum(out.values()), 0.0)
  grads = grad(lambda x: sum(losses.sapiens2_normal_loss(x, target).values()), pred)
  assert all_finite(grads)


# ------------------------------------------------------------------------------------------------ pointmap


def pointmap_inputs(b=3, h=6, w=5):
  """A smooth GT surface in front of a camera, canonical XYZ built from original K with integer pixel indices."""
  rng = np.random.default_rng(4)
  k = np.zeros((b, 3, 3))
  k[:, 0, 0], k[:, 1, 1] = rng.uniform(4, 6, b), rng.uniform(4, 6, b)
  k[:, 0, 2], k[:, 1, 2], k[:, 2, 2] = rng.uniform(1.5, 3, b), rng.uniform(2, 3.5, b), 1.0
  scale = 768.0 / k[:, 0, 0] / 100  # keep canonical values small
  v, u = np.mgrid[0:h, 0:w]
  target = np.zeros((b, h, w, 3))
  for i in range(b):
    z = 2.0 + 0.3 * np.sin(u + i) + 0.2 * np.cos(0.7 * v) + 0.1 * u * v / (h * w)
    target[i] = np.stack([(u - k[i, 0, 2]) * z / k[i, 0, 0], (v - k[i, 1, 2]) * z / k[i, 1, 1], z], -1) * scale[i]
  mask = rng.random((b, h, w)) < 0.75
  mask[0, 0, 0] = True
  mask[2] = False  # sample 2 has no valid pixel
  target[~mask] = 0.0  # upstream zeroes invalid GT points
  pred = (target + rng.normal(0, 0.3, target.shape)).astype(np.float32)
  pred[..., 2] = np.abs(pred[..., 2]) + 0.1
  pred[0, 0, 0, 2] = -0.5  # a negative Z hits the 1e-4 log clamp
  pred_scale = (scale + rng.normal(0, 0.1, b)).astype(np.float32)
  return pred, pred_scale, target.astype(np.float32), mask, scale.astype(np.float32), k.astype(np.float32)


def numpy_mean_depth(g, m):
  return np.array([g[i][m[i], 2].mean() if m[i].any() else 1.0 for i in range(len(g))])


def numpy_shift_invariant(p, g, m):
  p, g = p.copy(), g.copy()
  for i in range(len(p)):
    n = m[i].sum() + 1e-6
    p[i] -= np.sum(p[i][m[i]], axis=0) / n
    g[i] -= np.sum(g[i][m[i]], axis=0) / n
  return masked_pixel_l1(p, g, m)


def numpy_silog(pz, gz, m):
  out = []
  for i in range(len(pz)):
    d = [np.log(max(gz[i, y, x], 1e-4)) - np.log(max(pz[i, y, x], 1e-4)) for y, x in zip(*np.nonzero(m[i]))]
    d = np.array(d)
    out.append(np.sqrt(np.mean(d ** 2) - 0.5 * np.mean(d) ** 2) if len(d) else 0.0)
  return np.mean(out)


def numpy_intrinsics(p, m, k):
  total, count = 0.0, 0
  for i, y, x in zip(*np.nonzero(m)):
    fx, fy, cx, cy = k[i, 0, 0], k[i, 1, 1], k[i, 0, 2], k[i, 1, 2]
    xx, yy, zz = p[i, y, x]
    total += abs(xx - (x - cx) * zz / fx) + abs(yy - (y - cy) * zz / fy)  # u = column x, v = row y
    count += 1
  return total / max(count, 1)


def numpy_normals(points, m, scale):
  b, h, w, _ = points.shape
  normals, valid = np.zeros_like(points), np.zeros((b, h, w), bool)
  for i in range(b):
    q = points[i] / scale[i]
    for y in range(h):
      for x in range(w):
        dx = (q[y, reflect(x + 1, w)] - q[y, x]) * 100
        dy = (q[reflect(y + 1, h), x] - q[y, x]) * 100
        n = np.cross(dx, dy)
        mag = np.linalg.norm(n)
        if mag > 1e-6 and m[i, y, x]:
          normals[i, y, x], valid[i, y, x] = n / max(mag, 1e-6), True
  return normals, valid


def numpy_pointmap_normal(p, g, m, scale):
  pn, _ = numpy_normals(p, m, scale)
  gn, valid = numpy_normals(g, m, scale)
  total = 0.0
  for idx in zip(*np.nonzero(valid)):
    total += (1 - np.clip(np.dot(pn[idx], gn[idx]), -1, 1)) + np.mean(np.abs(pn[idx] - gn[idx]))
  return total / max(valid.sum(), 1)


def test_pointmap_terms_match_numpy():
  pred, pred_scale, target, mask, scale, k = pointmap_inputs()
  p, g = pred.astype(np.float64), target.astype(np.float64)
  depth = numpy_mean_depth(g, mask)
  close(losses.pointmap_mean_depth(target, mask), depth)
  pn, gn = p / depth[:, None, None, None], g / depth[:, None, None, None]
  mask2 = np.repeat(np.repeat(mask, 2, 1), 2, 2)
  expected = {
      "loss_l1": 2 * masked_pixel_l1(pn, gn, mask),
      "loss_multiscale_l1_2": masked_pixel_l1(upsample_bilinear(pn, 2), upsample_bilinear(gn, 2), mask2),
      "loss_silog": numpy_silog(p[..., 2], g[..., 2], mask),
      "loss_K_consistency": numpy_intrinsics(p, mask, k.astype(np.float64)),
      "loss_shift_invariant": numpy_shift_invariant(pn, gn, mask),
      "loss_normal": 2 * numpy_pointmap_normal(p, g, mask, scale.astype(np.float64)),
      "loss_scale_l1": 4 * np.mean(np.abs(pred_scale.astype(np.float64) - scale)),
  }
  assert max(expected.values()) < 4  # nothing clamped here
  out = losses.sapiens2_pointmap_loss(pred, pred_scale[:, None], target, mask, scale, k)
  assert set(out) == set(expected)
  for name, value in expected.items():
    close(out[name], value, 2e-5, 2e-6, name)


def test_pointmap_normal_validity_follows_the_gt():
  """Valid: centre pixel in the mask and |n_gt| > 1e-6; a pixel whose right and lower neighbours are both
  masked-out zeros has dx = dy, so n = 0 and it drops out although it is in the mask."""
  _, _, target, mask, scale, _ = pointmap_inputs()
  normals, valid = losses.pointmap_normals(jnp.asarray(target), mask, scale)
  expected_normals, expected_valid = numpy_normals(target.astype(np.float64), mask, scale.astype(np.float64))
  np.testing.assert_array_equal(np.asarray(valid), expected_valid)
  assert expected_valid.sum() < mask.sum()
  close(normals, expected_normals, 1e-5, 1e-5)


def test_pointmap_intrinsics_is_zero_for_a_consistent_pointmap():
  _, _, target, mask, _, k = pointmap_inputs()
  close(losses.intrinsics_consistency_l1(jnp.asarray(target), mask, k), 0.0, atol=1e-6)


def test_pointmap_clamps_the_normalised_terms_at_4():
  pred, pred_scale, target, mask, scale, k = pointmap_inputs()
  huge = pred * 1000.0
  out = losses.sapiens2_pointmap_loss(huge, pred_scale, target, mask, scale, k)
  for name in ("loss_l1", "loss_multiscale_l1_2", "loss_shift_invariant"):
    close(out[name], 4.0, atol=0)
  assert float(out["loss_K_consistency"]) > 4  # the other terms are not clamped
  # The clamp is on the weighted value: a depth-normalised offset of 1 per channel gives an unweighted L1 of 3,
  # so loss_l1 = min(2 * 3, 4) = 4 while loss_multiscale_l1_2 = 1 * 3 stays; the offset is a shift, so 0.
  shifted = target + numpy_mean_depth(target.astype(np.float64), mask)[:, None, None, None].astype(np.float32)
  out = losses.sapiens2_pointmap_loss(shifted, pred_scale, target, mask, scale, k)
  close(out["loss_l1"], 4.0, atol=0)
  close(out["loss_multiscale_l1_2"], 3.0, atol=1e-5)
  close(out["loss_shift_invariant"], 0.0, atol=1e-5)
  grads = grad(lambda x: losses.sapiens2_pointmap_loss(x, pred_scale, target, mask, scale, k)["loss_l1"], huge)
  assert float(jnp.abs(grads).max()) == 0.0


def test_pointmap_resizes_the_prediction():
  pred, pred_scale, target, mask, scale, k = pointmap_inputs(h=8, w=6)
  small = pred[:, ::2, ::2]
  a = losses.sapiens2_pointmap_loss(small, pred_scale, target, mask, scale, k)
  b = losses.sapiens2_pointmap_loss(losses.resize_to(small, (8, 6)), pred_scale, target, mask, scale, k)
  for name in a:
    close(a[name], float(b[name]))


def test_pointmap_empty_mask_is_zero_with_finite_gradients():
  pred, pred_scale, target, mask, scale, k = pointmap_inputs()
  empty = np.zeros_like(mask)

  def total(x, s):
    out = losses.sapiens2_pointmap_loss(x, s, target, empty, scale, k)
    return sum(v for name, v in out.items() if name != "loss_scale_l1")

  close(total(pred, pred_scale), 0.0)
  assert all_finite(grad(total, pred, pred_scale, argnums=(0, 1)))
  # And with some valid pixels (one sample empty, one negative Z): finite too.
  grads = grad(lambda x: sum(losses.sapiens2_pointmap_loss(x, pred_scale, target, mask, scale, k).values()), pred)
  assert all_finite(grads)


# ------------------------------------------------------------------------------------------------ albedo


def albedo_inputs():
  rng = np.random.default_rng(5)
  target = rng.random((2, 6, 5, 3)).astype(np.float32)
  pred = (target + rng.normal(0, 0.3, target.shape)).astype(np.float32)  # some outside [0, 1]
  mask = rng.random((2, 6, 5)) < 0.7
  mask[1] = False
  return pred, target, mask


def test_sapiens2_albedo_loss_matches_numpy():
  pred, target, mask = albedo_inputs()
  p, g = pred.astype(np.float64), target.astype(np.float64)
  gx, gy = forward_diff_mse(p, g, mask)
  pc = np.clip(p, 0, 1)
  pc = pc / (pc.sum(-1, keepdims=True) + 1e-6)
  gc = g / (g.sum(-1, keepdims=True) + 1e-6)
  out = losses.sapiens2_albedo_loss(pred, target, mask)
  assert set(out) == {"loss_l1", "loss_grad_l1", "loss_chroma_l1"}
  close(out["loss_l1"], 2 * masked_pixel_l1(p, g, mask))
  close(out["loss_grad_l1"], 2 * 0.5 * (gx + gy))
  close(out["loss_chroma_l1"], masked_pixel_l1(pc, gc, mask))


def test_albedo_empty_mask_gradients_finite():
  pred, target, mask = albedo_inputs()
  empty = np.zeros_like(mask)
  close(sum(losses.sapiens2_albedo_loss(pred, target, empty).values()), 0.0)
  grads = grad(lambda x: sum(losses.sapiens2_albedo_loss(x, target, empty).values()), pred)
  assert all_finite(grads)


# ------------------------------------------------------------------------------------------------ pose


def test_sapiens2_keypoint_loss_is_ten_times_weighted_mse():
  rng = np.random.default_rng(6)
  pred, gt = rng.random((2, 4, 3, 5)), rng.random((2, 4, 3, 5))
  weight = np.array([[1, 0, 1, 0.5, 1], [0, 0, 1, 1, 1]])
  total = sum(np.sum((pred[i, ..., j] - gt[i, ..., j]) ** 2) * weight[i, j] for i in range(2) for j in range(5))
  out = losses.sapiens2_keypoint_loss(pred.astype(np.float32), gt.astype(np.float32), weight.astype(np.float32))
  close(out["loss_kpt"], 10 * total / pred.size)


# ------------------------------------------------------------------------------------------------ matting


def numpy_sobel_mag(x):
  """3x3 Sobel cross-correlation on reflect-padded x, tap by tap; sqrt(gx^2 + gy^2 + 1e-6)."""
  h, w = x.shape[1:3]
  kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float64)
  gx, gy = np.zeros_like(x), np.zeros_like(x)
  for a in range(3):
    for d in range(3):
      tap = x[:, [reflect(y + a - 1, h) for y in range(h)]][:, :, [reflect(c + d - 1, w) for c in range(w)]]
      gx, gy = gx + kx[a, d] * tap, gy + kx.T[a, d] * tap
  return np.sqrt(gx ** 2 + gy ** 2 + 1e-6)


def numpy_blur(x):
  """Direct 5x5 cross-correlation with the [1 4 6 4 1]^T[1 4 6 4 1] / 256 kernel on reflect-padded x."""
  k1 = np.array([1, 4, 6, 4, 1], np.float64)
  kernel = np.outer(k1, k1) / 256
  h, w = x.shape[1:3]
  assert min(h, w) >= 3
  out = np.zeros_like(x)
  for a in range(5):
    rows = [reflect(y + a - 2, h) for y in range(h)]
    for d in range(5):
      out += kernel[a, d] * x[:, rows][:, :, [reflect(c + d - 2, w) for c in range(w)]]
  return out


def numpy_laplacian_loss(p, g, m, levels):
  def pyramid(x):
    levels_out = []
    for _ in range(levels - 1):
      x = x[:, :x.shape[1] // 2 * 2, :x.shape[2] // 2 * 2]
      down = numpy_blur(x)[:, ::2, ::2]
      up = np.zeros_like(x)
      up[:, ::2, ::2] = 4 * down
      levels_out.append(x - numpy_blur(up))
      x = down
    return levels_out + [x]

  total = 0.0
  for level, (a, b) in enumerate(zip(pyramid(p), pyramid(g))):
    if m is None:
      ml = np.ones(a.shape[:3])
    else:
      h, w = a.shape[1:3]
      rows = [int(np.floor(i * m.shape[1] / h)) for i in range(h)]
      cols = [int(np.floor(j * m.shape[2] / w)) for j in range(w)]
      ml = m[:, rows][:, :, cols].astype(np.float64)
    total += 2 ** level * np.mean(np.abs(a * ml[..., None] - b * ml[..., None]))
  return total / levels


def matting_inputs(h=32, w=40):
  rng = np.random.default_rng(7)
  gt_alpha = np.clip(rng.random((2, h, w)) * 1.6 - 0.3, 0, 1)
  gt_alpha[0, :4] = 1.0
  gt_fgr = rng.random((2, h, w, 3))
  pred = rng.random((2, h, w, 4)).astype(np.float32)
  return pred, gt_alpha.astype(np.float32), gt_fgr.astype(np.float32)


def test_matting_terms_match_numpy():
  pred, gt_alpha, gt_fgr = matting_inputs()
  mask = np.asarray(losses.matting_foreground_mask(gt_alpha, np.array([False, True])))
  expected_mask = np.stack([(gt_alpha[0] >= 0.996) | (gt_alpha[0] == 0), np.ones_like(gt_alpha[1], bool)])
  np.testing.assert_array_equal(mask, expected_mask)
  p, a, f = pred.astype(np.float64), gt_alpha[..., None].astype(np.float64), gt_fgr.astype(np.float64)
  pa, pf, m = p[..., 3:], p[..., :3], mask[..., None]
  expected = {
      "loss_l1_pha": np.mean(np.abs(pa - a)),
      "loss_grad_pha": np.mean(np.abs(numpy_sobel_mag(pa) - numpy_sobel_mag(a))),
      "loss_lap_pha": numpy_laplacian_loss(pa, a, None, 5),
      "loss_l1_fgr": np.mean(np.abs(pf - f) * m),  # masked, but a mean over all B*H*W*3 elements
      "loss_grad_fgr": np.mean(np.abs(numpy_sobel_mag(pf) - numpy_sobel_mag(f)) * m),
      "loss_lap_fgr": numpy_laplacian_loss(pf, f, mask, 5),
  }
  out = jax.jit(losses.sapiens2_matting_loss)(pred, gt_alpha, gt_fgr, mask)  # eager pyramids are slow on CPU
  assert set(out) == set(expected)
  for name, value in expected.items():
    close(out[name], value, 2e-5, 1e-6, name)
  # Alpha-only prediction: only the alpha terms.
  alpha_only = jax.eval_shape(losses.sapiens2_matting_loss, pred[..., 3:], gt_alpha)
  assert set(alpha_only) == {"loss_l1_pha", "loss_grad_pha", "loss_lap_pha"}


def test_matting_laplacian_odd_sizes_and_mask():
  pred, gt_alpha, gt_fgr = matting_inputs(h=13, w=11)
  mask = np.random.default_rng(8).random((2, 13, 11)) < 0.5
  laplacian = jax.jit(losses.matting_laplacian_loss, static_argnames="levels")
  close(laplacian(pred[..., :3], gt_fgr, mask, levels=2),
        numpy_laplacian_loss(pred[..., :3].astype(np.float64), gt_fgr.astype(np.float64), mask, 2), 2e-5)
  with pytest.raises(ValueError, match="too small"):
    laplacian(pred[..., :3], gt_fgr, mask, levels=5)


def test_matting_composition_l1():
  rng = np.random.default_rng(9)
  alpha, fg, bg, img = rng.random((2, 6, 5, 1)), rng.random((2, 6, 5, 3)), rng.random((2, 6, 5, 3)), rng.random(
      (2, 6, 5, 3))
  expected = np.mean(np.abs(alpha * fg + (1 - alpha) * bg - img))
  close(losses.matting_composition_l1(*(x.astype(np.float32) for x in (alpha, fg, bg, img))), expected)


def test_matting_empty_foreground_mask_gradients_finite():
  pred, gt_alpha, gt_fgr = matting_inputs()
  empty = np.zeros(gt_alpha.shape, bool)
  out = jax.jit(losses.sapiens2_matting_loss)(pred, gt_alpha, gt_fgr, empty)
  for name in ("loss_l1_fgr", "loss_grad_fgr", "loss_lap_fgr"):
    close(out[name], 0.0)
  grads = grad(lambda x: sum(losses.sapiens2_matting_loss(x, gt_alpha, gt_fgr, empty).values()), pred)
  assert all_finite(grads)
