"""The Sapiens2 matting task end to end on synthetic humans (training, evaluation, panels, baselines,
prediction), and its pieces: the exact composite, premultiplied resampling, the loss's wiring, the
evaluator by hand, and bad dataset folders."""
import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from sapiens_jax import baselines
from sapiens_jax import losses
from sapiens_jax import predict
from sapiens_jax import train
from sapiens_jax import visualize
from sapiens_jax import writers
from sapiens_jax.data import dense_source
from sapiens_jax.data import pipeline
from sapiens_jax.data import sapiens2_transforms
from sapiens_jax.tasks import matting

H, W = 64, 48


@pytest.fixture(scope="module")
def matting_config(finetune_config, tmp_path_factory):
  """() -> the tiny matting config on one rendered dataset with the Sapiens2 labels (8 train, 4 eval)."""
  root = str(tmp_path_factory.mktemp("matting_humans"))

  def make():
    config = finetune_config("matting")
    config.data.path = root
    return config
  pipeline.ensure_synthetic_data(make(), "")
  return make


@pytest.fixture(scope="module")
def run(matting_config, tmp_path_factory):
  """The workdir of a 6-step training run (evaluated at steps 3 and 6)."""
  workdir = tmp_path_factory.mktemp("matting_run")
  train.train_and_evaluate(matting_config(), str(workdir))
  return workdir


def read(path):
  with Image.open(path) as image:
    return image.mode, np.asarray(image)


def test_trains_evaluates_every_metric_and_draws_panels(run, matting_config):
  config = matting_config()
  assert config.best_metric == "sad" and config.model.size == "sapiens2_micro"
  records = writers.read_metrics(run)
  train_losses = [r["loss"] for r in records if "loss" in r]
  assert len(train_losses) == 6 and np.all(np.isfinite(train_losses))
  evals = [r for r in records if "eval_sad" in r]
  assert [r["step"] for r in evals] == [3, 6]
  for r in evals:
    assert all(np.isfinite(r[f"eval_{name}"]) for name in matting.METRICS)
    assert r["eval_sad"] > 0 and 0 < r["eval_mse"] < 1
  _, grid = read(run / "predictions" / "step_0000006.png")
  assert grid.shape[1] == 3 * W + 2 * visualize._GAP  # image | target | prediction
  assert grid.shape[0] >= H and grid.std() > 0


def test_eval_image_is_the_exact_composite_the_synthetic_matte(matting_config):
  config = matting_config()
  source = matting.make_source(config, os.path.join(config.data.path, "eval"), "eval")
  for i in range(len(source)):
    name = source[i]["name"]
    example = matting.eval_example(config, source, i)
    folder = os.path.join(config.data.path, "eval")
    _, matte = read(os.path.join(folder, "mattes", name + ".png"))
    _, alpha = read(os.path.join(folder, "alphas", name + ".png"))
    np.testing.assert_array_equal(example["image"], matte)  # round((a fg + (255 - a) bg) / 255) of the files
    np.testing.assert_array_equal(example["alpha"], alpha / np.float32(255))
    assert example["foreground"].shape == (H, W, 3) and example["alpha"].dtype == np.float32


def test_resampling_premultiplies_the_foreground():
  """A person of one colour keeps exactly that colour wherever it has some alpha (a plain blend with the 0
  outside would darken the edge), and over a one-colour plate the composite of the resampled layers is the
  resampled composite."""
  alpha = np.zeros((20, 16), np.float32)
  alpha[5:15, 4:11] = 1.0
  alpha[5:15, 11] = 0.4
  colour = np.array([0.9, 0.5, 0.2], np.float32)
  layers = {"alpha": alpha, "foreground": np.where(alpha[..., None] > 0, colour, 0).astype(np.float32),
            "background": np.broadcast_to(np.float32([0.1, 0.8, 0.3]), (20, 16, 3))}
  for size in ((13, 9), (31, 27)):
    out = matting.resample_layers(layers, size)
    inside = out["alpha"] > 0
    assert inside.any() and (out["alpha"] < 1).any() and (out["alpha"] > 0).sum() > (out["alpha"] == 1).sum()
    np.testing.assert_allclose(out["foreground"][inside], np.broadcast_to(colour, (inside.sum(), 3)), atol=1e-6)
    assert (out["foreground"][~inside] == 0).all()
    linear = lambda x: sapiens2_transforms.resample(x, size, "linear")
    a = alpha[..., None]
    expected = linear(a * layers["foreground"] + (1 - a) * layers["background"])
    np.testing.assert_allclose(matting.composite(out["alpha"], out["foreground"], out["background"]) / 255,
                               expected, atol=0.5 / 255 + 1e-6)  # rounding to 8 bits


