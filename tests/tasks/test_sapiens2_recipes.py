"""The Sapiens2 recipes of seg, normal and pose (sapiens2.md §3-§4): the dataset row picks the head,
the loss, the evaluator and the schedule; released-style task checkpoints load by their head alone."""
import jax.numpy as jnp
import numpy as np
import pytest

from sapiens_jax import checkpoint
from sapiens_jax import default_config
from sapiens_jax import export
from sapiens_jax import init_from
from sapiens_jax import losses
from sapiens_jax import predict
from sapiens_jax import tasks
from sapiens_jax import train
from sapiens_jax import writers
from safetensors.numpy import save_file

from sapiens_jax.data import meta
from sapiens_jax.objectives import finetune

MAIN_METRIC = {"sapiens2_seg": "eval_mIoU", "sapiens2_normal": "eval_normal_mae", "sapiens2_pose": "eval_AP"}
FINAL_LAYER = {"sapiens2_seg": "conv_seg", "sapiens2_normal": "conv_normal", "sapiens2_pose": "conv_pose"}


def test_the_recipe_table_of_sapiens2_fine_tuning():
  """Cells of sapiens2.md §4 (lr / layer decay / iterations / clip / per-GPU batch, 8 GPUs)."""
  expected = {("seg", "0.8b"): (5e-4, 0.85, 30_000, 4, 5), ("normal", "5b"): (1e-4, 0.94, 40_000, 4, 3),
              ("pointmap", "0.4b"): (5e-4, 0.8, 20_000, 2, 8), ("albedo", "5b"): (5e-4, 0.94, 40_000, 4, 3),
              ("pose", "1b"): (5e-4, 0.9, 20_000, 4, 7), ("pose", "5b"): (1e-4, 0.94, 20_000, 4, 2)}
  for (task, size), (lr, decay, steps, clip, per_gpu) in expected.items():
    c = default_config.finetune(f"sapiens2_{task}", f"sapiens2_{size}")
    assert (c.task, c.recipe) == (task, "sapiens2")
    assert (c.optim.base_lr, c.optim.layer_decay, c.total_steps, c.optim.grad_clip_norm, c.batch_size) == (
        lr, decay, steps, clip, 8 * per_gpu), (task, size)
    assert (c.optim.warmup_steps, c.optim.warmup_start_factor, c.optim.schedule) == (500, 1e-3, "linear")
    assert (c.optim.b1, c.optim.b2, c.optim.weight_decay) == (0.9, 0.999, 0.1)
    assert (c.model.dtype, c.model.remat_policy, c.image_size) == ("bfloat16", "full", (1024, 768))
  assert default_config.finetune("goliath_seg", "1b").recipe == "sapiens"


@pytest.mark.parametrize("dataset", sorted(MAIN_METRIC))
def test_a_sapiens2_recipe_trains_its_head_with_its_loss(dataset, finetune_config, synthetic_root, tmp_path):
  config = finetune_config(dataset)
  config.data.path = synthetic_root
  train.train_and_evaluate(config, str(tmp_path))
  records = writers.read_metrics(tmp_path)
  assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
  assert np.isfinite([r[MAIN_METRIC[dataset]] for r in records if MAIN_METRIC[dataset] in r]).all()
  params, _, _ = checkpoint.restore_params(str(tmp_path))
  assert FINAL_LAYER[dataset] in params["head"]
  # The loss the step minimises is the sum of the reference's weighted terms.
  task = tasks.get(config.task)
  rng = np.random.default_rng(0)
  batch = {k: rng.random(v.shape).astype(v.dtype) for k, v in task.target_spec(config, 2).items()}
  if config.task == "seg":
    batch["label"] = rng.integers(0, 28, batch["label"].shape).astype(np.int32)
    outputs = rng.standard_normal((2, *config.image_size, 28)).astype(np.float32)
    weight = jnp.asarray(meta.seg_classes(config.data.labels).class_weight)
    terms = losses.sapiens2_seg_loss(outputs, batch["label"], weight)
  elif config.task == "normal":
    outputs = rng.standard_normal((2, *config.image_size, 3)).astype(np.float32)
    terms = losses.sapiens2_normal_loss(outputs, batch["normal"])
  else:
    outputs = rng.random(batch["heatmaps"].shape).astype(np.float32)
    terms = losses.sapiens2_keypoint_loss(outputs, batch["heatmaps"], batch["target_weight"])
  assert len(terms) >= 1
  np.testing.assert_allclose(task.loss(config, outputs, batch), sum(terms.values()), rtol=1e-6)


