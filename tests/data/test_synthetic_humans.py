"""Tests for sapiens_jax.data.synthetic_humans: exact geometry, labels, left/right and files."""
import json
import os

import numpy as np
from PIL import Image
from pycocotools.coco import COCO
import pytest

from sapiens_jax.data import synthetic_humans as sh
from sapiens_jax.data import transforms

HEIGHT, WIDTH = 96, 72
SAMPLES = range(6)


def rays_of(camera, height, width):
  """Independent per-pixel rays (z = 1) for pixel centres at integer coordinates."""
  v, u = np.mgrid[0:height, 0:width].astype(float)
  return np.stack([(u - camera.cx) / camera.fx, (v - camera.cy) / camera.fy, np.ones_like(u)], -1)


@pytest.fixture(scope="module")
def samples():
  return [sh.render_sample(1, i, HEIGHT, WIDTH) for i in SAMPLES]


def test_same_seed_and_index_give_identical_samples(samples):
  again = sh.render_sample(1, 0, HEIGHT, WIDTH)
  for key in ("image", "mask", "seg", "depth", "normal", "instances"):
    np.testing.assert_array_equal(again[key], samples[0][key])
  np.testing.assert_array_equal(np.array(again["keypoints"]), np.array(samples[0]["keypoints"]))
  assert again["boxes"] == samples[0]["boxes"]
  assert not np.array_equal(samples[0]["image"], samples[1]["image"])
  assert not np.array_equal(sh.render_sample(2, 0, HEIGHT, WIDTH)["image"], samples[0]["image"])


def test_dense_maps_agree_and_normals_face_the_camera(samples):
  for sample in samples:
    mask = sample["mask"]
    assert mask.any() and (~mask).any()
    np.testing.assert_array_equal(mask, sample["seg"] > 0)
    np.testing.assert_array_equal(mask, sample["depth"] > 0)
    np.testing.assert_array_equal(mask, sample["instances"] > 0)
    assert set(np.unique(sample["seg"])) <= set(sh.SEG_CLASSES_USED)
    depth = sample["depth"][mask]
    assert depth.min() > 1.0 and depth.max() < 10.0
    normal = sample["normal"]
    assert not normal[~mask].any()
    np.testing.assert_allclose(np.linalg.norm(normal[mask], axis=-1), 1.0, atol=1e-5)
    rays = rays_of(sample["camera"], HEIGHT, WIDTH)
    assert np.max(np.sum(normal * rays, -1)[mask]) < 1e-6


def test_ray_cast_matches_analytic_surfaces():
  """Every pixel of a lone capsule / ellipsoid lies on its surface, with the gradient as normal."""
  camera = sh.Camera(80.0, 80.0, 31.5, 23.5)
  axes = sh.body_rotation(0.4, 0.3, -0.2)  # any rotation
  capsule = sh.Capsule(np.array([-0.5, -0.2, 4.0]), np.array([0.4, 0.3, 4.5]), 0.2, sh.TORSO, 0)
  ellipsoid = sh.Ellipsoid(np.array([0.1, 0.1, 3.0]), axes, np.array([0.3, 0.2, 0.1]), sh.TORSO, 0,
                           False)
  rays = rays_of(camera, 48, 64)
  for primitive in (capsule, ellipsoid):
    person = sh.Person([primitive], np.zeros((17, 3)), np.zeros((17, 3)), np.zeros(17), None)
    render = sh.render_people([person], camera, 48, 64)
    mask = render["instances"] > 0
    assert mask.sum() > 100
    points = render["depth"][mask][:, None] * rays[mask]
    normal = render["normal"][mask]
    if primitive is capsule:
      axis = capsule.end - capsule.start
      along = np.clip((points - capsule.start) @ axis / (axis @ axis), 0, 1)
      offset = points - (capsule.start + along[:, None] * axis)
      np.testing.assert_allclose(np.linalg.norm(offset, axis=1), capsule.radius, atol=1e-6)
      expected = offset
    else:
      local = (points - ellipsoid.centre) @ axes
      np.testing.assert_allclose(np.sum((local / ellipsoid.radii)**2, 1), 1.0, atol=1e-6)
      expected = (local / ellipsoid.radii**2) @ axes.T
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(normal, expected, atol=1e-6)
    # The mask is exactly the rays that pass within the surface: distance from each ray to points
    # densely sampled inside the solid, compared with that solid's own size.
    directions = rays[..., None, :] / np.linalg.norm(rays, axis=-1)[..., None, None]
    if primitive is capsule:
      axis_points = capsule.start + np.linspace(0, 1, 400)[:, None] * (capsule.end - capsule.start)
      distance = np.linalg.norm(np.cross(directions, axis_points), axis=-1).min(-1)
      hits, misses = distance < capsule.radius - 1e-3, distance > capsule.radius + 1e-3
    else:  # in the frame where the ellipsoid is the unit sphere
      scaled_rays = (rays @ axes) / ellipsoid.radii
      scaled_centre = (ellipsoid.centre @ axes) / ellipsoid.radii
      unit_rays = scaled_rays / np.linalg.norm(scaled_rays, axis=-1, keepdims=True)
      distance = np.linalg.norm(np.cross(unit_rays, scaled_centre), axis=-1)
      hits, misses = distance < 1 - 1e-3, distance > 1 + 1e-3
    assert hits.sum() > 100 and misses.sum() > 100
    assert mask[hits].all() and not mask[misses].any()
  # Nearest surface wins: the centre pixel of the ellipsoid (z 2.9..3.1) in front of the capsule.
  both = sh.Person([capsule, ellipsoid], np.zeros((17, 3)), np.zeros((17, 3)), np.zeros(17), None)
  render = sh.render_people([both], camera, 48, 64)
  u, v = sh.project(camera, ellipsoid.centre[None])[0].round().astype(int)
  assert render["primitives"][v, u] == 1 and render["depth"][v, u] < 3.1


