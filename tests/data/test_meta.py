"""Tests for sapiens_jax.data.meta: the shipped dataset metadata and its checks."""
import json
import os
import shutil

import numpy as np
import pytest

from sapiens_jax.data import meta

# Reference §4.2 (COCO sigmas) and §5.1/§5.2 (Goliath classes, swaps, weights).
COCO_SIGMAS = [0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
               0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089]
GOLIATH_CLASS_WEIGHT = [0.1, 10, 3, 2, 4, 4, 2, 2, 6, 10, 3, 3, 1, 4, 4, 2, 2,
                        6, 10, 3, 3, 1, 1, 10, 10, 10, 10, 10]
GOLIATH_CLASSES = (
    "Background Apparel Face_Neck Hair Left_Foot Left_Hand Left_Lower_Arm"
    " Left_Lower_Leg Left_Shoe Left_Sock Left_Upper_Arm Left_Upper_Leg"
    " Lower_Clothing Right_Foot Right_Hand Right_Lower_Arm Right_Lower_Leg"
    " Right_Shoe Right_Sock Right_Upper_Arm Right_Upper_Leg Torso"
    " Upper_Clothing Lower_Lip Upper_Lip Lower_Teeth Upper_Teeth Tongue").split()


def mirror_name(name):
  """Independent name-based mirror for the sets whose names carry the side."""
  for a, b in (("left_", "right_"), ("right_", "left_"),
               ("l_", "r_"), ("r_", "l_")):
    if name.startswith(a):
      return b + name[len(a):]
  return name


@pytest.mark.parametrize("name,count", [
    ("coco17", 17), ("coco_wholebody133", 133), ("goliath308", 308)])
def test_skeleton_shapes_and_flip_involution(name, count):
  s = meta.skeleton(name)
  assert s.num_keypoints == count == len(set(s.names))
  assert s.flip_indices.dtype == np.int32 and s.flip_indices.shape == (count,)
  np.testing.assert_array_equal(s.flip_indices[s.flip_indices], np.arange(count))
  assert s.sigmas.dtype == np.float32 and np.all(s.sigmas > 0)
  assert s.keypoint_colors.shape == (count, 3)
  assert s.link_colors.shape == (len(s.links), 3)
  assert s.keypoint_colors.dtype == s.link_colors.dtype == np.uint8
  # The mirror image of every skeleton link is a link too.
  links = {frozenset(link) for link in s.links}
  mirrored = {frozenset(int(s.flip_indices[k]) for k in link) for link in s.links}
  assert mirrored == links
  left_wrist, right_wrist = s.names.index("left_wrist"), s.names.index("right_wrist")
  assert s.flip_indices[left_wrist] == right_wrist
  assert s.flip_indices[s.names.index("nose")] == s.names.index("nose")
  with pytest.raises(ValueError):
    s.sigmas[0] = 1.0  # Cached and shared: must not be writable.


def test_coco17_facts():
  s = meta.skeleton("coco17")
  np.testing.assert_array_equal(s.sigmas, np.float32(COCO_SIGMAS))
  np.testing.assert_array_equal(
      s.flip_indices, [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15])
  assert s.upper_body_ids == tuple(range(11))
  assert s.lower_body_ids == tuple(range(11, 17))
  assert (s.names.index("left_ankle"), s.names.index("left_knee")) in s.links


def test_wholebody_facts():
  s = meta.skeleton("coco_wholebody133")
  assert s.names[:17] == meta.skeleton("coco17").names
  np.testing.assert_array_equal(s.sigmas[:17], np.float32(COCO_SIGMAS))
  for k, name in enumerate(s.names):
    if not name.startswith("face-"):
      assert s.names[s.flip_indices[k]] == mirror_name(name), name
  # Face contour: face-0 <-> face-16, the chin tip face-8 stays.
  face = s.names.index("face-0")
  assert s.flip_indices[face] == s.names.index("face-16")
  assert s.flip_indices[face + 8] == face + 8
  assert s.lower_body_ids == tuple(range(11, 23))  # Hips .. heels.


