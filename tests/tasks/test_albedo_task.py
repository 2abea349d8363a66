"""The Sapiens2 albedo task: trained and evaluated end to end on synthetic humans, its loss wiring, the
evaluator at the label's size (pad cut off, resized back), the baselines against numpy, the training recipe,
pictures, prediction on photos of other sizes, and bad dataset folders."""
import os

import numpy as np
from PIL import Image
import pytest

from sapiens_jax import baselines
from sapiens_jax import losses
from sapiens_jax import predict
from sapiens_jax import train
from sapiens_jax import visualize
from sapiens_jax import writers
from sapiens_jax.data import convert
from sapiens_jax.data import dense_source
from sapiens_jax.data import pipeline
from sapiens_jax.data import sapiens2_transforms
from sapiens_jax.tasks import albedo

HEIGHT, WIDTH = 64, 48  # finetune_config's image size


@pytest.fixture(scope="module")
def trained(finetune_config, tmp_path_factory):
  """(config, workdir) of one 6-step run on synthetic humans rendered with their albedos."""
  config = finetune_config("albedo")
  config.data.path = str(tmp_path_factory.mktemp("albedo_data"))
  workdir = tmp_path_factory.mktemp("albedo_run")
  train.train_and_evaluate(config, str(workdir))
  return config, str(workdir)


def _write_sample(root, name, image, mask, albedo_rgb):
  """One sample of the task's folder layout: uint8 image, bool mask, float albedo in [0, 1] as 8-bit PNGs."""
  for folder in ("images", "masks", "albedos"):
    os.makedirs(os.path.join(root, folder), exist_ok=True)
  Image.fromarray(image).save(os.path.join(root, "images", name + ".png"))
  Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(os.path.join(root, "masks", name + ".png"))
  Image.fromarray(np.round(albedo_rgb * 255).astype(np.uint8)).save(os.path.join(root, "albedos", name + ".png"))


def _textured(rng, height, width):
  return rng.integers(0, 256, (height, width, 3)).astype(np.float32) / 255


def test_trains_evaluates_and_draws_its_predictions(trained):
  config, workdir = trained
  assert config.best_metric == "mae" and config.recipe == "sapiens2"
  records = writers.read_metrics(workdir)
  assert len([r for r in records if "loss" in r]) == 6 and all(np.isfinite(r["loss"]) for r in records if "loss" in r)
  evals = [r for r in records if "eval_mae" in r]
  assert [r["step"] for r in evals] == [3, 6]
  for record in evals:
    assert all(np.isfinite(record["eval_" + name]) for name in albedo.METRICS), record
  grid = np.asarray(Image.open(os.path.join(workdir, "predictions", "step_0000006.png")))
  assert grid.shape[1] == 3 * WIDTH + 2 * visualize._GAP and grid.std() > 0  # image | target | prediction


def test_loss_is_the_sum_of_the_albedo_terms_on_the_person():
  rng = np.random.default_rng(0)
  target = rng.uniform(0.1, 0.9, (2, 16, 12, 3)).astype(np.float32)
  mask = np.zeros((2, 16, 12), bool)
  mask[:, 4:12, 3:9] = True
  batch = {"albedo": np.where(mask[..., None], target, 0).astype(np.float32), "mask": mask}
  wrong = rng.uniform(0, 1, target.shape).astype(np.float32)
  terms = losses.sapiens2_albedo_loss(wrong, batch["albedo"], mask)
  assert float(albedo.loss(None, wrong, batch)) == pytest.approx(float(sum(terms.values())), rel=1e-6)
  assert float(albedo.loss(None, wrong, batch)) > 0.1
  # Off the person a prediction may be anything: only the mask's pixels count.
  perfect_on_person = np.where(mask[..., None], batch["albedo"], 7.0).astype(np.float32)
  assert float(albedo.loss(None, perfect_on_person, batch)) == pytest.approx(0.0, abs=1e-6)


