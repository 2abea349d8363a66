"""Sapiens2 task heads: parity with our PyTorch reference and with the transformers port, state-dict names and
shapes at full size (abstractly), bitwise export / import."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sapiens_jax import torch_names
from sapiens_jax.models import sapiens2
from sapiens_jax.tasks import heads2

torch = pytest.importorskip("torch")
import torch_sapiens2_heads  # pylint: disable=g-import-not-at-top,wrong-import-position

TASKS = ("seg", "pose", "normal", "albedo", "pointmap", "matting")
PORT_TASKS = ("seg", "pose", "normal", "pointmap", "matting")  # albedo is not in the port
SMALL_IN, SIZE = 32, "sapiens2_tiny"
FULL_GRID = (64, 48)
# pointmap's scale branch halves the grid three times; 16x12 leaves 2x2, so its last InstanceNorm is not
# over a single pixel (which would zero it and hide the weights before it).
GRIDS = {**dict.fromkeys(TASKS, (4, 3)), "pointmap": (16, 12)}
OUT_CHANNELS = {"seg": 29, "pose": 308, "normal": 3, "albedo": 3, "pointmap": 3, "matting": 4}
SMALL_OUT = {**OUT_CHANNELS, "seg": 5, "pose": 7}


def small_head(task):
  if task in ("seg", "pose"):
    return heads2.HEADS[task](SIZE, SMALL_OUT[task])
  return heads2.head(task, SIZE)


def torch_head(task, in_channels, size, grid, num_out=None):
  """Our PyTorch reference of the head heads2 builds for (task, size)."""
  w = heads2.widths(task, size)
  out = num_out or OUT_CHANNELS[task]
  final = heads2.FINAL_LAYERS[task]
  if task in ("seg", "pose"):
    return torch_sapiens2_heads.DeconvHead(in_channels, w.upsample, w.conv, out, final)
  scale = None
  if task == "pointmap":
    s = heads2.SCALE_WIDTHS[size]
    scale = (s.conv, s.hidden, grid)
  return torch_sapiens2_heads.UpsampleHead(in_channels, w.upsample, w.conv, out, final,
                                           norm="rms" if task == "albedo" else "instance",
                                           sigmoid=task == "matting", scale=scale)


def abstract_init(head, grid, width):
  """(params, output) as ShapeDtypeStructs: nothing of full size is allocated."""
  features = jax.ShapeDtypeStruct((1, *grid, width), jnp.float32)
  out, variables = jax.eval_shape(lambda x: head.init_with_output(jax.random.key(0), x), features)
  return nn.unbox(variables["params"]), out


def random_params(head, grid, seed=0):
  """Small-head params with every leaf random, so a swapped layer, a zero bias or a unit weight cannot hide."""
  params, _ = abstract_init(head, grid, SMALL_IN)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: 0.3 * rng.standard_normal(x.shape, dtype=np.float32), params)


def head_to_torch(params):
  return torch_names.to_torch({"head": params}, [heads2.torch_part()])


def head_from_torch(state_dict, target):
  return torch_names.from_torch(state_dict, {"head": target}, [heads2.torch_part()])["head"]


def strip(state_dict, prefix=heads2.TORCH_PREFIX):
  return {k[len(prefix):]: torch.from_numpy(v) for k, v in state_dict.items()}


def ours_and_features(task, seed=0):
  head = small_head(task)
  params = random_params(head, GRIDS[task], seed)
  features = np.random.default_rng(seed + 1).standard_normal((2, *GRIDS[task], SMALL_IN), dtype=np.float32)
  return head, params, features, head.apply({"params": params}, features)


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def nhwc(t):
  return t.permute(0, 2, 3, 1).numpy()


def assert_outputs_equal(task, ours, theirs):
  """Maps (NHWC vs NCHW) and, for pointmap, the (B, 1) scales, to 1e-4."""
  if task == "pointmap":
    (ours, ours_scale), (theirs, theirs_scale) = ours, theirs
    assert ours_scale.shape == theirs_scale.shape == (2, 1)
    np.testing.assert_allclose(np.asarray(ours_scale), theirs_scale.numpy(), atol=1e-4, rtol=0)
  theirs = nhwc(theirs)
  assert ours.shape == theirs.shape
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("task", TASKS)
def test_matches_pytorch_reference(task):
  _, params, features, ours = ours_and_features(task)
  reference = torch_head(task, SMALL_IN, SIZE, GRIDS[task], SMALL_OUT[task]).eval()
  reference.load_state_dict(strip(head_to_torch(params)), strict=True)
  with torch.no_grad():
    theirs = reference(nchw(features))
  assert_outputs_equal(task, ours, theirs)
  grid, factor = GRIDS[task], 4 if task == "pose" else 16
  out = ours[0] if task == "pointmap" else ours
  assert out.shape == (2, grid[0] * factor, grid[1] * factor, SMALL_OUT[task])
  if task == "matting":
    assert 0 < float(out.min()) and float(out.max()) < 1


@pytest.mark.parametrize("task", TASKS)
def test_export_import_roundtrip_is_bitwise(task):
  params = random_params(small_head(task), GRIDS[task], seed=3)
  back = head_from_torch(head_to_torch(params), params)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def test_names_are_checked():
  params = random_params(small_head("albedo"), GRIDS["albedo"])
  state_dict = head_to_torch(params)
  assert state_dict["decode_head.upsample_blocks.1.2.weight"].shape == (16,)  # the RMSNorm2d weight
  with pytest.raises(KeyError, match="decode_head.input_conv.1.weight"):
    head_from_torch({k: v for k, v in state_dict.items() if k != "decode_head.input_conv.1.weight"}, params)
  with pytest.raises(KeyError, match="decode_head.extra"):
    head_from_torch({**state_dict, "decode_head.extra": np.zeros(1)}, params)
  with pytest.raises(ValueError, match="stray"):
    head_to_torch({**params, "stray": {"kernel": np.zeros((1, 1, 2, 2))}})


def test_pixel_shuffle_is_torch_order():
  x = np.random.default_rng(0).standard_normal((2, 3, 5, 4 * 6), dtype=np.float32)
  ours = np.asarray(heads2.pixel_shuffle(jnp.asarray(x)))
  theirs = nhwc(torch.nn.functional.pixel_shuffle(nchw(x), 2))
  np.testing.assert_array_equal(ours, theirs)
  # out[c, 2h + i, 2w + j] = in[4c + 2i + j, h, w], NHWC here
  assert ours[1, 2 * 2 + 1, 2 * 3 + 0, 5] == x[1, 2, 3, 4 * 5 + 2 * 1 + 0]


def test_bfloat16_compute_keeps_float32_params():
  head = heads2.pointmap_head(SIZE, dtype=jnp.bfloat16)
  params = random_params(heads2.pointmap_head(SIZE), GRIDS["pointmap"])
  abstract, _ = abstract_init(head, GRIDS["pointmap"], SMALL_IN)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract))
  features = np.random.default_rng(2).standard_normal((1, *GRIDS["pointmap"], SMALL_IN), dtype=np.float32)
  out, scale = head.apply({"params": params}, features)
  full, full_scale = heads2.pointmap_head(SIZE).apply({"params": params}, features)
  assert out.dtype == scale.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), full, atol=0.1 * np.abs(full).max())
  np.testing.assert_allclose(np.asarray(scale, np.float32), full_scale, atol=0.1 * np.abs(full_scale).max())


# ---- full size, abstractly: key names and shapes against the transformers port ----

def our_shapes(task, size):
  """Our full-size head's state-dict shapes and output, from shapes alone."""
  params, out = abstract_init(heads2.head(task, size), FULL_GRID, sapiens2.size(size).width)
  return {k: tuple(v.shape) for k, v in head_to_torch(torch_names.stand_ins(params)).items()}, out