def _plain_layers(height=48, width=40, seed=0):
  """An irregular alpha left of centre, a textured foreground, a one-colour plate."""
  rng = np.random.default_rng(seed)
  alpha = np.zeros((height, width), np.float32)
  alpha[10:36, 6:20] = rng.uniform(0.3, 1.0, size=(26, 14))
  foreground = np.where(alpha[..., None] > 0, rng.uniform(size=(height, width, 3)), 0).astype(np.float32)
  background = np.broadcast_to(PLATE, (height, width, 3)).copy()
  return {"alpha": alpha, "foreground": foreground, "background": background}


PLATE = np.float32([0.1, 0.2, 0.7])


def test_training_sample_keeps_image_and_labels_together(monkeypatch):
  """Without the photometric step, each augmented image is the composite of its own alpha and foreground
  over the plate, whatever resize, crop and flip were drawn; a photo replaces the plate about half the time."""
  monkeypatch.setattr(matting, "photometric_distortion", lambda image, rng: image)
  layers, size, photo = _plain_layers(), (24, 20), np.full((50, 60, 3), 200, np.uint8)
  for seed in range(8):
    sample = matting.train_sample(None, layers, np.random.default_rng(seed), size=size, ratio_range=(0.5, 2.0))
    assert sample["image"].shape == (*size, 3) and sample["alpha"].shape == size
    expected = matting.composite(sample["alpha"], sample["foreground"], np.broadcast_to(PLATE, (*size, 3)))
    np.testing.assert_array_equal(sample["image"], expected)

  # At ratio 1 the layers only halve (48x40 -> 24x20, no crop): the one random step left is the flip.
  unflipped = matting.resample_layers(layers, size)["alpha"]
  flips, seen_photo, seen_plate = [], 0, 0
  for seed in range(16):
    sample = matting.train_sample(None, layers, np.random.default_rng(seed), size=size, ratio_range=(1.0, 1.0),
                                  background_images=[photo])
    flips.append(np.array_equal(sample["alpha"], unflipped[:, ::-1]))
    assert flips[-1] or np.array_equal(sample["alpha"], unflipped)
    behind = sample["image"][sample["alpha"] == 0]
    seen_photo += bool((behind == 200).all())
    seen_plate += bool((behind == np.round(255 * PLATE)).all())
  assert 0 < sum(flips) < 16 and 0 < seen_photo < 16 and seen_photo + seen_plate == 16


def _batch(alpha, foreground):
  return {"alpha": jnp.asarray(alpha), "foreground": jnp.asarray(foreground)}


