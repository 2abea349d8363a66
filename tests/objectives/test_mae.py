"""MAE: parameter counts against the paper, masking, the decoder and the loss, against numpy."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sapiens_jax import default_config
from sapiens_jax import patches
from sapiens_jax.models import sapiens
from sapiens_jax.objectives import mae
from sapiens_jax.prng import example_keys


# Paper Table 2: (whole MAE model, in billions, 3 decimals) and the layer sizes it lists.
TABLE2 = {"0.3b": (0.336, 1024, 24, 16), "0.6b": (0.664, 1280, 32, 16),
          "1b": (1.169, 1536, 40, 24), "2b": (2.163, 1920, 48, 32)}


def mae_model(size="tiny", image_size=(64, 64), decoder=(32, 1, 2)):
  """The MAE of `size` (unscanned blocks: params `layers_{i}`) with a (width, depth, heads) decoder."""
  config = default_config.pretrain(size)
  config.image_size = image_size
  config.model.scan_layers = False
  config.model.decoder_width, config.model.decoder_depth, config.model.decoder_heads = decoder
  return mae.build_model(config)


def abstract_mae_params(size):
  model = mae_model(size, (1024, 1024), (512, 8, 16))
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 1024, 1024, 3)), example_keys(jax.random.key(1), 1)))
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
  assert sapiens.SIZES[size] == sapiens.Size(width=width, depth=depth, num_heads=heads)
  params = abstract_mae_params(size)
  encoder, decoder = formula_counts(width, depth)
  assert count(params["encoder"]) == encoder
  assert count(params["decoder"]) == decoder
  total = count(params)
  assert total == encoder + decoder
  assert round(total / 1e9, 3) == paper_billions


def test_random_masking_keeps_a_quarter_per_example_reproducibly():
  batch, n = 6, 64
  keys = example_keys(jax.random.key(3), batch)
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
  _, mask3, _ = mae.random_masking(example_keys(jax.random.key(4), batch), n, 0.75)
  assert not np.array_equal(mask, mask3)
  # An example's mask depends on its own key only, not on the rest of the batch.
  _, mask_half, _ = mae.random_masking(keys[3:], n, 0.75)
  np.testing.assert_array_equal(mask_half, mask[3:])


def test_restore_order_puts_every_token_back():
  batch, n = 3, 16
  keep, mask, restore = mae.random_masking(example_keys(jax.random.key(0), batch), n, 0.75)
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


def test_mae_forward_shapes_and_mask():
  model = mae_model()
  images = jnp.ones((3, 64, 64, 3))
  params = model.init(jax.random.key(0), images, example_keys(jax.random.key(1), 3))["params"]
  pred, mask = model.apply({"params": params}, images, example_keys(jax.random.key(2), 3))
  assert pred.shape == (3, 16, 768) and pred.dtype == jnp.float32
  np.testing.assert_array_equal(mask.sum(axis=1), 12)


def test_patchify_order_matches_loss_target():
  images = jnp.arange(2 * 32 * 32 * 3, dtype=jnp.float32).reshape(2, 32, 32, 3)
  p = patches.patchify(images, 16)
  np.testing.assert_array_equal(p[1, 3], np.asarray(images[1, 16:32, 16:32, :]).reshape(-1))

@pytest.mark.parametrize("size,image_size,stride", [("sapiens2_tiny", (64, 48), 16),
                                                    ("sapiens2_tiny_4k", (256, 192), 64)])
def test_a_sapiens2_encoder_reconstructs_its_own_tokens(size, image_size, stride):
  """MAE with a Sapiens2 encoder: the decoder sees cls + the visible tokens (registers dropped) and
  predicts one patch per encoder token, 64x64 pixels with the 4K tokenizer's window tokens."""
  config = default_config.pretrain(size)
  config.image_size = image_size
  model = mae.build_model(config)
  params = jax.eval_shape(lambda: mae.init_params(model, config, jax.random.key(0)))
  batch = {"image": jax.ShapeDtypeStruct((2, *image_size, 3), jnp.uint8)}
  keys = jax.eval_shape(lambda: example_keys(jax.random.key(0), 2))
  loss, (pred, mask) = jax.eval_shape(lambda p, b, k: mae.loss(model, nn.unbox(p), {}, b, k, config), params, batch,
                                      keys)
  tokens = (image_size[0] // stride) * (image_size[1] // stride)
  assert loss.shape == () and pred.shape == (2, tokens, stride * stride * 3) and mask.shape == (2, tokens)
