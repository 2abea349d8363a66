"""Executes colabs/pretrain_sapiens2.ipynb end to end: a few steps of MAE + self-distillation at 32 px, then the
teacher's export.

How a notebook is run (parameters injected as papermill does, a kernel running this interpreter):
tests/notebooks.py.
"""
import importlib.util
import math
import os

import numpy as np
import pytest

import notebooks
from sapiens_jax import checkpoint
from sapiens_jax import models
from sapiens_jax import objectives
from sapiens_jax import torch_names
from sapiens_jax import writers

NOTEBOOK = "pretrain_sapiens2.ipynb"
TOTAL_STEPS = 3
IMAGE_SIZE = 32  # 2x2 patches per global view; the notebook makes the local crops 16x16 (one patch)
# Every term of the objective and its monitors, as metrics.jsonl names them.
DISTILL_TERMS = ("loss", "mae_loss", "dino_loss", "dense_loss", "koleo_loss", "teacher_entropy",
                 "student_teacher_kl", "cls_std")


def quickstart_config():
  path = os.path.join(os.path.dirname(notebooks.COLABS), "configs", "quickstart_sapiens2.py")
  spec = importlib.util.spec_from_file_location("quickstart_sapiens2", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """(executed notebook, workdir) after running the notebook once for all tests of this module."""
  pytest.importorskip("torch")  # the export cell needs the [torch] extra: torch and safetensors
  pytest.importorskip("safetensors")
  root = tmp_path_factory.mktemp("colab_sapiens2")
  workdir = root / "workdir"
  nb = notebooks.execute(NOTEBOOK, root, {"TOTAL_STEPS": TOTAL_STEPS, "WORKDIR": str(workdir),
                                          "IMAGE_SIZE": IMAGE_SIZE})
  return nb, workdir


def test_committed_notebook_is_clean_valid_and_installs_nothing():
  notebooks.assert_clean(NOTEBOOK)
  notebooks.assert_no_shell_lines(NOTEBOOK)


def test_parameters_cell_defines_the_quickstart_defaults():
  defaults = notebooks.parameters(NOTEBOOK)
  assert defaults["TOTAL_STEPS"] == 500
  assert defaults["WORKDIR"] == "/tmp/sapiens2_pretrain_colab"
  assert defaults["START_FRESH"] is True
  assert defaults["IMAGE_SIZE"] == 96
  config = quickstart_config()
  # At its defaults the notebook runs the config's own image size and length.
  assert tuple(config.image_size) == (defaults["IMAGE_SIZE"],) * 2
  assert config.total_steps == defaults["TOTAL_STEPS"]


def test_trains_every_distillation_term_to_the_last_step(executed):
  nb, workdir = executed
  records = {r["step"]: r for r in writers.read_metrics(str(workdir))}
  assert max(records) == TOTAL_STEPS, sorted(records)  # the override reached the config
  last = records[TOTAL_STEPS]
  for name in DISTILL_TERMS:
    assert math.isfinite(last[name]), (name, last)
    assert math.isfinite(last["eval_" + name]), (name, last)  # eval_every_steps was capped at TOTAL_STEPS
  assert (workdir / "checkpoints").is_dir()
  # The notebook shrank the run to the 32 px views it was given, the local crops with them.
  text = notebooks.stdout(nb)
  assert f"2 global views of {IMAGE_SIZE}x{IMAGE_SIZE}" in text and "local crops of 16x16" in text, text[:2000]


def test_writes_a_reconstruction_png(executed):
  _, workdir = executed
  notebooks.reconstruction_png(workdir, TOTAL_STEPS)


def test_displays_the_curves_and_the_reconstructions(executed):
  nb, workdir = executed
  pngs = notebooks.displayed_pngs(nb)
  assert len(pngs) == 2, "expected the loss curves and the reconstruction"
  assert pngs[-1] == notebooks.reconstruction_png(workdir, TOTAL_STEPS)


def test_prints_the_loss_table(executed):
  nb, _ = executed
  text = notebooks.stdout(nb)
  lines = text.splitlines()
  header = next(line.split() for line in lines if line.split()[:2] == ["step", "loss"])
  assert header == ["step", "loss", "mae_loss", "dino_loss", "dense_loss", "koleo_loss", "teacher_entropy",
                    "student_teacher_kl", "cls_std", "ema_momentum"]
  row = next(line.split() for line in lines if line.split()[:1] == [str(TOTAL_STEPS)])
  assert len(row) == len(header) and all(math.isfinite(float(v)) for v in row[1:]), row
  assert f"ln K = {math.log(quickstart_config().distill.num_prototypes):.4f}" in text


def test_exports_the_teacher_of_the_last_checkpoint(executed):
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  nb, workdir = executed
  output = workdir / "teacher.safetensors"
  assert f"of the teacher at step {TOTAL_STEPS} to {output}" in notebooks.stdout(nb)
  tensors = load_file(output)
  # restore_params reads the objective's WEIGHTS: for mae_distill, the EMA teacher.
  params, config, step = checkpoint.restore_params(workdir)
  assert step == TOTAL_STEPS and objectives.get(config).WEIGHTS == "teacher"
  expected = torch_names.to_torch(params, objectives.get(config).torch_parts(config, include_decoder=False))
  buffers = models.family(config.model).torch_buffers(config.model, "")
  assert sorted(tensors) == sorted([*expected, *buffers])  # the backbone and rope_embed.periods, nothing else
  np.testing.assert_array_equal(tensors["cls_token"].numpy(), params["encoder"]["cls_token"].reshape(1, 1, -1))
  for key, value in expected.items():
    np.testing.assert_array_equal(tensors[key].numpy(), value, err_msg=key)
