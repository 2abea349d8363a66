"""Self-distillation math (objectives/distillation.py) against numpy written out here in float64, on tiny
inputs: B=4 images, K=7 prototypes, N=5 patches, 2 global + 2 local views. The facts are
self_distillation.md §1-§3 (DINOv2 as coded)."""
import functools
import math
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from sapiens_jax.objectives import distillation

import fake_devices

B, K, N, D = 4, 7, 5, 12
N_GLOBAL, N_LOCAL = 2, 2
RTOL = 2e-5  # float32 against float64


def draw(*shape, seed=0, low=-1.0, high=1.0):
  """Uniform in [low, high]: head logits are cosines, so exp(z / 0.04) stays finite."""
  return np.random.default_rng(seed).uniform(low, high, shape)


def np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_softmax(x):
  return np.exp(np_log_softmax(x))


def np_sinkhorn(z, temperature, iterations):
  """On the (B, K) matrix: every prototype column to total 1/K, then every sample row to 1/B; rows times B."""
  p = np.exp(np.asarray(z, np.float64) / temperature)
  b, k = p.shape
  p = p / p.sum()
  for _ in range(iterations):
    for j in range(k):
      p[:, j] = p[:, j] / p[:, j].sum() / k
    for i in range(b):
      p[i] = p[i] / p[i].sum() / b
  return p * b


def np_cross_entropy(t, s, temperature):
  """Batch mean of -sum_k t_k log softmax(s / temperature)_k."""
  return float(np.mean(-np.sum(t * np_log_softmax(s / temperature), axis=-1)))


# ---------------------------------------------------------------- Sinkhorn-Knopp

def test_sinkhorn_matches_numpy_and_its_marginals():
  z = draw(N_GLOBAL * B, K)
  for temperature in (0.04, 0.07):
    got = np.asarray(distillation.sinkhorn_knopp(jnp.asarray(z, jnp.float32), temperature))
    want = np_sinkhorn(z, temperature, 3)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-7)
    # The last step normalises samples: each row sums to exactly 1 (B times 1/B).
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)
    # Prototype totals were B/K before that step and drift from it after: not B/K at 3 iterations ...
    np.testing.assert_allclose(got.sum(axis=0), want.sum(axis=0), rtol=RTOL)
    assert np.abs(got.sum(axis=0) - N_GLOBAL * B / K).max() > 1e-3
  # ... but converge to it as the iterations grow.
  many = np.asarray(distillation.sinkhorn_knopp(jnp.asarray(z, jnp.float32), 0.2, num_iterations=200))
  np.testing.assert_allclose(many.sum(axis=0), N_GLOBAL * B / K, atol=1e-4)
  np.testing.assert_allclose(many, np_sinkhorn(z, 0.2, 200), rtol=1e-4, atol=1e-6)


def test_sinkhorn_leaves_out_invalid_rows():
  z = draw(2 * B, K, seed=1)
  valid = np.array([1, 1, 0, 1, 0, 1, 1, 0], bool)
  garbage = z.copy()
  garbage[~valid] = [np.inf, np.nan, 1e30, -np.inf, 0, 0, 0]  # padding must not matter
  got = np.asarray(distillation.sinkhorn_knopp(jnp.asarray(garbage, jnp.float32), 0.05, valid=jnp.asarray(valid)))
  np.testing.assert_allclose(got[valid], np_sinkhorn(z[valid], 0.05, 3), rtol=RTOL, atol=1e-7)
  np.testing.assert_array_equal(got[~valid], 0.0)


