"""Pointmaps (Sapiens2, sapiens2.md §3.3): each pixel's camera XYZ in a canonical camera, and a scale.

The head predicts canonical XYZ (B, H, W, 3) and a scale (B, 1); metric XYZ = canonical / scale. The target
is made last, after every geometric augmentation, from the augmented depth, mask and camera K
(`sapiens2_transforms.canonical_pointmap`), so it always agrees with K. A dataset folder holds images/,
masks/NAME.png, depths/NAME.npy (metres, > 0 on the person) and one cameras.json ({stem: {fx, fy, cx, cy}},
pixel centres at integers, as sapiens2_transforms' module docstring says).

The canonical focal is upstream's 768 at its 1024x768 input and scales with the input width below that
(`canonical_focal`): the canonical units then stay near metres at any training size (a 768 focal at 48
pixels wide would make canonical points ~16x the metric ones), which PointmapMetrics' cm thresholds and the
0.04 minimum depth of `pointmap_sample_ok` assume. At 1024x768 it is upstream's exactly.
"""
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from sapiens_jax import losses
from sapiens_jax import metrics
from sapiens_jax import visualize
from sapiens_jax.data import dense_source
from sapiens_jax.data import dense_transforms
from sapiens_jax.data import photometric
from sapiens_jax.data import sapiens2_transforms as s2
from sapiens_jax.tasks import dense
from sapiens_jax.tasks import heads2

TORCH_PREFIX = heads2.TORCH_PREFIX
TARGET = "pointmap"  # canonical XYZ (H, W, 3), 0 off the mask
LAYOUT = (dense_source.LabelFile("masks", ".png", "mask"),
          dense_source.LabelFile("depths", ".npy", "depth", positive=True))
CAMERAS = "cameras.json"  # beside images/, in a dataset folder and in its converted shards' folder
CAMERA_KEYS = ("fx", "fy", "cx", "cy")
METRICS = {"l2_mean": "min", "x_mae": "min", "y_mae": "min", "z_mae": "min", "rmse": "min",
           **{key: "max" for _, key in metrics.POINTMAP_DISTANCE_THRESHOLDS},
           "normal_mae": "min", "normal_rmse": "min",
           **{f"within_{t:g}_deg": "max" for t in metrics.SAPIENS2_NORMAL_THRESHOLDS},
           "scale_abs_rel": "min"}  # ours: mean |s_hat - s| / s; metric XYZ are only as good as the scale
BACKGROUND_PROB = 0.5  # a person pasted on a config.data.backgrounds photo (dense_transforms' masked recipes)
FLIP_PROB = 0.5  # ours: §3.3 gives no probability
# A sample failing pointmap_sample_ok is replaced by the next index, as upstream refetches a None sample; this
# many failures in a row means the data, not the draw, is wrong.
MAX_REFETCHES = 100


def configure(config, dataset, size):
  del dataset, size
  config.best_metric = "l2_mean"


def make_head(config):
  return heads2.head("pointmap", config.model.size, jnp.dtype(config.model.dtype))


def canonical_focal(config):
  """Upstream's 768 at its 768-wide input, in proportion to config.image_size's width otherwise."""
  return s2.CANONICAL_FOCAL * config.image_size[1] / s2.INPUT_SIZE[1]


def target_spec(config, batch_size):
  """pointmap: canonical XYZ (0 off the mask); mask: the person pixels with a positive depth (the loss's
  and the metrics' valid pixels); scale: canonical_focal / fx, one per example; intrinsics: K of the
  network's pixel grid before the canonical rescale (the loss's K-consistency term takes the original K)."""
  h, w = config.image_size
  return {TARGET: jax.ShapeDtypeStruct((batch_size, h, w, 3), jnp.float32),
          "mask": jax.ShapeDtypeStruct((batch_size, h, w), jnp.bool_),
          "scale": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
          "intrinsics": jax.ShapeDtypeStruct((batch_size, 3, 3), jnp.float32)}


def loss(config, outputs, batch):
  """The sum of losses.sapiens2_pointmap_loss's weighted terms; outputs = (canonical XYZ, scale (B, 1))."""
  del config
  points, scale = outputs
  terms = losses.sapiens2_pointmap_loss(points, scale, batch[TARGET], batch["mask"], batch["scale"],
                                        batch["intrinsics"])
  return sum(terms.values())


def eval_outputs(forward, images, config):
  """(B, H, W, 4): canonical XYZ at the label resolution and the predicted scale repeated in channel 3
  (evaluation takes one array per batch)."""
  points, scale = forward(images)
  points = losses.resize_to(points, tuple(config.image_size))
  scale = jnp.broadcast_to(scale.reshape(-1, 1, 1, 1), points.shape[:3] + (1,))
  return jnp.concatenate([points, scale], axis=-1)


