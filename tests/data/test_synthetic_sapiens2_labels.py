"""Tests for the Sapiens2 labels of sapiens_jax.data.synthetic_humans: albedo, alpha matte, cameras."""
import hashlib
import json
import os

import cv2
import numpy as np
from PIL import Image
import pytest

from sapiens_jax.data import synthetic_humans as sh

HEIGHT, WIDTH = 96, 72
SKIN_LABELS = (sh.FACE_NECK, sh.SIDE_LABELS["left"][2], sh.SIDE_LABELS["right"][2])  # face, neck, hands

# sha256 (first 16 hex digits) of the pre-Sapiens2 outputs, computed with the generator before the labels
# were added: recorded datasets and results depend on these staying bit-identical.
REFERENCE_DIGESTS = {
    (0, 0, 64, 48, "scene"): "02fac18783c8478e",
    (7, 3, 96, 72, "scene"): "8d1b1eb011cfd069",
    (2, 5, 80, 64, "portrait"): "487b2edc4973b2e1",
    (4, 1, 64, 48, "studio"): "ab3ed0b3335daf68",
}


def digest(sample):
  """Hash of every output that existed before the Sapiens2 labels."""
  h = hashlib.sha256()
  for key in ("image", "mask", "seg", "depth", "normal", "instances"):
    array = np.ascontiguousarray(sample[key])
    h.update(key.encode())
    h.update(str(array.dtype).encode())
    h.update(array.tobytes())
  h.update(np.asarray(sample["keypoints"], np.float64).tobytes())
  h.update(json.dumps([sample["boxes"], sample["areas"], sample["instance_ids"],
                       list(map(float, sample["camera"]))]).encode())
  return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def samples():
  return ([sh.render_sample(1, i, HEIGHT, WIDTH) for i in range(4)]
          + [sh.render_sample(1, i, HEIGHT, WIDTH, "portrait") for i in range(3)])


@pytest.mark.parametrize("args", sorted(REFERENCE_DIGESTS))
def test_existing_outputs_are_unchanged(args):
  assert digest(sh.render_sample(*args)) == REFERENCE_DIGESTS[args]
  assert digest(sh.render_sample(*args, sapiens2=False)) == REFERENCE_DIGESTS[args]


def test_albedo_is_the_image_without_shading(samples):
  """image = 255 albedo x Lambert shading + N(0, 2) noise on every unclipped person pixel."""
  residuals = []
  for sample in samples:
    mask, albedo = sample["mask"], sample["albedo"]
    assert albedo.dtype == np.float32 and albedo.shape == (HEIGHT, WIDTH, 3)
    assert not albedo[~mask].any() and albedo.min() >= 0 and albedo.max() <= 1
    predicted = 255 * albedo[mask] * sh.shading(sample["normal"][mask], sample["light"])
    unclipped = (predicted > 10) & (predicted < 245)
    residuals.append((sample["image"][mask] - predicted)[unclipped])
    # Plain skin has one albedo per person while its shaded image varies; materials differ.
    for instance in sample["instance_ids"]:
      person = sample["instances"] == instance
      skin = person & np.isin(sample["seg"], SKIN_LABELS)
      if skin.sum() >= 20:
        assert np.ptp(albedo[skin], axis=0).max() == 0
        assert np.ptp(sample["image"][skin].astype(float), axis=0).max() > 20
      assert len(np.unique(albedo[person], axis=0)) >= 3
  residuals = np.concatenate(residuals)
  assert residuals.size > 5000
  assert abs(residuals.mean()) < 0.2 and 1.8 < residuals.std() < 2.3 and np.abs(residuals).max() < 12


def supersampled_coverage(people, camera, height, width):
  """Independent 4x4 supersampling: render at 4x and box-downsample the person mask.

  The high-res pixel U has its centre at low-res u = (U + 0.5) / 4 - 0.5, hence cx' = 4 cx + 1.5.
  """
  fine = sh.Camera(4 * camera.fx, 4 * camera.fy, 4 * camera.cx + 1.5, 4 * camera.cy + 1.5)
  hits = sh.render_people(people, fine, 4 * height, 4 * width)["instances"] > 0
  return hits.reshape(height, 4, width, 4).mean((1, 3))


@pytest.mark.parametrize("index, framing", [(0, "scene"), (1, "scene"), (2, "portrait")])
def test_alpha_is_sub_pixel_coverage_at_the_silhouette(index, framing):
  captured = []
  compose = sh.compose_sample

  def capture(people, camera, *args):
    captured.append((people, camera))
    return compose(people, camera, *args)

  sh.compose_sample = capture
  try:
    sample = sh.render_sample(3, index, HEIGHT, WIDTH, framing)
  finally:
    sh.compose_sample = compose
  (people, camera), = captured
  mask, alpha = sample["mask"], sample["alpha"]
  alpha8 = np.round(alpha * 255)
  assert alpha.dtype == np.float32 and np.array_equal(alpha, (alpha8 / 255).astype(np.float32))
  band = sh.silhouette_band(mask)
  np.testing.assert_array_equal(alpha[~band], mask[~band])  # 1 inside, 0 away from the person
  far = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
  assert far.sum() > 1000 and not alpha[far].any()
  fractional = (alpha > 0) & (alpha < 1)
  assert fractional.sum() > 30 and not fractional[~band].any()
  expected = supersampled_coverage(people, camera, HEIGHT, WIDTH)
  np.testing.assert_array_equal(alpha8[band], np.round(expected[band] * 255))
  # Outside the band only sub-pixel holes or slivers that no pixel centre sees may disagree.
  assert np.sum(expected[~band] != mask[~band]) <= 0.002 * mask.size


