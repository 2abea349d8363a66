"""Executes a committed notebook of colabs/ in a test, as papermill would, without papermill.

The notebook's `parameters` cell is followed by an injected cell that overrides its values, so the
notebook itself stays as users see it. The kernel is a kernelspec written to a temporary
directory that runs this interpreter, so the notebook sees the same environment as pytest
whatever `python3` kernel the machine has installed.
"""
import base64
import io
import json
import os
import sys

import nbclient
import nbformat
from PIL import Image
import pytest

COLABS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colabs")
KERNEL_NAME = "sapiens-jax-test"


def load(name):
  return nbformat.read(os.path.join(COLABS, name), as_version=4)


def parameters_index(nb):
  indices = [i for i, cell in enumerate(nb.cells)
             if "parameters" in cell.get("metadata", {}).get("tags", [])]
  assert len(indices) == 1, f"expected one cell tagged 'parameters', found {len(indices)}"
  return indices[0]


def parameters(name):
  """The defaults the notebook's parameters cell defines."""
  nb, namespace = load(name), {}
  exec(nb.cells[parameters_index(nb)].source, namespace)  # pylint: disable=exec-used
  return {k: v for k, v in namespace.items() if not k.startswith("__")}


def write_kernelspec(root):
  kernel_dir = root / "kernels" / KERNEL_NAME
  kernel_dir.mkdir(parents=True)
  spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
          "display_name": "sapiens_jax test", "language": "python"}
  (kernel_dir / "kernel.json").write_text(json.dumps(spec))


def execute(name, root, overrides, timeout=600):
  """colabs/`name` executed in colabs/ with `overrides` ({name: value}) after its parameters cell.

  `root` is a fresh directory for the kernelspec. Returns the executed notebook; a failing cell
  raises nbclient's CellExecutionError with the cell's traceback.
  """
  write_kernelspec(root / "jupyter")
  nb = load(name)
  source = "\n".join(f"{key} = {value!r}" for key, value in overrides.items())
  injected = nbformat.v4.new_code_cell(f"# Injected by tests/notebooks.py\n{source}")
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(parameters_index(nb) + 1, injected)
  with pytest.MonkeyPatch.context() as mp:
    # JUPYTER_PATH comes first in the kernelspec search path; read when the kernel starts.
    mp.setenv("JUPYTER_PATH", str(root / "jupyter"))
    nbclient.NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=timeout,
                            resources={"metadata": {"path": COLABS}}).execute()
  return nb


def outputs(nb):
  return [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]


def displayed_pngs(nb):
  """The PNG bytes the executed notebook displayed, in order, each checked to decode."""
  pngs = [base64.b64decode(output["data"]["image/png"]) for output in outputs(nb)
          if "image/png" in output.get("data", {})]
  for png in pngs:
    Image.open(io.BytesIO(png)).verify()
  return pngs


def reconstruction_png(workdir, step):
  """The bytes of a run's reconstruction PNG of `step`, checked to be a non-empty PNG."""
  path = workdir / "reconstructions" / f"step_{step:07d}.png"
  assert path.is_file(), path
  with Image.open(path) as image:
    assert image.format == "PNG" and image.width > 0 and image.height > 0
  return path.read_bytes()


def stdout(nb):
  return "".join(output.get("text", "") for output in outputs(nb) if output.get("name") == "stdout")


def assert_clean(name):
  """Committed as users should first see it: valid, no outputs, no execution counts."""
  nb = load(name)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def assert_no_shell_lines(name):
  """Running pip from a notebook in CI (or on a user's machine outside Colab) would be wrong."""
  for cell in load(name).cells:
    if cell.cell_type == "code":
      for line in cell.source.splitlines():
        assert not line.lstrip().startswith(("!", "%pip", "%cd")), line
