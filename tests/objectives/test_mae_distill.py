"""MAE + self-distillation (objectives/mae_distill.py): each term recomputed in numpy from the networks' own
outputs (which view meets which, which patches the dense term reads), the teacher untouched by gradients,
the EMA and the centres exact after a train step, and a whole run that trains, resumes and exports its teacher."""
import functools
import logging
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sapiens_jax import checkpoint
from sapiens_jax import default_config
from sapiens_jax import export
from sapiens_jax import init_from
from sapiens_jax import optim
from sapiens_jax import prng
from sapiens_jax import step as train_step
from sapiens_jax import torch_names
from sapiens_jax import train
from sapiens_jax import writers
from sapiens_jax.data import transforms
from sapiens_jax.models import sapiens2
from sapiens_jax.objectives import distillation
from sapiens_jax.objectives import mae
from sapiens_jax.objectives import mae_distill

B = 4


def small_config(centering="sinkhorn_knopp", local=2):
  c = default_config.pretrain("sapiens2_tiny", "mae_distill")
  c.image_size = (32, 32)
  c.batch_size = B
  c.total_steps = 10
  c.model.scan_layers = True  # 18 blocks compiled as 3 scanned segments: seconds, not minutes
  c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 32, 1, 2
  d = c.distill
  d.num_prototypes, d.head_hidden_dim, d.head_bottleneck_dim = 64, 32, 16
  d.dense_tokens = 3
  d.num_local_crops, d.local_size = local, (16, 16)
  d.teacher_temperature_warmup_steps = 4
  d.freeze_prototypes_steps = 3
  d.centering = centering
  c.optim.base_lr, c.optim.warmup_steps = 0.05, 1
  return c


def random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.integers(0, 256, s.shape, dtype=np.uint8) for k, s in mae_distill.batch_spec(config, B).items()}


