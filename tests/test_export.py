"""Weights cross to PyTorch and back: names, layouts, numerics against an independent torch model, the CLI."""
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from sapiens_jax import checkpoint
from sapiens_jax import default_config
from sapiens_jax import export
from sapiens_jax import objectives
from sapiens_jax import torch_names
from sapiens_jax import train
from sapiens_jax.data import transforms
from sapiens_jax.models import sapiens
from sapiens_jax.objectives import mae
from sapiens_jax.prng import example_keys

# torch is an optional extra (`pip install -e .[torch]`); CI installs it, so these tests run there.
torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
import photos  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = sapiens.SIZES["tiny"]
WIDTH, DEPTH, HEADS = TINY.width, TINY.depth, TINY.num_heads  # 64, 2, 4

# Reference §2.1, verbatim: every backbone key of one block, and the rest.
SPEC_BLOCK_KEYS = ["ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                   "attn.proj.bias", "ln2.weight", "ln2.bias", "ffn.layers.0.0.weight", "ffn.layers.0.0.bias",
                   "ffn.layers.1.weight", "ffn.layers.1.bias"]
SPEC_OTHER_KEYS = ["patch_embed.projection.weight", "patch_embed.projection.bias", "cls_token", "pos_embed",
                   "ln1.weight", "ln1.bias"]


def randomize(params, seed=0):
  """Every leaf random (float32 numpy), so a swapped bias or LayerNorm cannot hide behind zeros and ones."""
  rng = np.random.default_rng(seed)
  def draw(path, x):
    noise = 0.2 * rng.standard_normal(x.shape, dtype=np.float32)
    return 1 + noise if jax.tree_util.keystr(path).endswith("['scale']") else noise
  return jax.tree_util.tree_map_with_path(draw, params)


def mae_config(image_size=(64, 48), scan_layers=False):
  """A tiny MAE: 64 wide, 2 blocks; decoder 32 wide, 2 blocks."""
  config = default_config.pretrain("tiny")
  config.image_size = image_size
  config.model.scan_layers = scan_layers
  config.model.decoder_width, config.model.decoder_depth, config.model.decoder_heads = 32, 2, 2
  return config


def mae_params(image_size=(64, 48), scan_layers=False, seed=0):
  """Random params of the tiny MAE."""
  config = mae_config(image_size, scan_layers)
  model = mae.build_model(config)
  shapes = jax.eval_shape(lambda: mae.init_params(model, config, jax.random.key(0)))
  return randomize(nn.unbox(shapes), seed)


def parts(prefix="", include_decoder=True):
  """The MAE's PyTorch parts, the encoder under `prefix`."""
  return [p._replace(prefix=prefix) if p.group == "encoder" else p
          for p in mae.torch_parts(mae_config(), include_decoder)]