def test_normals_agree_with_depth_map():
  """Finite differences of back-projected depth are perpendicular to the normals."""
  rng = np.random.default_rng(0)
  camera = sh.Camera(300.0, 300.0, 95.5, 127.5)
  person = sh.build_person(sh.AVERAGE_SHAPE, sh.REST_POSE, sh.body_rotation(0.5), (0.0, 0.1, 3.0),
                           sh.sample_appearance(rng))
  render = sh.render_people([person], camera, 256, 192)
  points = render["depth"][..., None] * rays_of(camera, 256, 192)
  ids = render["primitives"]
  interior = ids[1:-1, 1:-1] >= 0
  for dv, du in ((-1, 0), (1, 0), (0, -1), (0, 1)):
    interior &= ids[1 + dv:255 + dv, 1 + du:191 + du] == ids[1:-1, 1:-1]
  assert interior.sum() > 2000
  normal = render["normal"][1:-1, 1:-1][interior]
  for tangent in (points[1:-1, 2:] - points[1:-1, :-2], points[2:, 1:-1] - points[:-2, 1:-1]):
    tangent = tangent[interior]
    cosine = np.abs(np.sum(tangent * normal, 1)) / np.linalg.norm(tangent, axis=1)
    assert np.median(cosine) < 0.02
    assert np.quantile(cosine, 0.98) < 0.2


def test_keypoints_and_boxes_are_consistent_with_the_pixels(samples):
  annotated = 0
  for sample in samples:
    instances = sample["instances"]
    for keypoints, box, area, instance in zip(sample["keypoints"], sample["boxes"], sample["areas"],
                                              sample["instance_ids"]):
      annotated += 1
      rows, cols = np.nonzero(instances == instance)
      assert area == len(rows) >= sh.MIN_VISIBLE_PIXELS
      assert box == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
      assert keypoints.shape == (17, 3) and set(np.unique(keypoints[:, 2])) <= {0, 1, 2}
      outside = keypoints[:, 2] == 0
      assert not keypoints[outside, :2].any()
      xy = keypoints[~outside, :2]
      assert np.all((xy >= -0.5) & (xy < np.array([WIDTH, HEIGHT]) - 0.5))
      for x, y, _ in keypoints[keypoints[:, 2] == 2]:
        assert instances[int(np.floor(y + 0.5)), int(np.floor(x + 0.5))] == instance
        assert box[0] - 0.5 <= x <= box[0] + box[2] - 0.5 and box[1] - 0.5 <= y <= box[1] + box[3] - 0.5
  assert annotated >= len(samples)
  all_keypoints = np.concatenate([np.array(s["keypoints"]) for s in samples])
  assert (all_keypoints[..., 2] == 1).any() and (all_keypoints[..., 2] == 2).any()


SPREAD_ARMS = dict(sh.REST_POSE, left_shoulder_abduct=np.pi / 2, right_shoulder_abduct=np.pi / 2)


