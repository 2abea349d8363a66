"""2D pose, top-down (reference §4): mmpose's heatmap head over 17 / 133 / 308 keypoints, UDP
Gaussian heatmaps, keypoint MSE (or OHKM), OKS AP with the reference's flip test, skeletons drawn.

Every person box is its own example: training crops are augmented around the box, evaluation and
prediction crops are the padded 3:4 box, and keypoints go back to image pixels through the crop's
centre and scale.
"""
import functools
import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from sapiens_jax import losses
from sapiens_jax import metrics
from sapiens_jax import visualize
from sapiens_jax.data import coco_source
from sapiens_jax.data import heatmaps as heatmap_codec
from sapiens_jax.data import meta
from sapiens_jax.data import photometric
from sapiens_jax.data import pose_transforms
from sapiens_jax.data import record_sources
from sapiens_jax.data import transforms
from sapiens_jax.tasks import heads
from sapiens_jax.tasks import heads2

TORCH_PREFIX = "head."  # mmpose's
TARGET = "heatmaps"
# pycocotools' ten statistics, all higher-is-better; the best checkpoint is chosen by AP.
LABEL_SETS = meta.SKELETONS  # a head may be fine-tuned on any of them (init_from reads which)
# With a whole-body skeleton also AP and AR of each of its parts alone (meta.Skeleton.subsets), as
# COCO-WholeBody's and Sapiens2's Keypoints308 evaluations report them.
PARTS = ("body", "foot", "face", "left_hand", "right_hand")
METRICS = {name: "max" for name in ("AP", "AP50", "AP75", "AP_M", "AP_L", "AR", "AR50", "AR75", "AR_M", "AR_L",
                                     "PCK@0.05", "PCK@0.1", "PCK@0.2",
                                     *(f"{part}_{stat}" for part in PARTS for stat in ("AP", "AR")))}
PCK_THRESHOLDS = (0.05, 0.1, 0.2)  # of the person box's longer side (mmpose PCKAccuracy, norm_item="bbox")
RECORDS_FILE = "keypoints.json"  # predict: every person of every photo, in COCO result format
SYNTHETIC_ANNOTATIONS = "person_keypoints.json"  # where sapiens_jax.data.synthetic_humans writes them
KEYPOINT_SCORE_THRESHOLD = 0.2  # mmpose CocoMetric: keypoints above it make the instance score
COCO_TRAIN_PERSONS = 149_813  # person instances with keypoints in COCO train2017


def configure(config, dataset, size):
  """The reference recipe: 210 epochs of COCO's people, warm-up 500, x0.1 at epochs 170 and 200.
  Sapiens2's (sapiens2.md §3.5, §4): its schedule from the recipe table, keypoint MSE x10."""
  config.loss.name = "ohkm" if (dataset, size) in (("goliath", "0.3b"), ("goliath", "1b")) else "mse"
  config.loss.ohkm_topk = 128
  config.loss.heatmap_sigma = 6.0  # UDP Gaussian heatmaps at 1/4 of the input size
  config.best_metric = "AP"
  if config.recipe == "sapiens2":
    return
  config.total_steps = 210 * COCO_TRAIN_PERSONS // config.batch_size
  config.optim.warmup_steps = 500
  config.optim.schedule, config.optim.milestones = "multistep", (170 / 210, 200 / 210)
  if (dataset, size) == ("goliath", "1b"):
    config.optim.layer_decay = 0.95


def skeleton(config):
  return meta.skeleton(config.data.labels)


def head(num_keypoints, channels=768, dtype=jnp.float32):
  """mmpose HeatmapHead: x4 upsampling to K heatmaps (64x48 -> 256x192); Normal(0.001) init, biases 0."""
  return heads.DenseHead((channels,) * 2, (channels,) * 2, num_keypoints, "final_layer", dtype=dtype)


def make_head(config):
  if config.recipe == "sapiens2":
    return heads2.pose_head(config.model.size, skeleton(config).num_keypoints, jnp.dtype(config.model.dtype))
  return head(skeleton(config).num_keypoints, config.model.head_channels, jnp.dtype(config.model.dtype))


def heatmap_size(image_size):
  """(W, H) of the heatmaps: the head upsamples the 1/16 grid 4x, so 1/4 of the input."""
  return image_size[1] // 4, image_size[0] // 4


