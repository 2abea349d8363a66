"""Tests for sapiens_jax.metrics against hand-computed cases and references."""
import math

import numpy as np
import pytest

from sapiens_jax import metrics
from sapiens_jax.data import meta
from sapiens_jax.tasks import pose

# ---------------------------------------------------------------- segmentation

PRED = np.array([[0, 1, 2], [1, 1, 0]])
LABEL = np.array([[0, 1, 1], [255, 1, 2]])


def test_confusion_matrix_by_hand():
  # Rows are ground truth; the ignored pixel (1, 0) is dropped.
  np.testing.assert_array_equal(
      metrics.confusion_matrix(PRED, LABEL, 3),
      [[1, 0, 0], [0, 2, 1], [1, 0, 0]])


def test_seg_metrics_by_hand():
  result = metrics.seg_metrics(metrics.confusion_matrix(PRED, LABEL, 3))
  # IoU: 1/2, 2/3, 0/2; Acc: 1/1, 2/3, 0/1; aAcc 3/5.
  np.testing.assert_allclose(result["IoU"], [50, 200 / 3, 0])
  np.testing.assert_allclose(result["Acc"], [100, 200 / 3, 0])
  assert result["mIoU"] == pytest.approx((50 + 200 / 3) / 3)
  assert result["mAcc"] == pytest.approx((100 + 200 / 3) / 3)
  assert result["aAcc"] == pytest.approx(60)


def test_seg_metrics_absent_class_is_excluded_but_false_positive_counts():
  absent = metrics.seg_metrics(metrics.confusion_matrix(PRED, LABEL, 4))
  assert math.isnan(absent["IoU"][3]) and math.isnan(absent["Acc"][3])
  assert absent["mIoU"] == pytest.approx((50 + 200 / 3) / 3)
  # Class 3 predicted once but never labelled: IoU 0 enters the mean.
  pred = PRED.copy()
  pred[0, 0] = 3
  wrong = metrics.seg_metrics(metrics.confusion_matrix(pred, LABEL, 4))
  assert wrong["IoU"][3] == 0 and math.isnan(wrong["Acc"][3])
  assert wrong["mIoU"] == pytest.approx((0 + 200 / 3 + 0 + 0) / 4)


def test_confusion_matrices_accumulate_and_match_a_loop():
  rng = np.random.default_rng(0)
  preds = [rng.integers(0, 5, (7, 9)) for _ in range(3)]
  labels = [np.where(rng.random((7, 9)) < 0.1, 255, rng.integers(0, 5, (7, 9)))
            for _ in range(3)]
  total = sum(metrics.confusion_matrix(p, l, 5) for p, l in zip(preds, labels))
  expected = np.zeros((5, 5), np.int64)
  for p, l in zip(preds, labels):
    for pi, li in zip(p.ravel(), l.ravel()):
      if li != 255:
        expected[li, pi] += 1
  np.testing.assert_array_equal(total, expected)
  iou = [expected[c, c] / (expected[c].sum() + expected[:, c].sum() - expected[c, c])
         for c in range(5)]
  assert metrics.seg_metrics(total)["mIoU"] == pytest.approx(100 * np.mean(iou))


def test_confusion_matrix_rejects_bad_input():
  with pytest.raises(ValueError, match="label"):
    metrics.confusion_matrix(PRED, np.full_like(LABEL, 7), 3)
  with pytest.raises(ValueError, match="shape"):
    metrics.confusion_matrix(PRED, LABEL[:1], 3)


# ----------------------------------------------------------------------- depth


def test_align_scale_shift_recovers_exact_parameters():
  rng = np.random.default_rng(1)
  pred = rng.normal(size=(6, 5))
  valid = rng.random((6, 5)) < 0.7
  gt = np.where(valid, 2.5 * pred - 0.3, 99.0)  # Junk outside the mask.
  scale, shift = metrics.align_scale_shift(pred, gt, valid)
  assert scale == pytest.approx(2.5) and shift == pytest.approx(-0.3)
  result = metrics.depth_metrics(pred, gt, valid)
  assert result["rmse"] == pytest.approx(0, abs=1e-9)
  assert result["rmse_raw"] > 0.1


def test_alignment_never_turns_a_depth_map_upside_down():
  """A map that orders the pixels backwards gets scale 0: it scores as the mean of gt, no better."""
  rng = np.random.default_rng(2)
  gt = rng.random((4, 5))
  valid = np.ones(gt.shape, bool)
  reversed_pred = 3.0 - 2.0 * gt
  assert metrics.align_scale_shift(reversed_pred, gt, valid) == (0.0, pytest.approx(gt.mean()))
  assert metrics.depth_metrics(reversed_pred, gt, valid)["rmse"] == pytest.approx(gt.std())
  assert metrics.depth_metrics(-reversed_pred, gt, valid)["rmse"] == pytest.approx(0, abs=1e-9)