def check_matte(alpha8, foreground, background, matte):
  """The matte is the alpha composite of foreground over background, to 8-bit rounding."""
  a = alpha8[..., None] / 255.0
  composite = a * foreground + (1 - a) * background
  assert np.abs(matte - composite).max() <= 0.5 + 1e-9


def test_matte_is_the_composite_and_the_image_off_the_silhouette(samples):
  for sample in samples:
    alpha8 = np.round(sample["alpha"] * 255).astype(np.uint8)
    fg, bg, matte, image = sample["foreground"], sample["background"], sample["matte"], sample["image"]
    for array in (fg, bg, matte):
      assert array.dtype == np.uint8 and array.shape == image.shape
    check_matte(alpha8, fg, bg, matte)
    mask, band = sample["mask"], sh.silhouette_band(sample["mask"])
    np.testing.assert_array_equal(matte[~band], image[~band])
    np.testing.assert_array_equal(bg[~mask], image[~mask])  # the plate is the image where no person is
    np.testing.assert_array_equal(fg[mask & (alpha8 > 0)], image[mask & (alpha8 > 0)])
    assert not fg[alpha8 == 0].any()
    # At partly covered pixels the matte lies between the two layers and differs from the hard edge.
    partial = (alpha8 > 0) & (alpha8 < 255)
    low, high = np.minimum(fg, bg)[partial], np.maximum(fg, bg)[partial]
    assert np.all((matte[partial] >= low) & (matte[partial] <= high))
    assert np.any(matte[partial] != image[partial])


def test_pointmap_back_projects_each_pixel(samples):
  for sample in samples:
    camera, depth, mask = sample["camera"], sample["depth"], sample["mask"]
    points = sh.pointmap(depth, camera)
    assert points.dtype == np.float32 and points.shape == (HEIGHT, WIDTH, 3)
    assert not points[~mask].any()
    np.testing.assert_array_equal(points[..., 2], depth)
    rows, cols = np.nonzero(mask)
    xy = sh.project(camera, points[mask].astype(np.float64))
    np.testing.assert_allclose(xy[:, 0], cols, atol=1e-3)
    np.testing.assert_allclose(xy[:, 1], rows, atol=1e-3)
    np.testing.assert_array_equal(sh.pointmap(depth, camera._asdict()), points)  # a cameras.json entry


def read_png(path, mode):
  with Image.open(path) as png:
    assert png.mode == mode
    return np.asarray(png)


def test_write_dataset_writes_the_sapiens2_folders(tmp_path):
  num, height, width = 3, 64, 48
  plain, full = str(tmp_path / "plain"), str(tmp_path / "full")
  sh.write_dataset(plain, num, height, width, seed=3)
  sh.write_dataset(full, num, height, width, seed=3, sapiens2=True)
  with open(os.path.join(full, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["folders"] == ["images", "masks", "segs", "depths", "normals", "albedos", "alphas", "mattes",
                                 "backgrounds", "foregrounds"]
  assert manifest["folders"][5:] == list(sh.SAPIENS2_SUBDIRS) and manifest["cameras"] == "cameras.json"
  assert sorted(os.listdir(full)) == sorted(manifest["folders"] + ["cameras.json", "manifest.json",
                                                                   "person_keypoints.json"])
  assert not set(sh.SAPIENS2_SUBDIRS) & set(os.listdir(plain))
  with open(os.path.join(full, "cameras.json")) as f:
    cameras = json.load(f)
  assert sorted(cameras) == [f"{i:06d}" for i in range(num)]
  for i in range(num):
    name = f"{i:06d}"
    for folder, extension in (("images", ".jpg"), ("masks", ".png"), ("segs", ".png"), ("depths", ".npy"),
                              ("normals", ".npy")):  # the existing files do not depend on the flag
      with open(os.path.join(plain, folder, name + extension), "rb") as a, open(
          os.path.join(full, folder, name + extension), "rb") as b:
        assert a.read() == b.read()
    sample = sh.render_sample(3, i, height, width)
    assert cameras[name] == sample["camera"]._asdict()
    read = lambda folder, mode: read_png(os.path.join(full, folder, name + ".png"), mode)
    np.testing.assert_array_equal(read("albedos", "RGB"), np.round(sample["albedo"] * 255))
    alpha8 = read("alphas", "L")
    np.testing.assert_array_equal(alpha8, np.round(sample["alpha"] * 255))
    layers = [read(folder, "RGB") for folder in ("foregrounds", "backgrounds", "mattes")]
    for layer, key in zip(layers, ("foreground", "background", "matte")):
      np.testing.assert_array_equal(layer, sample[key])
    check_matte(alpha8, *layers)
    np.testing.assert_array_equal(sh.pointmap(np.load(os.path.join(full, "depths", name + ".npy")), cameras[name]),
                                  sh.pointmap(sample["depth"], sample["camera"]))