def reference_models(image_size=(64, 48), with_cls_token=True, decoder_depth=2):
  h, w = image_size
  backbone = torch_reference.SapiensViT(WIDTH, DEPTH, HEADS, image_size, with_cls_token=with_cls_token)
  neck = torch_reference.MAENeck(WIDTH, 32, decoder_depth, 2, (h // 16) * (w // 16))
  return backbone, neck


def split_neck(state_dict):
  backbone = {k: v for k, v in state_dict.items() if not k.startswith("neck.")}
  neck = {k[len("neck."):]: v for k, v in state_dict.items() if k.startswith("neck.")}
  return backbone, neck


def as_torch(state_dict):
  return {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def test_roundtrip_is_bitwise_with_and_without_prefix():
  params = mae_params()
  for prefix in ("", "backbone."):
    state_dict = torch_names.to_torch(params, parts(prefix))
    assert_trees_equal(torch_names.from_torch(state_dict, params, parts(prefix)), params)
  backbone_only = torch_names.to_torch(params, parts(include_decoder=False))
  assert_trees_equal(torch_names.from_torch(backbone_only, params, parts(include_decoder=False)),
                     {"encoder": params["encoder"]})


def test_scanned_blocks_are_written_as_separate_layers():
  params = mae_params()
  scanned = mae_params(scan_layers=True)
  assert "layers" in scanned["encoder"] and "decoder_blocks" in scanned["decoder"]
  # Same values, stacked on a leading depth axis.
  stack = lambda *blocks: jax.tree.map(lambda *x: np.stack(x), *blocks)
  scanned["encoder"]["layers"] = stack(*(params["encoder"][f"layers_{i}"] for i in range(DEPTH)))
  scanned["decoder"]["decoder_blocks"] = stack(*(params["decoder"][f"decoder_blocks_{j}"] for j in range(2)))
  state_dict = torch_names.to_torch(scanned, parts())
  assert_trees_equal(state_dict, torch_names.to_torch(params, parts()))
  assert_trees_equal(torch_names.from_torch(state_dict, scanned, parts()), scanned)


def test_keys_and_shapes_are_the_original_ones_and_load_strictly():
  params = mae_params()
  state_dict = torch_names.to_torch(params, parts())
  backbone, neck = reference_models()
  # The reference model itself has the key set of the spec's table.
  spec = SPEC_OTHER_KEYS + [f"layers.{i}.{k}" for i in range(DEPTH) for k in SPEC_BLOCK_KEYS]
  assert sorted(backbone.state_dict()) == sorted(spec)
  ours_backbone, ours_neck = split_neck(state_dict)
  for module, ours in ((backbone, ours_backbone), (neck, ours_neck)):
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == {k: v.shape for k, v in ours.items()}
    module.load_state_dict(as_torch(ours), strict=True)
  assert state_dict["layers.1.attn.qkv.weight"].shape == (3 * WIDTH, WIDTH)
  assert state_dict["patch_embed.projection.weight"].shape == (WIDTH, 3, 16, 16)
  assert state_dict["neck.decoder_pred.weight"].shape == (16 * 16 * 3, 32)
  prefixed = torch_names.to_torch(params, parts("backbone."))
  assert {k for k in prefixed if not k.startswith("neck.")} == {"backbone." + k for k in ours_backbone}


def torch_features(backbone, images_nhwc):
  with torch.no_grad():
    return backbone.forward_features(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def apply(model, params, *inputs):
  """model.apply, jitted: one compile is much cheaper than running a fresh model op by op."""
  return np.asarray(jax.jit(model.apply)({"params": params}, *inputs), np.float32)


@pytest.mark.parametrize("with_cls_token", [True, False])
def test_backbone_matches_the_torch_reference(with_cls_token):
  image_size = (64, 48)
  params = mae_params(image_size)["encoder"]
  if not with_cls_token:  # as in the task finetunes: no cls token, no cls slot in pos_embed
    params = {k: v for k, v in params.items() if k != "cls_token"}
    params["pos_embed"] = params["pos_embed"][:, 1:]
  backbone, _ = reference_models(image_size, with_cls_token)
  backbone.load_state_dict(as_torch(torch_names.to_torch({"encoder": params}, parts(include_decoder=False))),
                           strict=True)
  # Two images of unit Gaussian noise, then a real photo, normalised as in training.
  noise = np.random.default_rng(1).standard_normal((2, *image_size, 3)).astype(np.float32)
  images = np.concatenate([noise, transforms.normalize(photos.astronaut(image_size))[None]])
  theirs = torch_features(backbone, images)
  ours = apply(sapiens.ViT(WIDTH, DEPTH, HEADS, image_size, use_cls_token=with_cls_token), params, images)
  assert ours.shape == theirs.shape == (3, 12 + int(with_cls_token), WIDTH)
  diff = np.abs(ours - theirs).max(axis=(1, 2))
  print(f"cls={with_cls_token} float32 max abs diff: noise {diff[:2].max():.1e}, photo {diff[2]:.1e}")
  assert diff.max() < 1e-4  # measured 3e-6 to 5e-6
  # bfloat16 compute (params stay float32) against the float32 reference: measured 2e-2 to 4e-2,
  # the rounding of O(1) activations to 8 mantissa bits; reported, loosely bounded.
  ours = apply(sapiens.ViT(WIDTH, DEPTH, HEADS, image_size, use_cls_token=with_cls_token, dtype="bfloat16"),
               params, images)
  diff = np.abs(ours - theirs).max()
  print(f"cls={with_cls_token} bfloat16 compute max abs diff: {diff:.1e}")
  assert diff < 0.25


def test_decoder_matches_the_torch_reference():
  image_size = (64, 48)
  params = mae_params(image_size)
  _, neck = reference_models(image_size)
  neck.load_state_dict(as_torch(split_neck(torch_names.to_torch(params, parts()))[1]), strict=True)
  keep_ids, _, restore_ids = mae.random_masking(example_keys(jax.random.key(2), 2), 12, 0.75)
  latent = np.random.default_rng(2).standard_normal((2, 1 + keep_ids.shape[1], WIDTH)).astype(np.float32)
  ours = apply(mae.Decoder(32, 2, 2, (4, 3), 16), params["decoder"], latent, restore_ids)
  with torch.no_grad():
    theirs = neck(torch.from_numpy(latent), torch.from_numpy(np.asarray(restore_ids, np.int64))).numpy()
  assert ours.shape == theirs.shape == (2, 12, 768)
  assert np.abs(ours - theirs).max() < 1e-4


def run_export(*args):
  return subprocess.run([sys.executable, "-m", "sapiens_jax.export", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_cli_exports_a_trained_run_that_torch_loads_strictly(tiny_config, tmp_path):
  tiny_config.total_steps = 2
  tiny_config.checkpoint_every_steps = 1
  tiny_config.model.scan_layers = True  # as the real sizes train: export must unstack the blocks
  workdir = str(tmp_path / "run")
  state = train.train_and_evaluate(tiny_config, workdir)
  expected = torch_names.to_torch(jax.tree.map(np.asarray, state["params"]), mae.torch_parts(tiny_config))

  out = run_export(f"--workdir={workdir}", f"--output={tmp_path / 'backbone.safetensors'}")
  assert out.returncode == 0, out.stderr[-3000:]
  out = run_export(f"--workdir={workdir}", f"--output={tmp_path / 'mae.pth'}", "--include_decoder")
  assert out.returncode == 0, out.stderr[-3000:]

  # .pth: a plain state dict that torch.load reads with its safe default (weights_only).
  loaded = torch.load(tmp_path / "mae.pth")
  assert set(loaded) == set(expected)
  for key, value in loaded.items():
    assert value.dtype == torch.float32
    np.testing.assert_array_equal(value.numpy(), expected[key], err_msg=key)
  # ... and converts back to the trained (scanned) params bit for bit.
  m = tiny_config.model
  assert_trees_equal(torch_names.from_torch(loaded, state["params"], mae.torch_parts(tiny_config)),
                     jax.tree.map(np.asarray, state["params"]))
  backbone, neck = reference_models(tuple(tiny_config.image_size), decoder_depth=m.decoder_depth)
  torch_backbone, torch_neck = split_neck(loaded)
  backbone.load_state_dict(torch_backbone, strict=True)
  neck.load_state_dict(torch_neck, strict=True)
  # The loaded torch model computes what the trained Flax encoder computes.
  images = transforms.normalize(photos.astronaut(tuple(tiny_config.image_size)))[None]
  ours = apply(mae.encoder(tiny_config), state["params"]["encoder"], images)
  assert np.abs(ours - torch_features(backbone, images)).max() < 1e-4

  # .safetensors without --include_decoder: exactly the backbone keys.
  backbone_only = safetensors_torch.load_file(tmp_path / "backbone.safetensors")
  assert set(loaded) - set(backbone_only) == {"neck." + k for k in neck.state_dict()}
  assert set(backbone_only) == set(backbone.state_dict())
  for key, value in backbone_only.items():
    np.testing.assert_array_equal(value.numpy(), expected[key], err_msg=key)

  # bfloat16: the float32 values rounded to nearest; --step picks an older checkpoint.
  export.export(workdir, str(tmp_path / "bf16.safetensors"), dtype="bfloat16")
  bf16 = safetensors_torch.load_file(tmp_path / "bf16.safetensors")
  for key, value in bf16.items():
    assert value.dtype == torch.bfloat16
    assert torch.equal(value, torch.tensor(expected[key]).to(torch.bfloat16)), key
  assert export.export(workdir, str(tmp_path / "step1.pth"), step=1) == (1, len(backbone_only))
  step1 = torch.load(tmp_path / "step1.pth")
  assert not np.array_equal(step1["layers.0.attn.qkv.weight"].numpy(), expected["layers.0.attn.qkv.weight"])
  with pytest.raises(ValueError, match=r"no checkpoint for step 7 .* available steps: \[1, 2\]"):
    export.export(workdir, str(tmp_path / "step7.pth"), step=7)


def test_bad_inputs_are_named(tmp_path):
  with pytest.raises(ValueError, match=r"'weights.npz' has an unknown extension"):
    export.export(str(tmp_path), "weights.npz")
  with pytest.raises(ValueError, match="float16"):
    export.export(str(tmp_path), "weights.pth", dtype="float16")
  with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}/checkpoints does not exist")):
    export.export(str(tmp_path), str(tmp_path / "weights.pth"))
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(FileNotFoundError, match="holds no saved step"):
    export.export(str(tmp_path), str(tmp_path / "weights.pth"))

  params = mae_params()
  state_dict = torch_names.to_torch(params, parts())
  with pytest.raises(KeyError, match=r"head\.bogus\.weight"):
    torch_names.from_torch({**state_dict, "head.bogus.weight": np.zeros(1)}, params, parts())
  with pytest.raises(KeyError, match=r"layers\.1\.ln2\.bias"):
    torch_names.from_torch({k: v for k, v in state_dict.items() if k != "layers.1.ln2.bias"}, params, parts())
  with pytest.raises(KeyError, match="backbone.patch_embed"):
    torch_names.from_torch(state_dict, params, parts("backbone."))
  extra = {**params, "encoder": {**params["encoder"], "layer_scale": np.ones(3)}}
  with pytest.raises(ValueError, match="layer_scale"):
    torch_names.to_torch(extra, parts())
  with pytest.raises(ValueError, match="head parameters with no PyTorch name.*bogus"):
    head = objectives.finetune.torch_parts(default_config.finetune("coco", "tiny"))[1]
    torch_names.to_torch({"head": {"final_layer": {}, "bogus": {"kernel": np.ones(3)}}}, [head])


@pytest.mark.parametrize("objective,dataset", [("mae", ""), ("finetune", "coco"), ("finetune", "goliath_seg"),
                                               ("finetune", "render_people_depth"),
                                               ("finetune", "render_people_normal"), ("mae_distill", "")])
def test_every_parameter_group_has_pytorch_names(objective, dataset):
  """What an objective builds, it names: no group (and no parameter) is left out of an export."""
  if objective == "mae_distill":
    config = default_config.pretrain("sapiens2_tiny", objective)
  else:
    config = default_config.finetune(dataset, "tiny") if dataset else default_config.pretrain("tiny")
  config.image_size = (64, 48)
  chosen = objectives.get(config)
  assert chosen is objectives.OBJECTIVES[objective]
  params = checkpoint.abstract_weights(config)
  parts = chosen.torch_parts(config)
  assert sorted(p.group for p in parts) == sorted(params)
  torch_names.to_torch(torch_names.stand_ins(params), parts)  # raises on a parameter without a name
