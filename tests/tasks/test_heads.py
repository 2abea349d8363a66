"""Task heads: full-size shapes and parameter counts (abstractly), PyTorch parity, state-dict names."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sapiens_jax import torch_names
from sapiens_jax.models import layers
from sapiens_jax.models import sapiens
from sapiens_jax.tasks import depth
from sapiens_jax.tasks import heads
from sapiens_jax.tasks import normal
from sapiens_jax.tasks import pose
from sapiens_jax.tasks import seg

torch = pytest.importorskip("torch")
import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

FEATURE_GRID = (64, 48)  # 1024x768 images, patch 16
SMALL_IN, SMALL_CHANNELS, SMALL_GRID = 32, 16, (4, 3)

# kind: (jax factory, torch class, state-dict prefix), both built with reduced channels.
SMALL_HEADS = {
    "pose": (lambda: pose.head(5, SMALL_CHANNELS),
             lambda: torch_reference.PoseHead(SMALL_IN, 5, SMALL_CHANNELS), "head."),
    "seg": (lambda: seg.head(7, SMALL_CHANNELS),
            lambda: torch_reference.SegHead(SMALL_IN, 7, SMALL_CHANNELS), "decode_head."),
    "depth": (lambda: depth.head(SMALL_CHANNELS),
              lambda: torch_reference.DepthHead(SMALL_IN, SMALL_CHANNELS), "decode_head."),
    "normal": (lambda: normal.head(SMALL_CHANNELS),
               lambda: torch_reference.NormalHead(SMALL_IN, SMALL_CHANNELS), "decode_head."),
}


def abstract_init(head, grid, width, dtype=jnp.float32):
  """(params, output) as ShapeDtypeStructs: nothing of full size is allocated."""
  features = jax.ShapeDtypeStruct((1, *grid, width), dtype)
  out, variables = jax.eval_shape(lambda x: head.init_with_output(jax.random.key(0), x), features)
  return nn.unbox(variables["params"]), out


def random_params(head, seed=0):
  """Small-head params with every leaf random, so a swapped layer or a zero bias cannot hide."""
  params, _ = abstract_init(head, SMALL_GRID, SMALL_IN)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: 0.3 * rng.standard_normal(x.shape, dtype=np.float32), params)


def head_to_torch(params, prefix):
  return torch_names.to_torch({"head": params}, [heads.torch_part(prefix)])


def head_from_torch(state_dict, target, prefix):
  return torch_names.from_torch(state_dict, {"head": target}, [heads.torch_part(prefix)])["head"]


def count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("size", ["0.3b", "0.6b", "1b", "2b"])
def test_full_size_output_shapes(size):
  width = sapiens.SIZES[size].width
  expected = {pose.head(17): (256, 192, 17), pose.head(133): (256, 192, 133),
              pose.head(308): (256, 192, 308), seg.head(28): (512, 384, 28),
              seg.head(20): (512, 384, 20), depth.head(): (1024, 768, 1),
              normal.head(): (512, 384, 3)}
  for head, hwc in expected.items():
    _, out = abstract_init(head, FEATURE_GRID, width)
    assert out.shape == (1, *hwc) and out.dtype == jnp.float32


def expected_count(width, deconvs, convs, out_channels):
  """Hand count from §2.4: deconv in*out*16 (no bias), 1x1 conv in*out + out, final conv."""
  total, cin = 0, width
  for c in deconvs:
    total, cin = total + cin * c * 16, c
  for c in convs:
    total, cin = total + cin * c + c, c
  return total + cin * out_channels + out_channels


@pytest.mark.parametrize("size,kind,out,deconvs,convs", [
    ("0.3b", "pose", 17, (768,) * 2, (768,) * 2), ("2b", "pose", 308, (768,) * 2, (768,) * 2),
    ("1b", "seg", 28, (768,) * 3, (768,) * 3), ("0.6b", "depth", 1, (384,) * 4, (384,) * 2),
    ("2b", "normal", 3, (768,) * 3, (768,) * 3)])
def test_param_counts(size, kind, out, deconvs, convs):
  width = sapiens.SIZES[size].width
  head = {"pose": lambda: pose.head(out), "seg": lambda: seg.head(out),
          "depth": depth.head, "normal": normal.head}[kind]()
  params, _ = abstract_init(head, FEATURE_GRID, width)
  assert count(params) == expected_count(width, deconvs, convs, out)


def test_pose_head_counts_match_the_reference():
  """§2.4: 23.2M (0.3b, K=17) ... 34.4M (2b, K=308)."""
  small, _ = abstract_init(pose.head(17), FEATURE_GRID, 1024)
  large, _ = abstract_init(pose.head(308), FEATURE_GRID, 1920)
  assert round(count(small) / 1e6, 1) == 23.2
  assert round(count(large) / 1e6, 1) == 34.4


@pytest.mark.parametrize("kind", sorted(SMALL_HEADS))
def test_matches_pytorch(kind):
  make_jax, make_torch, prefix = SMALL_HEADS[kind]
  head = make_jax()
  params = random_params(head)
  state_dict = head_to_torch(params, prefix)
  reference = make_torch().eval()
  reference.load_state_dict({k[len(prefix):]: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  features = np.random.default_rng(1).standard_normal((2, *SMALL_GRID, SMALL_IN), dtype=np.float32)
  ours = np.asarray(head.apply({"params": params}, features))
  with torch.no_grad():
    theirs = reference(torch.from_numpy(features).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  assert ours.shape == theirs.shape
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_state_dict_keys_and_shapes_follow_the_reference():
  """§2.4 key pattern, with C=32 input channels, 16 head channels, K=5."""
  params = random_params(SMALL_HEADS["pose"][0]())
  shapes = {k: v.shape for k, v in head_to_torch(params, "head.").items()}
  c, h = SMALL_IN, SMALL_CHANNELS
  assert shapes == {
      "head.deconv_layers.0.weight": (c, h, 4, 4), "head.deconv_layers.3.weight": (h, h, 4, 4),
      "head.conv_layers.0.weight": (h, h, 1, 1), "head.conv_layers.0.bias": (h,),
      "head.conv_layers.3.weight": (h, h, 1, 1), "head.conv_layers.3.bias": (h,),
      "head.final_layer.weight": (5, h, 1, 1), "head.final_layer.bias": (5,)}
  depth = head_to_torch(random_params(SMALL_HEADS["depth"][0]()), "decode_head.")
  assert sorted(depth) == sorted(
      [f"decode_head.deconv_layers.{i}.weight" for i in (0, 3, 6, 9)]
      + [f"decode_head.conv_layers.{i}.{p}" for i in (0, 3) for p in ("weight", "bias")]
      + ["decode_head.conv_seg.weight", "decode_head.conv_seg.bias"])


@pytest.mark.parametrize("kind", sorted(SMALL_HEADS))
def test_export_import_roundtrip_is_bitwise(kind):
  make_jax, _, prefix = SMALL_HEADS[kind]
  params = random_params(make_jax(), seed=3)
  state_dict = head_to_torch(params, prefix)
  back = head_from_torch(state_dict, params, prefix)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def test_head_names_are_checked():
  params = random_params(SMALL_HEADS["pose"][0]())
  state_dict = head_to_torch(params, "head.")
  with pytest.raises(KeyError, match="head.deconv_layers.0.bias"):
    head_from_torch({**state_dict, "head.deconv_layers.0.bias": np.zeros(3)}, params, "head.")
  with pytest.raises(KeyError, match="head.conv_layers.3.bias"):
    head_from_torch({k: v for k, v in state_dict.items() if k != "head.conv_layers.3.bias"}, params, "head.")
  with pytest.raises(KeyError, match="decode_head."):
    head_from_torch(state_dict, params, "decode_head.")
  with pytest.raises(ValueError, match="extra"):
    head_to_torch({**params, "extra": {"kernel": np.zeros(2)}}, "head.")


def test_bfloat16_compute_keeps_float32_params():
  head = pose.head(5, SMALL_CHANNELS, dtype=jnp.bfloat16)
  params = random_params(pose.head(5, SMALL_CHANNELS))
  features = np.random.default_rng(2).standard_normal((1, *SMALL_GRID, SMALL_IN), dtype=np.float32)
  abstract_params, _ = abstract_init(head, SMALL_GRID, SMALL_IN)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract_params))
  out = head.apply({"params": params}, features)
  full = pose.head(5, SMALL_CHANNELS).apply({"params": params}, features)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), full, atol=0.1 * np.abs(full).max())


def test_dropout_drops_whole_channels_only_in_training():
  head = seg.head(4, channels=64)
  features = np.random.default_rng(4).standard_normal((2, *SMALL_GRID, SMALL_IN), dtype=np.float32)
  params = random_params(head)
  rngs = {"dropout": jax.random.key(5)}
  out, state = head.apply({"params": params}, features, deterministic=False, rngs=rngs,
                          capture_intermediates=True)
  dropped = np.asarray(state["intermediates"]["Dropout_0"]["__call__"][0])  # (2, 32, 24, 64)
  zero_channels = np.all(dropped == 0, axis=(1, 2))
  assert np.all(zero_channels | np.all(dropped != 0, axis=(1, 2)))  # a channel goes as a whole
  assert 0 < zero_channels.sum() < zero_channels.size
  assert not np.allclose(out, head.apply({"params": params}, features))
  np.testing.assert_array_equal(out, head.apply({"params": params}, features, deterministic=False, rngs=rngs))


def test_tokens_to_map():
  tokens = np.arange(2 * 12 * 3).reshape(2, 12, 3)
  grid = layers.tokens_to_map(tokens, (4, 3))
  np.testing.assert_array_equal(grid[1, 2, 1], tokens[1, 2 * 3 + 1])
  with pytest.raises(ValueError, match="4x3 grid"):
    layers.tokens_to_map(tokens[:, :11], (4, 3))


def test_sub_pixel_deconv_is_pytorch_conv_transpose_and_xla_conv_transpose():
  """The heads' deconv (four 2x2 phase convolutions) against torch and XLA's own transposed conv,
  values and input gradients, on a non-square map with Cin != Cout."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 3, 6), dtype=np.float32)
  kernel = rng.standard_normal((4, 4, 7, 6), dtype=np.float32)  # (4, 4, out, in)
  ours = np.asarray(heads.deconv4x4_stride2(jnp.asarray(x), jnp.asarray(kernel)))
  weight = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))  # (in, out, 4, 4)
  with torch.no_grad():
    theirs = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(x).permute(0, 3, 1, 2), weight, stride=2, padding=1).permute(0, 2, 3, 1).numpy()
  assert ours.shape == theirs.shape == (2, 10, 6, 7)
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
  xla = lambda x: jax.lax.conv_transpose(x, jnp.asarray(kernel), (2, 2), ((2, 2), (2, 2)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), transpose_kernel=True)
  np.testing.assert_allclose(np.asarray(xla(jnp.asarray(x))), theirs, atol=1e-5, rtol=0)
  cotangent = jnp.asarray(rng.standard_normal(theirs.shape, dtype=np.float32))
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * cotangent))(jnp.asarray(x))
  np.testing.assert_allclose(grad(lambda x: heads.deconv4x4_stride2(x, jnp.asarray(kernel))), grad(xla),
                             atol=1e-4, rtol=0)