def test_sinkhorn_sums_over_a_named_axis():
  """Each vmapped slice plays a device: psum'd sums over 2 slices of 2 rows equal the sums over 4 rows."""
  z = jnp.asarray(draw(B, K, seed=2), jnp.float32)
  split = jax.vmap(functools.partial(distillation.sinkhorn_knopp, temperature=0.05, axis_name="d"),
                   axis_name="d")(z.reshape(2, B // 2, K))
  np.testing.assert_allclose(split.reshape(B, K), distillation.sinkhorn_knopp(z, 0.05), rtol=1e-5, atol=1e-7)
  # Without the axis name each slice is balanced on its own: a different answer.
  alone = jax.vmap(functools.partial(distillation.sinkhorn_knopp, temperature=0.05))(z.reshape(2, B // 2, K))
  assert not np.allclose(alone.reshape(B, K), split.reshape(B, K), rtol=1e-3)


ON_4_DEVICES = """
import functools
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from sapiens_jax.objectives import distillation as d
assert jax.device_count() == 4, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("data",))
rows = P("data")
z = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 7)), jnp.float32)
valid = jnp.asarray([1, 1, 0, 1, 0, 0, 1, 1], bool)  # 2, 1, 0 and 2 valid rows per device
close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7)
per_device = lambda f, ins, out: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=ins, out_specs=out))

sk = per_device(lambda x: d.sinkhorn_knopp(x, 0.05, axis_name="data"), rows, rows)
close(sk(z), d.sinkhorn_knopp(z, 0.05))
sk_valid = per_device(lambda x, v: d.sinkhorn_knopp(x, 0.05, axis_name="data", valid=v), (rows, rows), rows)
close(sk_valid(z, valid), d.sinkhorn_knopp(z, 0.05, valid=valid))
# Under jit on a sharded array the plain sums are already global: no axis name.
sharded = jax.device_put(z, NamedSharding(mesh, rows))
close(jax.jit(lambda x: d.sinkhorn_knopp(x, 0.05))(sharded), d.sinkhorn_knopp(z, 0.05))
c = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 7)), jnp.float32)
center = per_device(lambda x: d.update_center(c, x, axis_name="data"), rows, P())
close(center(z), d.update_center(c, z))
print("ok")
"""


def test_sinkhorn_and_center_under_shard_map_on_4_devices():
  out = subprocess.run([sys.executable, "-c", ON_4_DEVICES], env=fake_devices.env(4), capture_output=True,
                       text=True, check=False, timeout=300)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ---------------------------------------------------------------- softmax centring

def test_softmax_centering_and_the_center_ema():
  z = [draw(N_GLOBAL * B, K, seed=s) for s in range(3)]
  center_np, center = np.zeros((1, K)), jnp.zeros((1, K))
  for step in range(3):  # DINOv2's order: centre with the current centre, then update it
    probs = np.asarray(distillation.softmax_centering(jnp.asarray(z[step], jnp.float32), center, 0.04))
    want = np.stack([np_softmax((row - center_np[0]) / 0.04) for row in z[step]])
    np.testing.assert_allclose(probs, want, rtol=1e-4, atol=1e-7)
    center = distillation.update_center(center, jnp.asarray(z[step], jnp.float32))
    center_np = 0.9 * center_np + 0.1 * z[step].mean(axis=0, keepdims=True)
    assert center.shape == (1, K)
    np.testing.assert_allclose(center, center_np, rtol=1e-5, atol=1e-7)

  # The iBOT centre: the mean over masked tokens only, (B, N, K) with a (B, N) mask; centre (1, 1, K).
  patches, mask = draw(B, N, K, seed=4), draw(B, N, seed=5, low=0, high=1) > 0.5
  got = distillation.update_center(jnp.zeros((1, 1, K)), jnp.asarray(patches, jnp.float32), 0.9,
                                   valid=jnp.asarray(mask))
  assert got.shape == (1, 1, K)
  np.testing.assert_allclose(got[0, 0], 0.1 * patches[mask].mean(axis=0), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- losses

def test_dino_cls_loss_skips_identical_views():
  student = draw(N_GLOBAL + N_LOCAL, B, K, seed=6, low=-3, high=3)
  teacher = np.stack([np_sinkhorn(draw(B, K, seed=7 + v), 0.04, 3) for v in range(N_GLOBAL)])
  got = float(distillation.dino_cls_loss(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32)))

  total, pairs = 0.0, 0
  for t in range(N_GLOBAL):
    for s in range(N_GLOBAL + N_LOCAL):
      if s != t:  # a crop is never its own target
        total += np_cross_entropy(teacher[t], student[s], 0.1)
        pairs += 1
  assert pairs == N_GLOBAL * (N_GLOBAL - 1) + N_GLOBAL * N_LOCAL == 6
  assert got == pytest.approx(total / pairs, rel=RTOL)

  # DINOv2's split (§1.4): the local sum / T, plus the global term: one batch mean over 2B rows of the swapped
  # teacher (A scored against B) x 2 / T.
  local = sum(np_cross_entropy(teacher[t], student[s], 0.1) for s in range(N_GLOBAL, N_GLOBAL + N_LOCAL)
              for t in range(N_GLOBAL))
  global_rows = np_cross_entropy(np.concatenate([teacher[1], teacher[0]]), np.concatenate(student[:2]), 0.1)
  assert got == pytest.approx((local + 2 * global_rows) / 6, rel=RTOL)
  all_pairs = np.mean([np_cross_entropy(teacher[t], student[s], 0.1) for t in range(2) for s in range(4)])
  assert got != pytest.approx(all_pairs, rel=1e-3)


def test_ibot_patch_loss_weights_each_image_by_its_masked_patches():
  student = draw(B, N, K, seed=8, low=-3, high=3)
  teacher = np_softmax(draw(B, N, K, seed=9) / 0.07)
  mask = np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 0]], bool)  # 2, 0, 5, 1
  teacher_nan = teacher.copy()
  teacher_nan[~mask] = np.nan  # what the teacher says at unmasked patches is never read

  total = 0.0
  for i in range(B):
    masked = np.flatnonzero(mask[i])
    if masked.size:
      total += sum(-np.sum(teacher[i, p] * np_log_softmax(student[i, p] / 0.1)) for p in masked) / masked.size
  want = total / B  # the unmasked image counts in the mean

  args = jnp.asarray(student, jnp.float32), jnp.asarray(teacher_nan, jnp.float32), jnp.asarray(mask)
  loss, grad = jax.value_and_grad(distillation.ibot_patch_loss)(*args)
  assert float(loss) == pytest.approx(want, rel=RTOL)
  assert np.isfinite(grad).all()
  np.testing.assert_array_equal(grad[~mask], 0.0)
  # masks_weight (DINOv2 data/collate.py:39): 1/|M_i| at masked patches.
  weight = np.asarray(distillation.ibot_masks_weight(jnp.asarray(mask)))
  np.testing.assert_allclose(weight, mask / np.maximum(mask.sum(axis=1, keepdims=True), 1), rtol=1e-7)


def test_koleo_matches_numpy_with_a_duplicate_point():
  x = draw(6, 3, seed=10, low=-2, high=2)
  x[4] = x[1]  # nearest neighbours of each other, at distance 0: only the eps terms keep the log finite
  eps = 1e-8
  unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
  logs = []
  for i in range(len(x)):
    dots = [unit[i] @ unit[j] if j != i else -np.inf for j in range(len(x))]
    j = int(np.argmax(dots))
    logs.append(np.log(np.sqrt(np.sum((unit[i] - unit[j] + eps) ** 2)) + eps))
  want = -np.mean(logs)
  assert logs[1] == pytest.approx(np.log(eps * math.sqrt(3) + eps))

  loss, grad = jax.value_and_grad(distillation.koleo_loss)(jnp.asarray(x, jnp.float32))
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert np.isfinite(grad).all()


# ---------------------------------------------------------------- schedules and EMA

def test_teacher_temperature_and_momentum_schedules():
  warmup = 11
  ramp = np.linspace(0.04, 0.07, warmup)  # DINOv2's warm-up, inclusive of its end
  jitted = jax.jit(distillation.teacher_temperature, static_argnums=1)
  for step, want in [(0, 0.04), (5, 0.055), (warmup - 1, 0.07), (warmup, 0.07), (10 * warmup, 0.07)]:
    assert float(jitted(step, warmup)) == pytest.approx(want, rel=1e-6)
    if step < warmup:
      assert float(distillation.teacher_temperature(step, warmup)) == pytest.approx(ramp[step], rel=1e-6)
  assert float(distillation.teacher_temperature(0, 0)) == pytest.approx(0.07)

  total = 100
  cosine = 1.0 + 0.5 * (0.992 - 1.0) * (1 + np.cos(np.pi * np.arange(total) / total))  # DINOv2's array
  momentum = jax.jit(distillation.ema_momentum, static_argnums=1)
  for step, want in [(0, 0.992), (50, 0.996), (99, cosine[99]), (100, 1.0), (1000, 1.0)]:
    assert float(momentum(step, total)) == pytest.approx(want, abs=1e-7)
  assert cosine[99] < 1.0


def test_ema_update_is_exact_and_jits():
  teacher = {"a": draw(2, 3, seed=11), "b": {"c": draw(4, seed=12), "d": draw(3, seed=13)}}
  student = jax.tree.map(lambda x: x + 1.5, teacher)
  to_jax = lambda tree: {"a": jnp.asarray(tree["a"], jnp.float32),
                         "b": {"c": jnp.asarray(tree["b"]["c"], jnp.float32),
                               "d": jnp.asarray(tree["b"]["d"], jnp.bfloat16)}}
  m = 0.9
  got = distillation.ema_update(to_jax(teacher), to_jax(student), m)
  np.testing.assert_allclose(got["a"], m * teacher["a"] + (1 - m) * student["a"], rtol=1e-6)
  np.testing.assert_allclose(got["b"]["c"], m * teacher["b"]["c"] + (1 - m) * student["b"]["c"], rtol=1e-6)
  assert got["b"]["d"].dtype == jnp.bfloat16  # computed in float32, stored in the leaf's dtype
  np.testing.assert_allclose(np.asarray(got["b"]["d"], np.float64),
                             m * teacher["b"]["d"] + (1 - m) * student["b"]["d"], rtol=1e-2)
  # Fused in a jitted step with a traced momentum from the schedule.
  step = jax.jit(lambda t, s, i: distillation.ema_update(t, s, distillation.ema_momentum(i, 100)))
  fused = step(to_jax(teacher), to_jax(student), 50)
  m = float(distillation.ema_momentum(50, 100))
  assert m == pytest.approx(0.996, abs=1e-7)
  np.testing.assert_allclose(fused["a"], m * teacher["a"] + (1 - m) * student["a"], rtol=1e-6, atol=1e-7)
  identity = distillation.ema_update(to_jax(teacher), to_jax(student), 1.0)
  for a, b in zip(jax.tree.leaves(identity), jax.tree.leaves(to_jax(teacher))):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- head

def tiny_head(**kwargs):
  return distillation.DinoHead(num_prototypes=K, hidden_dim=16, bottleneck_dim=8, **kwargs)


def np_head(params, x):
  """The head written out: linear, exact GELU, linear, GELU, linear, L2 normalise, unit prototypes."""
  def linear(name, h):
    return h @ np.asarray(params[name]["kernel"], np.float64) + np.asarray(params[name]["bias"], np.float64)
  gelu = lambda h: 0.5 * h * (1 + special.erf(h / math.sqrt(2)))
  h = linear("mlp_4", gelu(linear("mlp_2", gelu(linear("mlp_0", x)))))
  h = h / np.linalg.norm(h, axis=-1, keepdims=True)
  v = np.asarray(params["last_layer"]["kernel"], np.float64)
  return h @ (v / np.linalg.norm(v, axis=0, keepdims=True))


def test_dino_head_scores_cosines_against_unit_prototypes():
  head = tiny_head()
  x = draw(B, N, D, seed=14, low=-3, high=3)
  params = nn.unbox(head.init(jax.random.key(0), jnp.zeros((1, D)))["params"])
  assert set(params) == {"mlp_0", "mlp_2", "mlp_4", "last_layer"}
  assert params["last_layer"]["kernel"].shape == (8, K) and set(params["last_layer"]) == {"kernel"}
  logits = head.apply({"params": params}, jnp.asarray(x, jnp.float32))
  assert logits.shape == (B, N, K) and logits.dtype == jnp.float32
  assert head.apply({"params": params}, jnp.asarray(x[:, 0], jnp.float32)).shape == (B, K)
  np.testing.assert_allclose(logits, np_head(params, x), rtol=1e-4, atol=1e-6)
  assert np.abs(logits).max() <= 1 + 1e-6

  # Rescaling a prototype changes nothing: the forward pass divides each column by its norm.
  scaled = jax.tree.map(lambda a: a, params)
  scaled["last_layer"]["kernel"] = params["last_layer"]["kernel"] * jnp.arange(1.0, K + 1)
  np.testing.assert_allclose(head.apply({"params": scaled}, jnp.asarray(x, jnp.float32)), logits, atol=1e-6)

  # DINOv2's trainable g (weight_g, initialised to 1) when asked for: it scales each prototype's logits.
  learned = tiny_head(learn_norm=True)
  params_g = nn.unbox(learned.init(jax.random.key(0), jnp.zeros((1, D)))["params"])
  np.testing.assert_array_equal(params_g["last_layer"]["weight_g"], np.ones(K))
  params_g["last_layer"]["weight_g"] = jnp.full((K,), 3.0)
  np.testing.assert_allclose(learned.apply({"params": params_g}, jnp.asarray(x, jnp.float32)), 3 * logits,
                             rtol=1e-5, atol=1e-6)


def test_dino_head_default_sizes_and_init():
  shapes = jax.eval_shape(lambda: distillation.DinoHead().init(jax.random.key(0), jnp.zeros((1, 1024))))
  shapes = jax.tree.map(lambda a: a.shape, nn.unbox(shapes["params"]))
  assert shapes == {"mlp_0": {"kernel": (1024, 2048), "bias": (2048,)},
                    "mlp_2": {"kernel": (2048, 2048), "bias": (2048,)},
                    "mlp_4": {"kernel": (2048, 256), "bias": (256,)},
                    "last_layer": {"kernel": (256, 65536)}}
  params = nn.unbox(distillation.DinoHead(num_prototypes=512, hidden_dim=256, bottleneck_dim=64).init(
      jax.random.key(1), jnp.zeros((1, 64)))["params"])
  for name in ("mlp_0", "mlp_2", "mlp_4"):  # N(0, 0.02), bias 0
    np.testing.assert_array_equal(params[name]["bias"], 0.0)
    assert float(jnp.std(params[name]["kernel"])) == pytest.approx(0.02, rel=0.05)
  v = np.asarray(params["last_layer"]["kernel"])  # torch nn.Linear's default U(+-1/sqrt(64))
  assert np.abs(v).max() <= 1 / 8 and np.abs(v).max() > 0.99 / 8
  assert float(np.std(v)) == pytest.approx(1 / 8 / math.sqrt(3), rel=0.05)


# ---------------------------------------------------------------- gradients

def test_student_gets_finite_gradients_and_the_teacher_none():
  """The pattern: the teacher's outputs go through jax.lax.stop_gradient before they are centred."""
  head = tiny_head()
  student_params = head.init(jax.random.key(2), jnp.zeros((1, D)))["params"]
  teacher_params = head.init(jax.random.key(3), jnp.zeros((1, D)))["params"]
  features = {"student_cls": jnp.asarray(draw(N_GLOBAL + N_LOCAL, B, D, seed=15), jnp.float32),
              "student_patches": jnp.asarray(draw(B, N, D, seed=16), jnp.float32),
              "teacher_cls": jnp.asarray(draw(N_GLOBAL, B, D, seed=17), jnp.float32),
              "teacher_patches": jnp.asarray(draw(B, N, D, seed=18), jnp.float32)}
  mask = jnp.asarray([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 0]], bool)
  temperature = distillation.teacher_temperature(3, 10)

  def loss_fn(student, teacher, feats, stop=True):
    guard = jax.lax.stop_gradient if stop else (lambda a: a)
    teacher_cls = guard(head.apply({"params": teacher}, feats["teacher_cls"]))
    teacher_patches = guard(head.apply({"params": teacher}, feats["teacher_patches"]))
    targets = distillation.sinkhorn_knopp(teacher_cls.reshape(-1, K), temperature).reshape(N_GLOBAL, B, K)
    patch_targets = distillation.softmax_centering(teacher_patches, jnp.zeros((1, 1, K)), temperature)
    dino = distillation.dino_cls_loss(head.apply({"params": student}, feats["student_cls"]), targets)
    ibot = distillation.ibot_patch_loss(head.apply({"params": student}, feats["student_patches"]), patch_targets,
                                        mask)
    koleo = sum(distillation.koleo_loss(feats["student_cls"][v]) for v in range(N_GLOBAL))
    return dino + ibot + 0.1 * koleo

  grads = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2)))(student_params, teacher_params, features)
  student_grads, teacher_grads, feature_grads = grads
  for g in jax.tree.leaves(student_grads) + [feature_grads["student_cls"], feature_grads["student_patches"]]:
    assert np.isfinite(g).all() and np.abs(g).max() > 0
  for g in jax.tree.leaves(teacher_grads) + [feature_grads["teacher_cls"], feature_grads["teacher_patches"]]:
    np.testing.assert_array_equal(g, 0.0)
  # Without the stop_gradient the teacher would be trained too.
  leaky_grad = jax.jit(jax.grad(functools.partial(loss_fn, stop=False), argnums=1))
  leaky = leaky_grad(student_params, teacher_params, features)
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(leaky))
