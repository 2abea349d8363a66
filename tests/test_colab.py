"""Executes colabs/quickstart.ipynb end to end, shortened to a few training steps.

How a notebook is run (parameters injected as papermill does, a kernel running this interpreter):
tests/notebooks.py.
"""
import math

import pytest

import notebooks
from sapiens_jax import writers

NOTEBOOK = "quickstart.ipynb"
TOTAL_STEPS = 6


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """(executed notebook, workdir) after running the notebook once for all tests of this module."""
  root = tmp_path_factory.mktemp("colab")
  workdir = root / "workdir"
  nb = notebooks.execute(NOTEBOOK, root, {"TOTAL_STEPS": TOTAL_STEPS, "WORKDIR": str(workdir)})
  return nb, workdir


def test_committed_notebook_is_clean_and_valid():
  notebooks.assert_clean(NOTEBOOK)


def test_parameters_cell_defines_defaults():
  defaults = notebooks.parameters(NOTEBOOK)
  assert defaults["TOTAL_STEPS"] == 300
  assert defaults["WORKDIR"] == "/tmp/sapiens_quickstart_colab"


def test_install_cell_stays_commented():
  notebooks.assert_no_shell_lines(NOTEBOOK)


def test_trains_to_the_last_step_with_finite_loss(executed):
  _, workdir = executed
  records = {r["step"]: r for r in writers.read_metrics(str(workdir))}
  assert TOTAL_STEPS in records, sorted(records)
  last = records[TOTAL_STEPS]
  assert math.isfinite(last["loss"]), last
  assert math.isfinite(last["eval_loss"]), last  # eval_every_steps was capped at TOTAL_STEPS
  assert max(records) == TOTAL_STEPS  # the override reached the config
  assert (workdir / "checkpoints").is_dir()


def test_writes_a_reconstruction_png(executed):
  _, workdir = executed
  notebooks.reconstruction_png(workdir, TOTAL_STEPS)


def test_displays_images(executed):
  nb, workdir = executed
  pngs = notebooks.displayed_pngs(nb)
  assert len(pngs) == 2, "expected the loss curve and the reconstruction"
  assert pngs[-1] == notebooks.reconstruction_png(workdir, TOTAL_STEPS)


def test_prints_the_loss_table(executed):
  nb, _ = executed
  text = notebooks.stdout(nb)
  assert "eval_loss" in text
  row = next(line.split() for line in text.splitlines() if line.split()[:1] == [str(TOTAL_STEPS)])
  assert math.isfinite(float(row[1]))
