"""The Sapiens ViT and MAE: sizes against the paper, layouts, masking and the loss, against numpy."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from sapiens_jax import mae
from sapiens_jax import patches
from sapiens_jax import vit

# Paper Table 2: (whole MAE model, in billions, 3 decimals) and the layer sizes it lists.
TABLE2 = {"0.3b": (0.336, 1024, 24, 16), "0.6b": (0.664, 1280, 32, 16),
          "1b": (1.169, 1536, 40, 24), "2b": (2.163, 1920, 48, 32)}


def abstract_mae_params(size, image_size=(1024, 1024)):
  width, depth, heads = vit.SIZES[size]
  model = mae.MAE(encoder=vit.ViT(width, depth, heads, image_size))
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_size, 3)), mae.example_keys(jax.random.key(1), 1)))
  return nn.unbox(variables["params"])


def count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def formula_counts(c, layers, d=512, decoder_layers=8, tokens=4097, pixels=768):
  """Parameter counts written out from the architecture, independently of the Flax code."""
  block = lambda w: 12 * w * w + 13 * w
  encoder = layers * block(c) + (pixels * c + c) + c + tokens * c + 2 * c
  decoder = (c * d + d) + d + tokens * d + decoder_layers * block(d) + 2 * d + (d * pixels + pixels)
  return encoder, decoder


@pytest.mark.parametrize("size", sorted(TABLE2))
def test_parameter_counts_match_table2(size):
  paper_billions, width, depth, heads = TABLE2[size]
  assert vit.SIZES[size] == (width, depth, heads)
  params = abstract_mae_params(size)
  encoder, decoder = formula_counts(width, depth)
  assert count(params["encoder"]) == encoder
  assert count(params["decoder"]) == decoder
  total = count(params)
  assert total == encoder + decoder
  assert round(total / 1e9, 3) == paper_billions


def test_encoder_param_shapes_follow_the_reference_layout():
  params = abstract_mae_params("2b")["encoder"]
  c = 1920
  assert params["patch_embed"]["kernel"].shape == (16, 16, 3, c)
  assert params["patch_embed"]["bias"].shape == (c,)
  assert params["cls_token"].shape == (1, 1, c)
  assert params["pos_embed"].shape == (1, 4097, c)
  layer = params["layers_47"]
  assert "layers_48" not in params
  assert layer["attn"]["qkv_kernel"].shape == (c, 3, 32, 60)
  assert layer["attn"]["proj_kernel"].shape == (32, 60, c)
  assert layer["ffn"]["fc1"]["kernel"].shape == (c, 4 * c)
  assert layer["ffn"]["fc2"]["kernel"].shape == (4 * c, c)
  assert params["ln1"]["scale"].shape == (c,)


def test_every_parameter_has_logical_axis_names():
  model = mae.MAE(encoder=vit.ViT(64, 2, 4, (64, 64)), decoder_width=32, decoder_depth=1, decoder_heads=2)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                            mae.example_keys(jax.random.key(0), 1)))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  assert all(len(x.names) == len(x.value.shape) for x in leaves)


def test_sincos_position_embedding_matches_formula():
  dim, grid = 16, (4, 4)
  table = vit.sincos_2d(grid, dim)
  omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
  for t in range(16):
    a, b = divmod(t, 4)
    want = np.concatenate([np.sin(a * omega), np.cos(a * omega), np.sin(b * omega), np.cos(b * omega)])
    np.testing.assert_allclose(table[t], want, rtol=1e-6, atol=1e-7)
  pos = vit.sincos_init(grid, 1)(None, (1, 17, dim))
  np.testing.assert_array_equal(pos[0, 0], 0.0)
  np.testing.assert_allclose(pos[0, 1:], table)


def test_random_masking_keeps_a_quarter_per_example_reproducibly():
  batch, n = 6, 64
  keys = mae.example_keys(jax.random.key(3), batch)
  keep, mask, restore = mae.random_masking(keys, n, 0.75)
  assert keep.shape == (batch, 16) and mask.shape == (batch, n) and restore.shape == (batch, n)
  np.testing.assert_array_equal(mask.sum(axis=1), 48)
  for i in range(batch):  # mask is 0 exactly at the kept tokens
    np.testing.assert_array_equal(np.flatnonzero(mask[i] == 0), np.sort(np.asarray(keep[i])))
  sets = {tuple(sorted(np.asarray(k).tolist())) for k in keep}
  assert len(sets) == batch  # a different set for every example
  keep2, mask2, _ = mae.random_masking(keys, n, 0.75)
  np.testing.assert_array_equal(keep, keep2)
  np.testing.assert_array_equal(mask, mask2)
  _, mask3, _ = mae.random_masking(mae.example_keys(jax.random.key(4), batch), n, 0.75)
  assert not np.array_equal(mask, mask3)
  # An example's mask depends on its own key only, not on the rest of the batch.
  _, mask_half, _ = mae.random_masking(keys[3:], n, 0.75)
  np.testing.assert_array_equal(mask_half, mask[3:])


def test_restore_order_puts_every_token_back():
  batch, n = 3, 16
  keep, mask, restore = mae.random_masking(mae.example_keys(jax.random.key(0), batch), n, 0.75)
  tokens = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[None, :, None], (batch, n, 2))
  visible = mae.gather_tokens(tokens, keep)
  fill = jnp.full((batch, n - keep.shape[1], 2), -1.0)
  out = mae.restore_order(visible, fill, restore)
  expected = np.where(np.asarray(mask)[..., None] == 1, -1.0, np.asarray(tokens))
  np.testing.assert_array_equal(out, expected)


def numpy_mae_loss(pred, images, mask, p):
  b, h, w, _ = images.shape
  total, count_ = 0.0, 0.0
  for i in range(b):
    t = 0
    for r in range(h // p):
      for c in range(w // p):
        patch = images[i, r * p:(r + 1) * p, c * p:(c + 1) * p, :].reshape(-1)  # (p, q, channel) order
        target = (patch - patch.mean()) / np.sqrt(patch.var(ddof=1) + 1e-6)
        if mask[i, t]:
          total += np.mean((pred[i, t] - target) ** 2)
          count_ += 1
        t += 1
  return total / count_


def test_loss_equals_numpy_reference():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 32, 48, 3)).astype(np.float32)
  pred = rng.normal(size=(2, 6, 16 * 16 * 3)).astype(np.float32)
  mask = np.array([[1, 0, 1, 1, 0, 1], [0, 1, 1, 1, 1, 0]], np.float32)
  got = mae.mae_loss(jnp.asarray(pred), jnp.asarray(images), jnp.asarray(mask), 16)
  np.testing.assert_allclose(got, numpy_mae_loss(pred, images, mask, 16), rtol=1e-5)


def layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * scale + bias


def numpy_block(x, p, heads):
  """A pre-norm block from PyTorch-layout weights: fused qkv weight (3C, C), rows q|k|v."""
  b, n, c = x.shape
  hd = c // heads
  qkv_w = np.asarray(p["attn"]["qkv_kernel"]).reshape(c, 3 * c).T  # torch (out, in)
  qkv_b = np.asarray(p["attn"]["qkv_bias"]).reshape(3 * c)
  h = layer_norm(x, p["ln1"]["scale"], p["ln1"]["bias"])
  qkv = (h @ qkv_w.T + qkv_b).reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)
  q, k, v = qkv
  att = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
  att = np.exp(att - att.max(-1, keepdims=True))
  att /= att.sum(-1, keepdims=True)
  out = (att @ v).transpose(0, 2, 1, 3).reshape(b, n, c)
  proj_w = np.asarray(p["attn"]["proj_kernel"]).reshape(c, c).T
  x = x + out @ proj_w.T + np.asarray(p["attn"]["proj_bias"])
  h = layer_norm(x, p["ln2"]["scale"], p["ln2"]["bias"])
  h = h @ np.asarray(p["ffn"]["fc1"]["kernel"]) + np.asarray(p["ffn"]["fc1"]["bias"])
  h = 0.5 * h * (1 + special.erf(h / np.sqrt(2)))  # exact GELU
  return x + h @ np.asarray(p["ffn"]["fc2"]["kernel"]) + np.asarray(p["ffn"]["fc2"]["bias"])


def test_vit_forward_matches_numpy_reference():
  width, heads, image = 64, 4, (32, 48)
  model = vit.ViT(width, 2, heads, image, use_cls_token=True)
  images = jax.random.normal(jax.random.key(1), (2, *image, 3))
  params = nn.unbox(model.init(jax.random.key(0), images)["params"])
  # Perturb biases/norms away from their 0/1 init so the test sees them.
  params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(x.size), x.shape), params)
  got = model.apply({"params": params}, images)

  x = np.asarray(images, np.float64)
  pe = params["patch_embed"]
  # PyTorch conv weight (C, 3, 16, 16) applied to non-overlapping patches.
  w = np.asarray(pe["kernel"]).transpose(3, 2, 0, 1).reshape(width, -1)
  tokens = []
  for r in range(image[0] // 16):
    for c in range(image[1] // 16):
      patch = x[:, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16, :].transpose(0, 3, 1, 2).reshape(2, -1)
      tokens.append(patch @ w.T + np.asarray(pe["bias"]))
  tokens = np.stack(tokens, 1) + np.asarray(params["pos_embed"])[:, 1:]
  cls = np.asarray(params["cls_token"] + params["pos_embed"][:, :1])
  h = np.concatenate([np.broadcast_to(cls, (2, 1, width)), tokens], 1)
  for i in range(2):
    h = numpy_block(h, jax.tree.map(np.asarray, params[f"layers_{i}"]), heads)
  want = layer_norm(h, params["ln1"]["scale"], params["ln1"]["bias"])
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_mae_forward_shapes_and_mask():
  model = mae.MAE(encoder=vit.ViT(64, 1, 4, (64, 64)), decoder_width=32, decoder_depth=1, decoder_heads=2)
  images = jnp.ones((3, 64, 64, 3))
  params = model.init(jax.random.key(0), images, mae.example_keys(jax.random.key(1), 3))["params"]
  pred, mask = model.apply({"params": params}, images, mae.example_keys(jax.random.key(2), 3))
  assert pred.shape == (3, 16, 768) and pred.dtype == jnp.float32
  np.testing.assert_array_equal(mask.sum(axis=1), 12)


def test_bfloat16_compute_keeps_float32_params_and_close_outputs():
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  f32 = vit.ViT(64, 2, 4, (32, 32))
  bf16 = vit.ViT(64, 2, 4, (32, 32), dtype=jnp.bfloat16)
  params = nn.unbox(f32.init(jax.random.key(0), images)["params"])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(bf16.init(jax.random.key(0), images))))
  out32 = f32.apply({"params": params}, images)
  out16 = bf16.apply({"params": params}, images)
  assert out16.dtype == jnp.bfloat16
  assert float(jnp.max(jnp.abs(out16.astype(jnp.float32) - out32))) < 0.1


def test_patchify_order_matches_loss_target():
  images = jnp.arange(2 * 32 * 32 * 3, dtype=jnp.float32).reshape(2, 32, 32, 3)
  p = patches.patchify(images, 16)
  np.testing.assert_array_equal(p[1, 3], np.asarray(images[1, 16:32, 16:32, :]).reshape(-1))


def test_attention_uses_cudnn_only_where_it_applies():
  assert vit.attention_implementation(64, jnp.bfloat16, backend="gpu") == "cudnn"
  assert vit.attention_implementation(80, jnp.float16, backend="gpu") == "cudnn"
  assert vit.attention_implementation(60, jnp.bfloat16, backend="gpu") == "xla"  # Sapiens-2B
  assert vit.attention_implementation(64, jnp.float32, backend="gpu") == "xla"
  assert vit.attention_implementation(64, jnp.bfloat16, backend="cpu") == "xla"
  assert vit.attention_implementation(64, jnp.bfloat16, backend="tpu") == "xla"
