"""The Sapiens (v1) backbone family: layouts, logical axes, sin-cos tables and the forward pass
against numpy."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from sapiens_jax import default_config
from sapiens_jax.models import layers
from sapiens_jax.models import sapiens
from sapiens_jax.objectives import mae


def test_encoder_param_shapes_follow_the_reference_layout():
  config = default_config.pretrain("2b")
  config.model.scan_layers = False
  encoder = sapiens.build(config.model, (1024, 1024), cls_token=True)
  variables = jax.eval_shape(lambda: encoder.init(jax.random.key(0), jnp.zeros((1, 1024, 1024, 3))))
  params = nn.unbox(variables["params"])
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
  config = default_config.pretrain("tiny")  # the encoder and the MAE decoder
  config.image_size = (64, 64)
  model = mae.build_model(config)
  boxed = jax.eval_shape(lambda: mae.init_params(model, config, jax.random.key(0)))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  assert all(len(x.names) == len(x.value.shape) for x in leaves)


def test_sincos_position_embedding_matches_formula():
  dim, grid = 16, (4, 4)
  table = layers.sincos_2d(grid, dim)
  omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
  for t in range(16):
    a, b = divmod(t, 4)
    want = np.concatenate([np.sin(a * omega), np.cos(a * omega), np.sin(b * omega), np.cos(b * omega)])
    np.testing.assert_allclose(table[t], want, rtol=1e-6, atol=1e-7)
  pos = layers.sincos_init(grid, 1)(None, (1, 17, dim))
  np.testing.assert_array_equal(pos[0, 0], 0.0)
  np.testing.assert_allclose(pos[0, 1:], table)


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
  model = sapiens.ViT(width, 2, heads, image, use_cls_token=True)
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


def test_bfloat16_compute_keeps_float32_params_and_close_outputs():
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  f32 = sapiens.ViT(64, 2, 4, (32, 32))
  bf16 = sapiens.ViT(64, 2, 4, (32, 32), dtype=jnp.bfloat16)
  params = nn.unbox(f32.init(jax.random.key(0), images)["params"])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(bf16.init(jax.random.key(0), images))))
  out32 = f32.apply({"params": params}, images)
  out16 = bf16.apply({"params": params}, images)
  assert out16.dtype == jnp.bfloat16
  assert float(jnp.max(jnp.abs(out16.astype(jnp.float32) - out32))) < 0.1
