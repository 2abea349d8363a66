"""The quickstart and configs/synthetic.py:TASK compute what they computed before the code was split
into backbone families, objectives and tasks: the same losses, eval metrics and exported weights
for the same seed, over short runs. tests/reference_losses.json was recorded at commit 067733e
with exactly the runs below (the recording script is `record` here, run on that commit).

Losses are compared to 1e-5 relative (a changed init, mask, augmentation or data order moves them
by 1e-2 or more); where they match bit for bit, as on the machine that recorded them, the exported
file must match byte for byte too.
"""
import hashlib
import importlib.util
import json
import os

import numpy as np
import pytest

from sapiens_jax import export
from sapiens_jax import train
from sapiens_jax import writers

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
RUNS = {"quickstart": ("quickstart", None),
        **{f"synthetic_{t}": ("synthetic", t) for t in ("pose", "seg", "depth", "normal")}}


def config_of(name):
  file, arg = RUNS[name]
  spec = importlib.util.spec_from_file_location(file, os.path.join(REPO, "configs", f"{file}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg) if arg else module.get_config()
  c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 6, 1, 3, 6
  c.batch_size = 8
  if arg:
    c.eval_batch_size, c.data.num_generated, c.data.num_eval = 8, 24, 8
  else:
    c.data.num_generated = 64
  return c


def record(name, workdir):
  """{loss: [...], eval: [{eval_*: ...}, ...], export_sha256} of a short run of `name`."""
  train.train_and_evaluate(config_of(name), workdir)
  records = writers.read_metrics(workdir)
  path = os.path.join(workdir, "export.safetensors")
  export.export(workdir, path)
  with open(path, "rb") as f:
    sha = hashlib.sha256(f.read()).hexdigest()
  return {"loss": [r["loss"] for r in records if "loss" in r],
          "eval": [{k: v for k, v in r.items() if k.startswith("eval_")} for r in records
                   if any(k.startswith("eval_") for k in r)],
          "export_sha256": sha}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_runs_compute_what_they_did_before_the_split(name, tmp_path):
  pytest.importorskip("safetensors")
  with open(os.path.join(TESTS, "reference_losses.json")) as f:
    expected = json.load(f)["runs"][name]
  got = record(name, str(tmp_path))
  np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-5)
  assert [sorted(e) for e in got["eval"]] == [sorted(e) for e in expected["eval"]]
  for ours, theirs in zip(got["eval"], expected["eval"]):
    for key in theirs:
      np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-6, err_msg=key)
  if got["loss"] == expected["loss"]:  # bit for bit: then the exported weights are too
    assert got["export_sha256"] == expected["export_sha256"]
