"""The Sapiens2 pointmap task: cameras read and kept through conversion, a training recipe whose K follows
every resize, crop, pad and flip, the filter on bad samples, the loss and evaluator wiring, the baseline,
training end to end, and metric pointmaps, depth pictures and PLY clouds of photos."""
import json
import os
import shutil
import types

import numpy as np
from PIL import Image
import pytest

from sapiens_jax import losses
from sapiens_jax import metrics
from sapiens_jax import predict
from sapiens_jax import train
from sapiens_jax import visualize
from sapiens_jax import writers
from sapiens_jax.data import convert
from sapiens_jax.data import dense_source
from sapiens_jax.data import pipeline
from sapiens_jax.data import sapiens2_transforms as s2
from sapiens_jax.tasks import pointmap

PHOTOS = {"tall.png": (70, 50), "wide.jpg": (40, 90)}  # (H, W), other sizes and aspects than the run's 64x48


@pytest.fixture(scope="module")
def data(finetune_config, tmp_path_factory):
  """(config, the rendered train and eval splits' root)."""
  config = finetune_config("pointmap")
  config.data.path = str(tmp_path_factory.mktemp("pointmap_data"))
  pipeline.ensure_synthetic_data(config, "")
  return config, config.data.path


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
  """(config, workdir) of a 2-step run evaluated once (compiling dominates; more steps add nothing here)."""
  config = data[0].copy_and_resolve_references()
  config.total_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  workdir = str(tmp_path_factory.mktemp("pointmap_run"))
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _copy(root, tmp_path):
  folder = tmp_path / "copy"
  shutil.copytree(os.path.join(root, "train"), folder)
  return folder


def _lands_on_its_source_pixel(points, element, depth):
  """Whether every metric camera point, projected through the sample's own K, has the depth of the source
  pixel nearest to where it lands (the pixel the nearest resampling took; either one on a near tie)."""
  u, v = np.moveaxis(s2.project(points, element["intrinsics"]), -1, 0)
  hits = np.zeros(len(points), bool)
  for du in (-1e-4, 1e-4):
    for dv in (-1e-4, 1e-4):
      col, row = np.floor(u + 0.5 + du).astype(int), np.floor(v + 0.5 + dv).astype(int)
      inside = (row >= 0) & (row < depth.shape[0]) & (col >= 0) & (col < depth.shape[1])
      found = depth[np.clip(row, 0, depth.shape[0] - 1), np.clip(col, 0, depth.shape[1] - 1)]
      hits |= inside & np.isclose(found, points[:, 2], rtol=1e-5, atol=0)
  return bool(hits.all())


def test_training_rows_hold_the_samples_own_depths_where_their_camera_says(data):
  """A training row's metric points (pointmap / scale, X negated when flipped) project through the
  sample's original K onto the source pixels whose depths they carry: K follows every resize, crop, pad
  and flip exactly as the pixels move, and depth is resampled nearest (no value invented)."""
  config, root = data
  config = config.copy_and_resolve_references()
  config.data.scale_range = (0.5, 1.6)  # crops (ratio > 1) and pads (ratio < 1) both
  source = pointmap.make_source(config, os.path.join(root, "train"), "train")
  example = pointmap.train_example(config, source)
  element = source[2]
  depth = source.load(element)[1]["depth"]
  flips = []
  for seed in range(8):
    row = example(2, np.random.default_rng(seed))
    assert set(row) == {"image", "pointmap", "mask", "scale", "intrinsics"}
    metric = row["pointmap"][row["mask"]].astype(np.float64) / row["scale"]
    mirrored = metric * np.array([-1.0, 1.0, 1.0])
    straight, flipped = (_lands_on_its_source_pixel(p, element, depth) for p in (metric, mirrored))
    assert straight != flipped, seed  # exactly one reading fits
    flips.append(flipped)
    assert row["scale"] == pytest.approx(pointmap.canonical_focal(config) / row["intrinsics"][0, 0], rel=1e-6)
    assert not np.any(row["pointmap"][~row["mask"]])
  assert set(flips) == {True, False}  # both branches were seen


def test_the_canonical_focal_is_upstreams_768_at_1024x768_and_follows_the_width():
  assert pointmap.canonical_focal(types.SimpleNamespace(image_size=(1024, 768))) == 768.0
  assert pointmap.canonical_focal(types.SimpleNamespace(image_size=(64, 48))) == 48.0


