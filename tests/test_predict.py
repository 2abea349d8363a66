"""The prediction CLI on photos: every task's files, shapes and value ranges, the pose keypoints'
way back to image pixels, MAE features against the ViT applied by hand, bad input, the CLI."""
import json
import os
import subprocess
import sys

import grain
import jax
import numpy as np
from PIL import Image
import pytest

from sapiens_jax import checkpoint
from sapiens_jax import default_config
from sapiens_jax import predict
from sapiens_jax.data import heatmaps as heatmap_codec
from sapiens_jax.data import meta
from sapiens_jax.data import pose_transforms
from sapiens_jax.data import transforms
from sapiens_jax.models import sapiens
from sapiens_jax.tasks import pose
from sapiens_jax.tasks import seg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("pose", "seg", "depth", "normal")
SIZES = {"a.png": (70, 50), "b.jpg": (40, 90)}  # (H, W) of the test photos, unlike the runs' 64x48


def mae_config():
  c = default_config.pretrain("tiny")
  c.image_size = (64, 64)
  c.batch_size = 2
  c.model.decoder_width = 32
  c.model.decoder_depth = 1
  c.model.decoder_heads = 2
  return c


def save_run(config, workdir, seed=0):
  """A run directory whose step-1 checkpoint holds random params of the run's shapes, written by
  the training loop's own checkpoint.save (compiling and training each task would take too long)."""
  rng = np.random.default_rng(seed)
  def draw(path, leaf):  # LayerNorm scales near 1, everything else small noise
    noise = 0.05 * rng.standard_normal(leaf.shape, dtype=np.float32)
    return 1 + noise if jax.tree_util.keystr(path).endswith("['scale']") else noise
  params = jax.tree_util.tree_map_with_path(draw, checkpoint.abstract_weights(config))
  manager = checkpoint.make_manager(workdir, config)
  data_iter = iter(grain.MapDataset.range(1).to_iter_dataset())
  checkpoint.save(manager, 1, {"step": np.int32(1), "params": params}, data_iter, config)
  manager.wait_until_finished()
  return str(workdir)


@pytest.fixture(scope="module")
def runs(finetune_config, tmp_path_factory):
  """{task: (workdir, config, params)} for the four fine-tuning tasks and "mae"."""
  configs = {task: finetune_config(task) for task in TASKS}
  configs["mae"] = mae_config()
  out = {}
  for task, config in configs.items():
    workdir = save_run(config, tmp_path_factory.mktemp(task))
    out[task] = (workdir, *predict.load_run(workdir))
  return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """A folder of two photos of other sizes than the runs', a corrupt one, and a text file."""
  folder = tmp_path_factory.mktemp("photos")
  rng = np.random.default_rng(0)
  for name, (h, w) in SIZES.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  (folder / "notes.txt").write_text("not an image")
  return str(folder)


def read_png(path):
  return np.asarray(Image.open(path))


def test_load_run_restores_the_saved_config_and_params(runs):
  workdir, config, params = runs["seg"]
  assert config.task == "seg" and tuple(config.image_size) == (64, 48)
  assert set(params) == {"encoder", "head"}
  assert set(runs["mae"][2]) == {"encoder", "decoder"}


