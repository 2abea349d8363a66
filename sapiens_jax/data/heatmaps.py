"""UDP Gaussian heatmap codec for top-down pose (Sapiens / mmpose `UDPHeatmap`).

Heatmaps are channels-last, (H_hm, W_hm, K), like the rest of sapiens_jax.
Sizes are (W, H) pairs, as in the reference configs: input (768, 1024),
heatmap (192, 256). Keypoints are (x, y) pixel-centre coordinates.

Encoding uses the unbiased (UDP) grid mapping kp_hm = kp_in / s with
s = (input - 1) / (heatmap - 1) per axis. Decoding ends with the reference's
kp_in = kp_hm / (heatmap - 1) * input, which is NOT the exact inverse (it is
off by the factor input / (input - 1), about 0.1% at 768x1024); we keep it
because the published numbers were produced that way.
"""
import cv2
import numpy as np


def encode(keypoints, visible, input_size=(768, 1024), heatmap_size=(192, 256),
           sigma=6.0):
  """Keypoints in input pixels -> (heatmaps (H_hm, W_hm, K), target_weight (K,)).

  Each visible keypoint gets an unnormalised Gaussian (peak 1 at the exact
  sub-pixel location) on the integer pixels within `round(3 sigma)` of its
  rounded location, so a (6 sigma + 1)^2 patch. Its weight is 1 when visible
  (> 0) and the patch touches the map, else 0 (its channel is then all zero).
  The reference additionally keeps weight 1 for a patch ending one pixel short
  of the left/top border; here a patch with no pixel on the map always gets 0.
  """
  keypoints = np.asarray(keypoints, dtype=np.float64)
  visible = np.asarray(visible, dtype=np.float64)
  if keypoints.ndim != 2 or keypoints.shape[1] != 2:
    raise ValueError(f"keypoints must have shape (K, 2), got {keypoints.shape}")
  if visible.shape != keypoints.shape[:1]:
    raise ValueError(
        f"visible must have shape ({keypoints.shape[0]},), got {visible.shape}")
  heatmap_w, heatmap_h = heatmap_size
  grid_scale = ((np.asarray(input_size, np.float64) - 1)
                / (np.asarray(heatmap_size, np.float64) - 1))
  centres = keypoints / grid_scale  # (K, 2) on the heatmap grid.
  radius = int(round(3 * sigma))
  rounded = np.floor(centres + 0.5)

  def axis_profile(length, axis):
    # Separable: the 2D Gaussian patch is the outer product of two 1D ones.
    pixels = np.arange(length, dtype=np.float64)[None, :]
    offset = pixels - centres[:, axis:axis + 1]
    profile = np.exp(-offset**2 / (2 * sigma**2))
    in_patch = np.abs(pixels - rounded[:, axis:axis + 1]) <= radius
    return np.where(in_patch, profile, 0.0), in_patch.any(axis=1)

  profile_x, touches_x = axis_profile(heatmap_w, 0)
  profile_y, touches_y = axis_profile(heatmap_h, 1)
  weight = ((visible > 0) & touches_x & touches_y).astype(np.float32)
  heatmaps = np.einsum("ky,kx,k->yxk", profile_y, profile_x, weight)
  return heatmaps.astype(np.float32), weight