def test_evaluator_is_perfect_on_the_label_when_the_pad_holds_anything(finetune_config, tmp_path):
  """An 8x4 label in an 8x8 canvas (2 pad columns each side): the canvas' target with garbage in the pads
  scores perfectly; so does a label already at the canvas size (no pad)."""
  rng = np.random.default_rng(1)
  mask = np.zeros((8, 4), bool)
  mask[1:7, 1:4] = True
  _write_sample(str(tmp_path), "narrow", rng.integers(0, 256, (8, 4, 3), dtype=np.uint8), mask, _textured(rng, 8, 4))
  square = np.zeros((8, 8), bool)
  square[2:7, 1:6] = True
  _write_sample(str(tmp_path), "square", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), square, _textured(rng, 8, 8))
  config = finetune_config("albedo")
  config.image_size = (8, 8)
  source = albedo.make_source(config, str(tmp_path), "eval")
  rows = [albedo.eval_example(config, source, i) for i in range(2)]
  np.testing.assert_array_equal(rows[0]["padding"][:4], [0, 0, 2, 2])
  np.testing.assert_array_equal(rows[1]["padding"][:4], [0, 0, 0, 0])
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  batch["valid"] = np.array([True, True])
  predictions = np.where(batch["mask"][..., None], batch["albedo"], 0.9).astype(np.float32)
  predictions[0, :, :2] = predictions[0, :, 6:] = 5.0  # the pads
  evaluator = albedo.Evaluator(config, source)
  evaluator.add(predictions, batch)
  result = evaluator.result()
  assert result["num_images"] == 2
  assert result["mae"] == pytest.approx(0, abs=1e-6) and result["grad_l1"] == pytest.approx(0, abs=1e-6)
  assert result["psnr"] == np.inf and result["ssim"] == pytest.approx(1, abs=1e-6)


def test_evaluator_matches_a_hand_computation_at_the_label_size(finetune_config, tmp_path):
  rng = np.random.default_rng(2)
  grey = np.full((16, 8, 3), 128 / 255, np.float32)
  tall_mask = np.zeros((16, 8), bool)
  tall_mask[:, :4] = True
  _write_sample(str(tmp_path), "a_tall", rng.integers(0, 256, (16, 8, 3), dtype=np.uint8), tall_mask, grey)
  small_mask = np.ones((4, 4), bool)
  small_mask[3] = False  # 12 person pixels
  small = _textured(rng, 4, 4)
  _write_sample(str(tmp_path), "b_small", rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), small_mask, small)
  config = finetune_config("albedo")
  source = albedo.make_source(config, str(tmp_path), "eval")
  evaluator = albedo.Evaluator(config, source)

  # a_tall (16x8) in an 8x8 canvas: halved to 8x4, 2 pad columns each side. The network says grey + 0.1
  # on the photo and 0.9 in the pads; back at 16x8 that is +0.1 on every person pixel.
  canvas = np.full((2, 8, 8, 3), 0.9, np.float32)
  canvas[0, :, 2:6] = 128 / 255 + 0.1
  padding = np.array([sapiens2_transforms.Padding(0, 0, 2, 2, 0.5, 0.5)] * 2, np.float64)
  evaluator.add(canvas, {"valid": np.array([True, False]), "index": np.array([0, 0]), "padding": padding})
  tall = evaluator.result()
  assert tall["num_images"] == 1  # the padded row is not counted
  assert tall["mae"] == pytest.approx(0.1, abs=1e-5) and tall["rmse"] == pytest.approx(0.1, abs=1e-5)
  assert tall["psnr"] == pytest.approx(20.0, abs=1e-3)

  # b_small at the canvas size: one channel of one person pixel off by 0.3, a background pixel off by 5.
  evaluator = albedo.Evaluator(config, source)
  prediction = np.round(small * 255) / 255
  prediction[0, 0, 0] += 0.3
  prediction[3, 3] += 5.0
  no_pad = np.array([sapiens2_transforms.Padding(0, 0, 0, 0, 1.0, 1.0)], np.float64)
  evaluator.add(prediction[None].astype(np.float32), {"valid": np.array([True]), "index": np.array([1]),
                                                      "padding": no_pad})
  out = evaluator.result()
  assert out["mae"] == pytest.approx(0.3 / 36, abs=1e-6)
  assert out["rmse"] == pytest.approx(np.sqrt(0.09 / 36), abs=1e-6)
  assert out["psnr"] == pytest.approx(10 * np.log10(36 / 0.09), abs=1e-3)


