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


def test_dry_run_counts_sapiens2_parameters_as_upstream():
  """`--config.model.size=sapiens2_*` on any config: the encoder is upstream's module to the
  parameter (sapiens2.md §1.1), and a 5B fine-tune under FSDP shards every large parameter."""
  out = subprocess.run([sys.executable, "-m", "sapiens_jax.main", "--config=configs/pretrain_0.3b.py",
                        "--config.model.size=sapiens2_0.4b", "--workdir=unused", "--dry_run"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  plan = json.loads(out.stdout.strip().splitlines()[-1])
  assert (plan["family"], plan["objective"], plan["encoder_params"]) == ("sapiens2", "mae", 395_450_368)

  script = PLAN_2B_FSDP8.replace('default_config.pretrain("2b")', 'default_config.finetune("goliath_seg", "1b")')
  script = script.replace("config.batch_size = 64", 'config.batch_size = 8\nconfig.model.size = "sapiens2_5b"\n'
                          'config.model.scan_layers = True\nconfig.model.dtype = "bfloat16"')
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=fake_devices.env(8), capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  plan = json.loads(out.stdout.strip().splitlines()[-1])
  assert (plan["family"], plan["encoder_params"]) == ("sapiens2", 5_066_902_976)
  assert plan["num_large_params_unsharded"] == 0, plan["large_params_unsharded"]


def test_self_distillation_plans_its_teacher_sharded_like_the_student():
  """Sapiens2-1B MAE + self-distillation over fsdp=8: the EMA teacher costs what the params cost per device,
  and no large parameter (the 65,536 prototypes included) stays whole."""
  script = PLAN_2B_FSDP8.replace('default_config.pretrain("2b")', 'default_config.pretrain_sapiens2("sapiens2_1b")')
  script = script.replace("config.batch_size = 64", "config.batch_size = 8")
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=fake_devices.env(8), capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  plan = json.loads(out.stdout.strip().splitlines()[-1])
  assert (plan["objective"], plan["encoder_params"]) == ("mae_distill", 1_455_474_176)
  assert plan["num_large_params_unsharded"] == 0, plan["large_params_unsharded"]
  assert plan["teacher_bytes_per_device"] == plan["param_bytes_per_device"]
  assert abs(plan["param_bytes_per_device"] / (plan["params"] * 4 / 8) - 1) < 0.05
  assert plan["head_params"] > 65536 * 256  # the prototypes are there, at DINOv2's count
