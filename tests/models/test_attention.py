"""Every attention path equals the plain formula (jax.nn.dot_product_attention's XLA path) to float32
rounding, forward and gradients, with and without masked keys, grouped-query included: the blocked
online-softmax one that CPUs run, the zero padding of head dims that lets cuDNN take any head dim,
and the Pallas splash kernel of TPUs (run in Pallas' interpreter here)."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sapiens_jax import default_config
from sapiens_jax.models import attention
from sapiens_jax.models import sapiens

import fake_devices

TOLERANCE = 2e-6  # measured up to 1.2e-6 on these shapes


def inputs(batch, tq, tk, heads, kv_heads, head_dim, masked, seed=0):
  rng = np.random.default_rng(seed)
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q, do = draw(batch, tq, heads, head_dim), draw(batch, tq, heads, head_dim)
  k, v = draw(batch, tk, kv_heads, head_dim), draw(batch, tk, kv_heads, head_dim)
  mask = jnp.asarray(rng.uniform(size=(batch, tk)) > 0.3) if masked else None
  return q, k, v, mask, do


def output_and_grads(fn, q, k, v, do):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(do))


def assert_equal_to_the_formula(fn, q, k, v, mask, do, tolerance=TOLERANCE):
  ours = output_and_grads(jax.jit(lambda q, k, v: fn(q, k, v, mask)), q, k, v, do)
  plain = output_and_grads(jax.jit(lambda q, k, v: attention.attention(q, k, v, "xla", mask)), q, k, v, do)
  for name, a, b in zip(("output", "dq", "dk", "dv"), ours, plain):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    np.testing.assert_allclose(a, b, atol=tolerance, rtol=0, err_msg=name)


# (batch, query tokens, key tokens, heads, kv heads, head dim, masked keys)
SHAPES = [
    (2, 300, 300, 4, 4, 16, False),   # lengths that are no multiple of the block
    (2, 300, 260, 4, 2, 16, True),    # grouped-query, another key length, masked keys
    (1, 65, 65, 3, 3, 64, False),     # the quickstart decoder: one block
    (1, 129, 129, 4, 1, 8, True),     # multi-query, one token past a block
]


@pytest.mark.parametrize("shape", SHAPES)
def test_blocked_attention_equals_the_formula(shape):
  q, k, v, mask, do = inputs(*shape)
  assert_equal_to_the_formula(attention.blocked_attention, q, k, v, mask, do)


def test_blocked_attention_at_the_mae_decoder_size():
  """4,097 tokens, 16 heads of 32: the shape the blocked path exists for (33 x 33 blocks)."""
  q, k, v, mask, do = inputs(1, 4097, 4097, 16, 16, 32, False)
  assert_equal_to_the_formula(attention.blocked_attention, q, k, v, mask, do, tolerance=5e-6)


def test_blocked_attention_in_bfloat16_is_as_close_to_float32_as_the_formula():
  """bfloat16 inputs (the accelerators' compute dtype): bfloat16 results, no further from the float32
  truth than the plain formula's own bfloat16 results."""
  q, k, v, mask, do = inputs(2, 300, 260, 4, 2, 16, True)
  truth = output_and_grads(jax.jit(lambda q, k, v: attention.attention(q, k, v, "xla", mask)), q, k, v, do)
  low = [x.astype(jnp.bfloat16) for x in (q, k, v, do)]
  for path in ("blocked", "xla"):
    got = output_and_grads(jax.jit(lambda q, k, v, p=path: attention.attention(q, k, v, p, mask)), *low)
    errors = [float(jnp.abs(a.astype(jnp.float32) - b).max()) for a, b in zip(got, truth)]
    assert all(a.dtype == jnp.bfloat16 for a in got), path
    if path == "blocked":
      blocked_errors = errors
  for name, ours, plain in zip(("output", "dq", "dk", "dv"), blocked_errors, errors):
    assert ours <= 1.5 * plain, (name, ours, plain)


@pytest.mark.parametrize("head_dim", [60, 76, 32])  # Sapiens-2B, Sapiens2-5B, a multiple already
def test_padding_head_dims_changes_nothing(head_dim):
  """What the cuDNN path does around the kernel (run here around the XLA one): zero columns in
  q, k and v, the softmax scale of the true head dim, the padded output columns cut off."""
  q, k, v, mask, do = inputs(2, 40, 40, 4, 2, head_dim, True)
  padded = attention.padded_head_dim(attention._xla, 8)  # pylint: disable=protected-access
  assert_equal_to_the_formula(padded, q, k, v, mask, do)


@pytest.mark.parametrize("shape", [(1, 130, 130, 2, 2, 32, False), (2, 100, 140, 4, 2, 16, True)])
def test_splash_attention_in_the_pallas_interpreter_equals_the_formula(shape, monkeypatch):
  from sapiens_jax.models import splash  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(splash, "INTERPRET", True)
  q, k, v, mask, do = inputs(*shape)
  assert_equal_to_the_formula(lambda q, k, v, m: attention.attention(q, k, v, "splash", m), q, k, v, mask, do)


@pytest.mark.parametrize("path", ["xla", "blocked"])
def test_grouped_query_heads_read_contiguous_kv_heads(path):
  """Query head h reads kv head h // (H / Hkv), as PyTorch's repeat_interleave of k and v does
  (Sapiens2's grouping): the same as repeating each kv head for its group."""
  q, k, v, mask, _ = inputs(2, 150, 150, 8, 2, 16, True)
  grouped = attention.attention(q, k, v, path, mask)
  repeated = attention.attention(q, jnp.repeat(k, 4, axis=2), jnp.repeat(v, 4, axis=2), "xla", mask)
  np.testing.assert_allclose(grouped, repeated, atol=TOLERANCE, rtol=0)


SPLASH_ON_A_MESH = """
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from sapiens_jax import sharding
from sapiens_jax.models import attention, splash
splash.INTERPRET = True
mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES)
rng = np.random.default_rng(0)
q, do = (jnp.asarray(rng.standard_normal((4, 200, 4, 16)), jnp.float32) for _ in range(2))
k, v = (jnp.asarray(rng.standard_normal((4, 200, 2, 16)), jnp.float32) for _ in range(2))
mask = jnp.asarray(rng.uniform(size=(4, 200)) > 0.3)
with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
  spec = nn.logical_to_mesh_axes(("act_batch", "act_length", "act_heads", "act_kv"))
  put = lambda x, s: jax.device_put(x, jax.NamedSharding(mesh, s))
  args = (put(q, spec), put(k, spec), put(v, spec), put(mask, jax.P(spec[0], None)), put(do, spec))
  def outputs(path):
    def both(q, k, v, m, do):
      out, vjp = jax.vjp(lambda q, k, v: attention.attention(q, k, v, path, m, partition=spec), q, k, v)
      return (out, *vjp(do))
    return jax.jit(both)(*args), jax.jit(both).lower(*args).compile().as_text()
  (ours, hlo), (plain, _) = outputs("splash"), outputs("xla")
for name, a, b in zip(("output", "dq", "dk", "dv"), ours, plain):
  assert a.sharding.spec == spec, (name, a.sharding.spec)
  np.testing.assert_allclose(a, b, atol=2e-6, rtol=0, err_msg=name)
assert "all-gather" not in hlo  # each device attends over its own examples and heads
print("ok")
"""


def test_splash_attention_runs_per_device_on_a_mesh():
  """On a (data 2, fsdp 2, tensor 2) mesh the kernel runs under shard_map, each device on its
  examples and (kv) heads: same values and gradients as the formula, nothing gathered."""
  env = fake_devices.env(8)
  out = subprocess.run([sys.executable, "-c", SPLASH_ON_A_MESH], env=env, capture_output=True, text=True,
                       check=False, timeout=600)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_auto_picks_the_fast_path_of_each_backend():
  assert attention.resolve("auto", 32, jnp.float32, backend="cpu") == "blocked"
  assert attention.resolve("auto", 60, jnp.bfloat16, backend="gpu") == "cudnn"  # padded to 64
  assert attention.resolve("auto", 64, jnp.float32, backend="gpu") == "xla"  # cuDNN's is 16-bit only
  assert attention.resolve("auto", 64, jnp.bfloat16, backend="tpu") == "splash"
  assert attention.resolve("xla", 64, jnp.bfloat16, backend="tpu") == "xla"  # a choice is kept
  with pytest.raises(ValueError, match="config.model.attention='flash'"):
    attention.resolve("flash", 64, jnp.float32)
  with pytest.raises(ValueError, match="3 query heads do not split into groups over 2 kv heads"):
    attention.attention(*inputs(1, 8, 8, 3, 2, 4, False)[:3])


def test_the_vit_computes_the_same_features_with_each_cpu_path():
  config = default_config.pretrain("tiny")
  images = jax.random.normal(jax.random.key(0), (2, 64, 48, 3))
  config.model.attention = "xla"
  plain = sapiens.build(config.model, (64, 48), cls_token=True)
  params = plain.init(jax.random.key(1), images)["params"]
  config.model.attention = "blocked"
  blocked = sapiens.build(config.model, (64, 48), cls_token=True)
  np.testing.assert_allclose(blocked.apply({"params": params}, images), plain.apply({"params": params}, images),
                             atol=1e-5, rtol=0)