def test_samples_failing_the_pointmap_filter_never_train(data, tmp_path):
  """Sample 0 with its depth scaled to 2-3 cm (canonical Z under 0.04) is replaced by the next index;
  when every sample fails, the error names the filter."""
  config, root = data
  folder = _copy(root, tmp_path)
  depth = np.load(folder / "depths" / "000000.npy")
  np.save(folder / "depths" / "000000.npy", depth * 0.01)
  source = pointmap.make_source(config, str(folder), "train")
  example = pointmap.train_example(config, source)
  for seed in range(3):
    row = example(0, np.random.default_rng(seed))
    assert s2.pointmap_sample_ok(row["pointmap"][..., 2], row["mask"])
    assert row["pointmap"][..., 2].max() > 0.5  # not sample 0's centimetres
  for name in os.listdir(folder / "depths"):
    np.save(folder / "depths" / name, np.load(folder / "depths" / name) * 0.01)
  with pytest.raises(dense_source.DataError, match="pointmap_sample_ok"):
    pointmap.train_example(config, pointmap.make_source(config, str(folder), "train"))(0, np.random.default_rng(0))


def test_eval_rows_keep_the_photo_aspect_and_their_camera(data):
  config, root = data
  source = pointmap.make_source(config, os.path.join(root, "eval"), "eval")
  row = pointmap.eval_example(config, source, 1)
  element = source[1]
  metric = row["pointmap"][row["mask"]].astype(np.float64) / row["scale"]
  assert _lands_on_its_source_pixel(metric, element, source.load(element)[1]["depth"])
  assert row["mask"].sum() > 100


def _loss_batch(config, source, count=2):
  rows = [pointmap.eval_example(config, source, i) for i in range(count)]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_loss_is_the_sum_of_the_upstream_terms_and_prefers_the_truth(data):
  config, root = data
  batch = _loss_batch(config, pointmap.make_source(config, os.path.join(root, "train"), "train"))
  truth = (batch["pointmap"], batch["scale"][:, None])
  rng = np.random.default_rng(0)
  wrong = (batch["pointmap"] * 1.3 + rng.normal(0, 0.05, batch["pointmap"].shape).astype(np.float32),
           1.5 * batch["scale"][:, None])
  perfect, bad = float(pointmap.loss(config, truth, batch)), float(pointmap.loss(config, wrong, batch))
  assert perfect < 1e-3 < bad
  terms = losses.sapiens2_pointmap_loss(wrong[0], wrong[1], batch["pointmap"], batch["mask"], batch["scale"],
                                        batch["intrinsics"])
  assert bad == pytest.approx(float(sum(terms.values())), rel=1e-6)
  # The batch's K is the one the target was back-projected with (the original, not the canonical one).
  assert float(losses.intrinsics_consistency_l1(batch["pointmap"], batch["mask"], batch["intrinsics"])) < 1e-4


def test_eval_outputs_pack_the_resized_pointmap_and_the_scale(data):
  config, _ = data
  points = np.random.default_rng(0).normal(size=(2, 32, 24, 3)).astype(np.float32)
  scale = np.array([[0.5], [2.0]], np.float32)
  out = np.asarray(pointmap.eval_outputs(lambda x: (points, scale), None, config))
  assert out.shape == (2, 64, 48, 4)
  np.testing.assert_allclose(out[..., :3], losses.resize_to(points, (64, 48)))
  np.testing.assert_array_equal(out[1, ..., 3], 2.0)


