"""The --dry_run planner on a mesh it can only imagine: Sapiens-2B over 8 (fake) devices."""
import json
import os
import subprocess
import sys

import fake_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLAN_2B_FSDP8 = """
import json
from ml_collections import config_flags
from sapiens_jax import default_config, dry_run
config = default_config.pretrain("2b")
config.mesh.data, config.mesh.fsdp = 1, 8
config.batch_size = 64
print(json.dumps(dry_run.plan(config, compile_program=False)))
"""


def test_2b_under_fsdp8_shards_every_large_parameter():
  env = fake_devices.env(8)
  out = subprocess.run([sys.executable, "-c", PLAN_2B_FSDP8], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  plan = json.loads(out.stdout.strip().splitlines()[-1])
  assert plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert plan["num_large_params_unsharded"] == 0, plan["large_params_unsharded"]
  total_param_bytes = plan["params"] * 4
  assert abs(plan["param_bytes_per_device"] / (total_param_bytes / 8) - 1) < 0.05
  # Adam's two moments are sharded like the parameters.
  assert abs(plan["optimizer_bytes_per_device"] / (2 * total_param_bytes / 8) - 1) < 0.05
  assert plan["per_device_batch"] == 8