def target_spec(config, batch_size):
  width, height = heatmap_size(config.image_size)
  count = skeleton(config).num_keypoints
  return {"heatmaps": jax.ShapeDtypeStruct((batch_size, height, width, count), jnp.float32),
          "target_weight": jax.ShapeDtypeStruct((batch_size, count), jnp.float32)}


def loss(config, outputs, batch):
  if config.recipe == "sapiens2":
    return sum(losses.sapiens2_keypoint_loss(outputs, batch["heatmaps"], batch["target_weight"]).values())
  if config.loss.name == "ohkm":
    return losses.keypoint_ohkm_mse(outputs, batch["heatmaps"], batch["target_weight"], config.loss.ohkm_topk)
  return losses.keypoint_mse(outputs, batch["heatmaps"], batch["target_weight"])


def eval_outputs(forward, images, config):
  """Heatmaps averaged with those of the mirrored crop, brought back to the original orientation
  with left and right channels swapped, no shift (reference §4.1)."""
  flip_indices = jnp.asarray(skeleton(config).flip_indices)
  flipped = forward(images[:, :, ::-1])
  return 0.5 * (forward(images) + flipped[:, :, ::-1][..., flip_indices])


predict_outputs = eval_outputs


# ---------------------------------------------------------------- data

def make_source(config, root, split):
  """The people of a COCO keypoint file (or of a converted folder, whose shards hold the JSON)."""
  if record_sources.read_manifest(root) is not None:
    return record_sources.RecordPoseSource(root)
  if config.data.source == "synthetic":
    annotations = os.path.join(root, SYNTHETIC_ANNOTATIONS)
  else:
    annotations = config.data.eval_annotations if split == "eval" else config.data.annotations
  return coco_source.CocoKeypointSource(annotations, root)


def _read_person(source, index):
  element = source[index]
  return element, transforms.decode_image(source.read_bytes(element), element["image_name"])


def _train_sample(source, labels, image_size, sigma, index, rng):
  element, image = _read_person(source, index)
  bones = meta.skeleton(labels)
  sample = pose_transforms.topdown_train_sample(
      image, element["bbox"], element["keypoints"], element["visible"], rng,
      flip_indices=bones.flip_indices, upper_ids=bones.upper_body_ids, lower_ids=bones.lower_body_ids,
      input_size=image_size[::-1], heatmap_size=heatmap_size(image_size), sigma=sigma,
      photometric=photometric.photometric_distortion)
  return {"image": sample["image"], "heatmaps": sample["heatmaps"], "target_weight": sample["target_weight"]}


def train_example(config, source):
  """`(index, rng) -> training sample` of person `index` (reference §4.4); picklable."""
  return functools.partial(_train_sample, source, config.data.labels, tuple(int(s) for s in config.image_size),
                           config.loss.heatmap_sigma)


def eval_example(config, source, index):
  """The un-augmented crop of person `index`, with what evaluation needs to map keypoints back
  (centre, scale, image id) and the annotated keypoints in crop pixels (for pictures)."""
  element, image = _read_person(source, index)
  input_size = tuple(int(s) for s in config.image_size)[::-1]
  sample = pose_transforms.topdown_eval_sample(image, element["bbox"], input_size)
  matrix = pose_transforms.udp_affine_matrix(sample["center"], sample["scale"], 0.0, input_size)
  sample["keypoints"] = pose_transforms.transform_points(element["keypoints"], matrix).astype(np.float32)
  sample["visible"] = np.asarray(element["visible"], np.float32)
  sample["image_id"] = np.int64(element["image_id"])
  sample["bbox"] = np.asarray(element["bbox"], np.float32)  # (x, y, w, h) in image pixels, for PCK
  return sample


def convert_records(input_dir, annotations, output):
  """(count, records, manifest extras) of the images with usable people; the JSON is copied
  next to the shards."""
  if not annotations:
    raise ValueError("--annotations (the COCO keypoint JSON) is needed to convert a pose dataset")
  coco = coco_source.CocoKeypointSource(annotations, input_dir)
  used = {coco[i]["image_id"] for i in range(len(coco))}
  images = [image for image in coco.images if image["id"] in used]
  shutil.copyfile(annotations, os.path.join(output, record_sources.POSE_ANNOTATIONS))

  def records():
    for image in images:
      with open(os.path.join(input_dir, image["file_name"]), "rb") as f:
        data = f.read()
      yield serialization.msgpack_serialize(
          {"image_id": image["id"], "files": {"image": image["file_name"]}, "image": data})
  extra = {"annotations": os.path.abspath(annotations), "image_ids": [image["id"] for image in images]}
  return len(images), records(), extra


