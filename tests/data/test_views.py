"""Tests for the DINO-style multi-view augmentations (sapiens_jax.data.views) and their pipeline."""
import io
import os

import numpy as np
from PIL import Image
import pytest

from sapiens_jax import default_config
from sapiens_jax.data import pipeline
from sapiens_jax.data import transforms
from sapiens_jax.data import views

GLOBAL = (32, 32)
LOCAL = (16, 16)
BATCH = 4


def random_pixels(height=32, width=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def data_config(**overrides):
  config = default_config.pretrain("tiny").data
  config.source = "generated"
  config.num_generated = 8
  config.num_workers = 0
  config.update(overrides)
  return config


def make(config=None, num_local=2, batch_size=BATCH, seed=0, **kwargs):
  return pipeline.make_multiview_iterator(
      config or data_config(), image_size=GLOBAL, local_size=LOCAL, num_local=num_local,
      global_scale=views.GLOBAL_SCALE, local_scale=views.LOCAL_SCALE, batch_size=batch_size,
      seed=seed, **kwargs)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert set(a) == set(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


# Record i: red = 20 * i everywhere (which record), green and blue ramps (where the crop is).
def tagged_pixels(i, height=40, width=40):
  y, x = np.mgrid[0:height, 0:width]
  return np.stack([np.full_like(x, 20 * i), x * 255 // (width - 1), y * 255 // (height - 1)],
                  -1).astype(np.uint8)


def write_tagged_folder(root, num=8, corrupt=()):
  os.makedirs(root, exist_ok=True)
  for i in range(num):
    with open(os.path.join(root, f"img_{i:02d}.png"), "wb") as f:
      if i in corrupt:
        f.write(b"\x89PNG\r\n\x1a\n not a png")
      else:
        buffer = io.BytesIO()
        Image.fromarray(tagged_pixels(i)).save(buffer, format="PNG")
        f.write(buffer.getvalue())
  return str(root)


# ---------------------------------------------------------------- photometric


def test_grayscale_matches_pil():
  image = random_pixels()
  grey = views.grayscale(image)
  assert grey.shape == image.shape and grey.dtype == np.uint8
  assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 0], grey[..., 2])
  pil = np.asarray(Image.fromarray(image).convert("L"), dtype=np.int32)
  assert np.abs(grey[..., 0].astype(np.int32) - pil).max() <= 1


def test_solarize_inverts_from_the_threshold_up():
  image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
  expected = np.array([v if v < 128 else 255 - v for v in range(256)], np.uint8)
  np.testing.assert_array_equal(views.solarize(image)[..., 0].ravel(), expected)
  np.testing.assert_array_equal(views.solarize(image, threshold=256), image)


def test_color_jitter_with_zero_strengths_is_identity():
  image = random_pixels()
  for seed in range(5):
    out = views.color_jitter(image, np.random.default_rng(seed), 0, 0, 0, 0)
    np.testing.assert_array_equal(out, image)


def test_brightness_factor_is_applied_exactly():
  image = random_pixels()
  out = views._apply_jitter(image, (0, 1, 2, 3), (1.5, 1.0, 1.0, 0.0))
  np.testing.assert_array_equal(out, np.clip(np.rint(image * 1.5), 0, 255).astype(np.uint8))


def test_color_jitter_draws_order_then_factors_like_torchvision():
  image = random_pixels()
  out = views.color_jitter(image, np.random.default_rng(3), 0.4, 0.4, 0.2, 0.1)
  rng = np.random.default_rng(3)
  order = rng.permutation(4)
  factors = (rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.8, 1.2), rng.uniform(-0.1, 0.1))
  np.testing.assert_array_equal(out, views._apply_jitter(image, order, factors))
  assert not np.array_equal(out, image)


def test_order_matters_when_clipping():
  # Brightening saturates the light pixels, so the contrast that follows sees a different image.
  image = random_pixels()
  first = views._apply_jitter(image, (0, 1, 2, 3), (1.6, 0.5, 1.0, 0.0))
  last = views._apply_jitter(image, (1, 0, 2, 3), (1.6, 0.5, 1.0, 0.0))
  assert not np.array_equal(first, last)


def test_contrast_saturation_and_hue_limits():
  image = random_pixels()
  flat = views._apply_jitter(image, (1,), (1.0, 0.0, 1.0, 0.0))
  mean = np.rint(views._luma(image.astype(np.float32)).mean())
  assert np.all(np.abs(flat.astype(np.int32) - mean) <= 0)
  grey = views._apply_jitter(image, (2,), (1.0, 1.0, 0.0, 0.0)).astype(np.int32)
  assert np.abs(grey - views.grayscale(image)).max() <= 1
  red = np.zeros((2, 2, 3), np.uint8)
  red[..., 0] = 255
  green = views._apply_jitter(red, (3,), (1.0, 1.0, 1.0, 1 / 3)).astype(np.int32)
  assert np.abs(green - [0, 255, 0]).max() <= 1


def test_blur_is_a_reflect_101_gaussian():
  image = random_pixels().astype(np.float64)
  out = views.gaussian_blur(image.astype(np.uint8), np.random.default_rng(0), sigma=(1.3, 1.3))
  taps = np.exp(-np.arange(-4, 5) ** 2 / (2 * 1.3 ** 2))
  taps /= taps.sum()
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)), mode="reflect")  # numpy's reflect skips the edge
  rows = sum(t * padded[:, k:k + 32] for k, t in enumerate(taps))
  expected = sum(t * rows[k:k + 32] for k, t in enumerate(taps))
  # cv2 rounds between its row and column passes on uint8, so a pixel can be one grey level off.
  assert np.abs(out - np.rint(expected)).max() <= 1 and np.abs(out - expected).mean() < 0.5


