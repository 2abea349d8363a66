"""The Sapiens2 backbone family against our PyTorch reference (tests/torch_sapiens2.py, written
from sapiens2.md §1): parameter counts of every size, RoPE to the bit, features on noise and on a
photo in both directions of the weight conversion, any grid, masked encoding, scanned segments."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sapiens_jax import default_config
from sapiens_jax import optim
from sapiens_jax import torch_names
from sapiens_jax.data import transforms
from sapiens_jax.models import sapiens2
import photos

torch = pytest.importorskip("torch")
import torch_sapiens2  # pylint: disable=g-import-not-at-top,wrong-import-position

# The upstream module's parameters (state dict minus the rope_embed.periods buffer), counted on
# PyTorch's meta device (sapiens2.md §1.1).
UPSTREAM_PARAMS = {
    "sapiens2_0.1b": 113_993_472, "sapiens2_0.4b": 395_450_368, "sapiens2_0.8b": 814_283_520,
    "sapiens2_1b": 1_455_474_176, "sapiens2_1b_4k": 1_606_588_928, "sapiens2_5b": 5_066_902_976,
}


def model_config(name, **overrides):
  c = default_config.pretrain(name).model
  c.update(overrides)
  return c


def abstract_params(encoder, image_size):
  boxed = jax.eval_shape(lambda: encoder.init(jax.random.key(0), jnp.zeros((1, *image_size, 3))))["params"]
  return nn.unbox(boxed)


@pytest.mark.parametrize("name", sorted(UPSTREAM_PARAMS))
def test_parameter_counts_equal_the_upstream_module(name):
  encoder = sapiens2.build(model_config(name), (1024, 768), cls_token=True)
  count = sum(x.size for x in jax.tree.leaves(abstract_params(encoder, (1024, 768))))
  assert count == UPSTREAM_PARAMS[name]


def test_scanned_segments_follow_the_attention_layout():
  dims = sapiens2.size("sapiens2_5b")
  assert dims.segments() == [("blocks", 0, 8, 32), ("gqa_blocks", 8, 40, 16), ("late_blocks", 48, 8, 32)]
  assert sapiens2.size("sapiens2_0.1b").segments() == [("blocks", 0, 12, 12)]  # no GQA at 12 blocks
  encoder = sapiens2.build(model_config("sapiens2_5b", scan_layers=True), (1024, 768), cls_token=True)
  params = abstract_params(encoder, (1024, 768))
  assert params["gqa_blocks"]["attn"]["wk"]["kernel"].shape == (40, 2432, 16, 76)
  assert params["late_blocks"]["attn"]["wq"]["kernel"].shape == (8, 2432, 32, 76)
  assert params["blocks"]["ffn"]["w12"]["kernel"].shape == (8, 2432, 2, 4 * 2432)


@pytest.mark.parametrize("head_dim", [16, 64, 76, 80])
def test_rope_table_and_rotation_equal_upstream_bfloat16_to_the_bit(head_dim):
  rope = torch_sapiens2.RopeEmbedding(head_dim, 100.0, torch.bfloat16)
  np.testing.assert_array_equal(rope.periods.float().numpy(), sapiens2.rope_periods(head_dim))
  cos, sin = rope(64, 48)
  ours_sin, ours_cos = sapiens2.rope_table((64, 48), head_dim)
  np.testing.assert_array_equal(sin.float().numpy(), ours_sin)
  np.testing.assert_array_equal(cos.float().numpy(), ours_cos)
  x = np.random.RandomState(head_dim).randn(2, 9 + 64 * 48, 2, head_dim).astype(np.float32)
  want, _ = torch_sapiens2.apply_rope(*(torch.tensor(x).transpose(1, 2),) * 2, cos, sin)
  got = jax.jit(sapiens2.apply_rope, static_argnums=(3, 4))(x, ours_sin[None], ours_cos[None], 9, "bfloat16")
  np.testing.assert_array_equal(np.asarray(got), want.transpose(1, 2).numpy())


def reference(name, rope_dtype="bfloat16", seed=0):
  """Our PyTorch reference of size `name`, every parameter random."""
  return torch_sapiens2.random_reference(sapiens2.size(name), rope_dtype, seed)


torch_forward = torch_sapiens2.forward_nhwc


def imported(model, encoder, image_size):
  """Reference weights -> our params, through the PyTorch names (and the periods check)."""
  state_dict = {k: v.float().numpy() for k, v in model.state_dict().items()}
  sapiens2.adapt_state_dict(state_dict, None, "", None, None, "reference")
  assert sapiens2.PERIODS not in state_dict
  return torch_names.from_torch(state_dict, {"encoder": abstract_params(encoder, image_size)},
                                [sapiens2.torch_part()])["encoder"]


def inputs(image_size, photo):
  if photo:
    return transforms.normalize(jnp.asarray(photos.astronaut(image_size))[None])
  return jax.random.normal(jax.random.key(1), (2, *image_size, 3))


CASES = [  # size, image size, photo
    ("sapiens2_tiny", (64, 48), False),
    ("sapiens2_tiny", (128, 96), True),
    ("sapiens2_tiny_4k", (128, 192), False),
    ("sapiens2_tiny_4k", (256, 192), True),
]


@pytest.mark.parametrize("name,image_size,photo", CASES)
def test_features_match_the_reference_with_rope_in_float32(name, image_size, photo):
  """Every part except upstream's bfloat16 rotation, to 1e-4: GQA (blocks 8, 9), registers, q/k
  norm, SwiGLU, LayerScale, the windowed tokenizer; at two grids each (RoPE is normalised)."""
  model = reference(name, "float32")
  encoder = sapiens2.build(model_config(name, rope_dtype="float32"), image_size, cls_token=True)
  images = inputs(image_size, photo)
  got = jax.jit(encoder.apply)({"params": imported(model, encoder, image_size)}, images)
  want = torch_forward(model, images)
  assert got.shape == want.shape == (images.shape[0], 9 + np.prod(encoder.grid), sapiens2.size(name).width)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,image_size,photo", CASES[:2] + CASES[3:])
def test_features_match_the_reference_with_upstreams_bfloat16_rope(name, image_size, photo):
  """The default: about as close as the reference is to itself (see torch_sapiens2.sensitivity; measured
  1-2x of it, up to 3e-3 on features up to 4), and 10x closer than rotating in float32 would be."""
  model = reference(name)
  encoder = sapiens2.build(model_config(name), image_size, cls_token=True)
  images = inputs(image_size, photo)
  got = np.asarray(jax.jit(encoder.apply)({"params": imported(model, encoder, image_size)}, images))
  error = np.abs(got - torch_forward(model, images)).max()
  float32_rope = sapiens2.build(model_config(name, rope_dtype="float32"), image_size, cls_token=True)
  rope_effect = np.abs(got - np.asarray(float32_rope.apply({"params": imported(model, encoder, image_size)},
                                                            images))).max()
  assert error <= 3 * torch_sapiens2.sensitivity(model, images)
  assert error < rope_effect / 10


def test_exported_weights_load_into_the_reference_strictly_and_agree():
  """Ours -> PyTorch: randomly initialised params of ours, written under the upstream names with
  the periods buffer, load with strict=True and give our features."""
  name, image_size = "sapiens2_tiny", (64, 48)
  config = model_config(name, rope_dtype="float32", scan_layers=True)
  encoder = sapiens2.build(config, image_size, cls_token=True)
  params = nn.unbox(encoder.init(jax.random.key(3), jnp.zeros((1, *image_size, 3)))["params"])
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape), params)
  state_dict = torch_names.to_torch({"encoder": params}, [sapiens2.torch_part()])
  state_dict.update(sapiens2.torch_buffers(config))
  model = reference(name, "float32")
  model.load_state_dict({k: torch.tensor(np.asarray(v, np.float32)) for k, v in state_dict.items()}, strict=True)
  images = inputs(image_size, False)
  np.testing.assert_allclose(torch_forward(model, images), np.asarray(encoder.apply({"params": params}, images)),
                             atol=1e-4, rtol=0)
  bfloat16 = sapiens2.torch_buffers(model_config(name))[sapiens2.PERIODS]
  assert bfloat16.dtype.name == "bfloat16"
  np.testing.assert_array_equal(np.asarray(bfloat16, np.float32), reference(name).rope_embed.periods.float().numpy())


def test_masked_encoding_rotates_each_token_by_its_own_position():
  """Encoding the patch tokens in another order, with their grid ids, gives the full encoding's
  tokens in that order: what MAE-style masking relies on. (RoPE in float32: another token order sums
  in another order, which would flip bfloat16 roundings.)"""
  image_size = (64, 48)
  encoder = sapiens2.build(model_config("sapiens2_tiny", rope_dtype="float32"), image_size, cls_token=True)
  images = inputs(image_size, False)
  params = imported(reference("sapiens2_tiny"), encoder, image_size)  # LayerScale ~1: attention matters
  full = encoder.apply({"params": params}, images)
  tokens = encoder.apply({"params": params}, images, method=encoder.embed)
  ids = jnp.stack([jax.random.permutation(jax.random.key(i), tokens.shape[1]) for i in range(2)])
  shuffled = jnp.take_along_axis(tokens, ids[..., None], axis=1)
  out = encoder.apply({"params": params}, shuffled, ids, method=encoder.encode)
  np.testing.assert_allclose(out[:, 9:], jnp.take_along_axis(full[:, 9:], ids[..., None], axis=1), atol=1e-4)
  wrong = encoder.apply({"params": params}, shuffled, method=lambda m, t: m.encode(t, jnp.sort(ids, axis=1)))
  assert np.abs(np.asarray(wrong[:, 9:] - out[:, 9:])).max() > 1e-2  # positions do matter


def test_scanned_and_unscanned_encoders_agree_and_share_names():
  image_size = (64, 48)
  images = inputs(image_size, False)
  flat = sapiens2.build(model_config("sapiens2_tiny"), image_size, cls_token=True)
  scanned = sapiens2.build(model_config("sapiens2_tiny", scan_layers=True, remat_policy="dots"), image_size,
                           cls_token=True)
  params = nn.unbox(flat.init(jax.random.key(0), images[:1])["params"])
  state_dict = torch_names.to_torch({"encoder": params}, [sapiens2.torch_part()])
  stacked = torch_names.from_torch(state_dict, {"encoder": abstract_params(scanned, image_size)},
                                   [sapiens2.torch_part()])["encoder"]
  assert set(stacked) >= {"blocks", "gqa_blocks", "late_blocks"}
  np.testing.assert_allclose(scanned.apply({"params": stacked}, images), flat.apply({"params": params}, images),
                             atol=1e-5)
  back = torch_names.to_torch({"encoder": stacked}, [sapiens2.torch_part()])
  assert all(np.array_equal(back[k], state_dict[k]) for k in state_dict) and back.keys() == state_dict.keys()
  # Layer-wise lr decay sees the same layer ids either way.
  flat_ids = optim.layer_decay_multipliers({"encoder": params}, 0.5, sapiens2, 18)["encoder"]
  scanned_ids = optim.layer_decay_multipliers({"encoder": stacked}, 0.5, sapiens2, 18)["encoder"]
  for segment, first, count, _ in sapiens2.size("sapiens2_tiny").segments():
    for i in range(count):
      np.testing.assert_array_equal(np.asarray(scanned_ids[segment]["attn"]["wq"]["kernel"][i]),
                                    np.asarray(flat_ids[f"blocks_{first + i}"]["attn"]["wq"]["kernel"]))


def test_images_of_another_multiple_are_refused_by_name():
  encoder = sapiens2.build(model_config("sapiens2_tiny_4k"), (96, 64), cls_token=True)
  with pytest.raises(ValueError, match="multiples of 64"):
    encoder.init(jax.random.key(0), jnp.zeros((1, 96, 64, 3)))


def test_state_dict_of_another_size_is_named():
  model = reference("sapiens2_tiny")
  state_dict = {k: v.float().numpy() for k, v in model.state_dict().items()}
  assert sapiens2.size_of(state_dict) == "sapiens2_tiny"
  with pytest.raises(ValueError, match=r"model.size='sapiens2_tiny'.*'sapiens2_small'"):
    sapiens2.check_state_dict(state_dict, "", ml_collections.ConfigDict({"size": "sapiens2_small"}), "f")
  # sapiens2_micro is as wide as tiny: its 2 blocks tell them apart
  micro = {k: v.float().numpy() for k, v in reference("sapiens2_micro").state_dict().items()}
  assert sapiens2.size_of(micro) == "sapiens2_micro"
  with pytest.raises(ValueError, match=r"model.size='sapiens2_micro'.*'sapiens2_tiny'"):
    sapiens2.check_state_dict(micro, "", ml_collections.ConfigDict({"size": "sapiens2_tiny"}), "f")


def test_size_names_pick_one_family():
  from sapiens_jax import models  # pylint: disable=g-import-not-at-top
  from sapiens_jax.models import sapiens  # pylint: disable=g-import-not-at-top
  assert not set(sapiens.SIZES) & set(sapiens2.SIZES)
  assert models.family_name(ml_collections.ConfigDict({"size": "sapiens2_0.4b"})) == "sapiens2"
  assert models.family_name(ml_collections.ConfigDict({"size": "0.3b"})) == "sapiens"
  with pytest.raises(ValueError, match="'sapiens2_2b' is not a known size; expected one of"):
    models.family_name(ml_collections.ConfigDict({"size": "sapiens2_2b"}))