def test_evaluator_scores_the_truth_perfectly_and_a_hand_made_case_by_hand(data):
  config, root = data
  batch = _loss_batch(config, pointmap.make_source(config, os.path.join(root, "eval"), "eval"))
  batch["valid"] = np.array([True, True])
  scale = np.broadcast_to(batch["scale"][:, None, None, None], batch["mask"].shape + (1,))
  perfect = pointmap.Evaluator(config, None)
  perfect.add(np.concatenate([batch["pointmap"], scale], -1), batch)
  result = perfect.result()
  assert set(pointmap.METRICS) <= set(result)
  assert result["l2_mean"] == 0 and result["within_05_cm"] == 100 and result["scale_abs_rel"] == 0
  assert result["normal_mae"] == pytest.approx(0, abs=1e-3) and result["within_5_deg"] == 100

  # Image 0 shifted 3 cm along X, image 1 15 cm along Z (shifts keep every normal); scales off by 10 %, 50 %.
  shifted = batch["pointmap"] + np.array([[0.03, 0, 0], [0, 0, 0.15]], np.float32)[:, None, None]
  guess = np.concatenate([shifted, scale * np.array([1.1, 0.5])[:, None, None, None]], -1)
  evaluator = pointmap.Evaluator(config, None)
  evaluator.add(guess, batch)
  result = evaluator.result()
  n0, n1 = batch["mask"][0].sum(), batch["mask"][1].sum()
  n = n0 + n1
  assert result["l2_mean"] == pytest.approx((0.03 * n0 + 0.15 * n1) / n, rel=1e-5)
  assert result["x_mae"] == pytest.approx(0.03 * n0 / n, rel=1e-5)
  assert result["z_mae"] == pytest.approx(0.15 * n1 / n, rel=1e-5)
  assert result["rmse"] == pytest.approx(np.sqrt((0.03 ** 2 * n0 + 0.15 ** 2 * n1) / n), rel=1e-5)
  assert result["within_05_cm"] == result["within_10_cm"] == pytest.approx(100 * n0 / n)
  assert result["within_20_cm"] == 100
  assert result["normal_mae"] == pytest.approx(0, abs=1e-3)
  assert result["scale_abs_rel"] == pytest.approx((0.1 + 0.5) / 2, rel=1e-5)


def _train_rows_and_baselines(data):
  """The training split's un-augmented rows, and pointmap.baselines fitted on them."""
  config, root = data
  source = pointmap.make_source(config, os.path.join(root, "train"), "train")
  rows = [pointmap.eval_example(config, source, i) for i in range(len(source))]

  def batches():
    for start in range(0, len(rows), 3):  # batches of 3, the last padded as eval_batches pads
      chunk = rows[start:start + 3]
      valid = np.arange(3) < len(chunk)
      chunk = chunk + [chunk[0]] * (3 - len(chunk))
      yield {**{k: np.stack([r[k] for r in chunk]) for k in chunk[0]}, "valid": valid}
  return rows, pointmap.baselines(config, batches)


def test_mean_pointmap_baseline_is_the_per_pixel_mean_of_the_training_targets(data):
  rows, predictors = _train_rows_and_baselines(data)
  masks = np.stack([r["mask"] for r in rows])
  points = np.stack([r["pointmap"] for r in rows]).astype(np.float64)
  counts = masks.sum(0)
  expected = np.zeros(masks.shape[1:] + (3,))
  for y, x in zip(*np.nonzero(counts)):
    expected[y, x] = points[:, y, x][masks[:, y, x]].mean(0)
  overall = points[masks].mean(0)
  expected[counts == 0] = overall
  out = predictors["mean_pointmap"]({"pointmap": np.zeros((2, 64, 48, 3), np.float32)})
  assert out.shape == (2, 64, 48, 4)
  np.testing.assert_allclose(out[0, ..., :3], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[1, ..., 3], np.mean([r["scale"] for r in rows]), rtol=1e-6)


def test_mean_normal_plane_baseline_has_the_training_targets_mean_normal_everywhere(data):
  rows, predictors = _train_rows_and_baselines(data)
  normal_sum = np.zeros(3)
  for row in rows:  # the evaluator's normals of each target, where it takes them
    normals, window = metrics.pointmap_normals(row["pointmap"], row["mask"])
    normal_sum += normals[window].sum(0)
  mean_normal = normal_sum / np.linalg.norm(normal_sum)
  masks = np.stack([r["mask"] for r in rows])
  overall = np.stack([r["pointmap"] for r in rows]).astype(np.float64)[masks].mean(0)
  out = predictors["mean_normal_plane"]({"pointmap": np.zeros((1, 64, 48, 3), np.float32)})[0]
  np.testing.assert_allclose((out[..., :3] - overall) @ mean_normal, 0, atol=1e-4)  # on the plane
  pixel_columns, pixel_rows = np.meshgrid(np.arange(48), np.arange(64))
  for axis in range(2):  # X and Y affine in the pixel, increasing right and down as the targets' do
    grid = np.stack([np.ones(64 * 48), pixel_columns.ravel(), pixel_rows.ravel()], 1)
    coef = np.linalg.lstsq(grid, out[..., axis].ravel(), rcond=None)[0]
    np.testing.assert_allclose((grid @ coef).reshape(64, 48), out[..., axis], atol=1e-5)
    assert coef[1 + axis] > 0
  everywhere = np.ones(out.shape[:2], bool)
  normals, window = metrics.pointmap_normals(out[..., :3], everywhere)
  np.testing.assert_allclose(normals[window] @ mean_normal, 1, atol=1e-4)  # the mean normal, same side


