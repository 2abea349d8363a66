"""Pipelines ship uint8 images and the jitted steps normalise them on the device: the numbers are
those of the old path that normalised on the host."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from sapiens_jax import evaluate
from sapiens_jax import objectives
from sapiens_jax import tasks
from sapiens_jax.data import meta
from sapiens_jax.data import pipeline
from sapiens_jax.data import transforms
from sapiens_jax.objectives import mae
from sapiens_jax.prng import example_keys

TASKS = ("pose", "seg", "depth", "normal")


def host_normalized(images):
  """The old host path, written out from the reference statistics (not transforms.normalize)."""
  mean = np.array([123.675, 116.28, 103.53], np.float32)
  std = np.array([58.395, 57.12, 57.375], np.float32)
  return (images.astype(np.float32) - mean) / std


def test_normalize_gives_the_same_bits_on_host_and_device():
  every_value = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, 3))[None]
  on_host = transforms.normalize(every_value)
  on_device = jax.jit(transforms.normalize)(every_value)
  assert isinstance(on_host, np.ndarray) and isinstance(on_device, jax.Array)
  assert on_host.dtype == np.float32 and on_device.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(on_device), on_host)
  # The old division, to float32 rounding.
  np.testing.assert_allclose(on_host, host_normalized(every_value), rtol=0, atol=3e-7)


def test_mae_loss_on_the_uint8_batch_equals_the_host_normalised_one(tiny_config):
  config = tiny_config
  config.image_size = (32, 32)
  batch = next(pipeline.make_pretrain_iterator(config.data, image_size=(32, 32), batch_size=2, seed=0))
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (2, 32, 32, 3)
  images = host_normalized(batch["image"])
  objective = objectives.get(config)
  model = objective.build_model(config)
  keys = example_keys(jax.random.key(3), 2)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), images, keys)["params"])

  @jax.jit
  def old_loss(p, images):
    pred, mask = model.apply({"params": p}, images, keys)
    return mae.mae_loss(pred, images, mask, config.model.patch_size, config.model.norm_pix_loss), pred

  new, (new_pred, _) = jax.jit(lambda p, b: objective.loss(model, p, {}, b, keys, config))(params, batch)
  old, old_pred = old_loss(params, images)
  assert np.isfinite(float(new)) and float(new) > 0
  np.testing.assert_allclose(new, old, rtol=1e-5)
  np.testing.assert_allclose(new_pred, old_pred, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("task", TASKS)
def test_task_pipelines_ship_uint8_images(task, finetune_config, synthetic_root):
  config = finetune_config(task)
  config.data.path = synthetic_root
  batch = next(pipeline.make_task_iterator(config, batch_size=2, seed=0))
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (2, 64, 48, 3)
  assert batch["image"].std() > 0
  eval_batch = next(pipeline.eval_batches(config, pipeline.make_task_source(config, "eval"), 2))
  assert eval_batch["image"].dtype == np.uint8 and eval_batch["image"].shape == (2, 64, 48, 3)


def test_pose_loss_and_flip_test_on_uint8_equal_the_host_normalised_path(finetune_config, synthetic_root):
  config = finetune_config("pose")
  config.data.path = synthetic_root
  objective = objectives.get(config)
  batch = next(pipeline.make_task_iterator(config, batch_size=2, seed=0))
  batch = {k: batch[k] for k in tuple(objective.batch_spec(config, 1))}
  images = host_normalized(batch["image"])
  model = objective.build_model(config)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), images)["params"])
  keys = example_keys(jax.random.key(5), 2)  # the dropout key is keys[0]

  new_loss, new_outputs = jax.jit(lambda p, b: objective.loss(model, p, {}, b, keys, config))(params, batch)
  old_outputs = jax.jit(lambda p, x: model.apply({"params": p}, x, train=True, rngs={"dropout": keys[0]}))(
      params, images)
  old_loss = tasks.get(config.task).loss(config, old_outputs, batch)
  np.testing.assert_allclose(new_outputs, old_outputs, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new_loss, old_loss, rtol=1e-4)

  predicted = jax.jit(lambda p, x: evaluate.eval_outputs(p, x, model=model, config=config))(params, batch["image"])
  flip_indices = np.asarray(meta.skeleton(config.data.labels).flip_indices)
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
  plain = forward(params, images)
  mirrored = forward(params, images[:, :, ::-1])[:, :, ::-1][..., flip_indices]
  np.testing.assert_allclose(predicted, 0.5 * (plain + mirrored), rtol=1e-4, atol=1e-6)
