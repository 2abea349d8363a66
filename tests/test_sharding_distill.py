"""Sharding is real for the Sapiens2 pretraining objective (MAE + self-distillation against an EMA teacher,
objectives/mae_distill.py): on 8 CPU devices every mesh trains like one device, the teacher and the softmax
centres included, and FSDP shards the teacher as it shards the params.

The runs are tests/distill_mesh_runs.py in two subprocesses side by side (each compiles one mesh at a time,
in one thread: on 2 cores the pair takes half the time of one).

data 2 x fsdp 2 x tensor 2 is here because it once went wrong: the same losses, yet first-step gradients up to 60%
off (relative norm), all from the DINO head's backward pass. Its hidden-to-hidden layer was named (embed, mlp)
like the first, and XLA's partitioner (jaxlib 0.10.2, Shardy) returned wrong input gradients for that chain of
kernels on a three-axis mesh; the head now alternates the names as a transformer MLP does
(distillation._mlp_axes).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fake_devices

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = fake_devices.env(8)
# Unoptimised LLVM code generation: each mesh's step compiles in about half the time (the steps themselves
# take a fraction of a second). Every setting runs under the same flags.
ENV["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# XLA:CPU sizes its thread pool by NPROC, else by the CPU count. On 2 CPUs, data2_fsdp2_tensor2 (2 of 2 runs)
# and data2_fsdp4 (1 of 1) deadlocked in the collective rendezvous, devices waiting in different all-gathers
# / collective-permutes, tests/fake_devices.py's scheduler flag set; with NPROC=16, 0 of 12 runs of those
# meshes did. (Presumably a device waiting for its peers holds a pool thread, and 2 threads for 8
# devices run out; this objective's step has more independent collectives than MAE's: the teacher's too.)
ENV["NPROC"] = "16"

SETTINGS = {
    "one_device": {},
    "data8": {"mesh": (8, 1, 1)},
    "fsdp8": {"mesh": (1, 8, 1)},
    "data2_fsdp4": {"mesh": (2, 4, 1)},
    "data2_fsdp2_tensor2": {"mesh": (2, 2, 2)},
    # Softmax centring keeps its centres in the train state: those are compared too.
    "softmax_one_device": {"centering": "softmax"},
    "softmax_fsdp8": {"centering": "softmax", "mesh": (1, 8, 1), "base": "softmax_one_device"},
}
BASES = ("one_device", "softmax_one_device")
GROUPS = (("one_device", "data8", "fsdp8", "data2_fsdp2_tensor2"),
          ("data2_fsdp4", "softmax_one_device", "softmax_fsdp8"))
COMPONENTS = ("mae_loss", "dino_loss", "dense_loss", "koleo_loss", "teacher_entropy", "cls_std", "grad_norm")

# Every param is compared within ATOL/RTOL. The forward of one example is not bit-identical across layouts
# (XLA:CPU's kernels depend on the per-device shapes), nor are sums over devices; Adam divides by sqrt(v), so
# where a gradient is near 0 that float32 noise moves a weight by a sizeable part of one step. The learning
# rate is 3.9e-4 a step: ATOL is a quarter of one. The bulk must agree 10 times closer: at most 1 value in
# 1000 may differ by more than BULK_ATOL. The teacher takes (1 - 0.994) of each param's move, the centres
# are averages of teacher logits: both within TEACHER_ATOL. Largest differences measured (jaxlib 0.10.2,
# 4 steps): params 5.1e-5 to 5.8e-5 (46 to 108 of 1.29M values beyond 1e-5), teacher 7.9e-7 to 8.9e-7,
# centres 7.7e-7. At tests/mesh_runs.py's learning rate (4 times this) params were 2.2e-4 to 3.3e-4 off: about
# the same fraction of a step.
ATOL, RTOL = 1e-4, 1e-4
BULK_ATOL, BULK_FRACTION = 1e-5, 1e-3
TEACHER_ATOL = 1e-5


def _load(path):
  with np.load(path) as arrays:
    return {k: arrays[k] for k in arrays.files}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  runs = []
  for i, group in enumerate(GROUPS):
    out_dir = tmp_path_factory.mktemp(f"distill_mesh_runs_{i}")
    settings = json.dumps({name: SETTINGS[name] for name in group})
    command = [sys.executable, os.path.join(HERE, "distill_mesh_runs.py"), settings, str(out_dir)]
    # Output to files, not pipes: neither process can stall on a full pipe while the other one is read.
    with open(out_dir / "stdout", "w") as stdout, open(out_dir / "stderr", "w") as stderr:
      runs.append((out_dir, subprocess.Popen(command, env=ENV, stdout=stdout, stderr=stderr)))
  summary, initial = {}, []
  try:
    for out_dir, process in runs:
      returncode = process.wait(timeout=900)
      assert returncode == 0, (out_dir / "stderr").read_text()[-4000:]
      group = json.loads((out_dir / "stdout").read_text().strip().splitlines()[-1])
      for name in group:
        group[name]["state"] = _load(out_dir / f"{name}.npz")
      summary.update(group)
      initial.append(_load(out_dir / "initial.npz"))
  finally:
    for _, process in runs:
      if process.poll() is None:
        process.kill()
        process.wait()
  # Both subprocesses started from the same values (the same jitted init on the same CPU).
  assert initial[0].keys() == initial[1].keys()
  for key in initial[0]:
    np.testing.assert_array_equal(initial[0][key], initial[1][key], err_msg=key)
  summary["initial"] = initial[0]
  return summary


@pytest.mark.parametrize("name", [n for n in SETTINGS if n not in BASES])
def test_same_losses_params_and_teacher_as_one_device(results, name):
  base, other = results[SETTINGS[name].get("base", "one_device")], results[name]
  for key in COMPONENTS:
    assert np.all(np.isfinite(other["components"][key])), key
  assert base["losses"][-1] < base["losses"][0]  # the steps did something
  np.testing.assert_allclose(other["losses"], base["losses"], rtol=2e-5)
  state, expected = other["state"], base["state"]
  assert state.keys() == expected.keys()
  groups = {k.split("/")[0] for k in expected}
  assert groups == ({"params", "teacher", "centers"} if "centering" in SETTINGS[name] else {"params", "teacher"})
  params = [k for k in expected if k.startswith("params/")]
  for key in expected:
    atol = ATOL if key in params else TEACHER_ATOL
    np.testing.assert_allclose(state[key], expected[key], atol=atol, rtol=RTOL, err_msg=key)
  apart = sum(int(np.sum(np.abs(state[k] - expected[k]) > BULK_ATOL)) for k in params)
  assert apart <= BULK_FRACTION * sum(expected[k].size for k in params), apart


@pytest.mark.parametrize("name", list(SETTINGS))
def test_the_teacher_moved_by_ema_and_stays_apart_from_the_params(results, name):
  state, initial = results[name]["state"], results["initial"]
  teachers = [k for k in state if k.startswith("teacher/")]
  assert teachers and len(teachers) == len([k for k in state if k.startswith("params/")])
  moved = max(np.max(np.abs(state[k] - initial[k])) for k in teachers)
  apart = max(np.max(np.abs(state[k] - state["params" + k[len("teacher"):]])) for k in teachers)
  # Far beyond the tolerance: a teacher left as it started, or one equal to the params, would fail.
  assert moved > 20 * ATOL and apart > 20 * ATOL, (moved, apart)
  if "centering" in SETTINGS[name]:
    assert np.any(state["centers/cls"]) and np.any(state["centers/dense"])


def test_fsdp_shards_the_teacher_like_the_params(results):
  for name in ("fsdp8", "softmax_fsdp8", "data2_fsdp4", "data2_fsdp2_tensor2"):
    sharded = results[name]["sharded"]
    assert sharded["teacher"] == sharded["params"], name  # the same leaves, the same specs
    assert "fsdp" in sharded["teacher"]["encoder/blocks/ffn/w12/kernel"], name
    assert "fsdp" in sharded["teacher"]["head/last_layer/kernel"], name
  assert results["data8"]["sharded"] == {"params": {}, "teacher": {}}  # data parallelism replicates both