def test_loss_is_the_sum_of_the_recipe_terms_and_lowest_when_right(matting_config):
  config = matting_config()
  source = matting.make_source(config, os.path.join(config.data.path, "eval"), "eval")
  examples = [matting.eval_example(config, source, i) for i in range(2)]
  batch = _batch(np.stack([e["alpha"] for e in examples]), np.stack([e["foreground"] for e in examples]))
  right = jnp.concatenate([batch["foreground"], batch["alpha"][..., None]], axis=-1)
  wrong = 1 - right
  half = jax.image.resize(right, (2, H // 2, W // 2, 4), "linear")  # the head's output is resized to the labels
  mask = np.ones(batch["alpha"].shape, bool)  # every sample has a ground-truth foreground: every pixel
  assert np.asarray(losses.matting_foreground_mask(batch["alpha"], np.ones(2, bool))).all()
  both = jax.jit(lambda outputs: (matting.loss(config, outputs, batch),  # one compile per output shape
                                  losses.sapiens2_matting_loss(outputs, batch["alpha"], batch["foreground"], mask)))
  (loss_wrong, terms), (loss_right, _), (loss_half, _) = both(wrong), both(right), both(half)
  assert set(terms) == {f"loss_{k}_{p}" for k in ("l1", "grad", "lap") for p in ("pha", "fgr")}
  np.testing.assert_allclose(loss_wrong, sum(float(v) for v in terms.values()), rtol=1e-5)
  assert float(loss_right) < 1e-4 < float(loss_half) < float(loss_wrong)


def test_evaluator_scores_perfect_alpha_zero_and_matches_a_hand_computation():
  gt = np.stack([np.full((10, 12), 0.3, np.float32), np.zeros((10, 12), np.float32)])
  gt[1, 2:8, 3:9] = 1.0
  batch = {"alpha": np.concatenate([gt, gt[:1]]), "valid": np.array([True, True, False])}
  perfect = matting.Evaluator(None, None)
  perfect.add(batch["alpha"], batch)
  result = perfect.result()
  assert [result[k] for k in matting.METRICS] == [0.0] * 4 and result["num_images"] == 2

  off = matting.Evaluator(None, None)
  predictions = batch["alpha"].copy()
  predictions[0] += 0.2  # a flat shift of a flat alpha: no gradient error
  predictions[2] = 0.9  # the padding row: ignored
  off.add(predictions, batch)
  result = off.result()
  assert result["sad"] == pytest.approx((120 * 0.2 / 1000 + 0) / 2)
  assert result["mse"] == pytest.approx((0.2 ** 2 + 0) / 2)
  assert result["grad"] == pytest.approx(0.0, abs=1e-12)


def test_baselines_are_the_training_alphas_means(matting_config):
  config = matting_config()
  predictors = matting.baselines(config, baselines.train_batches(config))
  files = sorted(glob.glob(os.path.join(config.data.path, "train", "alphas", "*.png")))
  alphas = np.stack([read(f)[1] / 255.0 for f in files])
  assert len(files) == config.data.num_generated
  batch = {"alpha": np.zeros((3, H, W), np.float32)}
  np.testing.assert_allclose(predictors["constant_alpha"](batch), np.full((3, H, W), alphas.mean()), rtol=1e-6)
  np.testing.assert_allclose(predictors["per_pixel_mean_alpha"](batch)[2], alphas.mean(0), atol=1e-6)
  results = baselines.evaluate(config)
  assert set(results) == {"constant_alpha", "per_pixel_mean_alpha"}
  assert results["per_pixel_mean_alpha"]["sad"] < results["constant_alpha"]["sad"]  # people stand in the middle


def test_panel_is_image_target_and_predicted_alpha_in_grey():
  image = np.random.default_rng(0).integers(0, 256, (8, 6, 3), dtype=np.uint8)
  alpha = np.linspace(0, 1, 48, dtype=np.float32).reshape(8, 6)
  prediction = np.zeros((16, 12, 4), np.float32)
  prediction[..., 3] = 0.5
  prediction[..., :3] = 0.9  # the foreground is not drawn
  picture = matting.panel(None, {"image": image, "alpha": alpha}, prediction)
  step = 6 + visualize._GAP
  np.testing.assert_array_equal(picture[:, :6], image)
  np.testing.assert_array_equal(picture[:, step:step + 6], np.repeat(np.round(255 * alpha)[..., None], 3, -1))
  assert (picture[:, 2 * step:] == 128).all()


def test_predicts_alpha_and_an_rgba_cutout_at_each_photos_size(run, matting_config, tmp_path):
  config, params = predict.load_run(str(run))
  photos = tmp_path / "photos"
  photos.mkdir()
  eval_images = sorted(glob.glob(os.path.join(matting_config().data.path, "eval", "images", "*.jpg")))
  Image.open(eval_images[0]).save(photos / "a.png")
  Image.open(eval_images[1]).resize((90, 70)).save(photos / "b.jpg")  # another size and aspect
  written, skipped = predict.predict_files(config, params, str(photos), str(tmp_path / "out"), batch_size=2)
  assert written == ["a.png", "b.jpg"] and not skipped
  for stem, size in (("a", (H, W)), ("b", (70, 90))):
    mode, alpha = read(tmp_path / "out" / f"{stem}_alpha.png")
    assert mode == "L" and alpha.shape == size
    mode, cutout = read(tmp_path / "out" / f"{stem}_cutout.png")
    assert mode == "RGBA" and cutout.shape == (*size, 4)
    np.testing.assert_array_equal(cutout[..., 3], alpha)
  image = predict.read_image(str(photos / "b.jpg"))
  prediction = predict.predict_image(config, params, image, batch_size=2)
  np.testing.assert_array_equal(read(tmp_path / "out" / "b_alpha.png")[1], np.round(255 * prediction["alpha"]))
  np.testing.assert_array_equal(read(tmp_path / "out" / "b_cutout.png")[1][..., :3],
                                np.round(255 * prediction["foreground"]))


def test_a_missing_or_wrong_label_file_is_named(matting_config, tmp_path):
  config = matting_config()
  root = tmp_path / "eval"
  shutil.copytree(os.path.join(config.data.path, "eval"), root)
  name = sorted(os.listdir(root / "images"))[1][:-len(".jpg")]
  os.remove(root / "foregrounds" / f"{name}.png")
  with pytest.raises(dense_source.DataError, match=rf"foregrounds/{name}\.png"):
    matting.make_source(config, str(root), "eval")
  Image.open(root / "alphas" / f"{name}.png").convert("RGB").save(root / "foregrounds" / f"{name}.png")
  Image.open(root / "backgrounds" / f"{name}.png").convert("L").save(root / "backgrounds" / f"{name}.png")
  source = matting.make_source(config, str(root), "eval")
  with pytest.raises(dense_source.DataError, match=rf"backgrounds/{name}\.png.*RGB PNG.*'L'"):
    matting.eval_example(config, source, 1)