def trained_looking(params):
  """Layer scales of 0.1 instead of the init's 1e-4: the CLS then depends on the image (at init it barely does,
  which would leave KoLeo comparing nearly equal vectors)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * 1e3 if getattr(path[-1], "key", "") == "gamma" else x, params)


def fresh_state(config, model, key=0):
  params = trained_looking(nn.unbox(mae_distill.init_params(model, config, jax.random.key(key))))
  state = {"step": jnp.int32(0), "params": params, **mae_distill.init_extra_state(params, config)}
  # A teacher unlike the student, so that a view or weight mixed up cannot cancel out.
  state["teacher"] = trained_looking(nn.unbox(mae_distill.init_params(model, config, jax.random.key(key + 1))))
  return state


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def sinkhorn(logits, temperature, iterations=3):
  q = np.exp(logits / temperature).T
  q /= q.sum()
  k, b = q.shape
  for _ in range(iterations):
    q /= q.sum(1, keepdims=True)
    q /= k
    q /= q.sum(0, keepdims=True)
    q /= b
  return (q * b).T


def koleo(x):
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  dots = x @ x.T
  np.fill_diagonal(dots, -1)
  nn_ = x[dots.argmax(1)]
  return -np.mean(np.log(np.linalg.norm(x - nn_ + 1e-8, axis=1) + 1e-8))


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "softmax"])
def test_each_term_as_numpy_computes_it_from_the_networks_outputs(centering):
  config = small_config(centering)
  model = mae_distill.build_model(config)
  state = fresh_state(config, model)
  if centering == "softmax":
    state["centers"] = {"cls": jnp.linspace(-0.1, 0.1, 64), "dense": jnp.linspace(0.1, -0.1, 64)}
  state["step"] = jnp.int32(2)
  batch = random_batch(config)
  keys = prng.example_keys(jax.random.key(3), B)
  total, outputs = jax.jit(lambda: mae_distill.loss(model, state["params"], state, batch, keys, config))()
  metrics = {k: float(v) for k, v in outputs["metrics"].items()}

  # The pieces, from the objective's own forward functions (view-major rows: view 0's B examples first).
  images = np.concatenate([transforms.normalize(batch["image"][:, v]) for v in range(2)])
  local = np.concatenate([transforms.normalize(batch["local"][:, v]) for v in range(2)])
  view_keys = jnp.concatenate([jax.vmap(lambda k, v=v: jax.random.fold_in(k, v))(keys) for v in range(2)])
  pixels, mask, cls, local_cls, dense, dense_ids = jax.device_get(jax.jit(
      lambda: mae_distill.student_forward(model, state["params"], images, local, view_keys, config))())
  teacher_cls, teacher_dense = jax.device_get(jax.jit(
      lambda: mae_distill.teacher_forward(model, state["teacher"], images, dense_ids))())
  head = lambda x: np.asarray(model.head.apply({"params": state["params"]["head"]}, x))

  # The dense term reads masked patches only, distinct ones, and the teacher's token at the same place.
  assert all(mask[i, dense_ids[i]].all() and len(set(dense_ids[i])) == 3 for i in range(2 * B))
  tokens = jax.jit(lambda: model.encoder.apply({"params": state["teacher"]["encoder"]}, images))()
  patch = tokens[1, model.encoder.num_prefix_tokens + dense_ids[1, 2]]  # after the cls token and the registers
  np.testing.assert_allclose(teacher_dense[1, 2], model.head.apply({"params": state["teacher"]["head"]}, patch),
                             rtol=1e-5, atol=1e-6)

  temperature = 0.04 + (0.07 - 0.04) * 2 / 3  # step 2 of a 4-step linspace warm-up
  assert metrics["teacher_temperature"] == pytest.approx(temperature, rel=1e-6)
  if centering == "sinkhorn_knopp":
    t_cls = sinkhorn(teacher_cls, temperature)
    t_dense = sinkhorn(teacher_dense.reshape(-1, 64), temperature).reshape(teacher_dense.shape)
  else:
    softmax = lambda z, c: np.exp(log_softmax((z - c) / temperature))
    t_cls = softmax(teacher_cls, np.asarray(state["centers"]["cls"]))
    t_dense = softmax(teacher_dense, np.asarray(state["centers"]["dense"]))
  s_global = log_softmax(head(cls) / 0.1).reshape(2, B, -1)
  s_local = log_softmax(head(local_cls) / 0.1).reshape(2, B, -1)
  t_views = t_cls.reshape(2, B, -1)
  ce = lambda t, s: -np.mean(np.sum(t * s, -1))
  pairs = [ce(t_views[1], s_global[0]), ce(t_views[0], s_global[1])]  # global views cross over
  pairs += [ce(t_views[t], s_local[s]) for t in range(2) for s in range(2)]  # every local meets both
  dino = sum(pairs) / 6
  dense_ce = -np.sum(t_dense * log_softmax(head(dense) / 0.1), -1)  # (2B, 3)
  dense_loss = np.mean(dense_ce.mean(1))
  koleo_loss = koleo(cls[:B]) + koleo(cls[B:])
  mae_loss = float(mae.mae_loss(pixels, images, mask, 16))
  np.testing.assert_allclose(metrics["dino_loss"], dino, rtol=1e-4)
  np.testing.assert_allclose(metrics["dense_loss"], dense_loss, rtol=1e-4)
  np.testing.assert_allclose(metrics["koleo_loss"], koleo_loss, rtol=1e-4)
  np.testing.assert_allclose(metrics["mae_loss"], mae_loss, rtol=1e-5)
  np.testing.assert_allclose(float(total), mae_loss + dino + dense_loss + 0.1 * koleo_loss, rtol=1e-4)
  entropy = -np.mean(np.sum(t_cls * np.log(t_cls), -1))
  np.testing.assert_allclose(metrics["teacher_entropy"], entropy, rtol=1e-4)
  np.testing.assert_allclose(metrics["student_teacher_kl"], dino - entropy, rtol=1e-3, atol=1e-5)
  if centering == "softmax":  # c <- 0.9 c + 0.1 mean of this batch's teacher logits
    np.testing.assert_allclose(outputs["centers"]["cls"], 0.9 * np.asarray(state["centers"]["cls"])
                               + 0.1 * teacher_cls.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(outputs["centers"]["dense"], 0.9 * np.asarray(state["centers"]["dense"])
                               + 0.1 * teacher_dense.reshape(-1, 64).mean(0), rtol=1e-5, atol=1e-7)


def test_only_the_student_gets_gradients_and_every_part_of_it_does():
  config = small_config()
  model = mae_distill.build_model(config)
  state = fresh_state(config, model)
  batch, keys = random_batch(config), prng.example_keys(jax.random.key(0), B)
  loss = lambda params, teacher: mae_distill.loss(model, params, {**state, "teacher": teacher}, batch, keys,
                                                  config)[0]
  to_student, to_teacher = jax.jit(jax.grad(loss, argnums=(0, 1)))(state["params"], state["teacher"])
  assert all(not np.any(g) for g in jax.tree.leaves(to_teacher))
  for group in ("encoder", "decoder", "dense_proj", "head"):
    assert any(np.any(g) for g in jax.tree.leaves(to_student[group])), group
  # The prototypes get none during the first distill.freeze_prototypes_steps, then theirs.
  assert not np.any(to_student["head"]["last_layer"]["kernel"])
  state["step"] = jnp.int32(config.distill.freeze_prototypes_steps)
  to_student = jax.jit(jax.grad(loss))(state["params"], state["teacher"])
  assert np.any(to_student["head"]["last_layer"]["kernel"])


def test_a_train_step_updates_the_teacher_by_ema_and_keeps_the_new_centres():
  config = small_config("softmax")
  model, tx = mae_distill.build_model(config), optim.make_optimizer(config)
  state = nn.unbox(train_step.init_state(mae_distill, model, tx, config, jax.random.key(0)))
  state["teacher"] = fresh_state(config, model, key=5)["teacher"]
  batch = random_batch(config)
  step = jax.jit(functools.partial(train_step.train_step, objective=mae_distill, model=model, tx=tx, config=config))
  new, metrics = step(state, batch)
  m = 0.994  # momentum_start: the cosine schedule at step 0
  assert float(metrics["ema_momentum"]) == pytest.approx(m)
  for t, t0, p in zip(jax.tree.leaves(new["teacher"]), jax.tree.leaves(state["teacher"]),
                      jax.tree.leaves(new["params"])):
    np.testing.assert_allclose(t, m * np.asarray(t0) + (1 - m) * np.asarray(p), rtol=1e-6, atol=1e-7)
  for name in ("mae_loss", "dino_loss", "dense_loss", "koleo_loss", "teacher_entropy", "cls_std"):
    assert np.isfinite(float(metrics[name])), name
  keys = prng.example_keys(jax.random.fold_in(jax.random.key(config.seed), 0), B)
  _, outputs = jax.jit(lambda: mae_distill.loss(model, state["params"], state, batch, keys, config))()
  np.testing.assert_allclose(new["centers"]["cls"], outputs["centers"]["cls"], rtol=1e-5, atol=2e-6)
  assert np.any(new["centers"]["cls"])


def test_the_momentum_follows_the_cosine_schedule_to_one():
  config = small_config()
  config.total_steps = 100
  steps = np.arange(0, 120, 10)
  got = np.asarray(distillation.ema_momentum(steps, 100, 0.994, 1.0))
  expected = np.where(steps < 100, 1 - 0.006 * (1 + np.cos(np.pi * steps / 100)) / 2, 1.0)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_config_errors_name_the_key():
  config = small_config()
  config.distill.centering = "mean"
  with pytest.raises(ValueError, match="distill.centering"):
    mae_distill.check_config(config)
  config = small_config()
  config.distill.dense_tokens = 4  # a 2x2 grid at 32 px keeps 1 of 4 patches: 3 masked
  with pytest.raises(ValueError, match="distill.dense_tokens"):
    mae_distill.check_config(config)
  config = default_config.pretrain("tiny", "mae_distill")
  with pytest.raises(ValueError, match="num_local_crops"):
    mae_distill.check_config(config)


def run_config():
  c = small_config()
  c.image_size = (64, 64)
  c.batch_size = 8
  c.total_steps = 4
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.eval_every_steps = 4
  c.num_viz_images = 2
  c.distill.local_size = (32, 32)
  c.distill.dense_tokens = 8
  c.data.num_generated = 32
  return c


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory):
  """A 4-step run (checkpoints at 2 and 4) and its final state."""
  config = run_config()
  workdir = tmp_path_factory.mktemp("distill_run")
  return config, workdir, jax.device_get(train.train_and_evaluate(config, str(workdir)))


def train_losses(workdir):
  return [r["loss"] for r in writers.read_metrics(workdir) if "mae_loss" in r]  # eval's are eval_*


def test_a_run_logs_every_term_and_resumes_exactly(distill_run, tmp_path):
  config, workdir, full = distill_run
  records = [r for r in writers.read_metrics(workdir) if "mae_loss" in r]
  for name in ("mae_loss", "dino_loss", "dense_loss", "koleo_loss", "teacher_entropy", "student_teacher_kl",
               "cls_std", "ema_momentum", "teacher_temperature"):
    assert len(records) == 4 and all(np.isfinite(r[name]) for r in records), name
  assert (workdir / "reconstructions" / "step_0000004.png").exists()

  # Resumed from its step-2 checkpoint: the same teacher, bit for bit, and the same losses.
  cut = tmp_path / "cut"
  (cut / "checkpoints").mkdir(parents=True)
  shutil.copytree(workdir / "checkpoints" / "2", cut / "checkpoints" / "2")
  resumed = train.train_and_evaluate(config, str(cut))
  for a, b in zip(jax.tree.leaves(full["teacher"]), jax.tree.leaves(resumed["teacher"])):
    np.testing.assert_array_equal(a, b)
  assert train_losses(cut) == train_losses(workdir)[2:]


def test_the_teacher_is_what_a_run_hands_out_and_upstream_loads_it_strictly(distill_run, tmp_path):
  torch = pytest.importorskip("torch")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  import photos  # pylint: disable=g-import-not-at-top
  import torch_sapiens2  # pylint: disable=g-import-not-at-top
  config, workdir, full = distill_run
  weights, _, step = checkpoint.restore_params(str(workdir))
  assert step == 4
  for a, b in zip(jax.tree.leaves(weights), jax.tree.leaves(full["teacher"])):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(weights), jax.tree.leaves(full["params"])))

  path = str(tmp_path / "teacher.safetensors")
  export.export(str(workdir), path)
  # RoPE rotated in float32 on both sides, so that features agree within 1e-4 (README, "Sapiens2 backbones").
  model = torch_sapiens2.random_reference(sapiens2.size(config.model.size), rope_dtype="float32")
  model.load_state_dict(safetensors_torch.load_file(path), strict=True)
  images = transforms.normalize(photos.astronaut(config.image_size))[None]
  float32_rope = config.copy_and_resolve_references()
  float32_rope.model.rope_dtype = "float32"
  ours = np.asarray(mae_distill.encoder(float32_rope).apply({"params": full["teacher"]["encoder"]}, images))
  with torch.no_grad():
    np.testing.assert_allclose(ours, torch_sapiens2.forward_nhwc(model, images), atol=1e-4, rtol=0)


def test_a_sapiens2_task_and_continued_pretraining_start_from_the_teacher(distill_run, tmp_path, caplog):
  config, workdir, full = distill_run
  # A Sapiens2 task fine-tune from the run: its backbone is the teacher's.
  task_config = default_config.finetune("sapiens2_seg", "sapiens2_tiny")
  task_config.image_size = config.image_size
  target = checkpoint.abstract_weights(task_config)
  backbone = init_from.load_params(str(workdir), target, task_config)["encoder"]
  by_name = lambda encoder: torch_names.to_torch({"encoder": encoder}, [sapiens2.torch_part()])  # any layout
  teacher = by_name(full["teacher"]["encoder"])
  for key, value in by_name(backbone).items():
    np.testing.assert_array_equal(value, teacher[key], err_msg=key)

  # Continued pretraining from a backbone-only file: teacher = student at the start, the rest fresh.
  path = str(tmp_path / "backbone.safetensors")
  export.export(str(workdir), path)
  again = run_config()
  again.init_from, again.total_steps = path, 1
  with caplog.at_level(logging.WARNING):
    state = jax.device_get(train.train_and_evaluate(again, str(tmp_path / "continued")))
  assert any("starts freshly initialised" in r.getMessage() for r in caplog.records)
  m = again.distill.momentum_start  # after one step: teacher = m * start + (1 - m) * student
  student = by_name(state["params"]["encoder"])
  for key, value in by_name(state["teacher"]["encoder"]).items():
    np.testing.assert_allclose(value, m * teacher[key] + (1 - m) * student[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_a_collapsed_model_is_flagged_in_the_log(tmp_path, caplog):
  """A model that never moves from its init (every block scaled by 1e-4) gives every image the same CLS."""
  config = run_config()
  config.total_steps = 2
  config.optim.base_lr = 0.0
  config.optim.warmup_steps = 0
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, str(tmp_path / "collapsed"))
  assert any("collapse" in r.getMessage() for r in caplog.records)