def test_baselines_are_the_training_split_mean_albedos(trained):
  config, _ = trained
  predictors = albedo.baselines(config, baselines.train_batches(config))
  root = pipeline.data_root(config, "train")
  total, count = np.zeros(3), 0
  pixel_sum, pixel_count = np.zeros((HEIGHT, WIDTH, 3)), np.zeros((HEIGHT, WIDTH))
  for name in sorted(os.listdir(os.path.join(root, "albedos"))):
    rgb = np.asarray(Image.open(os.path.join(root, "albedos", name)), np.float64) / 255
    person = np.asarray(Image.open(os.path.join(root, "masks", name))) > 0
    total += rgb[person].sum(0)
    count += person.sum()
    pixel_sum += np.where(person[..., None], rgb, 0)
    pixel_count += person
  assert count > 0 and (pixel_count == 0).any()  # some pixels are never on a person
  batch = {"albedo": np.zeros((2, HEIGHT, WIDTH, 3), np.float32)}
  mean = total / count
  np.testing.assert_allclose(predictors["mean_albedo"](batch)[1, 5, 7], mean, rtol=1e-5)
  expected = np.where(pixel_count[..., None] > 0, pixel_sum / np.maximum(pixel_count, 1)[..., None], mean)
  np.testing.assert_allclose(predictors["per_pixel_mean_albedo"](batch)[0], expected, rtol=1e-5, atol=1e-6)
  results = baselines.evaluate(config)
  assert set(results) == {"mean_albedo", "per_pixel_mean_albedo"}
  assert all(np.isfinite(r["mae"]) and r["mae"] > 0 for r in results.values())


def test_training_sample_resamples_the_albedo_linearly_and_zeroes_it_off_the_person():
  rng = np.random.default_rng(3)
  rgb = np.zeros((20, 20, 3), np.float32)
  rgb[:, :10], rgb[:, 10:] = 0.2, 0.8
  mask = np.zeros((20, 20), np.uint8)
  mask[2:18, 2:18] = 1
  image = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
  sample = albedo.train_sample(image, {"mask": mask, "albedo": rgb}, rng, size=(16, 12), ratio_range=(1.3, 1.3))
  assert sample["image"].shape == (16, 12, 3) and sample["image"].dtype == np.uint8
  assert sample["albedo"].shape == (16, 12, 3) and sample["albedo"].dtype == np.float32
  assert sample["mask"].dtype == bool and sample["mask"].any() and not sample["mask"].all()
  assert not sample["albedo"][~sample["mask"]].any()
  person = sample["albedo"][sample["mask"]]
  assert person.min() >= 0.2 - 1e-6 and person.max() <= 0.8 + 1e-6
  assert np.any((person > 0.21) & (person < 0.79))  # a blend across the colour edge: bilinear, not nearest


def test_a_flat_albedo_names_its_file_and_is_skipped_in_training_under_skip(finetune_config, tmp_path):
  rng = np.random.default_rng(4)
  mask = np.zeros((8, 6), bool)
  mask[1:7, 1:5] = True
  image = rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)
  _write_sample(str(tmp_path), "a_flat", image, mask, np.full((8, 6, 3), 0.5, np.float32))
  _write_sample(str(tmp_path), "b_textured", image, mask, _textured(rng, 8, 6))
  config = finetune_config("albedo")
  config.image_size = (8, 6)
  source = albedo.make_source(config, str(tmp_path), "train")
  with pytest.raises(dense_source.DataError, match=r"a_flat\.png.*flat"):
    albedo.eval_example(config, source, 0)
  example = albedo.train_example(config, source)
  sample = pipeline.load_with_skips(lambda i: example(i, np.random.default_rng(0)), len(source), True, 0)
  assert sample["skipped"] == 1 and sample["albedo"].shape == (8, 6, 3)
  with pytest.raises(dense_source.DataError, match="a_flat"):
    pipeline.load_with_skips(lambda i: example(i, np.random.default_rng(0)), len(source), False, 0)
  # The same folder as shards: the sample is named by its image stem.
  convert.convert("albedo", str(tmp_path), str(tmp_path / "shards"))
  shards = albedo.make_source(config, str(tmp_path / "shards"), "eval")
  with pytest.raises(dense_source.DataError, match="sample 'a_flat'.*flat"):
    albedo.eval_example(config, shards, 0)
  from_shards, from_folder = albedo.eval_example(config, shards, 1), albedo.eval_example(config, source, 1)
  for key in ("image", "albedo", "mask", "padding"):
    np.testing.assert_array_equal(from_shards[key], from_folder[key])