def port_config(task, size, width, num_heads, grid, num_labels):
  """A transformers Sapiens2Config with a one-layer backbone of `width` and the head heads2 builds for
  (task, size): the port builds its head from these head_config fields."""
  transformers = pytest.importorskip("transformers")
  w = heads2.widths(task, size)
  head = {"upsample_out_channels": list(w.upsample), "conv_out_channels": list(w.conv)}
  if task not in ("seg", "pose"):
    head.update(use_pixel_shuffle=True, upsample_kernel_sizes=[3] * len(w.upsample),
                conv_kernel_sizes=[3] * len(w.conv))
  if task == "pointmap":
    s = heads2.SCALE_WIDTHS[size]
    head.update(scale_conv_out_channels=list(s.conv), scale_final_hidden_sizes=list(s.hidden))
  return transformers.Sapiens2Config(hidden_size=width, num_hidden_layers=1, num_attention_heads=num_heads,
                                     intermediate_size=64, image_size=[16 * grid[0], 16 * grid[1]],
                                     num_labels=num_labels, head_config=head)


PORT_CLASSES = {"seg": "Sapiens2ForSemanticSegmentation", "pose": "Sapiens2ForPoseEstimation",
                "normal": "Sapiens2ForNormalEstimation", "pointmap": "Sapiens2ForPointmapEstimation",
                "matting": "Sapiens2ForImageMatting"}


