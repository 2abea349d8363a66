"""Fine-tuning end to end on CPU: every task trains on synthetic humans, is evaluated with its
metrics, keeps its best checkpoint, and resumes exactly."""
import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest

from sapiens_jax import checkpoint
from sapiens_jax import train
from sapiens_jax import writers
from sapiens_jax.objectives import finetune

MAIN_METRIC = {"pose": "eval_AP", "seg": "eval_mIoU", "depth": "eval_rmse", "normal": "eval_mean_angle"}
@pytest.mark.parametrize("task", ["pose", "seg", "depth", "normal"])
def test_each_task_trains_evaluates_and_keeps_its_best_checkpoint(task, finetune_config, synthetic_root, tmp_path):
  config = finetune_config(task)
  config.data.path = synthetic_root
  train.train_and_evaluate(config, str(tmp_path))
  records = writers.read_metrics(tmp_path)
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 6 and all(np.isfinite(losses))
  evals = [r for r in records if MAIN_METRIC[task] in r]
  assert [r["step"] for r in evals] == [3, 6]
  assert all(np.isfinite(r[MAIN_METRIC[task]]) for r in evals)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
  grid = np.asarray(Image.open(tmp_path / "predictions" / "step_0000006.png"))
  assert grid.shape[1] >= 3 * 48  # image | target | prediction and grid.shape[0] >= 2 * 64 and grid.std() > 0
  # Exactly one best checkpoint: the step with the best main metric (the later one on a tie).
  sign = 1 if task in ("depth", "normal") else -1
  values = {r["step"]: r[MAIN_METRIC[task]] for r in evals}
  best = min(values, key=lambda s: (sign * values[s], -s))
  kept = [d for d in os.listdir(tmp_path / "best_checkpoint") if d.isdigit()]
  assert kept == [str(best)], (values, kept)


def test_finetuning_resumes_exactly(finetune_config, synthetic_root, tmp_path):
  config = finetune_config("seg")  # dropout and augmentation: both must replay
  config.data.path = synthetic_root
  config.eval_every_steps = 100
  full, cut = tmp_path / "full", tmp_path / "cut"
  train.train_and_evaluate(config, str(full))
  shutil.copytree(full, cut)
  shutil.rmtree(cut / "checkpoints" / "6")
  with open(cut / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in writers.read_metrics(full) if r["step"] <= 3)
  train.train_and_evaluate(config, str(cut))
  a = {r["step"]: r["loss"] for r in writers.read_metrics(full) if "loss" in r}
  b = {r["step"]: r["loss"] for r in writers.read_metrics(cut) if "loss" in r}
  np.testing.assert_array_equal([a[s] for s in (4, 5, 6)], [b[s] for s in (4, 5, 6)])
  # --mode=eval: the newest checkpoint evaluated once, the same numbers as at the end of training.
  shutil.rmtree(cut / "predictions")
  with open(cut / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in writers.read_metrics(full) if r["step"] <= 5)
  train.train_and_evaluate(config, str(cut), eval_only=True)
  records = writers.read_metrics(cut)
  assert records[-1]["step"] == 6 and "loss" not in records[-1]  # evaluated, not trained
  final = [r for r in writers.read_metrics(full) if "eval_mIoU" in r][-1]
  assert records[-1]["eval_mIoU"] == pytest.approx(final["eval_mIoU"])
  assert os.listdir(cut / "predictions") == ["step_0000006.png"]
  with pytest.raises(FileNotFoundError, match="nothing to evaluate"):
    train.train_and_evaluate(config, str(tmp_path / "empty"), eval_only=True)


