"""Sapiens2 weights across: files in the released layouts into init_from and `predict --weights`,
a trained run out again into upstream's module (strict) and transformers' Sapiens2Model."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from sapiens_jax import default_config
from sapiens_jax import export
from sapiens_jax import init_from
from sapiens_jax import torch_names
from sapiens_jax import train
from sapiens_jax.data import transforms
from sapiens_jax.models import sapiens2
from sapiens_jax.objectives import mae

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
import photos  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch_sapiens2  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = (64, 48)


def reference(name, seed=0):
  return torch_sapiens2.random_reference(sapiens2.size(name), seed=seed)


def numpy_state(model, prefix=""):
  return {prefix + k: v.float().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A one-step tiny Sapiens2 MAE run (scanned blocks, as the real sizes train)."""
  config = default_config.pretrain("sapiens2_tiny")
  config.image_size = IMAGE_SIZE
  config.batch_size = 2
  config.total_steps = 1
  config.checkpoint_every_steps = config.eval_every_steps = 1
  config.num_viz_images = 1
  config.model.scan_layers = True
  config.model.decoder_width, config.model.decoder_depth, config.model.decoder_heads = 32, 1, 2
  config.data.num_generated = 8
  workdir = str(tmp_path_factory.mktemp("sapiens2_run"))
  state = train.train_and_evaluate(config, workdir)
  return config, workdir, jax.tree.map(np.asarray, state["params"])


def our_features(config, encoder_params, images, rope_dtype=None):
  config = config.copy_and_resolve_references()
  if rope_dtype:
    config.model.rope_dtype = rope_dtype
  return np.asarray(mae.encoder(config).apply({"params": encoder_params}, images))


def test_export_loads_into_upstreams_module_strictly(run, tmp_path):
  config, workdir, params = run
  path = str(tmp_path / "sapiens2_tiny.safetensors")
  export.export(workdir, path)
  tensors = safetensors_torch.load_file(path)
  model = reference("sapiens2_tiny")
  assert set(tensors) == set(model.state_dict())
  assert tensors[sapiens2.PERIODS].dtype == torch.bfloat16  # the buffer as upstream keeps it
  model.load_state_dict(tensors, strict=True)
  images = transforms.normalize(photos.astronaut(IMAGE_SIZE))[None]
  error = np.abs(our_features(config, params["encoder"], images) - torch_sapiens2.forward_nhwc(model, images)).max()
  assert error <= 3 * torch_sapiens2.sensitivity(model, images)
  # ... and reads back (through init_from's reader and the periods check) to the trained values.
  back = init_from.load_params(path, params, config)
  for key, value in torch_names.to_torch(back, [sapiens2.torch_part()]).items():
    np.testing.assert_array_equal(value, torch_names.to_torch(params, [sapiens2.torch_part()])[key], err_msg=key)