def port_head_shapes(task, size):
  """The port's head keys and shapes after its save conversion (upstream names), built on the meta device."""
  transformers = pytest.importorskip("transformers")
  from transformers.core_model_loading import revert_weight_conversion  # pylint: disable=g-import-not-at-top
  dims = sapiens2.size(size)
  config = port_config(task, size, dims.width, dims.num_heads, FULL_GRID, OUT_CHANNELS[task])
  with torch.device("meta"):
    model = getattr(transformers, PORT_CLASSES[task])(config)
  state = revert_weight_conversion(model, model.state_dict())
  return {k: tuple(v.shape) for k, v in state.items() if not k.startswith("backbone.")}


@pytest.mark.parametrize("size", heads2.UPSTREAM_SIZES)
def test_full_size_keys_and_shapes_equal_the_ports(size):
  for task in PORT_TASKS:
    ours, _ = our_shapes(task, size)
    assert ours == port_head_shapes(task, size), (task, size)
  # albedo (not in the port) = normal's keys with conv_albedo, plus the RMSNorm2d weights at Sequential
  # position 1 (input_conv, conv_layers 1/4/7) and 2 (each upsample block)
  albedo, _ = our_shapes("albedo", size)
  normal, _ = our_shapes("normal", size)
  norms = {k: v for k, v in albedo.items() if k.replace("conv_albedo", "conv_normal") not in normal}
  rest = {k.replace("conv_albedo", "conv_normal"): v for k, v in albedo.items() if k not in norms}
  assert rest == normal
  w, width = heads2.widths("albedo", size), sapiens2.size(size).width
  assert norms == {"decode_head.input_conv.1.weight": (width,),
                   **{f"decode_head.upsample_blocks.{i}.2.weight": (c,) for i, c in enumerate(w.upsample)},
                   **{f"decode_head.conv_layers.{3 * i + 1}.weight": (c,) for i, c in enumerate(w.conv)}}


@pytest.mark.parametrize("task,millions", [("seg", 15.3), ("normal", 84), ("pointmap", 174)])
def test_1b_head_sizes_follow_the_reference(task, millions):
  """sapiens2.md §3.1-§3.3: about 15.3M (seg), 84M (normal), 174M (pointmap) head parameters at 1b."""
  shapes, _ = our_shapes(task, "sapiens2_1b")
  count = sum(int(np.prod(s)) for s in shapes.values())
  assert round(count / 1e6, 1 if task == "seg" else 0) == millions


def test_full_size_outputs():
  """1024x768 maps (pose 256x192), pointmap's scale (B, 1), at 1b and 5b."""
  for size in ("sapiens2_1b", "sapiens2_5b"):
    for task in TASKS:
      _, out = our_shapes(task, size)
      if task == "pointmap":
        out, scale = out
        assert scale.shape == (1, 1)
      hw = (256, 192) if task == "pose" else (1024, 768)
      assert out.shape == (1, *hw, OUT_CHANNELS[task]) and out.dtype == jnp.float32, (size, task)


# ---- against the port, numerically: our exported upstream-named weights through from_pretrained ----

@pytest.mark.parametrize("task", PORT_TASKS)
def test_exported_weights_load_into_the_port_and_match(task, tmp_path):
  transformers = pytest.importorskip("transformers")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  _, params, features, ours = ours_and_features(task, seed=5)
  config = port_config(task, SIZE, SMALL_IN, 2, GRIDS[task], SMALL_OUT[task])
  cls = getattr(transformers, PORT_CLASSES[task])
  torch.manual_seed(0)
  cls(config).save_pretrained(tmp_path / "port")  # upstream key names: backbone.* and decode_head.*
  saved = safetensors_torch.load_file(tmp_path / "port" / "model.safetensors")
  head = head_to_torch(params)
  saved_head = {k: tuple(v.shape) for k, v in saved.items() if not k.startswith("backbone.")}
  assert {k: v.shape for k, v in head.items()} == saved_head
  saved.update({k: torch.from_numpy(v) for k, v in head.items()})
  safetensors_torch.save_file(saved, tmp_path / "port" / "model.safetensors", metadata={"format": "pt"})
  model, info = cls.from_pretrained(tmp_path / "port", output_loading_info=True, dtype=torch.float32)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  x = nchw(features)
  with torch.no_grad():
    theirs = model.eval().decode_head(x)
    if task == "matting":
      theirs = theirs.sigmoid()  # the port's forward: sigmoid, then foreground [:3], alpha [3:]
    if task == "pointmap":
      theirs = (theirs, model.scale_head(x))
  assert_outputs_equal(task, ours, theirs)
