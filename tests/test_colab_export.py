"""Executes colabs/export_to_pytorch.ipynb: a short run, exported, loaded strictly in PyTorch, same features.

How a notebook is run: tests/notebooks.py.
"""
import importlib.util
import os
import re

import numpy as np
import pytest

import notebooks
from sapiens_jax import checkpoint
from sapiens_jax import torch_names
from sapiens_jax import writers
from sapiens_jax.models import sapiens
from sapiens_jax.objectives import mae

torch = pytest.importorskip("torch")  # the notebook needs it; CI installs the [torch] extra
import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

NOTEBOOK = "export_to_pytorch.ipynb"
TOTAL_STEPS = 2


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """(stdout of the executed notebook, workdir), run once for all tests of this module."""
  root = tmp_path_factory.mktemp("colab_export")
  workdir = root / "workdir"
  nb = notebooks.execute(NOTEBOOK, root, {"TOTAL_STEPS": TOTAL_STEPS, "WORKDIR": str(workdir)})
  return notebooks.stdout(nb), workdir


def test_committed_notebook_is_clean_valid_and_installs_nothing():
  notebooks.assert_clean(NOTEBOOK)
  notebooks.assert_no_shell_lines(NOTEBOOK)
  defaults = notebooks.parameters(NOTEBOOK)
  assert defaults["TOTAL_STEPS"] == 100 and defaults["WORKDIR"] == "/tmp/sapiens_export_colab"


def test_prints_a_max_abs_difference_below_1e_4(executed):
  text, _ = executed
  found = re.findall(r"max abs difference: (\S+)", text)
  assert len(found) == 1, text[-2000:]
  assert float(found[0]) < 1e-4, text[-2000:]
  assert "All keys matched successfully" in text


def test_trains_checkpoints_and_exports_the_last_step(executed):
  text, workdir = executed
  assert max(r["step"] for r in writers.read_metrics(workdir)) == TOTAL_STEPS
  assert f"of step {TOTAL_STEPS} to {workdir / 'sapiens_backbone.pth'}" in text
  state_dict = torch.load(workdir / "sapiens_backbone.pth")
  params, saved_config, step = checkpoint.restore_params(workdir)
  assert step == TOTAL_STEPS
  expected = torch_names.to_torch(params, mae.torch_parts(saved_config, include_decoder=False))
  assert sorted(state_dict) == sorted(expected)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(value.numpy(), expected[key], err_msg=key)
  # The notebook's own PyTorch ViT took it strictly; so does the tests' independent one.
  spec = importlib.util.spec_from_file_location(
      "quickstart", os.path.join(os.path.dirname(notebooks.COLABS), "configs", "quickstart.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  size = sapiens.SIZES[config.model.size]
  reference = torch_reference.SapiensViT(size.width, size.depth, size.num_heads, tuple(config.image_size))
  reference.load_state_dict(state_dict, strict=True)