def test_sapiens2_normal_evaluator_reports_the_reference_keys(finetune_config, synthetic_root):
  config = finetune_config("sapiens2_normal")
  config.data.path = synthetic_root
  evaluator = tasks.get("normal").Evaluator(config, None)
  normal = np.zeros((1, 4, 3, 3), np.float32)
  normal[..., 2] = -1
  normal[0, 0] = -1000  # background row
  evaluator.add(normal * 3.0, {"normal": normal, "valid": np.array([True])})  # right direction, any length
  result = evaluator.result()
  assert result["normal_mae"] == pytest.approx(0, abs=1e-3) and result["within_5_deg"] == 100
  assert config.best_metric == "normal_mae" and set(tasks.get("normal").METRICS) >= set(result) - {
      "num_images", "num_skipped"}


# Sapiens2's head on the released 29 classes and on the renders' 28 (a head fine-tuned on other classes is
# recognised too), and v1's at the released width.
@pytest.fixture(scope="module", params=[("sapiens2_seg", "seg29", None), ("sapiens2_seg", "seg28", None),
                                        ("seg", "seg28", 768)])
def exported(request, finetune_config, synthetic_root, tmp_path_factory):
  """(config, run, weights file) of a 3-step seg run exported under upstream's names: Sapiens2's head
  with the released 29 classes, or v1's at the released width (768)."""
  dataset, labels, head_channels = request.param
  config = finetune_config(dataset)
  config.data.path = synthetic_root
  config.data.labels = labels  # the released head's classes; the renders hold seg28 ids (a shape test)
  config.model.head_channels = head_channels or config.model.head_channels
  config.total_steps = config.eval_every_steps = config.checkpoint_every_steps = 3
  run = tmp_path_factory.mktemp("exported")
  train.train_and_evaluate(config, str(run / "run"))
  export.export(str(run / "run"), str(run / "seg.safetensors"))
  return config, str(run / "run"), str(run / "seg.safetensors")


def test_a_task_checkpoint_predicts_by_its_head_alone(exported, tmp_path):
  """A fine-tuned run exported under upstream's names (backbone.*, head) is recognised from the
  file's tensors (task, reference, labels) and predicts what the run predicts."""
  config, run, weights = exported
  keys = init_from.read_weights(weights)
  assert "decode_head.conv_seg.weight" in keys and any(k.startswith("backbone.") for k in keys)
  loaded, params = predict.load_weights(weights, config.image_size)
  assert (loaded.task, loaded.recipe, loaded.data.labels) == ("seg", config.recipe, config.data.labels)
  run_config, run_params = predict.load_run(run)
  image = np.random.default_rng(0).integers(0, 256, (70, 50, 3), dtype=np.uint8)  # not the run's 64x48
  ours = predict.predict_image(loaded, params, image)["labels"]
  np.testing.assert_array_equal(ours, predict.predict_image(run_config, run_params, image)["labels"])
  features, _ = predict.load_weights(weights, config.image_size, predict.FEATURES)
  assert features.get("task") is None  # the backbone alone
  backbone = str(tmp_path / "backbone.safetensors")  # the backbone alone, as a pretrain file
  save_file({k: np.ascontiguousarray(v) for k, v in keys.items() if k.startswith("backbone.")}, backbone)
  assert predict.load_weights(backbone, config.image_size)[0].get("task") is None
  with pytest.raises(ValueError, match="holds no task head"):
    predict.load_weights(backbone, config.image_size, "seg")


def test_task_checkpoint_with_an_unknown_head_is_named(exported, tmp_path):
  config, _, weights = exported
  keys = init_from.read_weights(weights)
  keys["decode_head.conv_seg.weight"] = keys["decode_head.conv_seg.weight"][:7]
  keys["decode_head.conv_seg.bias"] = keys["decode_head.conv_seg.bias"][:7]
  odd = str(tmp_path / "odd.safetensors")
  save_file({k: np.ascontiguousarray(v) for k, v in keys.items()}, odd)
  with pytest.raises(ValueError, match=r"none of the fine-tuning recipes.*shapes .*decode_head.conv_seg.weight \(7,"):
    init_from.model_from_file(odd, config.image_size)
  del keys["decode_head.conv_seg.bias"]
  save_file({k: np.ascontiguousarray(v) for k, v in keys.items()}, odd)
  with pytest.raises(ValueError, match="none of the fine-tuning recipes.*missing decode_head.conv_seg.bias"):
    init_from.model_from_file(odd, config.image_size)


def test_sapiens2_torch_prefix_is_decode_head_for_pose_too(finetune_config):
  config = finetune_config("sapiens2_pose")
  assert [p.prefix for p in finetune.torch_parts(config)][1] == "decode_head."
  assert [p.prefix for p in finetune.torch_parts(finetune_config("pose"))][1] == "head."
