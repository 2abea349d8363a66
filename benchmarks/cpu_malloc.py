r"""A test-size Sapiens2 fine-tuning run on XLA:CPU with glibc's default malloc and with the settings
that tests/conftest.py gives its workers (tests/cpu_env.py), each as two processes side by side, as
the suite's two workers run on a 2-core machine. Prints one JSON line per setting: steps/s of each
process (the median of its logged rates after the first), its user and system CPU seconds, minor page
faults, peak resident memory, and its final loss; then checks that both settings computed the same.

  python benchmarks/cpu_malloc.py [--task=sapiens2_normal] [--steps=150] [--processes=2]

The run is `python -m sapiens_jax.main --config=configs/synthetic.py:TASK` with `sapiens2_micro`
(the learning tests' model) on 512 rendered 128x96 training images, as tests/tasks/ fine-tunes it.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]
import cpu_env  # pylint: disable=g-import-not-at-top,wrong-import-position  (tests/cpu_env.py)

_TASK = flags.DEFINE_string("task", "sapiens2_normal", "configs/synthetic.py task.")
_STEPS = flags.DEFINE_integer("steps", 150, "Training steps of each run.")
_PROCESSES = flags.DEFINE_integer("processes", 2, "Runs side by side per setting.")


def render(task, root):
  """The task's synthetic training and eval renders, once, into root."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from sapiens_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("synthetic", os.path.join(REPO, "configs", "synthetic.py"))
  synthetic = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(synthetic)
  config = synthetic.get_config(task)
  config.data.path = root
  pipeline.ensure_synthetic_data(config, "")


def run_side_by_side(env, data, out):
  """Starts the runs together; returns (workdir, os.wait4 rusage) of each."""
  runs = []
  for i in range(_PROCESSES.value):
    workdir = os.path.join(out, str(i))
    args = [sys.executable, "-m", "sapiens_jax.main", f"--config=configs/synthetic.py:{_TASK.value}",
            f"--workdir={workdir}", "--config.model.size=sapiens2_micro", f"--config.data.path={data}",
            f"--config.total_steps={_STEPS.value}", f"--config.checkpoint_every_steps={_STEPS.value}",
            f"--config.eval_every_steps={_STEPS.value}", "--config.log_every_steps=25"]
    runs.append((workdir, subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE)))
  results = []
  for workdir, process in runs:
    _, status, usage = os.wait4(process.pid, 0)
    if status:
      raise RuntimeError(f"{workdir}: exit status {status}: {process.stderr.read().decode()[-3000:]}")
    results.append((workdir, usage))
  return results


def summary(workdir, usage):
  from sapiens_jax import writers  # pylint: disable=g-import-not-at-top
  records = writers.read_metrics(workdir)
  rates = [r["steps_per_sec"] for r in records if "steps_per_sec" in r][1:]
  last = [r for r in records if "loss" in r][-1]
  return {"steps_per_sec": round(statistics.median(rates), 3), "user_s": round(usage.ru_utime, 1),
          "sys_s": round(usage.ru_stime, 1), "minor_faults": usage.ru_minflt,
          "peak_rss_mb": round(usage.ru_maxrss / 1024), "final_loss": last["loss"]}


def main(_):
  default = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  settings = {"glibc default": default, f"GLIBC_TUNABLES={cpu_env.GLIBC_TUNABLES}":
              dict(default, GLIBC_TUNABLES=cpu_env.GLIBC_TUNABLES)}
  losses = {}
  with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(tmp, "data")
    render(_TASK.value, data)
    for i, (name, env) in enumerate(settings.items()):
      runs = [summary(*run) for run in run_side_by_side(env, data, os.path.join(tmp, f"setting{i}"))]
      print(json.dumps({"setting": name, "task": _TASK.value, "steps": _STEPS.value, "runs": runs}), flush=True)
      losses[name] = [run["final_loss"] for run in runs]
  first, *others = losses.values()
  if any(other != first for other in others):
    raise SystemExit(f"the settings computed different losses: {losses}")
  print("same final losses in every run of every setting:", first)


if __name__ == "__main__":
  app.run(main)