def single_person_sample(yaw, pose=SPREAD_ARMS):
  """One person of average shape, 4 m in front of the camera, turned by `yaw`."""
  person = sh.build_person(sh.AVERAGE_SHAPE, pose, sh.body_rotation(yaw), (0.0, 0.2, 4.0),
                           sh.sample_appearance(np.random.default_rng(0)))
  rng = np.random.default_rng(0)
  camera = sh.Camera(90.0, 90.0, (WIDTH - 1) / 2, (HEIGHT - 1) / 2)
  background = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
  return sh.compose_sample([person], camera, background, sh.sample_light(rng), rng)


@pytest.mark.parametrize("yaw, left_is_image_right", [(0.0, True), (np.pi, False)])
def test_left_and_right_are_the_persons_own(yaw, left_is_image_right):
  sample = single_person_sample(yaw)
  (keypoints,) = sample["keypoints"]
  names = sh.KEYPOINT_NAMES
  left_wrist, right_wrist = keypoints[names.index("left_wrist")], keypoints[names.index("right_wrist")]
  assert left_wrist[2] == right_wrist[2] == 2
  assert (left_wrist[0] > right_wrist[0]) == left_is_image_right
  centre_x = (WIDTH - 1) / 2
  for part in range(5):  # all but the feet, which hide behind the shins when seen from the back
    left_cols = np.nonzero(sample["seg"] == sh.SIDE_LABELS["left"][part])[1]
    right_cols = np.nonzero(sample["seg"] == sh.SIDE_LABELS["right"][part])[1]
    assert len(left_cols) and len(right_cols), part
    if part < 3:  # arms are spread to the sides
      assert (left_cols.min() > centre_x) == left_is_image_right
      assert (right_cols.max() < centre_x) == left_is_image_right
  # The face is visible from the front and hidden from behind, where the head shows hair.
  face = keypoints[:3, 2]
  np.testing.assert_array_equal(face, 2 if left_is_image_right else 1)
  hair, face_pixels = (sample["seg"] == sh.HAIR).sum(), (sample["seg"] == sh.FACE_NECK).sum()
  assert (face_pixels > hair) == left_is_image_right


def test_far_side_joints_are_occluded_in_profile():
  """Seen from the right, the left joints hide behind the body or the right limbs (same person)."""
  sample = single_person_sample(np.pi / 2, pose=sh.REST_POSE)
  (keypoints,) = sample["keypoints"]
  for joint in ("shoulder", "knee", "ankle"):
    left, right = (keypoints[sh.KEYPOINT_NAMES.index(f"{side}_{joint}")] for side in ("left", "right"))
    assert left[2] == 1 and right[2] == 2, joint


def test_sampled_poses_stay_within_limits():
  rng = np.random.default_rng(0)
  poses = [sh.sample_pose(rng) for _ in range(200)]
  for name, (low, high) in sh.JOINT_LIMITS.items():
    values = np.array([pose[name] for pose in poses])
    assert values.min() >= low and values.max() <= high
    assert values.min() < 0.5 * low or low == 0  # reaches well towards both limits
    assert values.max() > 0.5 * high


def test_bad_arguments_raise():
  with pytest.raises(sh.SyntheticDataError, match="height and width"):
    sh.render_sample(0, 0, 8, 64)
  with pytest.raises(sh.SyntheticDataError, match="right_knee"):
    pose = dict(sh.REST_POSE)
    del pose["right_knee"]
    sh.build_person(sh.AVERAGE_SHAPE, pose, np.eye(3), (0, 0, 3), sh.sample_appearance(
        np.random.default_rng(0)))
  with pytest.raises(sh.SyntheticDataError, match="seed and index"):
    sh.render_sample(-1, 0, 64, 48)
  with pytest.raises(sh.SyntheticDataError, match="num"):
    sh.write_dataset("/nonexistent", 0, 64, 48)