@pytest.mark.parametrize("task", ["pose", "seg"])
def test_exported_task_model_matches_pytorch(task, finetune_config):
  """Backbone (patch padding 2 for pose, none for seg) + head, exported with the reference's task
  keys, loads strictly into an independent PyTorch model and gives the same outputs."""
  import torch  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from sapiens_jax import torch_names  # pylint: disable=g-import-not-at-top
  from sapiens_jax.models import sapiens  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top

  config = finetune_config(task)
  model = finetune.build_model(config)
  import photos  # pylint: disable=g-import-not-at-top
  from sapiens_jax.data import transforms  # pylint: disable=g-import-not-at-top
  noise = np.random.default_rng(0).normal(size=(1, 64, 48, 3)).astype(np.float32)
  images = np.concatenate([noise, transforms.normalize(photos.astronaut((64, 48)))[None]])  # + a real photo
  params = nn.unbox(model.init(jax.random.key(1), images[:1])["params"])
  params = jax.tree.map(lambda p: p + 0.01 * np.random.default_rng(2).normal(size=p.shape).astype(p.dtype), params)
  ours = np.asarray(model.apply({"params": params}, images))

  state_dict = torch_names.to_torch(jax.device_get(params), finetune.torch_parts(config))
  dims = sapiens.size("tiny")
  width, depth, num_heads = dims.width, dims.depth, dims.num_heads
  grid = model.encoder.grid
  backbone = torch_reference.SapiensViT(width, depth, num_heads, (64, 48), with_cls_token=False,
                                        padding=config.model.patch_padding)
  if task == "pose":
    head, head_name = torch_reference.PoseHead(width, 17, channels=16), "head"
  else:
    head, head_name = torch_reference.SegHead(width, 28, channels=16), "decode_head"
  reference = torch_reference.TaskModel(backbone, head, head_name, grid).eval()
  reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True)
  with torch.no_grad():
    theirs = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  assert ours.shape == theirs.shape
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  assert config.model.patch_padding == (2 if task == "pose" else 0)  # reference §1.3