def test_trains_evaluates_with_every_metric_and_draws_panels(trained):
  config, workdir = trained
  records = writers.read_metrics(workdir)
  losses_seen = [r["loss"] for r in records if "loss" in r]
  assert len(losses_seen) == 2 and np.all(np.isfinite(losses_seen))
  evals = [r for r in records if "eval_l2_mean" in r]
  assert [r["step"] for r in evals] == [2]
  for key in pointmap.METRICS:
    assert np.isfinite(evals[-1][f"eval_{key}"]), key
  grid = np.asarray(Image.open(os.path.join(workdir, "predictions", "step_0000002.png")))
  assert grid.shape[1] >= 3 * config.image_size[1] and grid.std() > 0


def test_panel_draws_the_target_and_predicted_canonical_z(data):
  config, root = data
  row = pointmap.eval_example(config, pointmap.make_source(config, os.path.join(root, "eval"), "eval"), 0)
  prediction = (row["pointmap"] * np.float32(2), np.ones(1, np.float32))  # the same Z order everywhere
  picture = pointmap.panel(config, row, prediction)
  h, w = config.image_size
  tile = lambda col: picture[:h, col * (w + visualize._GAP):col * (w + visualize._GAP) + w]
  np.testing.assert_array_equal(tile(0), row["image"])
  np.testing.assert_array_equal(tile(1), visualize.colorize_depth(row["pointmap"][..., 2], row["mask"]))
  np.testing.assert_array_equal(tile(2), tile(1))  # min-max colours on the same mask: a scaled Z draws the same


def _photos(folder):
  rng = np.random.default_rng(0)
  for name, (h, w) in PHOTOS.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
  return folder


