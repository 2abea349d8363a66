"""End to end on CPU: training lowers the loss, resuming repeats an uninterrupted run, bad input is named."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from sapiens_jax import train
from sapiens_jax import writers
from sapiens_jax.data import ImageDecodeError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def losses(workdir):
  return {r["step"]: r["loss"] for r in writers.read_metrics(workdir) if "loss" in r}


def test_training_lowers_the_loss_and_writes_outputs(tiny_config, tmp_path):
  tiny_config.total_steps = 60
  tiny_config.eval_every_steps = 30
  tiny_config.checkpoint_every_steps = 30
  tiny_config.optim.warmup_steps = 5
  train.train_and_evaluate(tiny_config, str(tmp_path))
  loss = losses(tmp_path)
  assert sorted(loss) == list(range(1, 61))
  first, last = np.mean([loss[s] for s in range(1, 6)]), np.mean([loss[s] for s in range(56, 61)])
  assert last < 0.9 * first, (first, last)
  records = writers.read_metrics(tmp_path)
  assert all(k in records[-1] for k in ("loss", "learning_rate", "examples_per_sec", "eval_loss"))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["30", "60"]
  pngs = sorted(os.listdir(tmp_path / "reconstructions"))
  assert pngs == ["step_0000030.png", "step_0000060.png"]
  grid = np.asarray(Image.open(tmp_path / "reconstructions" / pngs[-1]))
  assert grid.shape[0] >= 2 * 64 and grid.shape[1] >= 3 * 64
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))


def test_resumed_run_repeats_the_uninterrupted_one(tiny_config, tmp_path):
  full, cut = tmp_path / "full", tmp_path / "cut"
  train.train_and_evaluate(tiny_config, str(full))  # 12 steps, checkpoints at 4, 8, 12
  # The same run stopped after step 8: its workdir as it was then.
  shutil.copytree(full, cut)
  shutil.rmtree(cut / "checkpoints" / "12")
  with open(cut / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in writers.read_metrics(full) if r["step"] <= 8)
  state = train.train_and_evaluate(tiny_config, str(cut))
  assert int(state["step"]) == 12
  a, b = losses(full), losses(cut)
  assert sorted(b) == list(range(1, 13))
  # Same data order, masks and parameters: identical losses after the restart.
  np.testing.assert_array_equal([a[s] for s in range(9, 13)], [b[s] for s in range(9, 13)])


def test_resuming_a_different_model_size_is_refused(tiny_config, tmp_path):
  tiny_config.total_steps = 4
  train.train_and_evaluate(tiny_config, str(tmp_path))
  tiny_config.total_steps = 8
  tiny_config.model.size = "small"
  with pytest.raises(ValueError, match=r"model.size: checkpoint has 'tiny', config has 'small'"):
    train.train_and_evaluate(tiny_config, str(tmp_path))


def write_folder(root, n, corrupt=()):
  rng = np.random.default_rng(0)
  for i in range(n):
    path = root / f"sub{i % 2}" / f"img{i}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    if i in corrupt:
      path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    else:
      Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(path)


def test_unreadable_image_raises_with_its_name_or_is_skipped_and_counted(tiny_config, tmp_path):
  data = tmp_path / "images"
  write_folder(data, 16, corrupt=(5,))
  tiny_config.data.source = "folder"
  tiny_config.data.path = str(data)
  tiny_config.total_steps = 4
  tiny_config.data.on_error = "raise"
  with pytest.raises(ImageDecodeError, match="img5.png"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "raise"))
  tiny_config.data.on_error = "skip"
  train.train_and_evaluate(tiny_config, str(tmp_path / "skip"))
  # 4 steps x 8 images = 2 epochs of 16 images: the bad one was met (and skipped) twice.
  assert writers.read_metrics(tmp_path / "skip")[-1]["data_skipped"] == 2


def test_empty_or_missing_image_folder_is_named(tiny_config, tmp_path):
  tiny_config.data.source = "folder"
  (tmp_path / "empty").mkdir()
  tiny_config.data.path = str(tmp_path / "empty")
  with pytest.raises(ValueError, match="empty"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "w1"))
  tiny_config.data.path = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="missing"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "w2"))


def run_main(*args):
  return subprocess.run([sys.executable, "-m", "sapiens_jax.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def test_misspelt_config_key_is_an_error_naming_it(tmp_path):
  out = run_main("--config=configs/quickstart.py", f"--workdir={tmp_path}", "--config.modle.size=tiny")
  assert out.returncode != 0
  assert "modle" in out.stderr
  out = run_main("--config=configs/quickstart.py", f"--workdir={tmp_path}", "--config.model.sise=tiny")
  assert out.returncode != 0
  assert "sise" in out.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_dry_run_of_2b_reports_table2_params_without_allocating():
  out = run_main("--config=configs/pretrain_2b.py", "--dry_run")
  assert out.returncode == 0, out.stderr[-3000:]
  plan = json.loads(out.stdout.strip().splitlines()[-1])
  assert isinstance(plan["params"], int) and isinstance(plan["encoder_params"], int)
  assert abs(plan["params"] / 2.163e9 - 1) < 1e-3
  assert plan["encoder_params"] == 2_133_912_960
  # Paper FLOPs (linear MACs of the encoder at 1024x1024) are 8.709 T; we count 8.703 T.
  assert abs(plan["paper_flops"] / 8.709e12 - 1) < 2e-3
  # A train step costs at least 3x the forward of the visible tokens and the decoder.
  assert plan["flops_per_example"] > 3 * 2 * plan["paper_flops"] / 4
  assert isinstance(plan["memory_per_device_bytes"], int)
  assert plan["memory_per_device_bytes"] > 4 * plan["params"] * 4  # params, grads, 2 Adam moments


def test_the_memory_plan_counts_attention_scores_only_where_the_path_keeps_them():
  """The plain formula keeps (heads, T, T) probabilities per layer for the backward; the blocked
  path keeps none. Both the compiled plan and the estimate say so (MAE decoder at 1,025 tokens)."""
  from sapiens_jax import default_config  # pylint: disable=g-import-not-at-top
  from sapiens_jax import dry_run  # pylint: disable=g-import-not-at-top
  from sapiens_jax import models  # pylint: disable=g-import-not-at-top
  plans = {}
  for path in ("xla", "blocked"):
    c = default_config.pretrain("tiny")
    c.image_size, c.batch_size, c.model.attention = (512, 512), 2, path
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 128, 2, 4
    plans[path] = dry_run.plan(c)
  encoder = models.family(c.model).size("tiny")
  encoder_tokens, decoder_tokens = 1 + 1024 // 4, 1 + 1024
  scores = c.batch_size * 4 * (encoder.depth * encoder.num_heads * encoder_tokens ** 2
                               + c.model.decoder_depth * c.model.decoder_heads * decoder_tokens ** 2)
  estimate = {p: plans[p]["activation_bytes_per_device_estimate"] for p in plans}
  assert estimate["xla"] - estimate["blocked"] == scores
  decoder_probabilities = c.batch_size * 4 * c.model.decoder_depth * c.model.decoder_heads * decoder_tokens ** 2
  assert plans["xla"]["memory_per_device_bytes"] - plans["blocked"]["memory_per_device_bytes"] > decoder_probabilities
  assert plans["xla"]["train_flops_per_step"] == plans["blocked"]["train_flops_per_step"]  # model FLOPs


@pytest.mark.parametrize("task", ["seg", "pose"])
def test_dry_run_of_a_finetuning_config(task):
  """Every config plans, fine-tuning ones included: the task's head and targets in the lowered step."""
  out = run_main(f"--config=configs/synthetic.py:{task}", "--dry_run")
  assert out.returncode == 0, out.stderr[-3000:]
  plan = json.loads(out.stdout.strip().splitlines()[-1])
  assert plan["objective"] == "finetune" and plan["params"] == plan["encoder_params"] + plan["head_params"]
  assert plan["encoder_params"] == 2_826_432  # "small": width 192, 6 blocks, a 8x6 position table
  # The encoder's forward alone is 2 x paper FLOPs (MACs); a train step is about 3x a forward.
  assert plan["flops_per_example"] > 3 * 2 * plan["paper_flops"]
  assert plan["memory_per_device_bytes"] > 4 * plan["params"] * 4  # params, grads, 2 Adam moments