# ---------------------------------------------------------------- data

def _camera(entry, stem, path):
  """The 3x3 K of one cameras.json entry, checked."""
  ok = isinstance(entry, dict) and all(
      isinstance(entry.get(k), (int, float)) and not isinstance(entry.get(k), bool) and math.isfinite(entry[k])
      for k in CAMERA_KEYS)
  if not ok or entry["fx"] <= 0 or entry["fy"] <= 0:
    raise dense_source.DataError(f"{path}: camera {stem!r} must be {{fx, fy, cx, cy}}, finite numbers with"
                                 f" fx, fy > 0; got {entry!r}")
  return [[entry["fx"], 0.0, entry["cx"]], [0.0, entry["fy"], entry["cy"]], [0.0, 0.0, 1.0]]


def read_cameras(root, stems):
  """{stem: 3x3 K (nested lists)} of `stems` from root/cameras.json; a missing file, stem or field is an
  error naming cameras.json and the stem."""
  path = os.path.join(root, CAMERAS)
  try:
    with open(path, "rb") as f:
      cameras = json.load(f)
  except FileNotFoundError as e:
    raise dense_source.DataError(f"{path} does not exist: a pointmap dataset needs each image's camera"
                                 " there, {stem: {fx, fy, cx, cy}}") from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise dense_source.DataError(f"{path}: malformed JSON: {e}") from e
  if not isinstance(cameras, dict):
    raise dense_source.DataError(f"{path}: expected a JSON object {{stem: {{fx, fy, cx, cy}}}}")
  missing = [stem for stem in stems if stem not in cameras]
  if missing:
    listed = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
    raise dense_source.DataError(f"{path}: no camera for {len(missing)} images: {listed}")
  return {stem: _camera(cameras[stem], stem, path) for stem in stems}


class CameraSource:
  """A dense source (DenseSource or RecordDenseSource of LAYOUT) whose elements also hold "intrinsics",
  the image's K from cameras.json; `load` is the inner source's."""

  def __init__(self, source, root):
    self.source = source
    cameras = read_cameras(root, [element["name"] for element in source.elements])
    self.elements = [{**element, "intrinsics": cameras[element["name"]]} for element in source.elements]

  def __len__(self):
    return len(self.elements)

  def __getitem__(self, index):
    return self.elements[index]

  def __repr__(self):
    return f"CameraSource({self.source!r})"

  def load(self, element):
    return self.source.load(element)


def make_source(config, root, split):
  return CameraSource(dense.make_source(LAYOUT, config, root, split), root)


def convert_records(input_dir, annotations, output):
  """dense.convert_records of LAYOUT, with the converted samples' cameras written to output/cameras.json
  (the shards' folder reads like a dataset folder)."""
  num, records, extras = dense.convert_records(LAYOUT, input_dir, annotations, output)
  cameras = read_cameras(input_dir, extras["names"])
  with open(os.path.join(output, CAMERAS), "w") as f:
    json.dump({stem: dict(zip(CAMERA_KEYS, (k[0][0], k[1][1], k[0][2], k[1][2]))) for stem, k in cameras.items()}, f)
  return num, records, extras


def _person(targets):
  return {"mask": (np.asarray(targets["mask"]) > 0).astype(np.uint8), "depth": targets["depth"]}


def _sample(image, targets, K, focal):
  """The batch row: image, the canonical pointmap made from the final depth and K, mask, scale, K."""
  points, scale, _ = s2.canonical_pointmap(targets["depth"], targets["mask"], K, focal)
  return {"image": image, TARGET: points, "mask": targets["mask"] > 0, "scale": np.float32(scale),
          "intrinsics": np.asarray(K, np.float32)}