def _read_ply(path):
  with open(path, "rb") as f:
    data = f.read()
  header, body = data.split(b"end_header\n", 1)
  lines = header.decode("ascii").splitlines()
  assert lines[:2] == ["ply", "format binary_little_endian 1.0"]
  count = int(lines[2].split()[-1])
  vertices = np.frombuffer(body, [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1")])
  assert len(vertices) == count
  return vertices


def test_photos_get_metric_pointmaps_depth_pictures_and_coloured_clouds(trained, tmp_path):
  config, workdir = trained
  config, params = predict.load_run(workdir)
  folder = _photos(tmp_path)
  out = tmp_path / "out"
  written, _ = predict.predict_files(config, params, str(folder), str(out), batch_size=2)
  assert sorted(written) == sorted(PHOTOS)
  for name, (h, w) in PHOTOS.items():
    stem = os.path.splitext(name)[0]
    points = np.load(out / f"{stem}_pointmap.npy")
    assert points.shape == (h, w, 3) and points.dtype == np.float32
    assert np.asarray(Image.open(out / f"{stem}_depth.png")).shape == (h, w, 3)
    cloud = _read_ply(out / f"{stem}_pointmap.ply")
    shown = np.isfinite(points).all(-1) & (points[..., 2] > 0)
    assert len(cloud) == shown.sum()
    np.testing.assert_array_equal(np.stack([cloud["x"], cloud["y"], cloud["z"]], -1), points[shown])
    photo = predict.read_image(str(folder / name))
    np.testing.assert_array_equal(np.stack([cloud["r"], cloud["g"], cloud["b"]], -1), photo[shown])


def test_prediction_is_canonical_over_scale_with_the_pad_cut_off(data):
  """predict_outputs divides each image's canonical XYZ by its own scale; finish cuts the pad of
  predict_inputs off and sizes the map back to the photo."""
  config, _ = data
  rng = np.random.default_rng(0)
  canonical = rng.normal(size=(2, 64, 48, 3)).astype(np.float32)
  scale = np.array([[0.5], [4.0]], np.float32)
  metric = np.asarray(pointmap.predict_outputs(lambda x: (canonical, scale), None, config))
  np.testing.assert_allclose(metric, canonical / scale[:, :, None, None], rtol=1e-6)
  photo = rng.integers(0, 256, (40, 90, 3), dtype=np.uint8)  # wide: padded above and below
  (canvas,), padding = pointmap.predict_inputs(config, photo, None)
  assert canvas.shape == (64, 48, 3) and padding.top > 0 and padding.left == padding.right == 0
  ramp = np.zeros((64, 48, 3), np.float32)
  ramp[..., 0] = np.arange(48) + 1.0  # a map linear in x: bilinear resizing keeps it linear
  ramp[:padding.top], ramp[64 - padding.bottom:] = np.nan, np.nan  # the pad must not reach the photo
  points = pointmap.finish(config, photo, ramp[None], padding)["pointmap"]
  assert points.shape == (40, 90, 3) and np.all(np.isfinite(points))
  expected = (np.arange(90) + 0.5) * 48 / 90 + 0.5  # column centres of the photo on the canvas, +1
  np.testing.assert_allclose(points[0, :, 0], np.clip(expected, 1, 48), atol=1e-4)


def test_write_prediction_leaves_points_behind_the_camera_out_of_the_cloud(tmp_path):
  points = np.zeros((2, 3, 3), np.float32)
  points[..., 2] = [[1.0, -1.0, 2.0], [np.nan, 0.0, 3.0]]
  image = np.arange(18, dtype=np.uint8).reshape(2, 3, 3)
  pointmap.write_prediction(None, str(tmp_path / "a"), "a.png", image, {"pointmap": points}, None)
  cloud = _read_ply(tmp_path / "a_pointmap.ply")
  np.testing.assert_array_equal(cloud["z"], [1.0, 2.0, 3.0])
  np.testing.assert_array_equal(cloud["r"], image[[0, 0, 1], [0, 2, 2], 0])


def test_conversion_keeps_every_samples_camera(data, tmp_path):
  config, root = data
  folder = os.path.join(root, "train")
  convert.convert("pointmap", folder, str(tmp_path / "shards"), records_per_shard=3)
  shards = pointmap.make_source(config, str(tmp_path / "shards"), "train")
  files = pointmap.make_source(config, folder, "train")
  assert type(shards.source).__name__ == "RecordDenseSource" and len(shards) == len(files)
  for i in range(len(files)):
    assert shards[i]["intrinsics"] == files[i]["intrinsics"]
    a, b = pointmap.eval_example(config, shards, i), pointmap.eval_example(config, files, i)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_a_missing_label_file_is_named(data, tmp_path):
  config, root = data
  folder = _copy(root, tmp_path)
  os.remove(folder / "depths" / "000003.npy")
  with pytest.raises(dense_source.DataError, match="000003.npy"):
    pointmap.make_source(config, str(folder), "train")


@pytest.mark.parametrize("edit, message", [
    (lambda cameras: cameras.pop("000002"), "no camera for 1 images: '000002'"),
    (lambda cameras: cameras["000002"].update(fx=0), "camera '000002' must be"),
    (lambda cameras: cameras["000002"].pop("cy"), "camera '000002' must be"),
    (lambda cameras: cameras["000002"].update(cx="12"), "camera '000002' must be"),
])
def test_a_missing_or_malformed_camera_is_named(data, tmp_path, edit, message):
  config, root = data
  folder = _copy(root, tmp_path)
  with open(folder / "cameras.json") as f:
    cameras = json.load(f)
  edit(cameras)
  with open(folder / "cameras.json", "w") as f:
    json.dump(cameras, f)
  with pytest.raises(dense_source.DataError, match="cameras.json") as error:
    pointmap.make_source(config, str(folder), "train")
  assert message in str(error.value)


def test_a_dataset_without_cameras_json_is_named(data, tmp_path):
  config, root = data
  folder = _copy(root, tmp_path)
  os.remove(folder / "cameras.json")
  with pytest.raises(dense_source.DataError, match="cameras.json does not exist"):
    pointmap.make_source(config, str(folder), "train")


def test_metrics_are_the_upstream_evaluators_plus_the_scale():
  upstream = set(metrics.pointmap_metrics(np.zeros((6, 6, 3)), np.ones((6, 6, 3)), np.ones((6, 6), bool)))
  assert set(pointmap.METRICS) - upstream == {"scale_abs_rel"}
  assert pointmap.METRICS["l2_mean"] == "min" and pointmap.METRICS["within_05_cm"] == "max"
