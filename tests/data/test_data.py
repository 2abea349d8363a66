"""Tests for sapiens_jax.data: decoding, augmentation, sources and the pipeline."""
import io
import os
import re
import struct
import zlib

import grain
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageOps
import pytest

from sapiens_jax.data import pipeline
from sapiens_jax.data import sources
from sapiens_jax.data import synthetic_humans
from sapiens_jax.data import transforms

IMAGE_SIZE = (16, 16)
BATCH = 4


def encode(pixels, fmt="PNG", **kwargs):
  buffer = io.BytesIO()
  image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def random_pixels(height=20, width=30, seed=0):
  return np.random.default_rng(seed).integers(
      0, 256, (height, width, 3), dtype=np.uint8)


def data_config(**overrides):
  config = dict(source="generated", path="", num_generated=16,
                on_error="raise", num_workers=0, resize="pil")
  config.update(overrides)
  return ml_collections.ConfigDict(config)


# Records whose pixels say which record they are: image i is a solid colour
# with red = 10 * i. Crops, resizes and flips keep a solid image solid.
NUM_TAGGED = 12


def tagged_colour(i):
  return (10 * i, 200 - 10 * i, 128)


def write_tagged_folder(root, num=NUM_TAGGED, corrupt=()):
  """Solid-colour images img_00.png ...; indices in `corrupt` get junk bytes."""
  os.makedirs(root, exist_ok=True)
  for i in range(num):
    path = os.path.join(root, f"img_{i:02d}.png")
    with open(path, "wb") as f:
      if i in corrupt:
        f.write(b"\x89PNG\r\n\x1a\n this is not really a png")
      else:
        f.write(encode(np.full((20, 24, 3), tagged_colour(i), np.uint8)))
  return root


def record_ids(batch):
  """Recovers which tagged record each example of a batch came from."""
  red = batch["image"][:, :, :, 0].astype(np.float32)
  assert np.all(np.abs(red - red[:, :1, :1]) <= 1), "tagged image not solid"
  return [int(round(r / 10)) for r in red[:, 0, 0]]


def tagged_iterator(root, batch_size=BATCH, **kwargs):
  config = data_config(source="folder", path=str(root),
                       on_error=kwargs.pop("on_error", "raise"),
                       num_workers=kwargs.pop("num_workers", 0))
  kwargs.setdefault("seed", 0)
  return pipeline.make_pretrain_iterator(
      config, image_size=IMAGE_SIZE, batch_size=batch_size, **kwargs)


# ---------------------------------------------------------------- transforms


def test_crop_box_respects_scale_and_ratio():
  rng = np.random.default_rng(0)
  height, width = 600, 800
  areas, aspects = [], []
  for _ in range(2000):
    top, left, h, w = transforms.sample_crop_box(height, width, rng)
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    areas.append(h * w / (height * width))
    aspects.append(w / h)
  # Small slack for rounding w and h to whole pixels.
  assert 0.2 - 0.005 <= min(areas) and max(areas) <= 1.0
  assert 3 / 4 - 0.01 <= min(aspects) and max(aspects) <= 4 / 3 + 0.01
  # The draws actually cover the range rather than sitting in one corner.
  assert min(areas) < 0.25 and max(areas) > 0.9
  assert min(aspects) < 0.8 and max(aspects) > 1.25


def test_crop_box_falls_back_to_centre_crop_with_clamped_aspect():
  # A 1x100 strip: no box with aspect in [3/4, 4/3] and area >= 20% fits.
  top, left, h, w = transforms.sample_crop_box(
      1, 100, np.random.default_rng(0))
  assert (top, h) == (0, 1)
  assert w == round(1 * 4 / 3)
  assert left == (100 - w) // 2


