"""Whole Sapiens2 task models: one upstream-layout file (`backbone.*` + `decode_head.*`) through
`predict.load_weights`, against our PyTorch reference of backbone and head together.

The heads (test_heads_sapiens2.py) and the backbone (test_sapiens2_weights.py) each match the reference
on their own; a released task checkpoint also needs the joining to be right: the task and labels read
off the head's tensors, both parts of one file into one param tree, the cls and register tokens dropped
and the patch tokens laid out as the head's (h, w) map, and pointmap's scale branch fed that same map.
A slip there passes both part tests, so the whole chain is compared here, on a photo.

RoPE: upstream rotates q and k in bfloat16, and the loaded config keeps that. Rounded to bfloat16, the
float32 differences of two summation orders flip a few roundings, which moves the outputs by about
1e-3, so 1e-4 parity is only defined with both sides rotating in float32 (`model.rope_dtype`, a
compute-only setting). The default is held to the reference's own noise instead: three times how far
its outputs move when its input moves by one float32 ulp, as test_sapiens2_weights.py bounds the
backbone.
"""
import contextlib
import functools
import json

import jax
import ml_collections
import numpy as np
import pytest

from sapiens_jax import objectives
from sapiens_jax import predict
from sapiens_jax.data import transforms
from sapiens_jax.models import sapiens2

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
import photos  # pylint: disable=g-import-not-at-top,wrong-import-position
import test_heads_sapiens2 as heads_test  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch_sapiens2  # pylint: disable=g-import-not-at-top,wrong-import-position

SIZE = "sapiens2_tiny"  # 18 blocks (grouped-query ones among them, as released), test widths for every head
TASKS = ("seg", "normal", "pointmap", "pose", "albedo", "matting")
ATOL = 1e-4
HEAD_STD = 0.3  # every head tensor N(0, 0.3^2), as test_heads_sapiens2's random params
WRONG_TENSOR = "decode_head.conv_layers.0.weight"  # a hidden layer every head has


def image_size(task):
  """16 x test_heads_sapiens2's grid: pointmap's needs 16x12 for its scale branch to keep a 2x2 map."""
  return tuple(16 * g for g in heads_test.GRIDS[task])


class TaskReference(torch.nn.Module):
  """Upstream's task model: the backbone's featmap (patch tokens as (B, C, h, w)) into decode_head,
  so state_dict() keys are the released checkpoints' `backbone.*` and `decode_head.*`."""

  def __init__(self, backbone, decode_head):
    super().__init__()
    self.backbone = backbone
    self.decode_head = decode_head

  def forward(self, images):
    return self.decode_head(self.backbone.featmap(images))


@torch.no_grad()
def randomize_head_(head, seed):
  gen = torch.Generator().manual_seed(seed)
  for p in head.parameters():
    p.copy_(HEAD_STD * torch.randn(p.shape, generator=gen))
  return head


def reference(task, rope_dtype="bfloat16"):
  """The task model with every weight random; LayerScale near 1 (random_reference), so the backbone's
  attention shapes the head's input. Seeded per task: both RoPE dtypes give the same weights."""
  seed = TASKS.index(task)
  dims = sapiens2.size(SIZE)
  backbone = torch_sapiens2.random_reference(dims, rope_dtype, seed=seed)
  head = heads_test.torch_head(task, dims.width, SIZE, heads_test.GRIDS[task])  # the recipe's output channels
  return TaskReference(backbone, randomize_head_(head, 100 + seed)).eval()


def write_upstream_file(state_dict, path):
  safetensors_torch.save_file({k: v.float().contiguous() for k, v in state_dict.items()}, path)
  return path


def photo_batch(task):
  """Two normalised float32 photos (the astronaut and its mirror image), (2, H, W, 3)."""
  photo = photos.astronaut(image_size(task))
  return np.asarray(transforms.normalize(np.stack([photo, photo[:, ::-1]])))


