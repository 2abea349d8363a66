"""The seg, depth and normal Evaluators (the classes training's evaluation runs) against numbers
worked out by hand on 2x2 images.

Each batch is fed as evaluation feeds it: `Evaluator.add(predictions, batch)` with a `valid` flag
per example, then `result()`. Every batch ends with a padded example (valid False) whose
prediction is wrong everywhere: counting it would change every number below. The expected values
are literals from the arithmetic in the comments, not from running the code.
"""
import math

import numpy as np
import pytest

from sapiens_jax.tasks import depth
from sapiens_jax.tasks import normal
from sapiens_jax.tasks import seg

BG_DEPTH = -1.0  # dense_transforms.DEPTH_BACKGROUND: not the person
BG_NORMAL = -1000.0  # dense_transforms.NORMAL_BACKGROUND


def test_seg_evaluator_by_hand(finetune_config):
  evaluator = seg.Evaluator(finetune_config("seg"), source=None)
  label = [[0, 0],
           [1, 1]]
  pred = [[0, 1],
          [1, 1]]
  batch = {"label": np.array([label, [[0, 0], [0, 0]]], np.int32), "valid": np.array([True, False])}
  evaluator.add(np.array([pred, [[1, 1], [1, 1]]], np.int32), batch)  # the padded one: all wrong
  result = evaluator.result()
  # Confusion (rows: label, columns: prediction): class 0 -> [1, 1], class 1 -> [0, 2].
  # IoU_0 = TP / (label + predicted - TP) = 1 / (2 + 1 - 1) = 1/2 -> 50 %
  # IoU_1 = 2 / (2 + 3 - 2) = 2/3 -> 66.667 %; every other class has no pixel: left out of the means.
  # mIoU = (50 + 66.667) / 2 = 58.333; Acc_0 = 1/2, Acc_1 = 2/2 -> mAcc = 75; aAcc = 3 of 4 = 75.
  assert result["mIoU"] == pytest.approx(58.333333, abs=1e-5)
  assert result["mAcc"] == pytest.approx(75.0)
  assert result["aAcc"] == pytest.approx(75.0)
  assert set(result) == {"mIoU", "mAcc", "aAcc"}  # scalars only, as the metrics writer takes them


def test_depth_evaluator_by_hand(finetune_config):
  evaluator = depth.Evaluator(finetune_config("depth"), source=None)
  targets = np.array([[[0.0, 0.5], [1.0, BG_DEPTH]],
                      [[0.5, 1.0], [BG_DEPTH, BG_DEPTH]],
                      [[0.5, 0.5], [0.5, 0.5]]], np.float32)
  preds = np.array([[[1.0, 2.0], [4.0, 100.0]],  # 100 on the background: ignored
                    [[3.0, 5.0], [-7.0, 9.0]],
                    [[9.0, -9.0], [9.0, -9.0]]], np.float32)
  evaluator.add(preds, {"depth": targets, "valid": np.array([True, True, False])})
  result = evaluator.result()
  # Image 1, person pixels g = (0, 0.5, 1), p = (1, 2, 4).
  #   Least squares s*p + t: mean p = 7/3, mean g = 1/2; p - 7/3 = (-4/3, -1/3, 5/3), g - 1/2 =
  #   (-1/2, 0, 1/2); cov = (2/3 + 0 + 5/6) / 3 = 1/2; var p = (16 + 1 + 25) / 9 / 3 = 14/9;
  #   s = (1/2) / (14/9) = 9/28, t = 1/2 - 9/28 * 7/3 = -1/4.
  #   Aligned: (9 - 7, 18 - 7, 36 - 7) / 28 = (2, 11, 29) / 28; errors (2, -3, 1) / 28.
  #   rmse = sqrt((4 + 9 + 1) / 784 / 3) = sqrt(1/168).
  #   abs_rel, delta1 skip g = 0: |11/28 - 1/2| / (1/2) = 3/14 and (1/28) / 1 = 1/28 -> mean 1/8.
  #   delta1: 14/11 = 1.27 (miss), 29/28 = 1.04 (hit) -> 1/2.
  #   Raw: errors (1, 1.5, 3): rmse_raw = sqrt(12.25 / 3) = 7 / sqrt(12); abs_rel_raw =
  #   (1.5 / 0.5 + 3 / 1) / 2 = 3; ratios 4 and 4 -> delta1_raw = 0.
  # Image 2, g = (0.5, 1), p = (3, 5): two points fit exactly (s = 1/4, t = -1/4): rmse 0,
  #   abs_rel 0, delta1 1. Raw: errors (2.5, 4): rmse_raw = sqrt((6.25 + 16) / 2) = sqrt(89/8);
  #   abs_rel_raw = (2.5 / 0.5 + 4 / 1) / 2 = 4.5; ratios 6 and 5 -> delta1_raw = 0.
  # Each image weighs the same (3 and 2 pixels alike): the mean of the two.
  expected = {"rmse": (math.sqrt(1 / 168) + 0) / 2, "abs_rel": (1 / 8 + 0) / 2, "delta1": (1 / 2 + 1) / 2,
              "rmse_raw": (7 / math.sqrt(12) + math.sqrt(89 / 8)) / 2, "abs_rel_raw": (3 + 4.5) / 2,
              "delta1_raw": 0.0}
  for key, value in expected.items():
    assert result[key] == pytest.approx(value, abs=1e-6), key
  assert result["num_images"] == 2 and result["num_skipped"] == 0


def test_normal_evaluator_by_hand(finetune_config):
  evaluator = normal.Evaluator(finetune_config("normal"), source=None)

  def at(degrees, length=1.0):
    """A normal in the x-y plane at `degrees` from +x: its angle to (1, 0, 0) is `degrees`."""
    return [length * math.cos(math.radians(degrees)), length * math.sin(math.radians(degrees)), 0.0]

  x, bg = [1.0, 0.0, 0.0], [BG_NORMAL] * 3
  targets = np.array([[[x, x], [x, bg]],
                      [[x, x], [x, x]],
                      [[x, x], [x, x]]], np.float32)
  preds = np.array([[[at(0, 2.0), at(90)], [at(45, 3.0), at(0)]],  # raw lengths: renormalised
                    [[at(10), at(20)], [at(25, 0.5), at(180)]],
                    [[at(90), at(90)], [at(90), at(90)]]], np.float32)
  evaluator.add(preds, {"normal": targets, "valid": np.array([True, True, False])})
  result = evaluator.result()
  # Pooled over the 7 person pixels (the background one and the padded image left out):
  # angles 0, 90, 45 | 10, 20, 25, 180.
  #   mean = (0 + 90 + 45 + 10 + 20 + 25 + 180) / 7 = 370 / 7 = 52.857
  #   sorted 0, 10, 20, 25, 45, 90, 180: median = 25 (to the histogram's 0.005 degrees)
  #   under 11.25: 0, 10 -> 2/7; under 22.5: + 20 -> 3/7; under 30: + 25 -> 4/7 (in percent).
  assert result["mean_angle"] == pytest.approx(370 / 7, abs=1e-4)
  assert result["median_angle"] == pytest.approx(25, abs=0.006)
  assert result["pct_11.25"] == pytest.approx(100 * 2 / 7)
  assert result["pct_22.5"] == pytest.approx(100 * 3 / 7)
  assert result["pct_30"] == pytest.approx(100 * 4 / 7)