def test_random_resized_crop_shape_dtype_and_determinism():
  image = random_pixels(40, 50)
  out_a = transforms.random_resized_crop(image, np.random.default_rng(7), (24, 32))
  out_b = transforms.random_resized_crop(image, np.random.default_rng(7), (24, 32))
  out_c = transforms.random_resized_crop(image, np.random.default_rng(8), (24, 32))
  assert out_a.shape == (24, 32, 3) and out_a.dtype == np.uint8
  np.testing.assert_array_equal(out_a, out_b)
  assert not np.array_equal(out_a, out_c)


def test_random_resized_crop_of_constant_image_stays_constant():
  image = np.full((30, 30, 3), (12, 200, 77), np.uint8)
  out = transforms.random_resized_crop(
      image, np.random.default_rng(0), (16, 16), scale=(1.0, 1.0),
      ratio=(1.0, 1.0))
  np.testing.assert_array_equal(out, np.broadcast_to((12, 200, 77), out.shape))


def smooth_pixels(height, width):
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  channels = [np.sin(6 * x + 3 * y), np.cos(5 * y - 2 * x), np.sin(4 * (x + y)) * np.cos(3 * x)]
  return np.round(127.5 + 120 * np.stack(channels, -1)).astype(np.uint8)


@pytest.mark.parametrize("in_hw,out_hw", [((300, 250), (512, 480)), ((600, 500), (300, 260)),
                                          ((400, 300), (440, 270))])
def test_cv2_resize_stays_close_to_the_reference_pil_bicubic(in_hw, out_hw):
  image = smooth_pixels(*in_hw)
  pil = transforms.resize(image, out_hw, "pil").astype(np.int32)
  fast = transforms.resize(image, out_hw, "cv2").astype(np.int32)
  assert pil.shape == fast.shape == (*out_hw, 3)
  assert np.abs(pil - fast).mean() < 0.6 and np.abs(pil - fast).max() <= 3


def test_cv2_resize_averages_areas_when_shrinking():
  image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 2
  out = transforms.resize(image, (2, 3), "cv2")
  blocks = image.reshape(2, 2, 3, 2, 3).astype(np.float64).mean(axis=(1, 3))
  np.testing.assert_array_equal(out, np.round(blocks))


def test_resize_rejects_unknown_backend():
  with pytest.raises(ValueError, match="pil, cv2"):
    transforms.resize(random_pixels(), (4, 4), "bilinear")


def test_random_flip_flips_horizontally():
  image = random_pixels(4, 5)
  flipped = transforms.random_flip(image, np.random.default_rng(0), prob=1.0)
  kept = transforms.random_flip(image, np.random.default_rng(0), prob=0.0)
  np.testing.assert_array_equal(flipped, image[:, ::-1])
  np.testing.assert_array_equal(kept, image)
  rng = np.random.default_rng(0)
  flips = [transforms.random_flip(image, rng)[0, 0, 0] != image[0, 0, 0]
           for _ in range(400)]
  assert 0.4 < np.mean(flips) < 0.6


def test_normalize_denormalize():
  mean_colour = np.array([[transforms.MEAN_RGB]], np.float32)
  np.testing.assert_allclose(transforms.normalize(mean_colour), 0, atol=1e-6)
  image = random_pixels()
  x = transforms.normalize(image)
  assert x.dtype == np.float32
  np.testing.assert_allclose(
      x[..., 1], (image[..., 1] - 116.28) / 57.12, rtol=1e-5)
  np.testing.assert_array_equal(transforms.denormalize(x), image)
  assert transforms.denormalize(np.full((1, 1, 3), 1e3)).max() == 255
  assert transforms.denormalize(np.full((1, 1, 3), -1e3)).min() == 0


# ------------------------------------------------------------------ decoding