def test_depth_metrics_by_hand():
  gt = np.array([[1.0, 1.0, 1.0, 1.0, 0.0, 5.0]])
  pred = np.array([[1.2, 1.3, 0.7, -1.0, 0.5, 0.0]])
  valid = np.array([[1, 1, 1, 1, 1, 0]], bool)
  result = metrics.depth_metrics(pred, gt, valid, align=False)
  # gt = 0 pixel counts for rmse only; ratios 1.2 hit, 1.3, 1.43, negative miss.
  assert result["rmse"] == pytest.approx(math.sqrt((.04 + .09 + .09 + 4 + .25) / 5))
  assert result["abs_rel"] == pytest.approx((0.2 + 0.3 + 0.3 + 2.0) / 4)
  assert result["delta1"] == pytest.approx(0.25)
  assert result["rmse_raw"] == result["rmse"]


def test_depth_accumulator_averages_per_image():
  acc = metrics.DepthMetrics(align=False)
  ones = np.ones((2, 2))
  acc.add(ones * 1.1, ones, np.ones((2, 2), bool))  # rmse 0.1
  big = np.ones((10, 10))
  acc.add(big * 1.5, big, np.ones((10, 10), bool))  # rmse 0.5, 25x the pixels
  acc.add(ones, ones, np.zeros((2, 2), bool))  # no foreground: skipped
  result = acc.result()
  assert result["rmse"] == pytest.approx(0.3)
  assert result["delta1"] == pytest.approx(0.5)
  assert result["num_images"] == 2 and result["num_skipped"] == 1


# --------------------------------------------------------------------- normals


def test_normal_metrics_by_hand():
  gt = np.zeros((1, 4, 3))
  gt[..., 2] = 1.0
  pred = np.array([[[0, 0, 2.0], [1, 0, 0], [1, 0, 1], [0, 0, -1]]])
  valid = np.array([[True, True, True, False]])  # 0, 90 and 45 degrees
  np.testing.assert_allclose(metrics.angular_errors(pred, gt, valid), [0, 90, 45],
                             atol=1e-6)
  result = metrics.normal_metrics(pred, gt, valid)
  assert result["mean"] == pytest.approx(45)
  assert result["median"] == pytest.approx(45)
  for key in ("pct_11.25", "pct_22.5", "pct_30"):
    assert result[key] == pytest.approx(100 / 3)


def test_normal_accumulator_pools_pixels():
  rng = np.random.default_rng(2)
  acc = metrics.NormalMetrics()
  angles = []
  for size in (5, 40):
    pred, gt = rng.normal(size=(2, size, size, 3))
    valid = rng.random((size, size)) < 0.8
    acc.add(pred, gt, valid)
    angles.append(metrics.angular_errors(pred, gt, valid))
  angles = np.concatenate(angles)
  result = acc.result()
  assert result["mean"] == pytest.approx(angles.mean())
  assert abs(result["median"] - np.median(angles)) <= 0.01
  assert result["pct_30"] == pytest.approx(100 * np.mean(angles < 30))


# ------------------------------------------------------------------------ pose


def coco_ground_truth(num_keypoints, num_images=4, seed=0):
  rng = np.random.default_rng(seed)
  images, annotations = [], []
  for i in range(num_images):
    x0, y0 = rng.uniform(10, 50, 2)
    w, h = 150.0, 200.0
    points = np.stack([rng.uniform(x0, x0 + w, num_keypoints),
                       rng.uniform(y0, y0 + h, num_keypoints),
                       np.full(num_keypoints, 2.0)], axis=1)
    images.append(dict(id=i + 1, width=300, height=300))
    annotations.append(dict(
        id=i + 1, image_id=i + 1, category_id=1, bbox=[x0, y0, w, h],
        area=w * h, keypoints=points.ravel().tolist()))
  return dict(images=images, annotations=annotations,
              categories=[dict(id=1, name="person")])


def results_from(gt, offset=0.0):
  results = []
  for ann in gt["annotations"]:
    points = np.asarray(ann["keypoints"]).reshape(-1, 3).copy()
    points[:, :2] += offset
    results.append(dict(image_id=ann["image_id"], category_id=1,
                        keypoints=points.ravel().tolist(), score=1.0))
  return results