def test_transformers_export_loads_into_sapiens2model_and_matches(run, tmp_path):
  transformers = pytest.importorskip("transformers")
  config, workdir, params = run
  out = str(tmp_path / "hf")
  export.export(workdir, out, output_format="transformers")
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  model, info = transformers.Sapiens2Model.from_pretrained(out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  images = transforms.normalize(photos.astronaut(IMAGE_SIZE))[None]
  with torch.no_grad():
    theirs = model.eval()(pixel_values=torch.tensor(np.asarray(images)).permute(0, 3, 1, 2)).last_hidden_state.numpy()
  # The port rotates RoPE in float32 (upstream and our default: bfloat16): equal to ours so set.
  np.testing.assert_allclose(theirs, our_features(config, params["encoder"], images, "float32"), atol=1e-4, rtol=0)

  # The directory is a weights source too, in upstream names (as written) or the port's own.
  native = str(tmp_path / "hf_native")
  model.save_pretrained(native, save_original_format=False)
  native_keys = safetensors_torch.load_file(os.path.join(native, "model.safetensors"))
  assert any(k.startswith("model.layer.") for k in native_keys)
  for directory in (out, native):
    loaded_config, loaded = init_from.backbone_from_file(directory, IMAGE_SIZE)
    assert loaded_config.model.size == "sapiens2_tiny"
    want = torch_names.to_torch(params, [sapiens2.torch_part()])
    got = torch_names.to_torch(loaded, [sapiens2.torch_part()])
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_the_port_differs_from_upstream_in_its_rope_dtype(tmp_path):
  """Weights where attention matters (LayerScale ~1): the port's features are upstream's with RoPE
  rotated in float32, not upstream's own bfloat16 rotation."""
  transformers = pytest.importorskip("transformers")
  model, paths = released_files(tmp_path)
  with open(os.path.join(paths[2], "config.json"), "w") as f:
    json.dump(sapiens2.transformers_config(default_config.pretrain("sapiens2_tiny").model, IMAGE_SIZE), f)
  port = transformers.Sapiens2Model.from_pretrained(paths[2]).eval()
  images = transforms.normalize(photos.astronaut(IMAGE_SIZE))[None]
  with torch.no_grad():
    theirs = port(pixel_values=torch.tensor(np.asarray(images)).permute(0, 3, 1, 2)).last_hidden_state.numpy()
  upstream = torch_sapiens2.forward_nhwc(model, images)
  config, params = init_from.backbone_from_file(paths[2], IMAGE_SIZE)
  np.testing.assert_allclose(theirs, our_features(config, params["encoder"], images, "float32"), atol=1e-4, rtol=0)
  assert np.abs(theirs - upstream).max() > 10 * torch_sapiens2.sensitivity(model, images)


def test_transformers_export_refuses_what_the_port_cannot_hold(tmp_path):
  with pytest.raises(ValueError, match="no 4K tokenizer"):
    sapiens2.transformers_config(default_config.pretrain("sapiens2_tiny_4k").model, IMAGE_SIZE)
  with pytest.raises(ValueError, match="writes a directory"):
    export.check_output(str(tmp_path / "x.safetensors"), "float32", "transformers")


def released_files(tmp_path):
  """A Sapiens2 file in each released layout: pretrain (bare keys, safetensors), task checkpoint
  (backbone.* + decode_head.*, .pth), and a directory with model.safetensors."""
  model = reference("sapiens2_tiny", seed=3)
  bare = {k: v.contiguous() for k, v in model.state_dict().items()}
  safetensors_torch.save_file(bare, str(tmp_path / "pretrain.safetensors"))
  task = {"backbone." + k: v for k, v in bare.items()}
  task["decode_head.conv_seg.weight"] = torch.zeros(29, 64, 1, 1)
  torch.save({"state_dict": task}, str(tmp_path / "seg.pth"))
  os.makedirs(tmp_path / "dir")
  safetensors_torch.save_file({k: v for k, v in bare.items() if k != sapiens2.PERIODS},
                              str(tmp_path / "dir" / "model.safetensors"))
  return model, [str(tmp_path / name) for name in ("pretrain.safetensors", "seg.pth", "dir")]


def test_init_from_reads_every_released_layout(tmp_path):
  model, paths = released_files(tmp_path)
  want = {k: v for k, v in numpy_state(model).items() if k != sapiens2.PERIODS}
  pretrain = default_config.pretrain("sapiens2_tiny")
  pretrain.image_size = IMAGE_SIZE
  target = mae.init_params(mae.build_model(pretrain), pretrain, jax.random.key(0))
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  target = jax.tree.map(np.asarray, nn.unbox(target))
  for path in paths:
    params = init_from.load_params(path, target, pretrain)
    got = torch_names.to_torch(params, [sapiens2.torch_part()])
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{path}: {key}")


def test_a_file_of_another_size_or_family_is_named(tmp_path):
  _, paths = released_files(tmp_path)
  small = default_config.pretrain("sapiens2_small")
  small.image_size = IMAGE_SIZE
  with pytest.raises(ValueError, match=r"model.size='sapiens2_tiny'.*config.model.size='sapiens2_small'"):
    init_from.load_params(paths[0], None, small)
  v1 = default_config.pretrain("tiny")
  with pytest.raises(ValueError, match="holds a Sapiens2 backbone.*sapiens2_\\* size"):
    init_from.load_params(paths[0], None, v1)
  with pytest.raises(FileNotFoundError, match="without model.safetensors"):
    init_from.read_weights(str(tmp_path))


def predict_cli(*args):
  return subprocess.run([sys.executable, "-m", "sapiens_jax.predict", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.parametrize("family", ["sapiens2", "sapiens2_4k", "sapiens"])
def test_predict_features_straight_from_a_file(family, tmp_path):
  """No run, no config: the architecture is read from the tensors; the features are the
  reference's on the photo resized to --image_size."""
  image_size = (256, 192) if family == "sapiens2_4k" else (128, 96)
  if family == "sapiens":  # v1: a task checkpoint's backbone (no cls token) of size "tiny"
    model = torch_reference.SapiensViT(64, 2, 4, image_size, with_cls_token=False)
    torch.manual_seed(0)
    state = {"backbone." + k: torch.randn_like(v) * 0.1 for k, v in model.state_dict().items()}
    model.load_state_dict({k[len("backbone."):]: v for k, v in state.items()})
    torch.save({"state_dict": state}, str(tmp_path / "w.pth"))
    weights = str(tmp_path / "w.pth")
  else:
    model = reference("sapiens2_tiny_4k" if family == "sapiens2_4k" else "sapiens2_tiny")
    weights = str(tmp_path / "w.safetensors")
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
  photo = photos.astronaut((300, 200))
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(photo).save(tmp_path / "astronaut.png")
  out = predict_cli(f"--weights={weights}", "--task=features", f"--input={tmp_path / 'astronaut.png'}",
                    f"--output={tmp_path / 'out'}", f"--image_size={image_size[0]},{image_size[1]}")
  assert out.returncode == 0, out.stderr[-3000:]
  features = np.load(tmp_path / "out" / "astronaut_features.npy")
  images = np.asarray(transforms.normalize(transforms.stretch(photo, image_size)))[None]
  with torch.no_grad():
    if family == "sapiens":
      want = model.forward_features(torch.tensor(images).permute(0, 3, 1, 2))
      want = want.transpose(1, 2).reshape(1, 64, image_size[0] // 16, image_size[1] // 16)[0].numpy()
    else:
      want = model.featmap(torch.tensor(images).permute(0, 3, 1, 2))[0].numpy()
  stride = 64 if family == "sapiens2_4k" else 16
  assert features.shape == want.shape == (64, image_size[0] // stride, image_size[1] // stride)
  tolerance = 1e-4 if family == "sapiens" else 3 * torch_sapiens2.sensitivity(model, images)
  assert np.abs(features - want).max() <= tolerance


def test_predict_weights_refuses_a_file_it_cannot_read(tmp_path):
  safetensors_torch.save_file({"something.weight": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
  out = predict_cli(f"--weights={tmp_path / 'w.safetensors'}", f"--input={tmp_path}", f"--output={tmp_path / 'o'}")
  assert out.returncode != 0 and "no Sapiens or Sapiens2 backbone of a known size" in out.stderr