@pytest.mark.parametrize("make_bytes", [
    lambda: encode(Image.new("L", (30, 20), 90)),
    lambda: encode(Image.new("RGBA", (30, 20), (10, 20, 30, 0))),
    lambda: encode(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG"),
    lambda: encode(Image.new("P", (30, 20), 3)),
    lambda: encode(random_pixels(), "JPEG", quality=90),
], ids=["gray", "rgba", "cmyk_jpeg", "palette", "rgb_jpeg"])
def test_decode_converts_modes_to_rgb(make_bytes):
  pixels = transforms.decode_image(make_bytes(), "x.img")
  assert pixels.shape == (20, 30, 3) and pixels.dtype == np.uint8


def test_decode_cmyk_colour_survives():
  data = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG")
  red = transforms.decode_image(data, "red.jpg")[4, 4]
  assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_decode_16_bit_png_keeps_the_high_byte():
  values = np.array([[0, 0x8000, 0xFFFF]], np.uint16)
  image = Image.frombytes("I;16", (3, 1), values.astype("<u2").tobytes())
  pixels = transforms.decode_image(encode(image), "depth.png")
  assert pixels.shape == (1, 3, 3)
  np.testing.assert_array_equal(pixels[0, :, 0], [0, 0x80, 0xFF])
  np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])


def test_decode_applies_exif_orientation():
  pixels = np.zeros((20, 30, 3), np.uint8)
  pixels[:, :5] = 255  # Bright band on the left edge.
  exif = Image.Exif()
  exif[0x0112] = 6  # "Rotate 90 CW to display".
  data = encode(pixels, "JPEG", quality=95, exif=exif.tobytes())
  upright = transforms.decode_image(data, "phone.jpg")
  assert upright.shape == (30, 20, 3)
  assert upright[:5].mean() > 200 and upright[10:].mean() < 40


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_orients_like_pillow_exif_transpose(orientation):
  exif = Image.Exif()
  exif[0x0112] = orientation
  data = encode(random_pixels(12, 20), "PNG", exif=exif.tobytes())
  expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
  pixels = transforms.decode_image(data, "oriented.png")
  assert pixels.shape == ((12, 20, 3) if orientation < 5 else (20, 12, 3))
  np.testing.assert_array_equal(pixels, expected)


@pytest.mark.parametrize("data,problem", [
    (encode(random_pixels(64, 64), "JPEG")[:300], "[Tt]runcated"),
    (encode(random_pixels(64, 64), "JPEG")[:-200], "[Tt]runcated"),
    (encode(random_pixels(64, 64), "PNG")[:-300], "[Tt]runcated"),
    (b"", "empty"),
    (np.random.default_rng(0).bytes(1000), "UnidentifiedImageError"),
])
def test_decode_errors_name_the_file(data, problem):
  with pytest.raises(transforms.ImageDecodeError,
                     match=re.escape("'dir/bad.jpg'") + ".*" + problem):
    transforms.decode_image(data, "dir/bad.jpg")


def png_header_only(width, height):
  """A PNG that claims a size but has no pixel data: all a bomb check reads."""
  def chunk(kind, body):
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body)))
  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
          + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [8200, 20000])  # Ours, and Pillow's limit.
def test_decode_refuses_decompression_bombs(side):
  with pytest.raises(transforms.ImageDecodeError,
                     match="'bomb.png'.*decompression"):
    transforms.decode_image(png_header_only(side, side), "bomb.png")


# ------------------------------------------------------------------- sources


def test_image_folder_source_is_recursive_sorted_and_filtered(tmp_path):
  (tmp_path / "b" / "deep").mkdir(parents=True)
  (tmp_path / "a").mkdir()
  files = {"b/deep/z.PNG": "PNG", "a/y.jpeg": "JPEG", "x.JPG": "JPEG",
           "a/w.png": "PNG"}
  for name, fmt in files.items():
    (tmp_path / name).write_bytes(encode(random_pixels(), fmt))
  (tmp_path / "notes.txt").write_text("not an image")
  (tmp_path / "a" / "v.gif").write_bytes(encode(random_pixels(), "GIF"))
  source = sources.ImageFolderSource(str(tmp_path))
  names = [source[i]["name"] for i in range(len(source))]
  assert names == sorted(str(tmp_path / n) for n in files)
  assert source[0]["data"] == (tmp_path / "a/w.png").read_bytes()