def train_sample(image, targets, K, rng, *, size, focal, background_images=None,
                 ratio_range=dense_transforms.REFERENCE_RATIO_RANGE):
  """One augmented row (no rotation, which K cannot follow): a background photo behind the person, a
  random aspect-kept resize to `size` x U(ratio_range), a random crop of at most `size` and a zero pad to
  it at a random offset, a horizontal flip; depth and mask nearest, K updated at each step; photometric
  distortion of the image only; the target last."""
  targets = _person(targets)
  image = dense_transforms.composite_background(image, targets["mask"], background_images, rng, BACKGROUND_PROB)
  height, width = image.shape[:2]
  ratio = rng.uniform(*ratio_range)
  resized = s2.fit_inside(height, width, (max(1, int(size[0] * ratio)), max(1, int(size[1] * ratio))))
  image, targets = s2.resize(image, targets, resized)
  K = s2.scale_intrinsics(K, resized[1] / width, resized[0] / height)
  top, left, bottom, right = dense_transforms.crop_box(*resized, size, rng)
  window = (slice(top, bottom), slice(left, right))
  image, targets = image[window], {name: array[window] for name, array in targets.items()}
  K = s2.crop_intrinsics(K, top, left)
  pad_y, pad_x = size[0] - image.shape[0], size[1] - image.shape[1]
  top, left = int(rng.integers(0, pad_y + 1)), int(rng.integers(0, pad_x + 1))
  pad = lambda a: np.pad(a, ((top, pad_y - top), (left, pad_x - left)) + ((0, 0),) * (a.ndim - 2))
  image, targets = pad(image), {name: pad(array) for name, array in targets.items()}
  K = s2.pad_intrinsics(K, top, left)
  if rng.uniform() < FLIP_PROB:
    image = np.ascontiguousarray(image[:, ::-1])
    targets = {name: np.ascontiguousarray(array[:, ::-1]) for name, array in targets.items()}
    K = s2.flip_intrinsics(K, size[1])
  return _sample(photometric.photometric_distortion(image, rng), targets, K, focal)


def eval_sample(image, targets, K, *, size, focal):
  """Upstream's test pipeline: an aspect-kept resize and a centred zero pad to `size` (K follows)."""
  image, targets, padding = s2.resize_pad(image, _person(targets), size)
  return _sample(image, targets, s2.resize_pad_intrinsics(K, padding), focal)


def _train_row(source, settings, index, rng):
  """Row `index`, or the next index whose sample passes pointmap_sample_ok (on canonical Z)."""
  for step in range(MAX_REFETCHES):
    element = source[(int(index) + step) % len(source)]
    image, targets = source.load(element)
    row = train_sample(image, targets, element["intrinsics"], rng, **settings)
    if s2.pointmap_sample_ok(row[TARGET][..., 2], row["mask"]):
      return row
  raise dense_source.DataError(
      f"{MAX_REFETCHES} samples in a row from index {index} of {source!r} fail pointmap_sample_ok (fewer than"
      f" {s2.POINTMAP_MIN_PIXELS} person pixels, over {s2.POINTMAP_MAX_FOREGROUND:.0%} of the image, or a"
      f" canonical depth under {s2.POINTMAP_MIN_DEPTH})")


def train_example(config, source):
  """`(index, rng) -> training row` (picklable, for Grain's workers). A row failing pointmap_sample_ok is
  never returned, whatever data.on_error says (it is a sample to pass over, not a bad file): the next index
  is tried, as upstream refetches, and its rows count in no "skipped" metric."""
  return functools.partial(_train_row, source, {**dense.recipe_settings(config), "focal": canonical_focal(config)})


def eval_example(config, source, index):
  """Every eval sample is kept (no filter), so runs compare on the same pixels."""
  element = source[index]
  image, targets = source.load(element)
  return eval_sample(image, targets, element["intrinsics"], size=tuple(int(s) for s in config.image_size),
                     focal=canonical_focal(config))


# ---------------------------------------------------------------- evaluation

class Evaluator:
  """metrics.PointmapMetrics (canonical space, on each image's mask) and scale_abs_rel over the images."""

  def __init__(self, config, source):
    del config, source
    self.points = metrics.PointmapMetrics()
    self.scale_errors = []

  def add(self, predictions, batch):
    """predictions: `eval_outputs`' (B, H, W, 4)."""
    for i in np.flatnonzero(batch["valid"]):
      self.points.add(predictions[i, ..., :3], batch[TARGET][i], batch["mask"][i])
      scale = float(batch["scale"][i])
      self.scale_errors.append(abs(float(np.mean(predictions[i, ..., 3], dtype=np.float64)) - scale) / scale)

  def result(self):
    out = self.points.result()
    out["scale_abs_rel"] = float(np.mean(self.scale_errors)) if self.scale_errors else float("nan")
    return out


