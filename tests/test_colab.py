"""Executes colabs/quickstart.ipynb end to end, shortened to a few training steps.

The notebook's `parameters` cell is followed by an injected cell that overrides TOTAL_STEPS and
WORKDIR (as papermill does), so the notebook itself stays as users see it. The kernel is a
kernelspec written to a temporary directory that runs this interpreter, so the notebook sees the
same environment as pytest whatever `python3` kernel the machine has installed.
"""
import base64
import io
import json
import math
import os
import sys

import nbclient
import nbformat
from PIL import Image
import pytest

from sapiens_jax import writers

COLABS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colabs")
NOTEBOOK = os.path.join(COLABS, "quickstart.ipynb")
KERNEL_NAME = "sapiens-jax-test"
TOTAL_STEPS = 6


def _load():
  return nbformat.read(NOTEBOOK, as_version=4)


def _parameters_index(nb):
  indices = [i for i, cell in enumerate(nb.cells)
             if "parameters" in cell.get("metadata", {}).get("tags", [])]
  assert len(indices) == 1, f"expected one cell tagged 'parameters', found {len(indices)}"
  return indices[0]


def _write_kernelspec(root):
  kernel_dir = root / "kernels" / KERNEL_NAME
  kernel_dir.mkdir(parents=True)
  spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
          "display_name": "sapiens_jax test", "language": "python"}
  (kernel_dir / "kernel.json").write_text(json.dumps(spec))


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """(executed notebook, workdir) after running the notebook once for all tests of this module."""
  root = tmp_path_factory.mktemp("colab")
  workdir = root / "workdir"
  _write_kernelspec(root / "jupyter")

  nb = _load()
  overrides = nbformat.v4.new_code_cell(
      f"# Injected by tests/test_colab.py\nTOTAL_STEPS = {TOTAL_STEPS}\nWORKDIR = {str(workdir)!r}")
  overrides.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(_parameters_index(nb) + 1, overrides)

  with pytest.MonkeyPatch.context() as mp:
    # JUPYTER_PATH comes first in the kernelspec search path; read when the kernel starts.
    mp.setenv("JUPYTER_PATH", str(root / "jupyter"))
    client = nbclient.NotebookClient(
        nb, kernel_name=KERNEL_NAME, timeout=600, resources={"metadata": {"path": COLABS}})
    client.execute()
  return nb, workdir


def _outputs(nb):
  return [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]


def test_committed_notebook_is_clean_and_valid():
  nb = _load()
  nbformat.validate(nb)
  assert nb.nbformat == 4
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_parameters_cell_defines_defaults():
  nb = _load()
  namespace = {}
  exec(nb.cells[_parameters_index(nb)].source, namespace)  # pylint: disable=exec-used
  assert namespace["TOTAL_STEPS"] == 300
  assert namespace["WORKDIR"] == "/tmp/sapiens_quickstart_colab"


def test_install_cell_stays_commented():
  # Running pip from the notebook in CI (or on a user's machine outside Colab) would be wrong.
  for cell in _load().cells:
    if cell.cell_type == "code":
      for line in cell.source.splitlines():
        assert not line.lstrip().startswith(("!", "%pip", "%cd")), line


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
  png = workdir / "reconstructions" / f"step_{TOTAL_STEPS:07d}.png"
  assert png.is_file()
  with Image.open(png) as image:
    assert image.format == "PNG" and image.width > 0 and image.height > 0


def test_displays_images(executed):
  nb, workdir = executed
  pngs = [base64.b64decode(output["data"]["image/png"]) for output in _outputs(nb)
          if "image/png" in output.get("data", {})]
  assert len(pngs) == 2, "expected the loss curve and the reconstruction"
  for png in pngs:
    Image.open(io.BytesIO(png)).verify()
  reconstruction = (workdir / "reconstructions" / f"step_{TOTAL_STEPS:07d}.png").read_bytes()
  assert pngs[-1] == reconstruction


def test_prints_the_loss_table(executed):
  nb, _ = executed
  text = "".join(output.get("text", "") for output in _outputs(nb) if output.get("name") == "stdout")
  assert "eval_loss" in text
  row = next(line.split() for line in text.splitlines() if line.split()[:1] == [str(TOTAL_STEPS)])
  assert math.isfinite(float(row[1]))
