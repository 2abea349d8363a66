"""The label pictures of visualize.py, and each task's panel (image | target | prediction) made from them."""
import cv2
import ml_collections
import numpy as np
import pytest

from sapiens_jax import tasks
from sapiens_jax import visualize
from sapiens_jax.data import heatmaps
from sapiens_jax.data import meta


def _config(labels=""):
  return ml_collections.ConfigDict({"data": {"labels": labels}})


def _panel(task, image, target=None, prediction=None, labels=""):
  """The task's panel of one example (holding the target under the task's TARGET key, if any)."""
  module = tasks.get(task)
  example = {"image": image, **({module.TARGET: target} if target is not None else {})}
  return module.panel(_config(labels), example, prediction)

COCO = meta.skeleton("coco17")
# Three points, two links, colours that differ from their BGR reading.
CHAIN = meta.Skeleton(
    name="chain", names=("a", "b", "c"), flip_indices=np.arange(3), sigmas=np.ones(3, np.float32),
    links=((0, 1), (1, 2)), keypoint_colors=np.array([[255, 0, 0], [0, 0, 200], [10, 20, 30]], np.uint8),
    link_colors=np.array([[250, 120, 0], [0, 60, 240]], np.uint8), upper_body_ids=(), lower_body_ids=())


def _image(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _tile(panel, col, height, width):
  left = col * (width + visualize._GAP)
  return panel[:height, left:left + width]


# Point c sits far away with score 0: it must not show up, nor its link from b.
KEYPOINTS = np.array([[10, 20], [50, 20], [50, 5]], np.float64)


def test_draw_pose_link_and_points_in_skeleton_colours():
  image = np.zeros((40, 64, 3), np.uint8)
  drawn = visualize.draw_pose(image, KEYPOINTS, np.array([0.9, 0.8, 0.0]), CHAIN, radius=2,
                              thickness=3)
  np.testing.assert_array_equal(drawn[20, 30], CHAIN.link_colors[0])  # middle of link a-b
  np.testing.assert_array_equal(drawn[20, 10], CHAIN.keypoint_colors[0])
  np.testing.assert_array_equal(drawn[20, 50], CHAIN.keypoint_colors[1])
  assert not drawn[:12].any() and not drawn[29:].any()  # nothing far from a and b
  assert not image.any()  # the input is left alone


def test_draw_pose_leaves_out_low_score_keypoints_and_their_links():
  image = _image(40, 64)
  scores = np.array([0.9, 0.3, 0.9])  # b is not above the threshold
  drawn = visualize.draw_pose(image, KEYPOINTS, scores, CHAIN, radius=2, thickness=3)
  np.testing.assert_array_equal(drawn[12:, 14:], image[12:, 14:])  # no link, no point b
  np.testing.assert_array_equal(drawn[20, 10], CHAIN.keypoint_colors[0])
  np.testing.assert_array_equal(drawn[5, 50], CHAIN.keypoint_colors[2])
  np.testing.assert_array_equal(
      visualize.draw_pose(image, KEYPOINTS, np.array([0.1, 0.3, 0.0]), CHAIN), image)


def test_draw_pose_sizes_grow_with_the_image():
  def changed_pixels(size):
    keypoints = np.array([[size / 2, size / 2], [np.nan, np.nan], [0, 0]])
    image = np.zeros((size, size, 3), np.uint8)
    drawn = visualize.draw_pose(image, keypoints, np.array([1.0, 1.0, 0.0]), CHAIN)
    return (drawn > 0).any(-1).sum()
  assert changed_pixels(600) > 4 * changed_pixels(60) > 0


def test_draw_pose_rejects_wrong_keypoint_count():
  with pytest.raises(ValueError, match="17 keypoints"):
    visualize.draw_pose(_image(8, 8), np.zeros((5, 2)), np.ones(5), COCO)


def test_overlay_parts_blends_palette_over_labelled_pixels_only():
  image = np.zeros((2, 3, 3), np.uint8)
  image[:] = (100, 50, 30)
  palette = np.array([[0, 0, 0], [20, 40, 60], [200, 0, 255]], np.uint8)
  labels = np.array([[0, 1, 2], [255, 1, 0]])
  blended = visualize.overlay_parts(image, labels, palette)
  np.testing.assert_array_equal(blended[0, 1], (60, 45, 45))  # (image + colour) / 2
  np.testing.assert_array_equal(blended[1, 1], (60, 45, 45))
  np.testing.assert_array_equal(blended[0, 2], (150, 25, 142))  # 285 / 2 rounds to even
  for y, x in ((0, 0), (1, 0), (1, 2)):  # background and ignored pixels
    np.testing.assert_array_equal(blended[y, x], image[y, x])


def test_overlay_parts_rejects_labels_outside_the_palette():
  with pytest.raises(ValueError, match="palette of 2"):
    visualize.overlay_parts(_image(1, 2), np.array([[0, 2]]), np.zeros((2, 3), np.uint8))


def _inferno_rgb(levels):
  return cv2.applyColorMap(np.asarray(levels, np.uint8)[:, None], cv2.COLORMAP_INFERNO)[:, 0, ::-1]


def test_colorize_depth_nearest_is_brightest_and_background_grey():
  depth = np.array([[2.0, 4.0, 3.0, 0.5]], np.float32)  # the last pixel is background
  mask = np.array([[1, 1, 1, 0]], bool)
  picture = visualize.colorize_depth(depth, mask)
  # Normalised (d - 2) / 2 = 0, 1, 0.5 -> inverted x255 -> 255, 0, 127.
  np.testing.assert_array_equal(picture[0, :3], _inferno_rgb([255, 0, 127]))
  np.testing.assert_array_equal(picture[0, 3], (100, 100, 100))
  brightness = picture[0, :3].astype(int).sum(-1)
  assert brightness[0] > brightness[2] > brightness[1]
  # Only the relative depth of the person matters.
  np.testing.assert_array_equal(visualize.colorize_depth(depth * 7 + 3, mask), picture)
  assert (visualize.colorize_depth(depth, np.zeros_like(mask)) == 100).all()


def test_colorize_normals_formula_and_black_background():
  normals = np.array([[[0, 0, -1], [1, 0, 0], [0, 1, 0], [np.nan, 0, 0]]], np.float32)
  mask = np.array([[1, 1, 0, 1]], bool)
  picture = visualize.colorize_normals(normals, mask)
  np.testing.assert_array_equal(picture[0, 0], (127, 127, 0))  # (n + 1) / 2 * 255, truncated
  np.testing.assert_array_equal(picture[0, 1], (255, 127, 127))
  np.testing.assert_array_equal(picture[0, 2:], 0)  # masked out, and not finite


def test_panel_pose_decodes_heatmaps_into_keypoints():
  height, width = 64, 48
  image = np.full((height, width, 3), 128, np.uint8)
  keypoints = np.zeros((COCO.num_keypoints, 2))
  visible = np.zeros(COCO.num_keypoints)
  keypoints[5], visible[5] = (20.0, 30.0), 1  # only the left shoulder
  target, _ = heatmaps.encode(keypoints, visible, (width, height), (width // 4, height // 4), 2.0)
  panel = _panel("pose", image, target=target, prediction=target, labels="coco17")
  assert panel.shape == (height, 3 * width + 2 * visualize._GAP, 3)
  np.testing.assert_array_equal(_tile(panel, 0, height, width), image)
  for col in (1, 2):
    tile = _tile(panel, col, height, width)
    ys, xs = np.nonzero((tile != image).any(-1))
    assert len(ys) and np.abs(xs - 20).max() <= 3 and np.abs(ys - 30).max() <= 3
    assert (tile == COCO.keypoint_colors[5]).all(-1).any()


def test_panel_seg_argmaxes_resized_logits():
  height, width = 8, 6
  image = _image(height, width)
  palette = meta.seg_classes("seg28").palette
  labels = np.zeros((height, width), np.int32)
  labels[2:5, 1:4] = 3
  logits = np.zeros((height // 2, width // 2, 28), np.float32)
  logits[..., 2] = 1.0  # class 2 everywhere
  panel = _panel("seg", image, target=labels, prediction=logits, labels="seg28")
  target_tile = _tile(panel, 1, height, width).astype(int)
  expected = (image[2:5, 1:4].astype(int) + palette[3]) / 2
  assert np.abs(target_tile[2:5, 1:4] - expected).max() <= 0.5
  np.testing.assert_array_equal(target_tile[labels == 0], image[labels == 0])
  predicted = _tile(panel, 2, height, width).astype(int)
  assert np.abs(predicted - (image.astype(int) + palette[2]) / 2).max() <= 0.5


def test_panel_depth_uses_the_target_mask_for_the_prediction():
  height, width = 8, 6
  target = np.full((height, width), -1.0, np.float32)
  target[2:6, 2:5] = np.linspace(0, 1, 12).reshape(4, 3)
  prediction = np.random.default_rng(1).uniform(size=(height, width, 1)).astype(np.float32)
  image = _image(height, width)
  panel = _panel("depth", image, target=target, prediction=prediction)
  background = target < 0
  for col in (1, 2):
    assert (_tile(panel, col, height, width)[background] == 100).all()
    assert (_tile(panel, col, height, width)[~background] != 100).any(-1).all()
  alone = _panel("depth", image, prediction=prediction)
  assert alone.shape == (height, 2 * width + visualize._GAP, 3)
  assert not (_tile(alone, 1, height, width) == 100).all(-1).any()  # no mask: all foreground


def test_panel_normal_normalises_predictions():
  height, width = 8, 6
  target = np.full((height, width, 3), -1000.0, np.float32)
  target[:4] = (1.0, 0.0, 0.0)
  prediction = np.zeros((height // 2, width // 2, 3), np.float32)
  prediction[..., 2] = -5.0  # length 5, pointing at the camera
  panel = _panel("normal", _image(height, width), target=target,
                               prediction=prediction)
  target_tile, predicted = _tile(panel, 1, height, width), _tile(panel, 2, height, width)
  assert (target_tile[:4] == (255, 127, 127)).all() and not target_tile[4:].any()
  assert (predicted[:4] == (127, 127, 0)).all() and not predicted[4:].any()


def test_panel_rejects_bad_input():
  with pytest.raises(ValueError, match="uint8"):
    _panel("seg", np.zeros((4, 4, 3), np.float32), labels="seg28")
  with pytest.raises(ValueError, match="'mae'"):
    tasks.get("mae")
  with pytest.raises(ValueError, match="4x4"):
    _panel("depth", _image(4, 4), target=np.zeros((4, 5)))
  with pytest.raises(ValueError, match=r"\(h, w, C\)"):
    _panel("depth", _image(4, 4), prediction=np.zeros((4, 4)))


def test_stack_rows_fills_the_last_row_with_white():
  panels = [np.full((3, 5, 3), i, np.uint8) for i in range(5)]
  gap = visualize._GAP
  grid = visualize.stack_rows(panels, per_row=2)
  assert grid.shape == (3 * 3 + 2 * gap, 2 * 5 + gap, 3)
  np.testing.assert_array_equal(grid[2 * (3 + gap):, :5], 4)
  assert (grid[2 * (3 + gap):, 5 + gap:] == 255).all()
  assert visualize.stack_rows(panels).shape == (5 * 3 + 4 * gap, 5, 3)