def only_blur(image, rng, blur_prob):
  return views.dino_photometric(image, rng, blur_prob, 0.0, jitter_prob=0.0, grayscale_prob=0.0,
                                blur_sigma=(0.5, 2.0))


def test_blur_probability_zero_never_and_one_always_blurs():
  image = random_pixels()
  rng = np.random.default_rng(0)
  for _ in range(20):
    np.testing.assert_array_equal(only_blur(image, rng, 0.0), image)
    assert not np.array_equal(only_blur(image, rng, 1.0), image)


def test_views_shapes_and_determinism():
  image = random_pixels(40, 40)
  for which in (0, 1):
    a = views.global_view(image, np.random.default_rng(1), GLOBAL, which)
    b = views.global_view(image, np.random.default_rng(1), GLOBAL, which)
    assert a.shape == GLOBAL + (3,) and a.dtype == np.uint8 and a.flags.c_contiguous
    np.testing.assert_array_equal(a, b)
  local = views.local_view(image, np.random.default_rng(1), LOCAL, resize="cv2")
  assert local.shape == LOCAL + (3,) and local.dtype == np.uint8
  with pytest.raises(ValueError, match="expected 0 or 1"):
    views.global_view(image, np.random.default_rng(1), GLOBAL, 2)


# ------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("num_local", [0, 3])
def test_batch_shapes_and_dtypes(num_local):
  batch = next(make(num_local=num_local))
  expected = {"image": (BATCH, 2) + GLOBAL + (3,), "skipped": (BATCH,)}
  if num_local:
    expected["local"] = (BATCH, num_local) + LOCAL + (3,)
  assert {k: v.shape for k, v in batch.items()} == expected
  assert batch["image"].dtype == np.uint8 and batch["skipped"].dtype == np.int32
  if num_local:
    assert batch["local"].dtype == np.uint8 and batch["local"].std() > 0


def test_views_of_a_row_are_different_crops_of_the_same_record(tmp_path, monkeypatch):
  # Without colour changes the red channel names the record and the ramps show where the crop was.
  monkeypatch.setattr(views, "dino_photometric", lambda image, rng, *args, **kwargs: image)
  root = write_tagged_folder(tmp_path / "tagged")
  batch = next(make(data_config(source="folder", path=root)))
  for row in range(BATCH):
    red = np.concatenate([batch["image"][row, ..., 0].ravel(), batch["local"][row, ..., 0].ravel()])
    assert red.max() - red.min() <= 1
    assert not np.array_equal(batch["image"][row, 0], batch["image"][row, 1])
  assert len({int(batch["image"][row, 0, 0, 0, 0]) for row in range(BATCH)}) == BATCH


def test_global_views_differ_with_the_full_recipe():
  batch = next(make())
  for row in range(BATCH):
    assert not np.array_equal(batch["image"][row, 0], batch["image"][row, 1])


def test_each_record_is_decoded_once(monkeypatch):
  decoded = []
  decode = transforms.decode_image
  monkeypatch.setattr(transforms, "decode_image", lambda data, name: decoded.append(name) or decode(data, name))
  buffer = io.BytesIO()
  Image.fromarray(random_pixels(40, 40)).save(buffer, format="PNG")
  source = [{"name": "only.png", "data": buffer.getvalue()}]
  example = pipeline.load_multiview_example(source, GLOBAL, LOCAL, 3, views.GLOBAL_SCALE, views.LOCAL_SCALE,
                                            "pil", False, 0, np.random.default_rng(0))
  # Read-ahead threads of other tests' iterators may still be decoding their own records.
  assert [name for name in decoded if name == "only.png"] == ["only.png"]
  assert example["image"].shape == (2,) + GLOBAL + (3,) and example["local"].shape == (3,) + LOCAL + (3,)


def test_restored_iterator_continues_like_an_uninterrupted_one():
  uninterrupted = take(make(), 5)
  interrupted = make()
  take(interrupted, 2)
  resumed = make()
  resumed.set_state(interrupted.get_state())
  # 8 records are 2 batches an epoch, so batches 2..4 cross into new epochs.
  assert_batches_equal(take(resumed, 3), uninterrupted[2:])


def test_two_processes_read_the_halves_of_the_global_batch():
  one = take(make(batch_size=4), 3)
  parts = [take(make(batch_size=2, process_index=p, process_count=2), 3) for p in range(2)]
  for step in range(3):
    for p in range(2):
      for key in one[step]:
        np.testing.assert_array_equal(parts[p][step][key], one[step][key][2 * p:2 * p + 2])
    assert not np.array_equal(parts[0][step]["image"], parts[1][step]["image"])


def test_corrupt_records_are_skipped_and_counted(tmp_path):
  corrupt = {2, 5}
  root = write_tagged_folder(tmp_path / "tagged", corrupt=corrupt)
  iterator = make(data_config(source="folder", path=root, on_error="skip"))
  for _ in range(2):  # Each epoch meets each corrupt file once.
    batches = take(iterator, 2)
    assert sum(int(b["skipped"].sum()) for b in batches) == len(corrupt)
    assert all(b["image"].shape == (BATCH, 2) + GLOBAL + (3,) for b in batches)
  with pytest.raises(transforms.ImageDecodeError, match="img_0[25].png"):
    take(make(data_config(source="folder", path=root)), 2)


def test_rejects_bad_settings():
  with pytest.raises(ValueError, match="raise, skip"):
    make(data_config(on_error="ignore"))
  with pytest.raises(ValueError, match="data.resize 'bicubic'"):
    make(data_config(resize="bicubic"))
  with pytest.raises(ValueError, match="num_local"):
    make(num_local=-1)