def test_write_dataset_layout_and_coco(tmp_path):
  num, height, width = 4, 64, 48
  sh.write_dataset(str(tmp_path / "a"), num, height, width, seed=3)
  root = str(tmp_path / "a")
  coco = COCO(os.path.join(root, "person_keypoints.json"))
  assert sorted(coco.getImgIds()) == list(range(num))
  category = coco.loadCats(1)[0]
  assert category["keypoints"] == list(sh.KEYPOINT_NAMES)
  assert [16, 14] in category["skeleton"] and len(category["skeleton"]) == 19
  with open(os.path.join(root, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest == {"generator": "sapiens_jax.data.synthetic_humans", "seed": 3, "num": num,
                      "height": height, "width": width, "framing": "scene",
                      "seg_classes_used": list(sh.SEG_CLASSES_USED),
                      "folders": ["images", "masks", "segs", "depths", "normals"], "cameras": "cameras.json"}
  assert sorted(os.listdir(root)) == sorted(manifest["folders"] + ["cameras.json", "manifest.json",
                                                                   "person_keypoints.json"])
  for i in range(num):
    sample = sh.render_sample(3, i, height, width)
    name = f"{i:06d}"
    (info,) = coco.loadImgs(i)
    assert info["file_name"] == f"images/{name}.jpg" and (info["height"], info["width"]) == (height, width)
    with open(os.path.join(root, info["file_name"]), "rb") as f:
      image = transforms.decode_image(f.read(), info["file_name"])
    assert np.mean(np.abs(image.astype(float) - sample["image"])) < 12  # JPEG of a noisy image
    for folder, expected in (("masks", sample["mask"] * 255), ("segs", sample["seg"])):
      with Image.open(os.path.join(root, folder, name + ".png")) as png:
        assert png.mode == "L"
        np.testing.assert_array_equal(np.asarray(png), expected)
    for folder, key in (("depths", "depth"), ("normals", "normal")):
      array = np.load(os.path.join(root, folder, name + ".npy"))
      assert array.dtype == np.float32
      np.testing.assert_array_equal(array, sample[key])
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=i))
    assert len(annotations) == len(sample["keypoints"])
    for annotation, keypoints, box in zip(annotations, sample["keypoints"], sample["boxes"]):
      assert annotation["id"] > 0 and annotation["bbox"] == box
      np.testing.assert_allclose(np.reshape(annotation["keypoints"], (17, 3)), keypoints, atol=0.006)
      assert annotation["num_keypoints"] == np.sum(keypoints[:, 2] > 0)
  # Workers write the same files as one process.
  sh.write_dataset(str(tmp_path / "b"), num, height, width, seed=3, workers=2)
  for folder, name in (("normals", "000003.npy"), ("segs", "000002.png"), ("", "person_keypoints.json")):
    with open(os.path.join(root, folder, name), "rb") as a, open(
        os.path.join(tmp_path, "b", folder, name), "rb") as b:
      assert a.read() == b.read()


def test_portrait_and_studio_framings_centre_one_person_who_fills_the_frame():
  height, width = 96, 72
  relative = {"scene": [], "portrait": [], "studio": []}
  facing = {"portrait": [], "studio": []}
  for framing in relative:
    for i in range(12):
      sample = sh.render_sample(5, i, height, width, framing)
      for x, y, w, h in sample["boxes"]:
        relative[framing].append(max(w / width, h / height))
      if framing != "scene":
        (box,) = sample["boxes"]  # exactly one annotated person
        centre = np.array([box[0] + box[2] / 2, box[1] + box[3] / 2])
        assert np.all(np.abs(centre / [width, height] - 0.5) < 0.2), box
        keypoints = sample["keypoints"][0]  # facing the camera: the left side is on the image's right
        facing[framing].append(keypoints[5, 0] > keypoints[6, 0] and keypoints[11, 0] > keypoints[12, 0])
  for framing in ("portrait", "studio"):
    assert min(relative[framing]) > 0.5
    assert np.mean(relative[framing]) > 1.5 * np.mean(relative["scene"])
  # The studio person faces the camera; the portrait one is also seen from behind.
  assert all(facing["studio"]) and not all(facing["portrait"])
  with pytest.raises(sh.SyntheticDataError, match="framing"):
    sh.render_sample(0, 0, 64, 48, "closeup")


def test_studio_backgrounds_hold_no_shapes():
  """Studio backgrounds are smooth (gradient and soft noise); portrait ones carry hard-edged
  shapes that look like limbs. Measured as the strongest background step between neighbours."""
  def strongest_step(framing):
    steps = []
    for i in range(6):
      sample = sh.render_sample(2, i, 96, 72, framing)
      image, background = sample["image"].astype(float), ~sample["mask"]
      both = background[:, 1:] & background[:, :-1]
      steps.append(np.abs(image[:, 1:] - image[:, :-1]).max(-1)[both].max())
    return np.median(steps)
  assert strongest_step("studio") < 30 < strongest_step("portrait")