def test_image_folder_source_errors_name_the_folder(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match=re.escape(missing)):
    sources.ImageFolderSource(missing)
  (tmp_path / "empty" / "sub").mkdir(parents=True)
  (tmp_path / "empty" / "readme.txt").write_text("hi")
  with pytest.raises(ValueError, match=re.escape(str(tmp_path / "empty"))
                     + ".*jpg"):
    sources.ImageFolderSource(str(tmp_path / "empty"))


def test_array_record_roundtrip_through_make_source(tmp_path):
  images = [encode(random_pixels(seed=i), "JPEG" if i % 2 else "PNG")
            for i in range(5)]
  shard_a = tmp_path / "train-00000.array_record"
  shard_b = tmp_path / "train-00001.array_record"
  assert sources.write_array_record(shard_a, images[:3]) == 3
  sources.write_array_record(shard_b, images[3:])
  for path in (str(tmp_path), str(tmp_path / "train-*"), str(shard_a)):
    source = sources.make_source(
        data_config(source="array_record", path=path), IMAGE_SIZE, 0)
    expected = images if path != str(shard_a) else images[:3]
    assert len(source) == len(expected)
    assert [source[i]["data"] for i in range(len(source))] == expected
  assert source[2]["name"] == f"{shard_a}#2"
  both = sources.make_source(
      data_config(source="array_record", path=str(tmp_path)), IMAGE_SIZE, 0)
  assert both[4]["name"] == f"{shard_b}#1"


def test_array_record_missing_files_error_names_the_pattern(tmp_path):
  pattern = str(tmp_path / "nothing-*.array_record")
  with pytest.raises(FileNotFoundError, match=re.escape(pattern)):
    sources.make_source(
        data_config(source="array_record", path=pattern), IMAGE_SIZE, 0)


def test_generated_source_is_deterministic_and_varied():
  source_a = sources.GeneratedSource(10, (40, 48), seed=3)
  source_b = sources.GeneratedSource(10, (40, 48), seed=3)
  source_c = sources.GeneratedSource(10, (40, 48), seed=4)
  assert source_a[5] == source_b[5]
  assert source_a[5]["name"] == "generated#5"
  assert source_a[5]["data"] != source_a[6]["data"]
  assert source_a[5]["data"] != source_c[5]["data"]
  pixels = transforms.decode_image(source_a[5]["data"], "g")
  assert pixels.shape == (40, 48, 3)
  assert pixels.std() > 20  # Not a flat image.
  with pytest.raises(IndexError):
    source_a[10]


def test_synthetic_humans_source_holds_the_generators_scenes_larger_than_the_crop():
  source = sources.make_source(data_config(source="synthetic_humans", num_generated=3), (32, 40), seed=2)
  assert len(source) == 3 and source[1]["name"] == "synthetic_humans#1"
  pixels = transforms.decode_image(source[1]["data"], "s")
  expected = synthetic_humans.render_sample(2, 1, 40, 50, sapiens2=False)["image"]
  np.testing.assert_array_equal(pixels, expected)  # PNG: lossless
  with pytest.raises(IndexError):
    source[3]


def test_make_source_generated_is_larger_than_the_crop():
  source = sources.make_source(data_config(num_generated=3), (32, 40), seed=0)
  assert len(source) == 3
  pixels = transforms.decode_image(source[0]["data"], "g")
  assert pixels.shape == (40, 50, 3)


def test_make_source_rejects_unknown_source():
  with pytest.raises(ValueError, match="'nope'; expected one of generated, synthetic_humans, folder, array_record, tfds"):
    sources.make_source(data_config(source="nope"), IMAGE_SIZE, 0)


# ------------------------------------------------------------------ pipeline


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["skipped"], b["skipped"])


