"""Tests for sapiens_jax.data.heatmaps: the UDP Gaussian heatmap codec."""
import math

import numpy as np
import pytest

from sapiens_jax.data import heatmaps

# Small sizes (W, H) for hand-checked cases; the grid step is 47/11 x 63/15.
INPUT = (48, 64)
HEATMAP = (12, 16)
SIGMA = 2.0
GRID = np.array([47 / 11, 63 / 15])


def reference_gaussians(keypoints_hm, visible, heatmap_size, sigma):
  """Loop-per-pixel encoder straight from the codec's definition."""
  width, height = heatmap_size
  radius = int(round(3 * sigma))
  maps = np.zeros((height, width, len(keypoints_hm)))
  for k, (x0, y0) in enumerate(keypoints_hm):
    if not visible[k]:
      continue
    cx, cy = math.floor(x0 + 0.5), math.floor(y0 + 0.5)
    for y in range(height):
      for x in range(width):
        if abs(x - cx) <= radius and abs(y - cy) <= radius:
          maps[y, x, k] = math.exp(-((x - x0)**2 + (y - y0)**2) / (2 * sigma**2))
  return maps


def test_encode_by_hand_at_a_grid_point():
  keypoints = np.array([[5, 7]]) * GRID  # Exactly heatmap pixel (x=5, y=7).
  maps, weight = heatmaps.encode(keypoints, [1], INPUT, HEATMAP, SIGMA)
  assert maps.shape == (16, 12, 1) and maps.dtype == np.float32
  np.testing.assert_array_equal(weight, [1])
  assert np.unravel_index(np.argmax(maps[..., 0]), (16, 12)) == (7, 5)
  np.testing.assert_allclose(maps[7, 5, 0], 1.0, rtol=1e-6)
  neighbour = math.exp(-1 / (2 * SIGMA**2))
  for y, x in ((7, 6), (7, 4), (6, 5), (8, 5)):
    np.testing.assert_allclose(maps[y, x, 0], neighbour, rtol=1e-6)
  np.testing.assert_allclose(maps[8, 6, 0], neighbour**2, rtol=1e-6)
  # Support is 3 sigma = 6 pixels: row 13 is inside, row 14 is not.
  np.testing.assert_allclose(maps[13, 5, 0], math.exp(-36 / 8), rtol=1e-5)
  assert maps[14, 5, 0] == 0


def test_encode_matches_pixel_loop_reference():
  rng = np.random.default_rng(0)
  keypoints_hm = rng.uniform(-4, 15, size=(9, 2))
  visible = np.array([1, 2, 0, 1, 1, 1, 1, 1, 1])
  maps, weight = heatmaps.encode(keypoints_hm * GRID, visible, INPUT, HEATMAP,
                                 SIGMA)
  expected = reference_gaussians(keypoints_hm, visible > 0, HEATMAP, SIGMA)
  np.testing.assert_allclose(maps, expected, atol=1e-6)
  np.testing.assert_array_equal(weight, (visible > 0).astype(np.float32))


def test_encode_weights_for_invisible_and_outside_keypoints():
  keypoints_hm = np.array([
      [5, 5],     # invisible
      [-30, 5],   # far left of the map
      [5, 40],    # far below
      [-3, 5],    # off the map, but its 13x13 patch still reaches columns 0..3
      [-6.6, 5],  # rounds to -7: patch ends at column -1, touches nothing
  ])
  visible = np.array([0, 1, 1, 1, 1])
  maps, weight = heatmaps.encode(keypoints_hm * GRID, visible, INPUT, HEATMAP,
                                 SIGMA)
  np.testing.assert_array_equal(weight, [0, 0, 0, 1, 0])
  assert np.all(maps[..., [0, 1, 2, 4]] == 0)
  assert maps[5, 0, 3] == pytest.approx(math.exp(-9 / 8), rel=1e-6)


