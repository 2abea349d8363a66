"""config.init_from: original PyTorch files and our own workdirs load into the model, or are refused by name."""
import fractions
import logging

import jax
import numpy as np
import pytest

from sapiens_jax import checkpoint
from sapiens_jax import init_from
from sapiens_jax import torch_names
from sapiens_jax import train
from sapiens_jax.models import posemb
from sapiens_jax.models import sapiens
from sapiens_jax.objectives import mae

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position


def randomized(module, seed=0):
  """Every parameter random, LayerNorm scales around 1, so no swap can hide behind zeros and ones."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      p.normal_(1.0 if p.ndim == 1 and name.endswith("weight") else 0.0, 0.2)
  return module


def clean_backbone(image_size=(64, 64), size="tiny"):
  """A torch Sapiens ViT whose state dict has the keys of a released `_clean` pretrain file."""
  dims = sapiens.SIZES[size]
  return randomized(torch_reference.SapiensViT(dims.width, dims.depth, dims.num_heads, image_size))


def tiny_neck(config, num_patches=16):
  m = config.model
  return randomized(torch_reference.MAENeck(sapiens.SIZES["tiny"].width, m.decoder_width, m.decoder_depth,
                                            m.decoder_heads, num_patches), seed=1)


def save(state_dict, path):
  if str(path).endswith(".safetensors"):
    safetensors_torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
  else:
    torch.save(state_dict, str(path))
  return str(path)


def features(config, encoder_params, backbone, image_size):
  images = np.random.default_rng(0).standard_normal((2, *image_size, 3)).astype(np.float32)
  model = sapiens.build(config.model, image_size, cls_token=True)
  ours = np.asarray(jax.jit(model.apply)({"params": encoder_params}, images))
  with torch.no_grad():
    theirs = backbone.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  return ours, theirs


def as_numpy(state_dict):
  return {k: v.detach().numpy() for k, v in state_dict.items()}


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("ext, scan_layers", [(".pth", False), (".safetensors", True)])
def test_clean_file_gives_the_torch_features_and_keeps_the_fresh_decoder(tiny_config, tmp_path, caplog,
                                                                         ext, scan_layers):
  tiny_config.model.scan_layers = scan_layers
  backbone = clean_backbone()
  path = save(backbone.state_dict(), tmp_path / f"sapiens_tiny_clean{ext}")
  target = checkpoint.abstract_weights(tiny_config)
  with caplog.at_level(logging.INFO):
    params = init_from.load_params(path, target, tiny_config)
  assert params["decoder"] is target["decoder"]  # left as given: fresh
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "has no decoder (neck.*)" in warnings[0] and path in warnings[0]
  assert any("loaded 30 tensors" in r.getMessage() for r in caplog.records)
  assert jax.tree.structure(params["encoder"]) == jax.tree.structure(target["encoder"])
  assert all(x.dtype == np.float32 and isinstance(x, np.ndarray) for x in jax.tree.leaves(params["encoder"]))
  ours, theirs = features(tiny_config, params["encoder"], backbone, (64, 64))
  assert ours.shape == theirs.shape == (2, 17, 64)
  assert np.abs(ours - theirs).max() < 1e-4  # measured 5e-6


def test_other_grid_resizes_pos_embed_like_torch(tiny_config, tmp_path):
  tiny_config.image_size = (64, 48)  # grid 4x3; the file's is 4x4 (+ cls)
  backbone = clean_backbone((64, 64))
  path = save(backbone.state_dict(), tmp_path / "clean.pth")
  params = init_from.load_params(path, checkpoint.abstract_weights(tiny_config), tiny_config)
  pos = params["encoder"]["pos_embed"]
  file_pos = backbone.pos_embed.detach()
  assert pos.shape == (1, 13, 64)
  np.testing.assert_array_equal(pos[:, :1], file_pos[:, :1].numpy())  # the cls slot is kept as is
  # The torch reference model at 64x48, with the file's table resized by torch itself.
  grid = file_pos[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
  resized = torch.nn.functional.interpolate(grid, size=(4, 3), mode="bicubic", align_corners=False)
  state_dict = backbone.state_dict()
  state_dict["pos_embed"] = torch.cat([file_pos[:, :1], resized.flatten(2).transpose(1, 2)], dim=1)
  assert np.abs(pos - state_dict["pos_embed"].numpy()).max() <= 1e-6
  reference = torch_reference.SapiensViT(64, 2, 4, (64, 48))
  reference.load_state_dict(state_dict, strict=True)
  ours, theirs = features(tiny_config, params["encoder"], reference, (64, 48))
  assert ours.shape == theirs.shape == (2, 13, 64)
  assert np.abs(ours - theirs).max() < 1e-4


def test_full_checkpoint_loads_backbone_and_decoder_and_ignores_the_head(tiny_config, tmp_path, caplog):
  tiny_config.image_size = (64, 48)  # both position tables come from a 4x4 grid
  backbone, neck = clean_backbone((64, 64)), tiny_neck(tiny_config, num_patches=16)
  state_dict = {"backbone." + k: v for k, v in backbone.state_dict().items()}
  state_dict.update({"neck." + k: v for k, v in neck.state_dict().items()})
  state_dict["head.final_layer.weight"] = torch.zeros(17, 768, 1, 1)  # a task head: not ours to load
  path = save({"state_dict": state_dict, "meta": {"epoch": 1600}}, tmp_path / "sapiens_tiny_epoch_1600.pth")
  with caplog.at_level(logging.INFO):
    params = init_from.load_params(path, checkpoint.abstract_weights(tiny_config), tiny_config)
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
  assert any("not loading 1 keys" in r.getMessage() and "head.final_layer.weight" in r.getMessage()
             for r in caplog.records)
  # What the one name mapping makes of the file, with both tables resized from 4x4 to 4x3.
  expected = as_numpy({k: v for k, v in state_dict.items() if not k.startswith("head.")})
  for key in ("backbone.pos_embed", "neck.decoder_pos_embed"):
    expected[key] = posemb.resize_pos_embed(expected[key], (4, 4), (4, 3), 1, 1)
  parts = [p._replace(prefix="backbone.") if p.group == "encoder" else p for p in mae.torch_parts(tiny_config)]
  expected = torch_names.from_torch(expected, checkpoint.abstract_weights(tiny_config), parts)
  assert_trees_equal(params, expected)
  np.testing.assert_array_equal(params["decoder"]["decoder_embed"]["kernel"], neck.decoder_embed.weight.detach().T)
  assert params["decoder"]["decoder_pos_embed"].shape == (1, 13, tiny_config.model.decoder_width)


def test_mismatches_are_one_error_naming_every_key_and_the_file(tiny_config, tmp_path):
  state_dict = clean_backbone().state_dict()
  state_dict["layers.1.attn.proj.bias"] = torch.zeros(65)
  state_dict["layers.0.attn.scale"] = torch.zeros(3)
  del state_dict["ln1.bias"]
  path = save(state_dict, tmp_path / "bad.safetensors")
  with pytest.raises(ValueError) as error:
    init_from.load_params(path, checkpoint.abstract_weights(tiny_config), tiny_config)
  message = str(error.value)
  assert path in message
  assert "1 missing keys:\n    ln1.bias (64,)" in message
  assert "1 unexpected keys:\n    layers.0.attn.scale (3,)" in message
  assert "1 mis-shaped keys:\n    layers.1.attn.proj.bias: file (65,), model (64,)" in message


def test_refusals_name_the_reason(tiny_config, tmp_path):
  target = checkpoint.abstract_weights(tiny_config)
  # Another model size is named as such.
  path = save(clean_backbone(size="small").state_dict(), tmp_path / "small.pth")
  with pytest.raises(ValueError, match=r"width 192 with 6 blocks \(model.size='small'\), but "
                                       r"config.model.size='tiny' is width 64 with 2 blocks"):
    init_from.load_params(path, target, tiny_config)
  # A table whose grid cannot be told is an error, never zeroed or mis-reshaped.
  state_dict = clean_backbone().state_dict()
  state_dict["pos_embed"] = torch.zeros(1, 1 + 15, 64)
  with pytest.raises(ValueError, match=r"odd.pth', pos_embed of shape \(1, 16, 64\): cannot tell the token "
                                       r"grid .* 15 patch tokens: it is neither square nor 4:3"):
    init_from.load_params(save(state_dict, tmp_path / "odd.pth"), target, tiny_config)
  # A training checkpoint with Python objects is not unpickled.
  path = save({"state_dict": {}, "message_hub": fractions.Fraction(1, 3)}, tmp_path / "full.pth")
  with pytest.raises(ValueError, match="holds Python objects besides tensors"):
    init_from.load_params(path, target, tiny_config)
  with pytest.raises(FileNotFoundError, match="nowhere.pth"):
    init_from.load_params(str(tmp_path / "nowhere.pth"), target, tiny_config)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    init_from.load_params(str(tmp_path / "no_run"), target, tiny_config)


def test_a_run_starts_from_init_from_and_resuming_wins(tiny_config, tmp_path):
  # A fresh run from a `_clean` file. Its first step has learning rate 0 (warm-up from 0), so its
  # step-1 checkpoint holds the params it started from.
  backbone = clean_backbone()
  tiny_config.init_from = save(backbone.state_dict(), tmp_path / "clean.pth")
  tiny_config.total_steps = 2
  tiny_config.checkpoint_every_steps = 1
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config, workdir)
  step1 = checkpoint.restore_params(workdir, 1)[0]
  assert_trees_equal(torch_names.to_torch(step1, mae.torch_parts(tiny_config, include_decoder=False)),
                     as_numpy(backbone.state_dict()))

  # That workdir as init_from (the same call the run makes): DIR is its newest checkpoint, DIR:STEP
  # the one named; a scanned model gets the same values stacked.
  target = checkpoint.abstract_weights(tiny_config)
  newest, _, step = checkpoint.restore_params(workdir)
  assert step == 2
  assert_trees_equal(init_from.load_params(workdir, target, tiny_config), newest)
  assert_trees_equal(init_from.load_params(f"{workdir}:1", target, tiny_config), step1)
  tiny_config.model.scan_layers = True
  scanned = init_from.load_params(workdir, checkpoint.abstract_weights(tiny_config), tiny_config)
  assert "layers" in scanned["encoder"]
  assert_trees_equal(torch_names.to_torch(scanned, mae.torch_parts(tiny_config)),
                     torch_names.to_torch(newest, mae.torch_parts(tiny_config)))
  tiny_config.model.scan_layers = False
  # Its position tables on another grid with as many tokens (4x4 -> 2x8): resized, from the grid
  # the run was trained on, not one guessed from the token count.
  tiny_config.image_size = (32, 128)
  wide = init_from.load_params(workdir, checkpoint.abstract_weights(tiny_config), tiny_config)
  for group, key in (("encoder", "pos_embed"), ("decoder", "decoder_pos_embed")):
    np.testing.assert_array_equal(wide[group][key],
                                  posemb.resize_pos_embed(newest[group][key], (4, 4), (2, 8), 1, 1))
  tiny_config.image_size = (64, 64)

  # Rerun: the workdir's own checkpoint wins; init_from is not even read. (Already at total_steps,
  # so nothing is trained or compiled beyond the state init.)
  tiny_config.init_from = str(tmp_path / "never_read.pth")
  state = train.train_and_evaluate(tiny_config, workdir)
  assert int(state["step"]) == 2
  assert_trees_equal(jax.tree.map(np.asarray, state["params"]), newest)