def test_pipeline_batch_shapes_and_values():
  iterator = pipeline.make_pretrain_iterator(
      data_config(), image_size=(24, 16), batch_size=BATCH, seed=0)
  assert isinstance(iterator, grain.DatasetIterator)
  batch = next(iterator)
  assert set(batch) == {"image", "skipped"}
  assert batch["image"].shape == (BATCH, 24, 16, 3)
  assert batch["image"].dtype == np.uint8  # normalised on the device by the train step
  assert batch["skipped"].shape == (BATCH,)
  assert batch["skipped"].dtype == np.int32
  assert np.all(batch["skipped"] == 0)
  assert batch["image"].std() > 0


def test_pipeline_is_deterministic_given_the_seed():
  def first_batches(seed):
    return take(pipeline.make_pretrain_iterator(
        data_config(), image_size=IMAGE_SIZE, batch_size=BATCH, seed=seed), 3)
  assert_batches_equal(first_batches(1), first_batches(1))
  assert not np.array_equal(first_batches(1)[0]["image"],
                            first_batches(2)[0]["image"])


def test_pipeline_resumes_from_state():
  def make():
    return pipeline.make_pretrain_iterator(
        data_config(num_generated=8), image_size=IMAGE_SIZE,
        batch_size=BATCH, seed=0)
  uninterrupted = take(make(), 7)
  interrupted = make()
  take(interrupted, 3)
  state = interrupted.get_state()
  resumed = make()
  resumed.set_state(state)
  # Batches 3..6 cross the epoch boundary (8 records = 2 batches per epoch).
  assert_batches_equal(take(resumed, 4), uninterrupted[3:])