def test_a_missing_albedo_file_is_named(finetune_config, tmp_path):
  rng = np.random.default_rng(5)
  mask = np.ones((8, 6), bool)
  for name in ("a", "b"):
    _write_sample(str(tmp_path), name, rng.integers(0, 256, (8, 6, 3), dtype=np.uint8), mask, _textured(rng, 8, 6))
  os.remove(tmp_path / "albedos" / "b.png")
  with pytest.raises(dense_source.DataError, match=r"albedos/b\.png"):
    albedo.make_source(finetune_config("albedo"), str(tmp_path), "train")


def test_panel_draws_clipped_pictures_on_the_targets_person():
  image = np.full((8, 6, 3), 40, np.uint8)
  mask = np.zeros((8, 6), bool)
  mask[2:6, 1:5] = True
  target = np.where(mask[..., None], np.full((8, 6, 3), 0.5), 0).astype(np.float32)
  prediction = np.full((8, 6, 3), 2.0, np.float32)
  prediction[..., 1] = -1.0
  panel = albedo.panel(None, {"image": image, "albedo": target, "mask": mask}, prediction)
  tiles = [panel[:, i * (6 + visualize._GAP):i * (6 + visualize._GAP) + 6] for i in range(3)]
  np.testing.assert_array_equal(tiles[0], image)
  np.testing.assert_array_equal(tiles[1][mask], np.full((16, 3), 128))
  np.testing.assert_array_equal(tiles[2][mask], np.tile([255, 0, 255], (16, 1)))
  assert not tiles[1][~mask].any() and not tiles[2][~mask].any()


def test_prediction_cuts_the_pad_off_and_writes_the_photo_size(trained, tmp_path):
  config, workdir = trained
  photo = np.random.default_rng(6).integers(0, 256, (40, 90, 3), dtype=np.uint8)  # wide: padded top and bottom
  inputs, padding = albedo.predict_inputs(config, photo, None)
  assert inputs[0].shape == (HEIGHT, WIDTH, 3) and padding.top > 0 and padding.left == padding.right == 0
  assert not inputs[0][:padding.top].any() and not inputs[0][HEIGHT - padding.bottom:].any()
  outputs = np.full((1, HEIGHT, WIDTH, 3), 5.0, np.float32)  # clipped to 1 if the pad leaked in
  outputs[0, padding.top:HEIGHT - padding.bottom] = 0.25
  finished = albedo.finish(config, photo, outputs, padding)["albedo"]
  assert finished.shape == (40, 90, 3) and finished.dtype == np.float32
  np.testing.assert_allclose(finished, 0.25, atol=1e-6)
  # A head output short of the canvas (an image size that is no multiple of 16) is brought to it first.
  short = albedo.finish(config, photo, np.full((1, HEIGHT // 2, WIDTH // 2, 3), 0.25, np.float32), padding)
  assert short["albedo"].shape == (40, 90, 3)

  photos = tmp_path / "photos"
  photos.mkdir()
  sizes = {"a.png": (70, 50), "b.jpg": (40, 90)}
  for name, shape in sizes.items():
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (*shape, 3), dtype=np.uint8)).save(photos / name)
  written, skipped = predict.predict_files(*predict.load_run(workdir), str(photos), str(tmp_path / "out"))
  assert written == ["a.png", "b.jpg"] and not skipped
  for name, shape in sizes.items():
    stem = os.path.join(tmp_path, "out", os.path.splitext(name)[0])
    values = np.load(stem + "_albedo.npy")
    assert values.shape == (*shape, 3) and values.dtype == np.float32
    assert values.min() >= 0 and values.max() <= 1
    picture = np.asarray(Image.open(stem + "_albedo.png"))
    assert picture.dtype == np.uint8
    np.testing.assert_array_equal(picture, np.round(values * 255))