def test_sigterm_saves_the_current_step_and_a_rerun_finishes(tmp_path):
  args = [sys.executable, "-m", "sapiens_jax.main", "--config=configs/quickstart.py", f"--workdir={tmp_path}",
          "--config.model.size=tiny", "--config.image_size=(32, 32)", "--config.batch_size=8",
          "--config.total_steps=100000", "--config.log_every_steps=1", "--config.checkpoint_every_steps=1000",
          "--config.model.decoder_width=32", "--config.model.decoder_depth=1", "--config.model.decoder_heads=2"]
  proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:  # wait until it trains
    lines.append(line)
    if "step 3/" in line:
      proc.send_signal(signal.SIGTERM)
      break
  rest, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, "".join(lines) + rest
  assert "Preempted (SIGTERM)" in rest and "Run the same command to resume" in rest
  saved = [int(s) for s in os.listdir(tmp_path / "checkpoints")]
  assert len(saved) == 1 and 3 <= saved[0] < 1000
  last_logged = max(losses(tmp_path))
  assert saved[0] == last_logged  # nothing trained after the save is lost or half-written
  out = run_main(*args[3:4], f"--workdir={tmp_path}", *args[5:6], *args[6:8],
                 f"--config.total_steps={saved[0] + 2}", *args[9:])
  assert out.returncode == 0, out.stderr[-3000:]
  assert sorted(losses(tmp_path))[-3:] == [saved[0], saved[0] + 1, saved[0] + 2]


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(damage, tiny_config, tmp_path, caplog):
  tiny_config.total_steps = 8
  train.train_and_evaluate(tiny_config, str(tmp_path))  # checkpoints at 4 and 8
  state_dir = tmp_path / "checkpoints" / "8" / "state"
  biggest = max((p for p in state_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  if damage == "truncated":
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
  else:
    biggest.unlink()
  tiny_config.total_steps = 10
  with caplog.at_level("WARNING"):
    state = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert int(state["step"]) == 10
  assert any("step 8" in r.getMessage() and "falling back to step 4" in r.getMessage() for r in caplog.records)
  assert sorted(losses(tmp_path))[-6:] == [5, 6, 7, 8, 9, 10]  # resumed after step 4
  assert os.listdir(tmp_path / "checkpoints_damaged") == ["8"]  # kept, not deleted


def test_a_run_resumes_with_another_attention_path_and_remat_policy(tiny_config, tmp_path):
  """How attention and remat are computed is not part of the model: a run resumes across them."""
  tiny_config.total_steps, tiny_config.model.attention = 4, "xla"
  train.train_and_evaluate(tiny_config, str(tmp_path))
  tiny_config.total_steps, tiny_config.model.attention, tiny_config.model.remat_policy = 6, "blocked", "full"
  state = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert int(state["step"]) == 6 and sorted(losses(tmp_path))[-2:] == [5, 6]