def test_missing_workdir_or_checkpoint_is_a_clear_error(runs, tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoints in"):
    predict.load_run(str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match=r"no checkpoint for step 7 .*available steps: \[1\]"):
    predict.load_run(runs["seg"][0], step=7)


def test_keypoints_go_back_to_the_image_pixels_of_the_heatmap_peak():
  input_size, heatmap_size = (192, 256), (48, 64)  # (W, H)
  box = (30.0, 50.0, 90.0, 150.0)
  points = np.array([[60.0, 80.0], [41.5, 170.25], [100.0, 120.0]])  # image pixels inside the box
  center, scale = pose_transforms.box_to_center_scale(box, aspect_ratio=input_size[0] / input_size[1])
  matrix = pose_transforms.udp_affine_matrix(center, scale, 0.0, input_size)
  in_crop = pose_transforms.transform_points(points, matrix)
  heatmaps, _ = heatmap_codec.encode(in_crop, np.ones(3), input_size, heatmap_size, sigma=2.0)

  keypoints, scores = pose.keypoints_from_heatmaps(heatmaps[None], [center], [scale], input_size)

  assert keypoints.shape == (1, 3, 2) and scores.shape == (1, 3)
  np.testing.assert_allclose(scores, 1.0, atol=0.05)
  # The decoder's x * input / (input - 1) stretch (heatmaps.py's doc) and the box mapping together
  # undo the UDP warp exactly, so the peaks come back at the very pixels they were drawn from.
  np.testing.assert_allclose(keypoints[0], points, atol=0.05)


def test_pose_writes_coco_results_and_a_picture_per_image(runs, photos, tmp_path):
  _, config, params = runs["pose"]
  count = meta.skeleton("coco17").num_keypoints
  boxes = {"a.png": [[10, 15, 24, 36], [12, 20, 20, 30]]}
  written, skipped = predict.predict_files(config, params, photos, str(tmp_path), boxes, batch_size=2)
  assert written == ["a.png", "b.jpg"] and skipped == ["broken.jpg"]
  with open(tmp_path / "keypoints.json") as f:
    results = json.load(f)
  assert [r["file_name"] for r in results] == ["a.png", "a.png", "b.jpg"]
  assert [r["bbox"] for r in results] == [*boxes["a.png"], [0, 0, 90, 40]]  # b: the whole image
  for r in results:
    assert r["category_id"] == 1 and 0 <= r["score"] <= 1
    assert len(r["keypoints"]) == 3 * count and np.all(np.isfinite(r["keypoints"]))
  for name, (h, w) in SIZES.items():
    assert read_png(tmp_path / (os.path.splitext(name)[0] + "_pose.png")).shape == (h, w, 3)


def test_pose_keypoints_land_where_the_network_points_in_each_box(runs, photos, tmp_path, monkeypatch):
  """A stub network puts keypoint k's heatmap peak at crop pixel q_k of every crop; each must come
  back at the image pixel the box's UDP warp sends there."""
  _, config, params = runs["pose"]
  config = config.copy_and_resolve_references()
  config.image_size = (256, 192)  # the stub ignores the params; larger heatmaps decode finer
  input_size = (192, 256)  # (W, H)
  count = meta.skeleton("coco17").num_keypoints
  in_crop = np.stack([30 + 8 * np.arange(count), 40 + 10.5 * np.arange(count)], axis=1)
  peaks, _ = heatmap_codec.encode(in_crop, np.ones(count), input_size, (48, 64), sigma=2.0)
  stub = lambda params, images: np.broadcast_to(peaks, (images.shape[0], *peaks.shape))
  monkeypatch.setattr(predict, "_network", lambda config_json, task: stub)
  boxes = {"a.png": [[10, 15, 24, 36], [12, 20, 20, 30]], "b.jpg": [[40, 12, 12, 16]]}
  predict.predict_files(config, params, photos, str(tmp_path), boxes, batch_size=2)
  with open(tmp_path / "keypoints.json") as f:
    results = json.load(f)
  assert len(results) == 3
  for r in results:
    center, scale = pose_transforms.box_to_center_scale(r["bbox"], aspect_ratio=0.75)
    expected = (in_crop - (np.array(input_size) - 1) / 2) * scale / (np.array(input_size) - 1) + center
    keypoints = np.array(r["keypoints"]).reshape(count, 3)
    np.testing.assert_allclose(keypoints[:, :2], expected, atol=0.05)
    np.testing.assert_allclose(keypoints[:, 2], 1.0, atol=0.05)
    h, w = SIZES[r["file_name"]]  # these padded boxes lie inside their photos
    assert np.all((keypoints[:, :2] >= 0) & (keypoints[:, :2] <= [w - 1, h - 1]))


def test_pose_predict_image_matches_the_batched_files(runs, photos, tmp_path):
  _, config, params = runs["pose"]
  image = np.asarray(Image.open(os.path.join(photos, "b.jpg")).convert("RGB"))
  alone = predict.predict_image(config, params, image, batch_size=1)
  predict.predict_files(config, params, photos, str(tmp_path), batch_size=1)
  with open(tmp_path / "keypoints.json") as f:
    result = [r for r in json.load(f) if r["file_name"] == "b.jpg"][0]
  from_files = np.array(result["keypoints"]).reshape(-1, 3)
  np.testing.assert_allclose(from_files[:, :2], alone["keypoints"][0], rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(from_files[:, 2], alone["keypoint_scores"][0], atol=1e-6)


def test_seg_labels_have_the_photo_size_and_valid_classes(runs, photos, tmp_path):
  _, config, params = runs["seg"]
  predict.predict_files(config, params, photos, str(tmp_path), batch_size=4)
  num_classes = meta.seg_classes("seg28").num_classes
  for name, (h, w) in SIZES.items():
    stem = os.path.splitext(name)[0]
    labels = read_png(tmp_path / f"{stem}_seg.png")
    assert labels.shape == (h, w) and labels.dtype == np.uint8 and labels.max() < num_classes
    assert read_png(tmp_path / f"{stem}_seg_overlay.png").shape == (h, w, 3)


@pytest.mark.parametrize("size", [(13, 9), (4, 3)])  # up and down, no antialiasing either way
def test_seg_labels_are_the_argmax_of_the_bilinearly_resized_logits(size):
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((6, 5, 4)).astype(np.float32)
  labels = seg.resize_labels(logits, *size)
  # align_corners=False bilinear, written out: source coordinate (i + 0.5) * in / out - 0.5.
  def axis(out, size):
    src = np.clip((np.arange(out) + 0.5) * size / out - 0.5, 0, size - 1)
    low = np.floor(src).astype(int)
    high = np.minimum(low + 1, size - 1)
    return low, high, src - low
  y0, y1, fy = axis(size[0], 6)
  x0, x1, fx = axis(size[1], 5)
  rows = logits[y0] * (1 - fy)[:, None, None] + logits[y1] * fy[:, None, None]
  resized = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
  np.testing.assert_array_equal(labels, resized.argmax(-1))


@pytest.mark.parametrize("task", ["depth", "normal"])
def test_depth_and_normal_maps_have_the_photo_size(task, runs, photos, tmp_path):
  _, config, params = runs[task]
  predict.predict_files(config, params, photos, str(tmp_path), batch_size=2)
  for name, (h, w) in SIZES.items():
    stem = os.path.splitext(name)[0]
    values = np.load(tmp_path / f"{stem}_{task}.npy")
    assert read_png(tmp_path / f"{stem}_{task}.png").shape == (h, w, 3)
    if task == "depth":
      assert values.shape == (h, w) and np.all(np.isfinite(values))
    else:
      assert values.shape == (h, w, 3)
      np.testing.assert_allclose(np.linalg.norm(values, axis=-1), 1.0, atol=1e-5)


def test_mae_features_are_the_encoder_tokens_without_cls(runs):
  _, config, params = runs["mae"]
  image = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # the run's size
  features = predict.predict_image(config, params, image)["features"]  # MAE runs default to features
  dims = sapiens.SIZES["tiny"]
  encoder = sapiens.ViT(dims.width, dims.depth, dims.num_heads, image_size=(64, 64), use_cls_token=True)
  tokens = encoder.apply({"params": params["encoder"]}, transforms.normalize(image)[None])[0]
  width = dims.width
  expected = np.asarray(tokens)[1:].reshape(4, 4, width).transpose(2, 0, 1)
  assert features.shape == (width, 4, 4)
  np.testing.assert_allclose(features, expected, atol=1e-5)


def test_features_of_a_task_run_and_a_stretched_photo(runs, photos, tmp_path):
  _, config, params = runs["depth"]
  predict.predict_files(config, params, photos, str(tmp_path), task="features", batch_size=2)
  for name in SIZES:
    features = np.load(tmp_path / (os.path.splitext(name)[0] + "_features.npy"))
    assert features.shape == (sapiens.SIZES["tiny"].width, 64 // 16, 48 // 16)


def test_a_task_the_run_cannot_predict_is_refused(runs):
  _, config, params = runs["seg"]
  with pytest.raises(ValueError, match="a seg run predicts seg or features, not 'depth'"):
    predict.predict_image(config, params, np.zeros((8, 8, 3), np.uint8), task="depth")


def test_bad_boxes_are_named(tmp_path):
  path = tmp_path / "boxes.json"
  path.write_text(json.dumps({"a.png": [[1, 2, 3, 4]], "b.png": [[1, 2, 0, 4]]}))
  with pytest.raises(ValueError, match="'b.png' must be a list of"):
    predict.load_boxes(str(path))
  path.write_text("[1, 2]")
  with pytest.raises(ValueError, match="expected a JSON object"):
    predict.load_boxes(str(path))


def test_command_line(runs, photos, tmp_path):
  workdir = runs["normal"][0]
  result = subprocess.run(
      [sys.executable, "-m", "sapiens_jax.predict", f"--workdir={workdir}", f"--input={photos}",
       f"--output={tmp_path}", "--batch_size=2"],
      cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Wrote predictions for 2 images" in result.stdout
  assert "skipped 1 unreadable: broken.jpg" in result.stdout
  assert "broken.jpg" in result.stderr  # the warning names the file
  assert sorted(os.listdir(tmp_path)) == ["a_normal.npy", "a_normal.png", "b_normal.npy", "b_normal.png"]
