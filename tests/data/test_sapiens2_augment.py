"""Sapiens2's seg and normal training augmentations (sapiens2.md §3.1, §3.2): sizes and types, labels that
stay class ids, each step's odds, what a flip does, the cat_max_ratio crop, unit normals, image-only steps,
and the tasks picking these recipes under config.recipe == "sapiens2"."""
import cv2
import numpy as np
import pytest

from sapiens_jax import tasks
from sapiens_jax.data import dense_transforms as dt
from sapiens_jax.data import meta
from sapiens_jax.data import sapiens2_augment as s2a
from sapiens_jax.data import views

from test_dense_data import person_sample

SEG29_SWAPS = meta.seg_classes("seg29").swap_pairs  # 5 Left_Foot <-> 14 Right_Foot, ...
SIZE = (32, 24)  # (H, W): portrait, while person_sample is a 48x64 landscape
BACKGROUNDS = [np.full((20, 30, 3), 9, np.uint8)]
NUM_SEEDS = 1000  # a rate's standard deviation is 0.0145 at p = 0.3
ODDS_TOLERANCE = 0.05
ALIGNMENT_MARGIN = 2  # pixels; see test_image_and_targets_move_together


def seg_input():
  """person_sample's image and labels (0, 2, 5 beside 14), with an ignored block beside class 14."""
  image, label, *_ = person_sample()
  label[10:40, 44:50] = dt.IGNORE_INDEX
  return image, label


def seg_sample(seed, image=None, label=None, **kwargs):
  if image is None:
    image, label = seg_input()
  return s2a.seg_train_sample(image, {"label": label}, np.random.default_rng(seed), swap_pairs=SEG29_SWAPS,
                              size=SIZE, **kwargs)


def normal_sample(seed, image=None, mask=None, normal=None, **kwargs):
  if image is None:
    image, _, mask, _, normal = person_sample()
  return s2a.normal_train_sample(image, {"mask": mask, "normal": normal}, np.random.default_rng(seed),
                                 size=SIZE, **kwargs)


# --- sizes, types, values --------------------------------------------------------------


def test_seg_samples_have_the_size_and_only_the_input_labels():
  """Labels are resampled nearest: 5 beside 14 and 14 beside 255 never blend into other ids; rotation fills
  with 0, and the flip turns 5 and 14 into each other."""
  for seed in range(100):
    out = seg_sample(seed, background_images=BACKGROUNDS)
    assert out["image"].shape == (*SIZE, 3) and out["image"].dtype == np.uint8
    assert out["label"].shape == SIZE and out["label"].dtype == np.int32
    assert set(np.unique(out["label"])) <= {0, 2, 5, 14, dt.IGNORE_INDEX}, seed


def test_normal_samples_are_unit_on_the_person_and_marked_elsewhere():
  for seed in range(100):
    out = normal_sample(seed)
    assert out["image"].shape == (*SIZE, 3) and out["image"].dtype == np.uint8
    assert out["normal"].shape == (*SIZE, 3) and out["normal"].dtype == np.float32
    person = dt.normal_foreground(out["normal"])
    assert person.any() and not person.all(), seed
    np.testing.assert_allclose(np.linalg.norm(out["normal"][person], axis=-1), 1, rtol=1e-5)
    assert (out["normal"][~person] == dt.NORMAL_BACKGROUND).all()


def test_a_seed_fixes_the_sample():
  for sample, target in ((seg_sample, "label"), (normal_sample, "normal")):
    first, again = sample(7), sample(7)
    np.testing.assert_array_equal(first["image"], again["image"])
    np.testing.assert_array_equal(first[target], again[target])
    assert any((sample(seed)["image"] != first["image"]).any() for seed in range(3))


# --- odds of each step -----------------------------------------------------------------


def changed_its_image(args, out):
  return not np.array_equal(out, args[0])