def test_pipeline_resumes_through_orbax(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  def make():
    return pipeline.make_pretrain_iterator(
        data_config(), image_size=IMAGE_SIZE, batch_size=BATCH, seed=0)
  uninterrupted = take(make(), 4)
  iterator = make()
  take(iterator, 2)
  checkpointer = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  checkpointer.save(tmp_path / "data", args=grain.checkpoint.CheckpointSave(iterator))
  restored = checkpointer.restore(
      tmp_path / "data", args=grain.checkpoint.CheckpointRestore(make()))
  assert_batches_equal(take(restored, 2), uninterrupted[2:])


def test_pipeline_reshuffles_every_epoch_and_covers_each_record(tmp_path):
  root = write_tagged_folder(tmp_path / "tagged")
  iterator = tagged_iterator(root)
  per_epoch = NUM_TAGGED // BATCH
  epochs = [sum((record_ids(b) for b in take(iterator, per_epoch)), [])
            for _ in range(3)]
  for order in epochs:
    assert sorted(order) == list(range(NUM_TAGGED))
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_pipeline_processes_hold_consecutive_blocks_of_the_global_batch(tmp_path):
  # Whatever the process count, global batch s (the processes' batches in
  # process order) is the same: that is what makes a 2-process run train
  # exactly like a 1-process one. 3 steps cross an epoch of 12 records.
  root = write_tagged_folder(tmp_path / "tagged")
  one = take(tagged_iterator(root, batch_size=6), 3)
  for count in (2, 3):
    parts = [take(tagged_iterator(root, batch_size=6 // count,
                                  process_index=p, process_count=count), 3)
             for p in range(count)]
    joined = [{k: np.concatenate([part[s][k] for part in parts])
               for k in ("image", "skipped")} for s in range(3)]
    assert_batches_equal(joined, one)


def test_pipeline_process_decodes_only_its_own_images(tmp_path, monkeypatch):
  root = write_tagged_folder(tmp_path / "tagged", num=24)
  decoded = []
  decode = transforms.decode_image
  monkeypatch.setattr(transforms, "decode_image",
                      lambda data, name: decoded.append(name) or decode(data, name))
  mine = record_ids(next(tagged_iterator(root, batch_size=2, process_index=0,
                                         process_count=2)))
  monkeypatch.undo()
  # Process 0's stream is rows [0:2] of the one-process global batches of 4. It decodes in stream
  # order (one read thread), so what it decoded -- its first batch plus whatever read-ahead got
  # to, possibly into later epochs, which reshuffle -- is a prefix of that stream and nothing else.
  own = [i for b in take(tagged_iterator(root), 24) for i in record_ids(b)[:2]]  # 4 epochs
  # Read-ahead threads of other tests' iterators may still be decoding their own folders.
  got = [int(os.path.basename(n)[4:6]) for n in decoded if n.startswith(str(root))]
  assert mine == own[:2]
  assert len(got) >= 2 and got == own[:len(got)], (got, own)


def test_pipeline_raises_naming_the_corrupt_file(tmp_path):
  root = write_tagged_folder(tmp_path / "tagged", corrupt={5})
  iterator = tagged_iterator(root)
  bad = os.path.join(root, "img_05.png")
  with pytest.raises(transforms.ImageDecodeError, match=re.escape(bad)):
    take(iterator, NUM_TAGGED // BATCH)


def test_pipeline_skips_and_counts_corrupt_files(tmp_path):
  corrupt = {2, 7}
  root = write_tagged_folder(tmp_path / "tagged", corrupt=corrupt)
  iterator = tagged_iterator(root, on_error="skip")
  for _ in range(2):  # Every epoch visits each corrupt file exactly once.
    batches = take(iterator, NUM_TAGGED // BATCH)
    assert sum(int(b["skipped"].sum()) for b in batches) == len(corrupt)
    ids = sum((record_ids(b) for b in batches), [])
    assert not set(ids) & corrupt
    # The file after each corrupt one stands in for it, so appears twice.
    assert all(ids.count(i + 1) == 2 for i in corrupt)
    for b in batches:
      assert b["image"].shape == (BATCH,) + IMAGE_SIZE + (3,)


def test_pipeline_skip_gives_up_when_nothing_is_readable(tmp_path):
  root = write_tagged_folder(tmp_path / "tagged", num=3, corrupt={0, 1, 2})
  with pytest.raises(RuntimeError, match="consecutive records"):
    next(tagged_iterator(root, on_error="skip"))


def test_pipeline_rejects_unknown_error_policy():
  with pytest.raises(ValueError, match="raise, skip"):
    pipeline.make_pretrain_iterator(
        data_config(on_error="ignore"), image_size=IMAGE_SIZE,
        batch_size=BATCH, seed=0)


def test_pipeline_rejects_unknown_resize_backend():
  with pytest.raises(ValueError, match="data.resize 'bicubic'.*pil, cv2"):
    pipeline.make_pretrain_iterator(
        data_config(resize="bicubic"), image_size=IMAGE_SIZE, batch_size=BATCH, seed=0)


def test_pipeline_cv2_resize_draws_the_same_crops_as_pil():
  def first_batch(resize):
    return next(pipeline.make_pretrain_iterator(
        data_config(resize=resize), image_size=(48, 40), batch_size=BATCH, seed=3))["image"]
  pil, fast = first_batch("pil").astype(np.int32), first_batch("cv2").astype(np.int32)
  assert pil.shape == fast.shape == (BATCH, 48, 40, 3)
  # Same boxes and flips, only the interpolation differs.
  assert np.abs(pil - fast).mean() < 3
  assert np.abs(pil - np.roll(fast, 1, axis=0)).mean() > 10


def test_pipeline_with_worker_process_matches_in_process_and_resumes():
  def make(num_workers):
    return pipeline.make_pretrain_iterator(
        data_config(num_workers=num_workers), image_size=IMAGE_SIZE,
        batch_size=BATCH, seed=0)
  in_process = take(make(0), 3)
  with_worker = make(1)
  first = take(with_worker, 2)
  state = with_worker.get_state()
  first += take(with_worker, 1)
  with_worker.close()
  assert_batches_equal(first, in_process)
  resumed = make(1)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 1), in_process[2:])
  resumed.close()