def test_encode_rejects_bad_shapes():
  with pytest.raises(ValueError, match=r"\(K, 2\)"):
    heatmaps.encode(np.zeros((3, 3)), np.ones(3))
  with pytest.raises(ValueError, match="visible"):
    heatmaps.encode(np.zeros((3, 2)), np.ones(4))


def test_round_trip_on_the_heatmap_grid_full_size():
  """Encode at sub-pixel heatmap locations; DARK-UDP recovers them.

  Measured in heatmap pixels: decode's final mapping is deliberately not the
  inverse of encode's, so the round trip is checked before it.
  """
  rng = np.random.default_rng(1)
  keypoints_hm = np.stack([rng.uniform(25, 166, 17), rng.uniform(25, 230, 17)],
                          axis=1)
  grid = np.array([767 / 191, 1023 / 255])
  maps, _ = heatmaps.encode(keypoints_hm * grid, np.ones(17))
  locations, scores = heatmaps.heatmap_maximum(maps)
  np.testing.assert_array_equal(locations, np.floor(keypoints_hm + 0.5))
  np.testing.assert_allclose(scores, 1.0, atol=0.05)
  refined = heatmaps.refine_dark_udp(maps, locations, blur_kernel_size=11)
  assert np.abs(refined - keypoints_hm).max() < 0.05


def test_decode_final_mapping_by_hand():
  """A symmetric peak at heatmap (12, 16) on a 25 x 33 map (grid step 4).

  The reference maps it to 12 / 24 * 97 and 16 / 32 * 129, not to 12 * 4.
  """
  maps, _ = heatmaps.encode([[48, 64]], [1], (97, 129), (25, 33), SIGMA)
  keypoints, scores = heatmaps.decode(maps, (97, 129))
  np.testing.assert_allclose(keypoints, [[48.5, 64.5]], atol=1e-4)
  np.testing.assert_allclose(scores, [1.0], rtol=1e-6)


def test_decode_empty_channel_and_batch():
  rng = np.random.default_rng(2)
  keypoints_hm = rng.uniform(2, 9, size=(3, 2))
  maps, _ = heatmaps.encode(keypoints_hm * GRID, [1, 0, 1], INPUT, HEATMAP,
                            SIGMA)
  locations, scores = heatmaps.heatmap_maximum(maps)
  np.testing.assert_array_equal(locations[1], [-1, -1])
  assert scores[1] == 0
  single, single_scores = heatmaps.decode(maps, INPUT)
  assert np.all(np.isfinite(single))
  batch = np.stack([maps, maps[::-1]])
  batched, batched_scores = heatmaps.decode(batch, INPUT)
  assert batched.shape == (2, 3, 2) and batched_scores.shape == (2, 3)
  np.testing.assert_allclose(batched[0], single, atol=1e-5)
  np.testing.assert_allclose(batched[1], heatmaps.decode(maps[::-1], INPUT)[0],
                             atol=1e-5)
  np.testing.assert_array_equal(batched_scores[0], single_scores)


def test_flip_heatmaps_back_by_hand():
  maps = np.zeros((2, 4, 3), np.float32)
  maps[1, 0, 0] = 1  # channel 0 at column 0
  maps[0, 1, 2] = 2  # channel 2 at column 1
  flipped = heatmaps.flip_heatmaps_back(maps, [2, 1, 0])
  assert flipped[0, 2, 0] == 2  # channel 2 -> 0, column 1 -> 2
  assert flipped[1, 3, 2] == 1  # channel 0 -> 2, column 0 -> 3
  assert flipped.sum() == 3
  np.testing.assert_array_equal(
      heatmaps.flip_heatmaps_back(flipped, [2, 1, 0]), maps)


def test_to_image_coords_by_hand():
  center, scale = np.array([100.0, 50.0]), np.array([30.0, 40.0])
  corners = np.array([[0, 0], [48, 64], [24, 32]])
  np.testing.assert_allclose(
      heatmaps.to_image_coords(corners, center, scale, INPUT),
      [[85, 30], [115, 70], [100, 50]])