def baselines(config, train_batches):
  """{"mean_pointmap", "mean_normal_plane": batch -> (B, H, W, 4)}, both with the training split's mean scale
  (its un-augmented examples). mean_pointmap: each pixel's mean canonical point where it is on the person
  (the overall mean point where it never is). mean_normal_plane: the plane through the overall mean point
  whose normal is the training targets' mean normal (metrics.pointmap_normals, as the evaluator takes them):
  the fixed answer for the normal metrics, as the mean normal is for the normal task."""
  del config
  total = count = normal_sum = 0.0
  scales = []
  for batch in train_batches():
    valid = batch["valid"]
    mask = batch["mask"][valid]
    total = total + np.where(mask[..., None], batch[TARGET][valid].astype(np.float64), 0.0).sum(0)
    count = count + mask.sum(0)
    scales.extend(batch["scale"][valid].tolist())
    for points, person in zip(batch[TARGET][valid], mask):
      normals, window = metrics.pointmap_normals(points, person)
      normal_sum = normal_sum + normals[window].sum(0)
  overall = total.reshape(-1, 3).sum(0) / count.sum()
  per_pixel = np.where(count[..., None] > 0, total / np.maximum(count, 1)[..., None], overall)
  plane = _plane_over_the_grid(per_pixel, count, overall, normal_sum / np.linalg.norm(normal_sum))
  scale = np.full(per_pixel.shape[:2] + (1,), np.mean(scales))
  predictions = {name: np.concatenate([points, scale], -1).astype(np.float32)
                 for name, points in (("mean_pointmap", per_pixel), ("mean_normal_plane", plane))}
  return {name: (lambda b, p=p: np.broadcast_to(p, b[TARGET].shape[:3] + (4,))) for name, p in predictions.items()}


def _plane_over_the_grid(points, weight, through, normal):
  """(H, W, 3) points of the plane through `through` with unit `normal`. X and Y are the affine function of
  the pixel (column, row) closest to `points`' X and Y, weighted by `weight` (H, W), so the plane spreads
  over the whole grid and no normal of it is degenerate; Z puts each on the plane."""
  rows, cols = np.indices(weight.shape)
  grid = np.stack([np.ones(weight.shape), cols, rows], -1)
  root = np.sqrt(weight)[..., None]
  coef = np.linalg.lstsq((grid * root).reshape(-1, 3), (points[..., :2] * root).reshape(-1, 2), rcond=None)[0]
  xy = grid @ coef
  nx, ny, nz = normal
  z = through[2] - (nx * (xy[..., 0] - through[0]) + ny * (xy[..., 1] - through[1])) / nz
  return np.concatenate([xy, z[..., None]], -1)


def _on_person(points):
  return points[..., 2] > 0


def _draw_z(points, mask):
  return visualize.colorize_depth(points[..., 2], mask)


def panel(config, example, prediction=None):
  """[image | target Z | predicted Z] on the target's person (inferno, nearest bright); `prediction` is
  the model's output for the example, (canonical XYZ, scale) or the XYZ alone."""
  del config
  if isinstance(prediction, (tuple, list)):
    prediction = prediction[0]
  return dense.masked_panel(example, prediction, TARGET, _on_person, _draw_z)


# ---------------------------------------------------------------- prediction on photos

predict_inputs = dense.padded_inputs  # aspect kept, zero pad (sapiens2.md §3.0); the Padding is the context


def predict_outputs(forward, images, config):
  """(B, H, W, 3) metric XYZ = canonical / scale, on the device."""
  del config
  points, scale = forward(images)
  return s2.metric_from_canonical(points, scale)


def finish(config, image, outputs, context):
  return {"pointmap": dense.unpad_map(config, outputs[0], context, image)}


def write_ply(path, points, colors):
  """A binary little-endian PLY of float32 x, y, z (camera axes: x right, y down, z forward) and uint8
  red, green, blue per point."""
  vertices = np.empty(len(points), [("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                    ("red", "u1"), ("green", "u1"), ("blue", "u1")])
  for i, axis in enumerate("xyz"):
    vertices[axis] = points[:, i]
  for i, channel in enumerate(("red", "green", "blue")):
    vertices[channel] = colors[:, i]
  header = (f"ply\nformat binary_little_endian 1.0\nelement vertex {len(points)}\n"
            + "".join(f"property float {a}\n" for a in "xyz")
            + "".join(f"property uchar {c}\n" for c in ("red", "green", "blue")) + "end_header\n")
  with open(path, "wb") as f:
    f.write(header.encode("ascii"))
    f.write(vertices.tobytes())


def write_prediction(config, stem, file_name, image, prediction, context):
  """STEM_pointmap.npy (float32 (H, W, 3) metric XYZ), STEM_depth.png (metric Z, inferno) and
  STEM_pointmap.ply (every pixel with a finite positive Z, in its photo colour; no person mask here)."""
  del config, file_name, context
  points = np.asarray(prediction["pointmap"], np.float32)
  np.save(stem + "_pointmap.npy", points)
  with np.errstate(invalid="ignore"):
    shown = np.isfinite(points).all(-1) & (points[..., 2] > 0)
  visualize.save_png(stem + "_depth.png", visualize.colorize_depth(points[..., 2], shown))
  write_ply(stem + "_pointmap.ply", points[shown], np.asarray(image)[shown])
  return []