@pytest.mark.parametrize("name", ["coco17", "coco_wholebody133"])
def test_oks_ap_perfect_and_shifted(name):
  sigmas = meta.skeleton(name).sigmas
  gt = coco_ground_truth(len(sigmas))
  perfect = metrics.oks_ap(gt, results_from(gt), sigmas)
  assert perfect["AP"] == pytest.approx(1.0)
  assert perfect["AR"] == pytest.approx(1.0)
  shifted = metrics.oks_ap(gt, results_from(gt, offset=40.0), sigmas)
  assert shifted["AP"] < 0.5


def test_oks_ap_uses_the_given_sigmas():
  sigmas = meta.skeleton("coco17").sigmas
  gt = coco_ground_truth(17)
  results = results_from(gt, offset=6.0)
  tight = metrics.oks_ap(gt, results, sigmas)["AP"]
  loose = metrics.oks_ap(gt, results, 4 * sigmas)["AP"]
  assert tight < loose == pytest.approx(1.0)


def test_oks_ap_rejects_mismatched_keypoint_counts():
  gt = coco_ground_truth(17)
  with pytest.raises(ValueError, match="17 keypoints, but 133 sigmas"):
    metrics.oks_ap(gt, results_from(gt), meta.skeleton("coco_wholebody133").sigmas)
  with pytest.raises(ValueError, match="no results"):
    metrics.oks_ap(gt, [], meta.skeleton("coco17").sigmas)


WHOLE_BODY_PARTS = {"coco_wholebody133": {"body": 17, "foot": 6, "face": 68, "left_hand": 21, "right_hand": 21},
                    "goliath308": {"body": 17, "foot": 6, "face": 238, "left_hand": 20, "right_hand": 20}}


@pytest.mark.parametrize("name", sorted(WHOLE_BODY_PARTS))
def test_whole_body_parts_are_the_evaluations_parts(name):
  """Sizes as COCO-WholeBody's and Sapiens2's Keypoints308 evaluators count them; the body is COCO's 17 by
  name; each hand is one side's; Goliath's 7 points outside every part are its extra arm and neck points."""
  skeleton = meta.skeleton(name)
  parts = dict(skeleton.subsets)
  assert {part: len(ids) for part, ids in parts.items()} == WHOLE_BODY_PARTS[name]
  assert {skeleton.names[i] for i in parts["body"]} == set(meta.skeleton("coco17").names)
  for side in ("left", "right"):
    assert all(skeleton.names[i].startswith(side) for i in parts[f"{side}_hand"])
  outside = set(range(skeleton.num_keypoints)) - {i for ids in parts.values() for i in ids}
  extra = {"left_olecranon", "right_olecranon", "left_cubital_fossa", "right_cubital_fossa", "left_acromion",
           "right_acromion", "neck"}
  assert {skeleton.names[i] for i in outside} == (extra if name == "goliath308" else set())
  assert not meta.skeleton("coco17").subsets


def test_each_part_is_scored_on_its_own_keypoints():
  skeleton = meta.skeleton("goliath308")
  gt = coco_ground_truth(skeleton.num_keypoints)
  perfect = pose.part_scores(gt, results_from(gt), skeleton.sigmas, skeleton.subsets)
  assert set(perfect) == {f"{p}_{s}" for p in WHOLE_BODY_PARTS["goliath308"] for s in ("AP", "AR")}
  assert all(v == pytest.approx(1.0) for v in perfect.values()), perfect
  face = dict(skeleton.subsets)["face"]
  results = results_from(gt)
  for r in results:  # only the face 40 px off
    points = np.asarray(r["keypoints"]).reshape(-1, 3)
    points[face, :2] += 40.0
    r["keypoints"] = points.ravel().tolist()
  scores = pose.part_scores(gt, results, skeleton.sigmas, skeleton.subsets)
  assert scores["face_AP"] < 0.5
  assert all(scores[f"{p}_AP"] == pytest.approx(1.0) for p in ("body", "foot", "left_hand", "right_hand"))
  assert metrics.oks_ap(gt, results, skeleton.sigmas)["AP"] < 0.5  # the whole body: the face is most of it
  # A person with no labelled hand point is ignored for that hand (COCOeval: num_keypoints 0), not missed.
  hand = dict(skeleton.subsets)["left_hand"]
  points = np.asarray(gt["annotations"][0]["keypoints"]).reshape(-1, 3)
  points[hand, 2] = 0
  gt["annotations"][0]["keypoints"] = points.ravel().tolist()
  moved = results_from(gt)
  moved_points = np.asarray(moved[0]["keypoints"]).reshape(-1, 3)
  moved_points[hand, :2] += 40.0
  moved[0]["keypoints"] = moved_points.ravel().tolist()
  assert pose.part_scores(gt, moved, skeleton.sigmas, skeleton.subsets)["left_hand_AP"] == pytest.approx(1.0)