def heatmap_maximum(heatmaps):
  """(..., H, W, K) -> (locations (..., K, 2) as (x, y), scores (..., K)).

  A channel whose maximum is <= 0 holds no detection: its location is -1.
  """
  heatmaps = np.asarray(heatmaps)
  *batch, height, width, channels = heatmaps.shape
  flat = np.moveaxis(heatmaps, -1, -3).reshape(*batch, channels, height * width)
  index = np.argmax(flat, axis=-1)
  scores = np.take_along_axis(flat, index[..., None], axis=-1)[..., 0]
  locations = np.stack([index % width, index // width], axis=-1).astype(
      np.float64)
  locations[scores <= 0] = -1
  return locations, scores.astype(np.float32)


def _blur_keep_maximum(heatmap, kernel_size):
  """Gaussian blur of one (H, W, K) map with a zero border, peaks rescaled back.

  cv2's sigma for a given kernel size (0.3 ((k - 1) / 2 - 1) + 0.8, so 2.0
  for 11) is the reference's.
  """
  original_max = heatmap.max(axis=(0, 1))
  blurred = cv2.GaussianBlur(heatmap, (kernel_size, kernel_size), 0,
                             borderType=cv2.BORDER_CONSTANT)
  blurred = blurred.reshape(heatmap.shape)  # cv2 drops a trailing axis of 1.
  blurred_max = blurred.max(axis=(0, 1))
  ratio = np.divide(original_max, blurred_max, out=np.zeros_like(original_max),
                    where=blurred_max > 0)
  return blurred * ratio


def refine_dark_udp(heatmaps, locations, blur_kernel_size=11):
  """DARK-UDP sub-pixel refinement of integer `locations` on the heatmap grid.

  Blurs, takes log(clip(h, 1e-3, 50)) and does one Newton step
  x -= (Hessian + eps I)^-1 gradient, with central differences read from the
  edge-padded log map. Exact when the blurred peak is Gaussian, since its log
  is then quadratic. heatmaps (..., H, W, K), locations (..., K, 2) -> same.
  Locations of -1 (no detection) are returned unchanged.
  """
  heatmaps = np.asarray(heatmaps, dtype=np.float32)
  locations = np.asarray(locations, dtype=np.float64)
  *batch, height, width, channels = heatmaps.shape
  maps = heatmaps.reshape(-1, height, width, channels)
  points = locations.reshape(-1, channels, 2)
  logs = np.stack([_blur_keep_maximum(m, blur_kernel_size) for m in maps])
  logs = np.log(np.clip(logs, 1e-3, 50.0)).astype(np.float64)
  padded = np.pad(logs, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")

  valid = np.all(points >= 0, axis=-1)
  # Integer (row, column) in the padded map; invalid points read pixel (1, 1).
  x = np.where(valid, points[..., 0], 0).astype(np.int64) + 1
  y = np.where(valid, points[..., 1], 0).astype(np.int64) + 1
  sample = np.arange(maps.shape[0])[:, None]
  channel = np.arange(channels)[None, :]

  def at(dx, dy):
    return padded[sample, y + dy, x + dx, channel]

  centre = at(0, 0)
  right, left, down, up = at(1, 0), at(-1, 0), at(0, 1), at(0, -1)
  dx = 0.5 * (right - left)
  dy = 0.5 * (down - up)
  dxx = right - 2 * centre + left
  dyy = down - 2 * centre + up
  # Mean of the forward and the backward mixed difference.
  dxy = 0.5 * (at(1, 1) - right - down + 2 * centre - left - up + at(-1, -1))
  hessian = np.stack([np.stack([dxx, dxy], -1), np.stack([dxy, dyy], -1)], -2)
  hessian += np.finfo(np.float32).eps * np.eye(2)
  gradient = np.stack([dx, dy], axis=-1)
  step = np.linalg.solve(hessian, gradient[..., None])[..., 0]
  refined = np.where(valid[..., None], points - step, points)
  return refined.reshape(locations.shape)


def decode(heatmaps, input_size=(768, 1024), blur_kernel_size=11):
  """(H_hm, W_hm, K) or (B, H_hm, W_hm, K) -> (keypoints in input pixels, scores).

  Keypoints are (..., K, 2), scores (..., K) = the heatmap maxima. The last
  step is the reference's kp_hm / (heatmap - 1) * input (see module doc).
  """
  heatmaps = np.asarray(heatmaps, dtype=np.float32)
  if heatmaps.ndim not in (3, 4):
    raise ValueError(
        f"heatmaps must be (H, W, K) or (B, H, W, K), got {heatmaps.shape}")
  height, width = heatmaps.shape[-3:-1]
  locations, scores = heatmap_maximum(heatmaps)
  locations = refine_dark_udp(heatmaps, locations, blur_kernel_size)
  keypoints = locations / np.array([width - 1, height - 1]) * np.asarray(
      input_size, np.float64)
  return keypoints.astype(np.float32), scores


def flip_heatmaps_back(heatmaps, flip_indices):
  """Undoes a horizontal input flip on predicted (..., H, W, K) heatmaps.

  Mirrors along W and swaps left/right channels (output k = input
  flip_indices[k]); no one-pixel shift, as the reference's flip test.
  """
  return np.asarray(heatmaps)[..., ::-1, :][..., np.asarray(flip_indices)]


def to_image_coords(keypoints_in, center, scale, input_size):
  """Input-crop pixels -> original image pixels for a crop box (center, scale)."""
  keypoints_in = np.asarray(keypoints_in, dtype=np.float64)
  input_size = np.asarray(input_size, dtype=np.float64)
  center = np.asarray(center, dtype=np.float64)
  scale = np.asarray(scale, dtype=np.float64)
  return keypoints_in / input_size * scale + center - 0.5 * scale
