r"""Fine-tuning on synthetic humans, small enough for a CPU: `--config=configs/synthetic.py:TASK`.

  python -m sapiens_jax.main --config=configs/synthetic.py:pose --workdir=/tmp/sapiens_pose

TASK is pose | seg | depth | normal (Sapiens' recipes, a small Sapiens ViT) or albedo | matting |
pointmap | sapiens2_seg | sapiens2_normal | sapiens2_pose (Sapiens2's recipes and heads, a small
Sapiens2). The first run renders a synthetic-humans dataset (train and eval splits,
sapiens_jax.data.synthetic_humans) into WORKDIR/synthetic_humans; then the model trains on it and is
evaluated with the task's metrics. Start from an MAE run of ours with --config.init_from=DIR (e.g.
the quickstart's workdir).
"""
from sapiens_jax import default_config

LABELS = {"pose": "coco17", "seg": "seg28", "depth": "", "normal": "", "sapiens2_seg": "seg28",
          "sapiens2_pose": "coco17"}  # the generator draws 28 body parts and COCO's 17 keypoints
DATASET = {"pose": "coco", "seg": "goliath_seg", "depth": "render_people_depth",
           "normal": "render_people_normal", "albedo": "sapiens2_albedo", "matting": "sapiens2_matting",
           "pointmap": "sapiens2_pointmap", "sapiens2_seg": "sapiens2_seg",
           "sapiens2_normal": "sapiens2_normal", "sapiens2_pose": "sapiens2_pose"}


def get_config(task="pose"):
  if task not in DATASET:
    raise ValueError(f"configs/synthetic.py:{task}: TASK must be one of {', '.join(DATASET)}")
  sapiens2 = default_config.DATASETS[DATASET[task]].recipe == "sapiens2"
  config = default_config.finetune(DATASET[task], "sapiens2_small" if sapiens2 else "small")
  config.image_size = (128, 96)
  config.batch_size = 16
  config.eval_batch_size = 16
  config.total_steps = 300
  config.log_every_steps = 10
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  config.model.head_channels = 64
  config.optim.base_lr = 1e-3
  config.optim.lr_base_batch = 0
  config.optim.warmup_steps = 30
  config.data.source = "synthetic"
  config.data.labels = LABELS.get(task, config.data.labels)
  config.data.num_generated = 512
  config.data.num_eval = 64
  # One person filling the frame, like the reference's task crops, facing the camera before a plain
  # background ("portrait" adds back views and limb-like clutter: harder, slower to learn).
  config.data.framing = "studio"
  # The reference's 0.2-2 resize ratios are for 1024x768 crops; at 128x96 a 0.2 shrink, stretched
  # back to size, leaves a 26-pixel-tall blur.
  config.data.scale_range = (0.8, 1.25)
  if config.task == "pose":
    config.loss.heatmap_sigma = 2.0  # sigma 6 is for 256x192 heatmaps; these are 32x24
  return config
