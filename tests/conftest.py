"""Shared fixtures: tiny configs that train in seconds on CPU, one rendered synthetic-humans
dataset, and no network for any test. Helper modules (torch_reference, photos, notebooks, mesh_runs,
cpu_env, ...) sit beside this file and import from any test folder."""
import importlib.util
import ipaddress
import os
import shutil
import socket
import sys
import tempfile

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
sys.path[:0] = [REPO, TESTS]

import cpu_env  # pylint: disable=g-import-not-at-top,wrong-import-position  (tests/cpu_env.py)

# One XLA compilation cache for the whole run, set before JAX is imported: many tests compile the same
# programs (the same configs in several files, in the xdist workers and in the subprocesses, which
# inherit the variable); test_train.py + tasks/test_finetune.py took 285 s with it, 376 s without.
# A cached program is the one compilation made, so results are unchanged. Made by the first process
# (pytest itself, or xdist's controller before it starts its workers) and removed when that one ends.
_OWN_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_XLA_CACHE = tempfile.mkdtemp(prefix="sapiens_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_XLA_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# glibc's malloc keeps XLA:CPU's per-step buffers instead of faulting them in again every step
# (cpu_env.py): two test-size Sapiens2 runs side by side on 2 cores went from 2.70 to 3.29 steps/s
# each, 18% of their CPU time having been the kernel's (BENCHMARKS.md). Set here, it reaches xdist's
# workers and every subprocess; pytest without -n keeps the default in its own process.
os.environ.setdefault("GLIBC_TUNABLES", cpu_env.GLIBC_TUNABLES)

from sapiens_jax import default_config  # pylint: disable=g-import-not-at-top
from sapiens_jax.data import pipeline  # pylint: disable=g-import-not-at-top


# The files that take longest (minutes of one core each), run first: README's command hands files to
# the two workers in collection order (--no-loadscope-reorder; xdist's default would start them last,
# as files with few tests), so each worker starts on one and the short files fill in around them.
LONGEST_FILES = ("tasks/test_learning_sapiens2.py", "tasks/test_learning.py")


def pytest_unconfigure(config):
  del config
  if _OWN_XLA_CACHE:
    shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(items):
  def rank(item):
    path = os.path.relpath(str(item.path), TESTS)
    return LONGEST_FILES.index(path) if path in LONGEST_FILES else len(LONGEST_FILES)
  items.sort(key=rank)  # stable: every other file, and the tests within a file, keep their order


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """No test reaches beyond this machine: a connection to any address but a loopback one fails,
  naming it (subprocesses and this machine's own ports are unaffected)."""
  connect = socket.socket.connect

  def local_only(sock, address):
    host = address[0] if isinstance(address, tuple) else None
    if host is not None and host != "localhost":
      try:
        outside = not ipaddress.ip_address(host).is_loopback
      except ValueError:  # a host name other than localhost
        outside = True
      if outside:
        raise OSError(f"a test tried to reach {address}: tests must not use the network")
    return connect(sock, address)
  monkeypatch.setattr(socket.socket, "connect", local_only)


@pytest.fixture
def tiny_config():
  """A tiny MAE run: 2-block width-64 ViT on 64x64 generated images, 12 steps."""
  config = default_config.pretrain("tiny")
  config.image_size = (64, 64)
  config.batch_size = 8
  config.total_steps = 12
  config.log_every_steps = 1
  config.checkpoint_every_steps = 4
  config.eval_every_steps = 6
  config.num_viz_images = 2
  config.model.decoder_width = 32
  config.model.decoder_depth = 1
  config.model.decoder_heads = 2
  config.optim.base_lr = 0.05  # peak lr 1.6e-3 at batch 8
  config.optim.warmup_steps = 2
  config.data.num_generated = 64
  return config


def _synthetic_config(task):
  """configs/synthetic.py:TASK."""
  spec = importlib.util.spec_from_file_location("synthetic", os.path.join(REPO, "configs", "synthetic.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(task)


def _finetune_config(task):
  """configs/synthetic.py:TASK, shrunk to seconds: a 2-block ViT on 64x48 images, 6 steps."""
  c = _synthetic_config(task)
  c.model.size = "sapiens2_micro" if c.recipe == "sapiens2" else "tiny"
  c.image_size = (64, 48)
  c.batch_size = c.eval_batch_size = 4
  c.total_steps = 6
  c.log_every_steps = 1
  c.checkpoint_every_steps = c.eval_every_steps = 3
  c.model.head_channels = 16
  c.optim.warmup_steps = 1
  c.data.num_generated = 8
  c.data.num_eval = 4
  if c.task == "pose":
    c.loss.heatmap_sigma = 1.0
  return c


@pytest.fixture(scope="session")
def synthetic_config():
  """The factory task -> configs/synthetic.py:TASK."""
  return _synthetic_config


@pytest.fixture(scope="session")
def finetune_config():
  """The factory task -> a tiny fine-tuning config (configs/synthetic.py:TASK shrunk)."""
  return _finetune_config


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
  """One rendered tiny dataset (train and eval splits) that every task reads."""
  root = tmp_path_factory.mktemp("synthetic")
  config = _finetune_config("pose")
  config.data.path = str(root)
  pipeline.ensure_synthetic_data(config, "")
  return str(root)