def test_finetuning_starts_from_an_mae_run_of_ours(tiny_config, finetune_config, tmp_path, caplog):
  """The encoder of an MAE workdir drops into a task model: cls token dropped, 4x4 position grid
  resized to 4x3, blocks identical; the head starts fresh, with a warning saying so."""
  import logging  # pylint: disable=g-import-not-at-top
  from sapiens_jax import init_from  # pylint: disable=g-import-not-at-top
  from sapiens_jax.models import posemb  # pylint: disable=g-import-not-at-top
  tiny_config.total_steps = 2
  tiny_config.checkpoint_every_steps = 2
  train.train_and_evaluate(tiny_config, str(tmp_path / "mae"))  # 64x64 images: a 4x4 grid
  mae_params, _, _ = checkpoint.restore_params(str(tmp_path / "mae"))

  config = finetune_config("pose")
  config.init_from = str(tmp_path / "mae")
  with caplog.at_level(logging.INFO):
    params = init_from.load_params(config.init_from, checkpoint.abstract_weights(config), config)
  assert "cls_token" not in params["encoder"] and "decoder" not in params
  np.testing.assert_array_equal(params["encoder"]["layers_1"]["attn"]["qkv_kernel"],
                                mae_params["encoder"]["layers_1"]["attn"]["qkv_kernel"])
  expected = posemb.resize_pos_embed(mae_params["encoder"]["pos_embed"], (4, 4), (4, 3), 1, 0)
  np.testing.assert_array_equal(params["encoder"]["pos_embed"], expected)
  assert params["encoder"]["pos_embed"].shape == (1, 12, 64)
  assert any("has no head (head.*)" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_an_original_task_checkpoint_loads_its_head_when_it_fits(finetune_config, tmp_path, caplog):
  """A reference-format pose checkpoint ({'state_dict': backbone.* + head.*}) loads backbone and
  head; the same file into a 133-keypoint config keeps the backbone and starts the head fresh."""
  import logging  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from sapiens_jax import init_from  # pylint: disable=g-import-not-at-top
  from sapiens_jax.models import sapiens  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top

  config = finetune_config("pose")
  dims = sapiens.size("tiny")
  width, depth, num_heads = dims.width, dims.depth, dims.num_heads
  torch.manual_seed(0)
  backbone = torch_reference.SapiensViT(width, depth, num_heads, (64, 48), with_cls_token=False, padding=2)
  head = torch_reference.PoseHead(width, 17, channels=16)
  model = torch_reference.TaskModel(backbone, head, "head", (4, 3))
  path = tmp_path / "sapiens_tiny_coco_best_coco_AP.pth"
  torch.save({"state_dict": model.state_dict()}, path)

  params = init_from.load_params(str(path), checkpoint.abstract_weights(config), config)
  np.testing.assert_array_equal(params["head"]["final_layer"]["kernel"],
                                head.final_layer.weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["encoder"]["pos_embed"], backbone.pos_embed.detach().numpy())

  config.data.labels = "coco_wholebody133"
  fresh = checkpoint.abstract_weights(config)
  with caplog.at_level(logging.INFO):
    params = init_from.load_params(str(path), fresh, config)
  assert params["head"] is fresh["head"]  # left as the model's own (fresh) head
  np.testing.assert_array_equal(params["encoder"]["ln1"]["scale"], backbone.ln1.weight.detach().numpy())
  assert any("head does not fit" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_pose_evaluation_of_perfect_heatmaps_scores_ap_one(finetune_config, synthetic_root):
  """Heatmaps made from the ground truth, in each eval crop's coordinates, go through the whole eval
  path (crop centre/scale, DARK-UDP decode, back to image pixels, pycocotools OKS) to AP ~ 1 and
  PCK 1; shifted by 2 crop pixels along each axis, PCK counts the keypoints a hand computation says are in reach."""
  from sapiens_jax import evaluate  # pylint: disable=g-import-not-at-top
  from sapiens_jax.data import heatmaps, pipeline, pose_transforms  # pylint: disable=g-import-not-at-top,multiple-imports
  config = finetune_config("pose")
  config.data.path = synthetic_root
  config.data.num_eval = 0  # every person of the eval split
  source = pipeline.make_task_source(config, "eval")
  evaluator, shifted = evaluate.make_evaluator(config, source), evaluate.make_evaluator(config, source)
  h, w = config.image_size
  row, hits, count = 0, np.zeros(3), 0
  for batch in pipeline.eval_batches(config, source, config.eval_batch_size):
    maps = []
    for i in range(len(batch["image"])):
      person = source[min(row + i, len(source) - 1)]
      matrix = pose_transforms.udp_affine_matrix(batch["center"][i], batch["scale"][i], 0.0, (w, h))
      in_crop = pose_transforms.transform_points(person["keypoints"], matrix)
      np.testing.assert_allclose(batch["keypoints"][i], in_crop, atol=1e-3)  # what eval examples carry
      maps.append(heatmaps.encode(in_crop, person["visible"], (w, h), (w // 4, h // 4),
                                  config.loss.heatmap_sigma)[0])
    row += len(batch["image"])
    evaluator.add(np.stack(maps), batch)
    inwards = [2.0 * np.where(k < np.array([w, h]) / 2, 1.0, -1.0) for k in batch["keypoints"]]  # stays in the crop
    shifted.add(np.stack([heatmaps.encode(k + d, v, (w, h), (w // 4, h // 4), config.loss.heatmap_sigma)[0]
                          for k, d, v in zip(batch["keypoints"], inwards, batch["visible"])]), batch)
    for i in range(len(batch["image"])):  # PCK by hand: a 2-pixel shift per crop axis, in image pixels
      if batch["valid"][i]:
        scale = batch["scale"][i] / np.array([w, h])  # image pixels per crop pixel, per axis
        miss = np.hypot(*(2.0 * scale)) / max(batch["bbox"][i][2:])
        visible = int(np.sum(batch["visible"][i] > 0))
        hits += np.array([visible * (miss <= t) for t in (0.05, 0.1, 0.2)])
        count += visible
  result = evaluator.result()
  assert result["AP"] > 0.95
  assert [result["PCK@0.05"], result["PCK@0.1"], result["PCK@0.2"]] == [1.0, 1.0, 1.0]
  result = shifted.result()
  np.testing.assert_allclose([result["PCK@0.05"], result["PCK@0.1"], result["PCK@0.2"]], hits / count, atol=0.1)  # decoding moves a few


def _split_targets(config, split, key):
  """(every example's `key` of `split`, un-augmented, stacked; the eval batches)."""
  from sapiens_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  whole = config.copy_and_resolve_references()
  whole.data.num_eval = 0
  source = pipeline.make_task_source(config, split)
  batches = list(pipeline.eval_batches(whole, source, config.eval_batch_size))
  return np.concatenate([b[key][b["valid"]] for b in batches]), batches


def _per_image_aligned_rmse(prediction, targets):
  """The depth metric written out: per image, least squares a * prediction + b on the person with
  a >= 0 (a fit that wants a < 0 falls back to b alone)."""
  errors = []
  for t in targets:
    person = t >= 0
    design = np.stack([prediction[person], np.ones(person.sum())], 1).astype(np.float64)
    fit, *_ = np.linalg.lstsq(design, t[person], rcond=None)
    fitted = design @ fit if fit[0] >= 0 else np.full(person.sum(), t[person].mean())
    errors.append(np.sqrt(np.mean((fitted - t[person]) ** 2)))
  return float(np.mean(errors))


def test_baselines_are_fitted_on_the_training_split_and_scored_as_models_are(finetune_config, synthetic_root):
  """Each baseline recomputed here by direct numpy from the training targets, and its eval score
  recomputed from the eval targets, independently of the task modules."""
  from sapiens_jax import baselines  # pylint: disable=g-import-not-at-top

  def config_of(task):
    config = finetune_config(task)
    config.data.path = synthetic_root
    return config

  # seg: the per-pixel majority map; mIoU from its confusion with the eval labels.
  config = config_of("seg")
  train, _ = _split_targets(config, "train", "label")
  evals, batches = _split_targets(config, "eval", "label")
  counts = np.stack([(train == c).sum(0) for c in range(28)], -1)  # 255 is never counted
  majority = int(np.argmax(counts.sum((0, 1))))
  per_pixel = np.where(counts.sum(-1) > 0, np.argmax(counts, -1), majority)
  predictors = baselines.tasks.get("seg").baselines(config, baselines.train_batches(config))
  np.testing.assert_array_equal(predictors["per_pixel_majority"](batches[0])[0], per_pixel)
  np.testing.assert_array_equal(predictors["majority_class"](batches[0])[0], np.full(per_pixel.shape, majority))
  results = baselines.evaluate(config)
  labelled = evals != 255
  ious = []
  for c in np.unique(np.concatenate([evals[labelled], np.broadcast_to(per_pixel, evals.shape)[labelled]])):
    truth, guess = (evals == c) & labelled, (per_pixel[None] == c) & labelled
    if truth.any():
      ious.append((truth & guess).sum() / (truth | guess).sum())
  assert results["per_pixel_majority"]["mIoU"] == pytest.approx(100 * np.mean(ious), abs=1e-4)
  assert baselines.strongest(config, results, "mIoU")[0] == max(results, key=lambda n: results[n]["mIoU"])

  # depth: every constant scores the mean per-image std; the ramps as the metric aligns them.
  config = config_of("depth")
  depth, _ = _split_targets(config, "eval", "depth")
  results = baselines.evaluate(config)
  assert results["constant"]["rmse"] == pytest.approx(np.mean([np.std(d[d >= 0]) for d in depth]), rel=1e-4)
  rows, columns = np.mgrid[:depth.shape[1], :depth.shape[2]]
  for name, ramp in {"down": rows, "up": -rows, "right": columns, "left": -columns}.items():
    assert results[f"ramp_{name}"]["rmse"] == pytest.approx(_per_image_aligned_rmse(ramp, depth), rel=1e-4), name
  train, _ = _split_targets(config, "train", "depth")
  person = train >= 0
  standard = [np.where(p, (t - t[p].mean()) / t[p].std(), 0.0) for t, p in zip(train, person)]
  mean_map = np.sum(standard, 0) / np.maximum(person.sum(0), 1)
  assert results["mean_aligned_map"]["rmse"] == pytest.approx(_per_image_aligned_rmse(mean_map, depth), rel=1e-4)
  assert baselines.strongest(config, results, "rmse")[1]["rmse"] == min(r["rmse"] for r in results.values())

  # normal: the mean training normal, everywhere; its angles to the eval normals.
  config = config_of("normal")
  train, _ = _split_targets(config, "train", "normal")
  evals, _ = _split_targets(config, "eval", "normal")
  on_person = train[train[..., 0] > -100]
  mean = on_person.sum(0) / np.linalg.norm(on_person.sum(0))
  foreground = evals[evals[..., 0] > -100]
  angles = np.degrees(np.arccos(np.clip(foreground @ mean, -1, 1)))
  results = baselines.evaluate(config)
  assert results["mean_normal"]["mean_angle"] == pytest.approx(angles.mean(), abs=1e-3)
  assert results["per_pixel_mean_normal"]["mean_angle"] < 90

  # pose: fixed poses score some PCK but AP near 0 (the bar is set on PCK for that reason).
  config = config_of("pose")
  results = baselines.evaluate(config)
  assert set(results) == {"mean_pose", "median_pose"}
  for result in results.values():
    assert 0 < result["PCK@0.2"] <= 1 and 0 <= result["AP"] < 0.5


def test_a_synthetic_dataset_made_with_other_settings_is_not_reused(finetune_config, synthetic_root):
  from sapiens_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = finetune_config("seg")
  config.data.path = synthetic_root
  pipeline.ensure_synthetic_data(config, "")  # same settings: reused as it is
  config.data.framing = "scene"
  with pytest.raises(ValueError, match=r"train holds synthetic humans made with other settings.*framing"):
    pipeline.ensure_synthetic_data(config, "")


# What each dense evaluator must report for predictions equal to the targets (the normal median is
# the centre of the first 0.01-degree histogram bin).
PERFECT = {"seg": {"mIoU": 100.0, "mAcc": 100.0, "aAcc": 100.0},
           "depth": {"rmse": 0.0, "abs_rel": 0.0, "delta1": 1.0, "rmse_raw": 0.0, "abs_rel_raw": 0.0,
                     "delta1_raw": 1.0},
           "normal": {"mean_angle": 0.0, "median_angle": 0.005, "pct_11.25": 100.0, "pct_22.5": 100.0,
                      "pct_30": 100.0}}


@pytest.mark.parametrize("task", sorted(PERFECT))
def test_dense_evaluators_score_the_targets_perfectly(task, finetune_config, synthetic_root):
  """The whole eval split, through the task's own Evaluator, with the targets as predictions."""
  from sapiens_jax import tasks  # pylint: disable=g-import-not-at-top
  from sapiens_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = finetune_config(task)
  config.data.path, config.data.num_eval = synthetic_root, 0
  module = tasks.get(config.task)
  source = pipeline.make_task_source(config, "eval")
  evaluator = module.Evaluator(config, source)
  target = "label" if task == "seg" else module.TARGET
  for batch in pipeline.eval_batches(config, source, config.eval_batch_size):
    evaluator.add(batch[target], batch)
  result = evaluator.result()
  for metric, perfect in PERFECT[task].items():
    np.testing.assert_allclose(float(result[metric]), perfect, atol=1e-5, err_msg=metric)