# ---------------------------------------------------------------- evaluation

def keypoints_from_heatmaps(heatmaps, centers, scales, input_size):
  """(N, h, w, K) heatmaps of N crops -> (keypoints (N, K, 2) in image pixels, scores (N, K))."""
  keypoints, scores = heatmap_codec.decode(heatmaps, input_size=input_size)
  in_image = [heatmap_codec.to_image_coords(k, c, s, input_size) for k, c, s in zip(keypoints, centers, scales)]
  return np.asarray(in_image, np.float32).reshape(keypoints.shape), scores


def pose_result(keypoints, scores, **ids):
  """One person as a COCO keypoint result; its score is the mean of its confident keypoints."""
  confident = scores[scores > KEYPOINT_SCORE_THRESHOLD]
  return {**ids, "category_id": 1,
          "keypoints": np.concatenate([keypoints, scores[:, None]], axis=1).ravel().tolist(),
          "score": float(confident.mean()) if confident.size else 0.0}


@functools.lru_cache(maxsize=2)
def _ground_truth(annotation_json):
  """The eval split's COCO JSON, read once per run rather than at every evaluation (never mutated)."""
  with open(annotation_json) as f:
    return json.load(f)


class Evaluator:
  """OKS AP / AR (pycocotools, the skeleton's sigmas) of the flip-tested heatmaps, on the
  ground-truth person boxes; and PCK: the share of visible keypoints within 0.05 / 0.1 / 0.2 of the box's
  longer side (pooled over all visible keypoints of the split)."""

  def __init__(self, config, source):
    self.sigmas = skeleton(config).sigmas
    self.subsets = skeleton(config).subsets
    self.input_size = tuple(config.image_size)[::-1]  # (W, H)
    self.ground_truth = _ground_truth(source.annotation_json)
    self.results = []
    self.pck_hits = np.zeros(len(PCK_THRESHOLDS), np.int64)
    self.pck_count = 0

  def add(self, heatmaps, batch):
    valid = np.flatnonzero(batch["valid"])
    keypoints, scores = keypoints_from_heatmaps(heatmaps[valid], batch["center"][valid], batch["scale"][valid],
                                                self.input_size)
    for i, xy, s in zip(valid, keypoints, scores):
      self.results.append(pose_result(xy, s, image_id=int(batch["image_id"][i])))
    if "bbox" in batch:
      for i, xy in zip(valid, keypoints):
        truth = heatmap_codec.to_image_coords(batch["keypoints"][i], batch["center"][i], batch["scale"][i],
                                              self.input_size)
        visible = batch["visible"][i] > 0
        distance = np.linalg.norm(xy - truth, axis=-1)[visible] / max(float(np.max(batch["bbox"][i][2:])), 1e-6)
        self.pck_hits += [np.count_nonzero(distance <= t) for t in PCK_THRESHOLDS]
        self.pck_count += int(np.count_nonzero(visible))

  def result(self):
    seen = {r["image_id"] for r in self.results}  # data.num_eval may cover part of the split
    gt = dict(self.ground_truth)
    gt["images"] = [im for im in gt["images"] if im["id"] in seen]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in seen]
    out = metrics.oks_ap(gt, self.results, self.sigmas)
    out.update(part_scores(gt, self.results, self.sigmas, self.subsets))
    if self.pck_count:
      out.update({f"PCK@{t:g}": float(h / self.pck_count) for t, h in zip(PCK_THRESHOLDS, self.pck_hits)})
    return out


def part_scores(gt, results, sigmas, subsets):
  """{PART_AP, PART_AR} of each (part, keypoint ids) of `subsets`: OKS AP / AR over those keypoints alone."""
  out = {}
  for part, ids in subsets:
    part_gt, part_results = _keypoint_subset(gt, results, ids)
    scores = metrics.oks_ap(part_gt, part_results, np.asarray(sigmas)[list(ids)])
    out.update({f"{part}_AP": scores["AP"], f"{part}_AR": scores["AR"]})
  return out