def test_goliath308_facts():
  s = meta.skeleton("goliath308")
  wholebody = meta.skeleton("coco_wholebody133")
  assert not [n for n in s.names if n.startswith("teeth")]
  # Teeth were ids 220..255 of 344; later ids moved down by 36.
  assert s.names[219] == "midpoint_6_of_lower_inner_lip"
  assert s.names[220] == "l_top_end_of_inferior_crus"
  assert s.names[-1] == "r_border_of_pupil_midpoint_2"
  for k, name in enumerate(s.names):
    expected = name if "eyebrow" in name else mirror_name(name)
    if "nostril" in name:
      expected = name.replace("_r_", "_x_").replace("_l_", "_r_").replace("_x_", "_l_")
    assert s.names[s.flip_indices[k]] == expected, name
  sigma = dict(zip(s.names, s.sigmas.tolist()))
  wb_sigma = dict(zip(wholebody.names, wholebody.sigmas.tolist()))
  assert sigma["neck"] == pytest.approx(0.079)
  assert sigma["left_olecranon"] == pytest.approx(0.072)
  assert sigma["right_pinky_finger_third_joint"] == pytest.approx(0.02)
  assert sigma["center_of_glabella"] == pytest.approx(0.010)
  assert sigma["right_thumb4"] == wb_sigma["right_thumb4"]
  assert sigma["left_heel"] == wb_sigma["left_heel"]
  assert s.lower_body_ids == tuple(range(9, 21))


def test_seg28_facts():
  c = meta.seg_classes("seg28")
  assert list(c.names) == GOLIATH_CLASSES
  np.testing.assert_array_equal(c.class_weight, np.float32(GOLIATH_CLASS_WEIGHT))
  assert c.swap_pairs == ((4, 13), (5, 14), (6, 15), (7, 16), (8, 17), (9, 18),
                          (10, 19), (11, 20))
  assert c.palette.shape == (28, 3) and c.palette.dtype == np.uint8
  assert c.palette[0].tolist() == [50, 50, 50]  # Background.
  assert len({tuple(p) for p in c.palette.tolist()}) == 28


def test_seg20_facts():
  c = meta.seg_classes("seg20")
  assert c.num_classes == 20 and c.names[0] == "Background"
  assert c.swap_pairs == ((14, 15), (16, 17), (18, 19))
  for a, b in c.swap_pairs:
    assert c.names[a].replace("Left", "Right") == c.names[b]
  assert c.palette.shape == (20, 3) and c.class_weight.shape == (20,)
  assert len({tuple(p) for p in c.palette.tolist()}) == 20


def test_every_file_names_its_source():
  for name in meta.SKELETONS + meta.SEG_CLASS_SETS:
    with open(os.path.join(meta.META_DIR, name + ".json")) as f:
      assert "facebookresearch/sapiens" in json.load(f)["source"]


@pytest.fixture
def broken_meta(tmp_path, monkeypatch):
  """Copies the metadata to tmp_path; returns a function that edits a file."""
  shutil.copytree(meta.META_DIR, tmp_path / "meta")
  monkeypatch.setattr(meta, "META_DIR", str(tmp_path / "meta"))
  meta.skeleton.cache_clear()
  meta.seg_classes.cache_clear()

  def edit(name, change):
    path = tmp_path / "meta" / (name + ".json")
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return str(path)

  yield edit
  meta.skeleton.cache_clear()
  meta.seg_classes.cache_clear()


@pytest.mark.parametrize("change,message", [
    (lambda d: d["flip_pairs"].append([1, 5]), "flip_pairs"),
    (lambda d: d["sigmas"].__setitem__(3, 0.0), "sigmas"),
    (lambda d: d["keypoint_names"].pop(), "num_keypoints"),
    (lambda d: d["links"].append([0, 17]), "links"),
    (lambda d: d.pop("keypoint_colors"), "keypoint_colors"),
    (lambda d: d["link_colors"].__setitem__(0, [0, 300, 0]), "link_colors"),
    (lambda d: d["links"].__setitem__(0, [0, 1, 2]), "links"),
])
def test_bad_skeleton_file_names_the_file(broken_meta, change, message):
  path = broken_meta("coco17", change)
  with pytest.raises(meta.MetadataError, match=message) as info:
    meta.skeleton("coco17")
  assert path in str(info.value)


def test_bad_seg_file_and_unknown_names(broken_meta):
  path = broken_meta("seg20", lambda d: d["class_weight"].pop())
  with pytest.raises(meta.MetadataError, match="class_weight") as info:
    meta.seg_classes("seg20")
  assert path in str(info.value)
  with pytest.raises(meta.MetadataError, match="coco17"):
    meta.skeleton("coco18")
  with pytest.raises(meta.MetadataError, match="seg28"):
    meta.seg_classes("coco17")