@contextlib.contextmanager
def one_torch_thread():
  """The reference is tiny: on a busy machine torch's thread pool makes it ~100x slower than one thread."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    yield
  finally:
    torch.set_num_threads(threads)


def theirs(model, images):
  """The reference's outputs as torch tensors: the NCHW map, or pointmap's (map, scale (B, 1))."""
  with one_torch_thread(), torch.no_grad():
    return model(heads_test.nchw(images))


@functools.cache
def _task_forward(config_json):
  """The jitted (params, normalised images) -> raw head outputs: the TaskModel that predict's network
  (`predict._network`) builds from a loaded config, before the task's predict_outputs."""
  config = ml_collections.ConfigDict(json.loads(config_json))
  model = objectives.get(config).build_model(config)
  return jax.jit(lambda params, images: model.apply({"params": params}, images))


def ours(config, params, images):
  return _task_forward(json.dumps(config.to_dict()))(params, images)


def with_rope(config, rope_dtype):
  config = config.copy_and_resolve_references()
  config.model.rope_dtype = rope_dtype
  return config


def as_numpy(outputs):
  """Our outputs or the reference's as a list of numpy arrays, maps NHWC (pointmap: map, then scale)."""
  leaves = outputs if isinstance(outputs, tuple) else (outputs,)
  return [heads_test.nhwc(x) if isinstance(x, torch.Tensor) and x.ndim == 4 else np.asarray(x) for x in leaves]


def max_difference(a, b):
  pairs = list(zip(as_numpy(a), as_numpy(b), strict=True))
  assert all(x.shape == y.shape for x, y in pairs)
  return max(float(np.abs(x - y).max()) for x, y in pairs)


def sensitivity(model, images):
  """How far the reference's outputs move when its input moves by one float32 ulp, up or down."""
  want = theirs(model, images)
  return max(max_difference(want, theirs(model, np.nextafter(images, np.float32(to)))) for to in (np.inf, -np.inf))


@pytest.fixture(scope="module", params=TASKS)
def loaded(request, tmp_path_factory):
  """(task, bfloat16-RoPE reference, file, config, params): the reference saved as a released task
  checkpoint and read back as `predict --weights` reads it."""
  task = request.param
  model = reference(task)
  path = write_upstream_file(model.state_dict(), str(tmp_path_factory.mktemp(task) / f"{task}.safetensors"))
  config, params = predict.load_weights(path, image_size(task))
  return task, model, path, config, params


def test_the_task_is_read_from_the_heads_tensors(loaded):
  task, model, path, config, params = loaded
  keys = set(safetensors_torch.load_file(path))
  assert keys == set(model.state_dict())
  assert {k.split(".")[0] for k in keys} == {"backbone", "decode_head"}
  assert (config.task, config.recipe, config.data.dataset, config.model.size) == (
      task, "sapiens2", f"sapiens2_{task}", SIZE)
  assert tuple(config.image_size) == image_size(task)
  assert (config.model.dtype, config.model.rope_dtype) == ("float32", "bfloat16")
  assert set(params) == {"encoder", "head"}
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))


def test_matches_the_reference_with_float32_rope(loaded):
  task, _, _, config, params = loaded
  images = photo_batch(task)
  got = ours(with_rope(config, "float32"), params, images)
  heads_test.assert_outputs_equal(task, got, theirs(reference(task, "float32"), images))


def test_default_bfloat16_rope_is_within_the_references_own_noise(loaded):
  task, model, _, config, params = loaded
  images = photo_batch(task)
  got, want = ours(config, params, images), theirs(model, images)
  assert max_difference(got, want) <= 3 * sensitivity(model, images)


def test_a_wrong_head_tensor_is_seen(tmp_path):
  """The comparison can fail: one decode_head tensor redrawn in the file moves the outputs far past ATOL."""
  task = "seg"
  model = reference(task, "float32")
  state = dict(model.state_dict())
  gen = torch.Generator().manual_seed(1234)
  state[WRONG_TENSOR] = HEAD_STD * torch.randn(state[WRONG_TENSOR].shape, generator=gen)
  config, params = predict.load_weights(write_upstream_file(state, str(tmp_path / "wrong.safetensors")),
                                        image_size(task))
  images = photo_batch(task)
  assert max_difference(ours(with_rope(config, "float32"), params, images), theirs(model, images)) > 100 * ATOL
