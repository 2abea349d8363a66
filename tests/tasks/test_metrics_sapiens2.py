"""The Sapiens2 dense-task metrics (normal v2, pointmap, albedo, matting) against perfect predictions,
numbers worked out by hand, and masks.

Expected values are literals (or short closed forms) from the arithmetic in the comments, not from running the
code. Sobel-5 normals and SSIM are checked on planes and constants, where the answer is known analytically.
"""
import math

import numpy as np
import pytest

from sapiens_jax import metrics


def _assert_results_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-12, err_msg=key)


# ------------------------------------------------------------------ normal v2


def _at(degrees):
  """A unit normal in the x-y plane at `degrees` from +x: its angle to (1, 0, 0) is `degrees`."""
  return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees)), 0.0]


NORMAL_KEYS = {"normal_mae", "normal_median_deg", "normal_rmse", "within_5_deg", "within_11.25_deg",
               "within_22.5_deg", "within_30_deg", "num_images", "num_skipped"}


def test_sapiens2_normals_perfect():
  rng = np.random.default_rng(0)
  gt = rng.normal(size=(5, 4, 3))
  acc = metrics.Sapiens2NormalMetrics()
  acc.add(3.0 * gt, gt, np.ones((5, 4), bool))  # raw length differs: renormalised
  result = acc.result()
  assert set(result) == NORMAL_KEYS
  assert result["normal_mae"] == pytest.approx(0, abs=1e-5)
  assert result["normal_rmse"] == pytest.approx(0, abs=1e-5)
  assert result["normal_median_deg"] == 0.25  # centre of the first 0.5-degree bin [0, 0.5)
  for t in ("5", "11.25", "22.5", "30"):
    assert result[f"within_{t}_deg"] == 100


def test_sapiens2_normals_by_hand():
  x = [1.0, 0.0, 0.0]
  acc = metrics.Sapiens2NormalMetrics()
  acc.add(np.array([[_at(3), _at(90)], [_at(45.2), _at(170)]]), np.array([[x, x], [x, x]]),
          np.array([[True, True], [True, False]]))  # 170 degrees at an invalid pixel: left out
  acc.add(np.array([[_at(10), _at(20)], [_at(25.2), _at(180)]]), np.array([[x, x], [x, x]]), np.ones((2, 2), bool))
  acc.add(np.zeros((2, 2, 3)), np.zeros((2, 2, 3)), np.zeros((2, 2), bool))  # no valid pixel: skipped
  result = acc.result()
  # Pooled angles 3, 90, 45.2 | 10, 20, 25.2, 180 (7 pixels).
  #   mae = (3 + 90 + 45.2 + 10 + 20 + 25.2 + 180) / 7 = 373.4 / 7 = 53.343
  #   rmse = sqrt((9 + 8100 + 2043.04 + 100 + 400 + 635.04 + 32400) / 7) = sqrt(43687.08 / 7) = 79.000
  #   median: sorted 3, 10, 20, 25.2, 45.2, 90, 180; the cumulative count first reaches 7/2 at the 4th angle,
  #   25.2, in bin [25, 25.5) -> its centre 25.25.
  #   within 5: {3} -> 1/7; 11.25: + 10 -> 2/7; 22.5: + 20 -> 3/7; 30: + 25.2 -> 4/7 (percent).
  assert result["normal_mae"] == pytest.approx(373.4 / 7)
  assert result["normal_rmse"] == pytest.approx(math.sqrt(43687.08 / 7))
  assert result["normal_median_deg"] == 25.25
  assert result["within_5_deg"] == pytest.approx(100 / 7)
  assert result["within_11.25_deg"] == pytest.approx(200 / 7)
  assert result["within_22.5_deg"] == pytest.approx(300 / 7)
  assert result["within_30_deg"] == pytest.approx(400 / 7)
  assert result["num_images"] == 2 and result["num_skipped"] == 1