def fire_rate(monkeypatch, owner, name, make_sample, fired):
  """The fraction of NUM_SEEDS samples in which `owner.name` was called and `fired(args, result)`."""
  original = getattr(owner, name)
  calls = []

  def spy(*args, **kwargs):
    out = original(*args, **kwargs)
    calls.append(fired(args, out))
    return out
  monkeypatch.setattr(owner, name, spy)
  count = 0
  for seed in range(NUM_SEEDS):
    start = len(calls)
    make_sample(seed)
    count += any(calls[start:])
  return count / NUM_SEEDS


# Inputs halved to 24x32: fast enough for NUM_SEEDS samples.
SMALL_IMAGE, SMALL_LABEL = (a[::2, ::2] for a in seg_input())
_, _, SMALL_MASK, _, SMALL_NORMAL = (a[::2, ::2] for a in person_sample())


def small_seg_sample(seed):
  return seg_sample(seed, SMALL_IMAGE, SMALL_LABEL, background_images=BACKGROUNDS)


def small_normal_sample(seed):
  return normal_sample(seed, SMALL_IMAGE, SMALL_MASK, SMALL_NORMAL, background_images=BACKGROUNDS)


# sapiens2.md's odds of each step (module, function) in each recipe; the flips are measured on outputs below.
ODDS = {
    (dt, "composite_background"): {"seg": 0.8, "normal": 0.0},  # §3.2 pastes no background
    (dt, "random_resize"): {"seg": 1.0, "normal": 0.3},
    (dt, "random_crop"): {"seg": 0.3},
    (s2a, "continuous_crop"): {"normal": 0.3},
    (s2a, "down_up_sample"): {"normal": 0.2},
    (views, "gaussian_blur"): {"seg": 0.3, "normal": 0.3},
    (s2a, "gaussian_noise"): {"seg": 0.3, "normal": 0.3},
    (dt, "rotate"): {"seg": 0.5, "normal": 0.0},
    (views, "solarize"): {"seg": 0.0, "normal": 0.3},
}
STEPS = [(recipe, owner, name, odds) for (owner, name), by_recipe in ODDS.items()
         for recipe, odds in by_recipe.items()]


@pytest.mark.parametrize("recipe, owner, name, odds", STEPS, ids=[f"{step[0]}-{step[2]}" for step in STEPS])
def test_each_step_happens_at_its_odds(recipe, owner, name, odds, monkeypatch):
  """Called only when a step happens, except composite_background, which says so by changing the image."""
  make_sample = small_seg_sample if recipe == "seg" else small_normal_sample
  fired = changed_its_image if name == "composite_background" else lambda args, out: True
  assert fire_rate(monkeypatch, owner, name, make_sample, fired) == pytest.approx(odds, abs=ODDS_TOLERANCE)


# --- flips -----------------------------------------------------------------------------


def test_seg_flip_mirrors_and_swaps_left_and_right_at_its_odds():
  """Left half Left_Foot (5), right half Apparel (1, no twin): unflipped, 5 stays on the left; flipped, the
  left half lands on the right as Right_Foot (14). Rotation (up to 60 degrees) keeps each half's side."""
  image = np.random.default_rng(0).integers(0, 256, (64, 48, 3), np.uint8)
  label = np.ones((64, 48), np.uint8)
  label[:, :24] = 5
  flips = 0
  for seed in range(400):
    out = seg_sample(seed, image, label, ratio_range=(1.0, 1.0))["label"]  # the crop keeps all: 64x48 -> 32x24
    flipped = (out == 14).any()
    assert (out == 5).any() != flipped, seed
    foot = out == (14 if flipped else 5)
    assert (np.nonzero(foot)[1].mean() > SIZE[1] / 2) == flipped, seed
    flips += flipped
  assert flips / 400 == pytest.approx(0.5, abs=0.1)