def _keypoint_subset(gt, results, ids):
  """The ground truth and results with only keypoints `ids` (each person's score kept, num_keypoints
  recounted: a person with none of them labelled is ignored, as COCOeval ignores num_keypoints 0)."""
  take = lambda flat: np.asarray(flat, np.float64).reshape(-1, 3)[list(ids)]
  annotations = []
  for a in gt["annotations"]:
    kept = take(a["keypoints"])
    annotations.append({**a, "keypoints": kept.ravel().tolist(), "num_keypoints": int(np.count_nonzero(kept[:, 2]))})
  return {**gt, "annotations": annotations}, [{**r, "keypoints": take(r["keypoints"]).ravel().tolist()}
                                              for r in results]


def baselines(config, train_batches):
  """{name: batch -> heatmaps} of the image-independent poses fitted on the training split's
  un-augmented people (`train_batches()`), in crop coordinates, visible keypoints only: the mean
  pose and the per-keypoint median pose."""
  h, w = config.image_size
  points = []
  for batch in train_batches():
    valid = batch["valid"]
    points.append(np.where((batch["visible"][valid] > 0)[..., None], batch["keypoints"][valid], np.nan))
  points = np.concatenate(points).astype(np.float64)

  def fixed(pose):
    maps, _ = heatmap_codec.encode(pose, np.ones(len(pose)), (w, h), heatmap_size((h, w)), config.loss.heatmap_sigma)
    return lambda batch: np.broadcast_to(maps, (len(batch["image"]), *maps.shape))
  with warnings.catch_warnings():  # a keypoint never visible in training sits at the crop's corner
    warnings.simplefilter("ignore", RuntimeWarning)
    mean, median = (np.nan_to_num(reduce(points, axis=0)) for reduce in (np.nanmean, np.nanmedian))
  return {"mean_pose": fixed(mean), "median_pose": fixed(median)}


# ---------------------------------------------------------------- pictures and prediction

def _draw_heatmaps(config, image, maps):
  height, width = image.shape[:2]
  keypoints, scores = heatmap_codec.decode(maps, input_size=(width, height))
  return visualize.draw_pose(image, keypoints, scores, skeleton(config))


def panel(config, example, prediction=None):
  """[crop | target skeleton | predicted skeleton]: the target from a training example's heatmaps
  or an eval example's annotated keypoints; the prediction from raw heatmaps (h, w, K)."""
  image = example["image"]
  tiles = [image]
  if "heatmaps" in example:
    tiles.append(_draw_heatmaps(config, image, example["heatmaps"]))
  elif "keypoints" in example:
    tiles.append(visualize.draw_pose(image, example["keypoints"], example["visible"], skeleton(config)))
  if prediction is not None:
    tiles.append(_draw_heatmaps(config, image, prediction))
  return visualize.row(tiles)


def predict_inputs(config, image, boxes):
  """One crop per person box (padded 1.25, 3:4, UDP warp), as in evaluation."""
  input_size = tuple(int(s) for s in config.image_size)[::-1]
  crops = [pose_transforms.topdown_eval_sample(image, box, input_size=input_size) for box in boxes]
  return [c["image"] for c in crops], {"boxes": boxes, "crops": crops}


def finish(config, image, outputs, context):
  """keypoints (N, K, 2) in image pixels and keypoint_scores (N, K), one row per box."""
  crops = context["crops"]
  if not crops:  # no person box given for this image
    count = skeleton(config).num_keypoints
    return {"keypoints": np.zeros((0, count, 2), np.float32), "keypoint_scores": np.zeros((0, count), np.float32)}
  keypoints, scores = keypoints_from_heatmaps(
      outputs, [c["center"] for c in crops], [c["scale"] for c in crops], tuple(config.image_size)[::-1])
  return {"keypoints": keypoints, "keypoint_scores": scores}


def write_prediction(config, stem, file_name, image, prediction, context):
  """STEM_pose.png (skeletons over the photo); returns the people as COCO result records (score:
  the mean of the confident keypoints, as in evaluation)."""
  picture = image
  for xy, scores in zip(prediction["keypoints"], prediction["keypoint_scores"]):
    picture = visualize.draw_pose(picture, xy, scores, skeleton(config))
  visualize.save_png(stem + "_pose.png", picture)
  return [pose_result(xy, scores, file_name=file_name, bbox=[float(v) for v in box])
          for box, xy, scores in zip(context["boxes"], prediction["keypoints"], prediction["keypoint_scores"])]