def test_sapiens2_normal_median_even_count_takes_the_lower_middle():
  x = [1.0, 0.0, 0.0]
  # Angles 1.1, 2.2, 3.3, 4.4: the cumulative count reaches 4/2 at 2.2, bin [2, 2.5) -> 2.25 (np.median: 2.75).
  result = metrics.sapiens2_normal_metrics(np.array([[_at(1.1), _at(2.2), _at(3.3), _at(4.4)]]),
                                           np.array([[x] * 4]), np.ones((1, 4), bool))
  assert result["normal_median_deg"] == 2.25
  with pytest.raises(ValueError, match="valid pixel"):
    metrics.sapiens2_normal_metrics(np.ones((1, 4, 3)), np.ones((1, 4, 3)), np.zeros((1, 4), bool))


def test_sapiens2_normals_mask_excludes_pixels():
  rng = np.random.default_rng(1)
  pred, gt = rng.normal(size=(2, 4, 5, 3))
  valid = rng.random((4, 5)) < 0.6
  before = metrics.sapiens2_normal_metrics(pred, gt, valid)
  pred[~valid] = rng.normal(size=(np.count_nonzero(~valid), 3))
  gt[~valid] = -1000.0
  _assert_results_equal(metrics.sapiens2_normal_metrics(pred, gt, valid), before)
  # The mean agrees with v1's NormalMetrics; the median is the ceil(n/2)-th smallest angle to within the
  # quarter degree of its bin centre.
  v1 = metrics.NormalMetrics()
  v1.add(pred, gt, valid)
  assert before["normal_mae"] == pytest.approx(v1.result()["mean"])
  angles = np.sort(metrics.angular_errors(pred, gt, valid))
  assert before["normal_median_deg"] == pytest.approx(angles[(angles.size + 1) // 2 - 1], abs=0.25)


# -------------------------------------------------------------------- pointmap


def _plane(height, width, z_per_px_x=0.0, z_per_px_y=0.0):
  """XYZ of a plane: X = 0.01 u, Y = 0.01 v, Z = 2 + 0.01 (a u + b v); its normal is (-a, -b, 1) normalised."""
  v, u = np.mgrid[0:height, 0:width].astype(np.float64)
  return np.stack([0.01 * u, 0.01 * v, 2.0 + 0.01 * (z_per_px_x * u + z_per_px_y * v)], axis=-1)


def _surface(height, width):
  v, u = np.mgrid[0:height, 0:width].astype(np.float64)
  z = 2.0 + 0.1 * np.sin(u / 3.0) + 0.05 * np.cos(v / 4.0)
  return np.stack([(u - width / 2) * z / 768, (v - height / 2) * z / 768, z], axis=-1)


def test_pointmap_normals_of_planes():
  # dP/dx ~ (1, 0, a), dP/dy ~ (0, 1, b) (Sobel-5 is exact on linear maps, the same factor 128 in both):
  # cross = (-a, -b, 1). A frontal plane gets +z (away from an OpenCV camera).
  normals, window = metrics.pointmap_normals(_plane(6, 7), np.ones((6, 7), bool))
  # A 5x5 window fits at rows 2..3 and columns 2..4 only.
  assert window.sum() == 6 and window[2:4, 2:5].all()
  np.testing.assert_allclose(normals[window], [[0, 0, 1]] * 6, atol=1e-12)
  normals, _ = metrics.pointmap_normals(_plane(6, 7, 2.0, -1.0), np.ones((6, 7), bool))
  np.testing.assert_allclose(normals[window], [np.array([-2, 1, 1]) / math.sqrt(6)] * 6, atol=1e-12)


POINTMAP_KEYS = {"l2_mean", "x_mae", "y_mae", "z_mae", "rmse", "within_05_cm", "within_10_cm", "within_20_cm",
                 "normal_mae", "normal_rmse", "within_5_deg", "within_11.25_deg", "within_22.5_deg", "within_30_deg",
                 "num_normal_pixels", "num_images", "num_skipped"}


def test_pointmap_perfect():
  gt = _surface(10, 12)
  valid = np.ones((10, 12), bool)
  valid[4, 5] = valid[0, :3] = False
  pred = gt.copy()
  pred[~valid] = 99.0  # wrong where it does not count
  result = metrics.pointmap_metrics(pred, gt, valid)
  assert set(result) == POINTMAP_KEYS
  for key in ("l2_mean", "x_mae", "y_mae", "z_mae", "rmse", "normal_mae", "normal_rmse"):
    assert result[key] == pytest.approx(0, abs=1e-5), key
  for key in ("within_05_cm", "within_10_cm", "within_20_cm", "within_5_deg", "within_11.25_deg",
              "within_22.5_deg", "within_30_deg"):
    assert result[key] == 100, key
  # 5x5 windows inside the image: centres at rows 2..7 x columns 2..9 = 48. Those reaching (4, 5): rows 2..6 x
  # columns 3..7 = 25. Those reaching (0, 0..2): row 2, columns 2..4, of which only (2, 2) is new. 48 - 26 = 22.
  assert result["num_normal_pixels"] == 48 - 26


def test_pointmap_distances_by_hand():
  acc = metrics.PointmapMetrics()
  gt = np.array([[[0.1, 0.2, 2.0], [0.3, -0.1, 2.5]], [[-0.2, 0.4, 3.0], [0.0, 0.0, 1.0]]])
  errors = np.array([[[-0.04, 0.0, 0.0], [0.0, 0.09, -0.12]], [[0.3, 0.0, 0.4], [5.0, 5.0, 5.0]]])
  acc.add(gt + errors, gt, np.array([[True, True], [True, False]]))  # the 5 m error is not a person pixel
  acc.add(np.ones((1, 1, 3)), np.ones((1, 1, 3)), np.ones((1, 1), bool))  # one exact pixel
  acc.add(np.zeros((2, 2, 3)), np.ones((2, 2, 3)), np.zeros((2, 2), bool))  # no valid pixel: skipped
  result = acc.result()
  # Pooled over 4 pixels, |e| = 0.04, 0.15 (0.09-0.12-0.15 triangle), 0.5 (0.3-0.4-0.5), 0:
  #   l2_mean = 0.69 / 4; x_mae = (0.04 + 0.3) / 4; y_mae = 0.09 / 4; z_mae = (0.12 + 0.4) / 4
  #   rmse = sqrt((0.0016 + 0.0225 + 0.25 + 0) / 4) = sqrt(0.2741 / 4)
  #   < 5 cm: 0.04, 0 -> 2/4; < 10 cm: same -> 2/4; < 20 cm: + 0.15 -> 3/4.
  # (A per-image mean would give l2_mean (0.23 + 0) / 2 instead.) No 5x5 window fits: no normal pixel.
  assert result["l2_mean"] == pytest.approx(0.69 / 4)
  assert result["x_mae"] == pytest.approx(0.34 / 4)
  assert result["y_mae"] == pytest.approx(0.09 / 4)
  assert result["z_mae"] == pytest.approx(0.52 / 4)
  assert result["rmse"] == pytest.approx(math.sqrt(0.2741 / 4))
  assert result["within_05_cm"] == 50 and result["within_10_cm"] == 50 and result["within_20_cm"] == 75
  assert result["num_normal_pixels"] == 0 and math.isnan(result["normal_mae"])
  assert result["num_images"] == 2 and result["num_skipped"] == 1


def test_pointmap_normals_by_hand():
  acc = metrics.PointmapMetrics()
  # 5x5, pred tilted by a = tan(10 deg): n = (-a, 0, 1) / |.| is 10 degrees from gt's (0, 0, 1) at the one
  # interior pixel. 6x6, a = tan(45 deg) = 1: 45 degrees at its 4 interior pixels.
  acc.add(_plane(5, 5, math.tan(math.radians(10))), _plane(5, 5), np.ones((5, 5), bool))
  acc.add(_plane(6, 6, 1.0), _plane(6, 6), np.ones((6, 6), bool))
  result = acc.result()
  # Pooled angles 10, 45, 45, 45, 45: mae = 190 / 5 = 38; rmse = sqrt((100 + 4 * 2025) / 5) = sqrt(1640);
  # within 5: none; within 11.25, 22.5 and 30: only the 10 -> 20 %.
  assert result["num_normal_pixels"] == 5
  assert result["normal_mae"] == pytest.approx(38)
  assert result["normal_rmse"] == pytest.approx(math.sqrt(1640))
  assert result["within_5_deg"] == 0
  assert result["within_11.25_deg"] == result["within_22.5_deg"] == result["within_30_deg"] == pytest.approx(20)


def test_pointmap_mask_excludes_pixels():
  rng = np.random.default_rng(2)
  gt = _surface(9, 11)
  pred = gt + 0.05 * rng.normal(size=gt.shape)
  valid = rng.random((9, 11)) < 0.9
  before = metrics.pointmap_metrics(pred, gt, valid)
  assert before["num_normal_pixels"] > 0
  pred[~valid] = rng.normal(size=(np.count_nonzero(~valid), 3)) * 100
  gt[~valid] = np.nan
  _assert_results_equal(metrics.pointmap_metrics(pred, gt, valid), before)


# ---------------------------------------------------------------------- albedo


ALBEDO_KEYS = {"mae", "rmse", "psnr", "ssim", "grad_l1", "num_images", "num_skipped"}


def test_albedo_perfect():
  rng = np.random.default_rng(3)
  acc = metrics.AlbedoMetrics()
  for scale in (1.0, 255.0):
    gt = scale * rng.random((7, 6, 3))
    valid = rng.random((7, 6)) < 0.8
    pred = np.where(valid[..., None], gt, -5.0)
    acc.add(pred, gt, valid)
  result = acc.result()
  assert set(result) == ALBEDO_KEYS
  assert result["mae"] == 0 and result["rmse"] == 0 and result["grad_l1"] == 0
  assert result["psnr"] == math.inf  # documented: a perfect image has infinite PSNR
  assert result["ssim"] == pytest.approx(1, abs=1e-12)


def test_albedo_by_hand():
  acc = metrics.AlbedoMetrics()
  # Image 1, range 1 (gt max 0.5): gt 0.5 everywhere, the same error in all 3 channels:
  #   [[0.1, -0.1], [0.2, (invalid)]].
  error = np.array([[0.1, -0.1], [0.2, 9.0]])[..., None].repeat(3, axis=-1)
  acc.add(0.5 + error, np.full((2, 2, 3), 0.5), np.array([[True, True], [True, False]]))
  # Image 2, range 255 (gt max 100): pred [[110, 100], (invalid row)] -> errors 10/255 and 0 in range units.
  acc.add(np.array([[110.0, 100.0], [0.0, 0.0]])[..., None].repeat(3, axis=-1), np.full((2, 2, 3), 100.0),
          np.array([[True, True], [False, False]]))
  acc.add(np.ones((2, 2, 3)), np.zeros((2, 2, 3)), np.zeros((2, 2), bool))  # no valid pixel: skipped
  result = acc.result()
  # Image 1: mae = (0.1 + 0.1 + 0.2) / 3 = 0.4/3; mse = (0.01 + 0.01 + 0.04) / 3 = 0.02, rmse = sqrt(0.02),
  #   psnr = 10 log10(1 / 0.02) = 10 log10(50) = 16.990. grad_l1: horizontal pair (0,0)-(0,1): |-0.1 - 0.1| =
  #   0.2; vertical pair (0,0)-(1,0): |0.2 - 0.1| = 0.1; the pairs with (1,1) are out -> (0.2 + 0.1) / 2 = 0.15.
  # Image 2: mae = (10/255 + 0) / 2 = 5/255; mse = (10/255)^2 / 2 = 50/255^2, rmse = sqrt(50)/255,
  #   psnr = 10 log10(255^2 / 50) = 10 log10(1300.5) = 31.141; grad_l1: one horizontal pair, |0 - 10/255|.
  # Then the mean of the two images.
  assert result["mae"] == pytest.approx((0.4 / 3 + 5 / 255) / 2)
  assert result["rmse"] == pytest.approx((math.sqrt(0.02) + math.sqrt(50) / 255) / 2)
  assert result["psnr"] == pytest.approx((10 * math.log10(50) + 10 * math.log10(1300.5)) / 2)
  assert result["grad_l1"] == pytest.approx((0.15 + 10 / 255) / 2)
  assert result["num_images"] == 2 and result["num_skipped"] == 1


def test_albedo_ssim_of_constants():
  # Constant images have zero variance and covariance, so SSIM = (2 x y + C1) / (x^2 + y^2 + C1) everywhere
  # (the structure term is C2 / C2 = 1), with C1 = (0.01 R)^2.
  ones = np.ones((4, 4), bool)
  result = metrics.albedo_metrics(np.full((4, 4, 3), 0.5), np.full((4, 4, 3), 0.25), ones)
  # R = 1: (2 * 0.5 * 0.25 + 1e-4) / (0.25 + 0.0625 + 1e-4) = 0.2501 / 0.3126 = 0.80006
  assert result["ssim"] == pytest.approx(0.2501 / 0.3126, abs=1e-12)
  # R = 255 (gt 100 > 1): C1 = 2.55^2 = 6.5025 -> (40000 + 6.5025) / (50000 + 6.5025)
  result = metrics.albedo_metrics(np.full((4, 4, 3), 200.0), np.full((4, 4, 3), 100.0), ones)
  assert result["ssim"] == pytest.approx(40006.5025 / 50006.5025, abs=1e-12)
  # A 2x2 image (smaller than the window) works too: the reflected border keeps a constant constant.
  result = metrics.albedo_metrics(np.full((2, 2), 0.5), np.full((2, 2), 0.25), np.ones((2, 2), bool))
  assert result["ssim"] == pytest.approx(0.2501 / 0.3126, abs=1e-12)


def test_albedo_mask_excludes_pixels():
  rng = np.random.default_rng(4)
  gt = rng.random((12, 10, 3))
  pred = np.clip(gt + 0.1 * rng.normal(size=gt.shape), 0, 1)
  valid = rng.random((12, 10)) < 0.7
  before = metrics.albedo_metrics(pred, gt, valid)
  assert 0 < before["ssim"] < 1
  pred[~valid] = rng.random((np.count_nonzero(~valid), 3))
  gt[~valid] = 250.0  # would also flip the detected range if invalid pixels counted
  _assert_results_equal(metrics.albedo_metrics(pred, gt, valid), before)


# --------------------------------------------------------------------- matting


MATTING_KEYS = {"sad", "mse", "grad", "conn", "num_images", "num_skipped"}


def test_matting_perfect():
  rng = np.random.default_rng(5)
  acc = metrics.MattingMetrics()
  gt = rng.random((8, 9))
  gt[:3] = 1.0
  gt[-2:] = 0.0
  acc.add(gt.copy(), gt)
  acc.add(gt.copy(), gt, rng.random((8, 9)) < 0.5)
  result = acc.result()
  assert set(result) == MATTING_KEYS
  assert result["sad"] == result["mse"] == result["grad"] == result["conn"] == 0
  assert result["num_images"] == 2


def test_matting_by_hand():
  acc = metrics.MattingMetrics()
  gt = np.array([[1.0, 1.0, 0.35], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
  pred = np.array([[1.0, 1.0, 0.65], [1.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
  acc.add(pred, gt)  # no trimap: the whole image
  # sad = (|0.65 - 0.35| + |0.5 - 1|) / 1000 = 0.8 / 1000; mse = (0.09 + 0.25) / 9 = 0.34 / 9.
  # conn, thresholds 0.1 .. 1: for t <= 0.3 both maps are >= t on the L {(0,0), (0,1), (1,0)} plus (0,2)
  #   (4-connected: 4 pixels) and on (2,2) alone; the largest is the first. At t = 0.1 every pixel outside it
  #   gets level 0. At t = 0.4 gt(0,2) = 0.35 drops out: level 0.3. The L stays to t = 1: level 1.
  #   phi = 1 - d [d >= 0.15], d = alpha - level:
  #   (0,2): pred d = 0.35 -> 0.65, gt d = 0.05 -> 1; (2,2): pred d = 0.5 -> 0.5, gt d = 1 -> 0; else d = 0
  #   for both -> 1. conn = (0.35 + 0.5) / 1000.
  first = metrics.matting_metrics(pred, gt)
  assert first["sad"] == pytest.approx(0.8 / 1000)
  assert first["mse"] == pytest.approx(0.34 / 9)
  assert first["conn"] == pytest.approx(0.85 / 1000)
  assert first["grad"] > 0
  # Constant 0.3 against constant 0.7: gradients are 0 everywhere (replicated border) -> grad 0;
  # sad = 9 * 0.4 / 1000; mse = 0.16; conn: both >= t for t <= 0.3 (one component, all pixels), nothing at
  # t = 0.4 -> level 0.3; pred d = 0 -> phi 1, gt d = 0.4 -> phi 0.6: conn = 9 * 0.4 / 1000.
  acc.add(np.full((3, 3), 0.3), np.full((3, 3), 0.7))
  acc.add(pred, gt, np.zeros((3, 3), bool))  # an empty region: skipped
  result = acc.result()
  assert result["sad"] == pytest.approx((0.8 + 3.6) / 2 / 1000)
  assert result["mse"] == pytest.approx((0.34 / 9 + 0.16) / 2)
  assert result["grad"] == pytest.approx(first["grad"] / 2)
  assert result["conn"] == pytest.approx((0.85 + 3.6) / 2 / 1000)
  assert result["num_images"] == 2 and result["num_skipped"] == 1


def test_matting_grad_of_an_impulse():
  # gt 0: no gradient. pred: a single 1 in the centre of 9x9, so the 9x9 kernels (half-size 4 for sigma 1.4)
  # stay inside the image: |grad pred|^2 at each pixel is hx^2 + hy^2 of one kernel tap, and both kernels have
  # unit L2 norm -> sum = 1 + 1 = 2 -> grad = 2 / 1000. sad = 1 / 1000, mse = 1 / 81.
  pred = np.zeros((9, 9))
  pred[4, 4] = 1.0
  result = metrics.matting_metrics(pred, np.zeros((9, 9)))
  assert result["grad"] == pytest.approx(2 / 1000, rel=1e-12)
  assert result["sad"] == pytest.approx(1 / 1000) and result["mse"] == pytest.approx(1 / 81)


def test_matting_region_excludes_pixels():
  gt = np.array([[1.0, 1.0, 0.35], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
  pred = np.array([[1.0, 1.0, 0.65], [1.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
  region = np.ones((3, 3), bool)
  region[2, 2] = False
  before = metrics.matting_metrics(pred, gt, region)
  # Only (0,2) is wrong inside: sad = 0.3 / 1000, mse = 0.09 / 8 (8 region pixels), conn = 0.35 / 1000 (the
  # prediction at (2,2) is taken from gt, so it matches there and lies outside the sum anyway).
  assert before["sad"] == pytest.approx(0.3 / 1000)
  assert before["mse"] == pytest.approx(0.09 / 8)
  assert before["conn"] == pytest.approx(0.35 / 1000)
  pred[2, 2] = 0.05
  _assert_results_equal(metrics.matting_metrics(pred, gt, region), before)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    metrics.matting_metrics(255 * pred, 255 * gt)