def test_normal_flip_negates_x_at_its_odds():
  image, _, mask, _, _ = person_sample()
  normal = np.broadcast_to(np.float32([0.48, 0.6, 0.64]), (*mask.shape, 3))  # unit length
  flips = 0
  for seed in range(400):
    out = normal_sample(seed, image, mask, normal)["normal"]
    person = out[dt.normal_foreground(out)]
    assert person.size, seed
    np.testing.assert_allclose(np.abs(person), np.broadcast_to([0.48, 0.6, 0.64], person.shape), rtol=1e-6)
    assert (person[:, 1:] > 0).all()
    negated = person[:, 0] < 0
    assert negated.all() or not negated.any(), seed
    flips += negated.all()
  assert flips / 400 == pytest.approx(0.3, abs=0.1)


# --- image and targets together -------------------------------------------------------


def silhouette(height=64, width=48):
  """A white person (a centred box) on black, and its mask."""
  mask = np.zeros((height, width), np.uint8)
  mask[height // 5:-height // 5, width // 5:-width // 3] = 1
  return np.repeat(mask[..., None] * np.uint8(255), 3, axis=-1), mask


def within(a, b, margin):
  """Whether every pixel of mask `a` lies within `margin` pixels (chessboard) of mask `b`."""
  grown = cv2.dilate(b.astype(np.uint8), np.ones((2 * margin + 1,) * 2, np.uint8)) > 0
  return not (a & ~grown).any()


@pytest.mark.parametrize("recipe", ["seg", "normal"])
def test_image_and_targets_move_together(recipe, monkeypatch):
  """Every geometric step moves the image and its targets alike: the person the image shows (white, which
  photometric distortion keeps above 80; the image-only blur, noise, down-up and solarize are off) is the
  target's person to within ALIGNMENT_MARGIN pixels. Ratios of 1 or more, so a source pixel is no larger
  than an output pixel; the margin is v1's resampling: its nearest resize (cv2's, which floors) trails the
  bilinear image by up to half a source pixel at each resize, and rotation's nearest edge is a pixel's jag."""
  for name in ("BLUR_PROB", "NOISE_PROB", "DOWN_UP_PROB", "SOLARIZE_PROB"):
    monkeypatch.setattr(s2a, name, 0.0)
  image, mask = silhouette()
  for seed in range(100):
    if recipe == "seg":
      out = seg_sample(seed, image, mask * np.uint8(22), ratio_range=(1.0, 2.0))  # Torso
      person = out["label"] == 22
    else:
      out = normal_sample(seed, image, mask, np.broadcast_to(np.float32([0, 0, 1]), (*mask.shape, 3)),
                          ratio_range=(1.0, 2.0))
      person = dt.normal_foreground(out["normal"])
    shown = out["image"].max(axis=-1) > 80
    assert person.any(), seed
    assert within(shown, person, ALIGNMENT_MARGIN) and within(person, shown, ALIGNMENT_MARGIN), seed


# --- the cat_max_ratio crop ------------------------------------------------------------


def quadrant_label(height, width):
  """Top-left and bottom-right Apparel (1), the others Eyeglass (2): a half-size window holds both classes
  near 50/50 around the centre and one class alone at the corners."""
  label = np.full((height, width), 2, np.uint8)
  label[:height // 2, :width // 2] = 1
  label[height // 2:, width // 2:] = 1
  return label


def largest_class_share(label):
  _, counts = np.unique(label[label != dt.IGNORE_INDEX], return_counts=True)
  return counts.max() / counts.sum() if len(counts) > 1 else 1.0


def test_the_crop_avoids_windows_where_one_class_covers_three_quarters(monkeypatch):
  """The image is twice SIZE, so the crop picks a quarter of it; about 15% of such windows hold 75% or more
  of one class (checked on plain crops), which a 10-draw retry practically never returns."""
  monkeypatch.setattr(s2a, "SEG_CROP_PROB", 1.0)
  monkeypatch.setattr(s2a, "SEG_ROTATE_PROB", 0.0)  # its class-0 fill would change the shares
  height, width = 2 * SIZE[0], 2 * SIZE[1]
  image = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
  label = quadrant_label(height, width)
  plain = [dt.random_crop(image, {"label": label}, np.random.default_rng(seed), SIZE)[1]["label"]
           for seed in range(200)]
  assert np.mean([largest_class_share(crop) >= 0.75 for crop in plain]) > 0.1
  for seed in range(200):
    out = seg_sample(seed, image, label, ratio_range=(2.0, 2.0))["label"]
    assert largest_class_share(out) < 0.75, seed


# --- image-only steps ------------------------------------------------------------------


def only(monkeypatch, step):
  """Every probabilistic step of the normal recipe off but `step` (photometric distortion stays)."""
  for name in ("DOWN_UP_PROB", "NORMAL_SCALE_PROB", "NORMAL_CROP_PROB", "NORMAL_FLIP_PROB", "BLUR_PROB",
               "NOISE_PROB", "SOLARIZE_PROB"):
    monkeypatch.setattr(s2a, name, 1.0 if name == step else 0.0)


@pytest.mark.parametrize("step", ["DOWN_UP_PROB", "SOLARIZE_PROB"])
def test_down_up_sampling_and_solarize_change_only_the_image(step, monkeypatch):
  image, _, mask, _, normal = person_sample()
  sample = lambda: normal_sample(3, image, mask, normal, ratio_range=(1.0, 1.0))
  only(monkeypatch, None)
  before = sample()
  only(monkeypatch, step)
  after = sample()
  np.testing.assert_array_equal(after["normal"], before["normal"])
  if step == "SOLARIZE_PROB":
    np.testing.assert_array_equal(after["image"], views.solarize(before["image"], s2a.SOLARIZE_THRESHOLD))
  else:  # detail lost: neighbouring pixels closer
    detail = lambda x: np.abs(np.diff(x.astype(np.int32), axis=1)).mean()
    assert detail(after["image"]) < 0.8 * detail(before["image"])


def test_down_up_sample_removes_detail_below_its_resolution():
  checker = (np.add.outer(np.arange(16), np.arange(12)) % 2 * 255).astype(np.uint8)
  image = np.repeat(checker[..., None], 3, axis=-1)
  out = s2a.down_up_sample(image, 0.5)
  assert out.shape == image.shape and out.dtype == np.uint8
  assert out.min() >= 127 and out.max() <= 128  # each 2x2 block averages to grey


def test_gaussian_noise_is_zero_mean_within_the_chosen_spread():
  image = np.full((64, 64, 3), 128, np.uint8)
  for seed in range(5):
    difference = s2a.gaussian_noise(image, np.random.default_rng(seed)).astype(np.float64) - 128
    assert abs(difference.mean()) < 0.3
    low, high = np.sqrt(s2a.NOISE_VARIANCE_RANGE)
    assert 0.95 * low < difference.std() < 1.05 * high


# --- resize ratios and the tasks -------------------------------------------------------


def test_data_scale_range_narrows_the_recipes_ratios():
  assert s2a.ratio_range_within(s2a.SEG_RATIO_RANGE, (0.2, 2.0)) == (0.4, 2.0)  # the default: Sapiens2's
  assert s2a.ratio_range_within(s2a.NORMAL_RATIO_RANGE, (0.2, 2.0)) == (0.5, 2.0)
  assert s2a.ratio_range_within(s2a.SEG_RATIO_RANGE, (0.8, 1.25)) == (0.8, 1.25)  # configs/synthetic.py
  with pytest.raises(ValueError, match=r"data\.scale_range"):
    s2a.ratio_range_within(s2a.NORMAL_RATIO_RANGE, (0.2, 0.3))


@pytest.mark.parametrize("dataset, task, recipe", [
    ("sapiens2_seg", "seg", s2a.seg_train_sample), ("seg", "seg", dt.seg_train_sample),
    ("sapiens2_normal", "normal", s2a.normal_train_sample), ("normal", "normal", dt.normal_train_sample)])
def test_the_tasks_pick_the_recipe_of_the_config(dataset, task, recipe, finetune_config):
  example = tasks.get(task).train_example(finetune_config(dataset), source=None)
  assert example.args[0] is recipe
