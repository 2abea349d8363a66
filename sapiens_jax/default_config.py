"""Every config key of a run, with its default; config files start from here.

Keeping the full key set in one place is what makes `--config.some_key=...` typos an error
(configs are locked) and keeps the per-size and per-task configs down to what actually differs.
`pretrain(size)` is the MAE recipe; `finetune(dataset, size)` the pose / seg / depth / normal ones
(reference: shared sapiens_v1.md §4-§7).
"""
import ml_collections

from sapiens_jax import sharding

# Paper Table 2 pretraining batch sizes.
TABLE2_BATCH = {"0.3b": 98_304, "0.6b": 65_536, "1b": 40_960, "2b": 20_480}
TOKENS_SEEN = 1_200_000_000_000  # patch tokens each Sapiens model saw in pretraining (paper)
COCO_TRAIN_PERSONS = 149_813  # person instances with keypoints in COCO train2017

# Fine-tuning datasets: task, label set (sapiens_jax.data.meta), patch-embed padding (reference
# §1.3: same 64x48 grid, shifted windows), peak lr, lr_base_batch (0 = lr as given) and global batch.
DATASETS = {
    "coco": ("pose", "coco17", 2, 5e-4, 0, 64),
    "coco_wholebody": ("pose", "coco_wholebody133", 2, 5e-4, 512, 64),  # auto_scale_lr on
    "goliath": ("pose", "goliath308", 2, 5e-5, 0, 64),
    "goliath_seg": ("seg", "seg28", 0, 5e-4, 0, 16),
    "cihp": ("seg", "seg20", 2, 5e-4, 0, 16),
    "render_people_depth": ("depth", "", 0, 5e-4, 0, 16),
    "render_people_normal": ("normal", "", 2, 5e-4, 0, 16),
}
TASKS = ("mae", "pose", "seg", "depth", "normal")


def _run(size, batch_size, total_steps, image_size):
  """Keys every run has: schedule of the loop, model basics, optimizer basics, data, mesh."""
  c = ml_collections.ConfigDict()
  c.task = "mae"                 # mae | pose | seg | depth | normal
  c.seed = 0
  c.batch_size = batch_size      # global, over all processes and devices
  c.total_steps = total_steps
  c.image_size = image_size      # (H, W)
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_steps = 1000
  c.num_viz_images = 8
  c.grad_accum_steps = 1         # sequential micro-batches per step (same result, less memory)
  # Initial weights when the workdir has no checkpoint yet (resuming always wins): an original
  # Sapiens .pth/.safetensors, or a workdir of ours as DIR or DIR:STEP. "" = random init.
  c.init_from = ""

  c.model = ml_collections.ConfigDict()
  c.model.size = size            # 0.3b | 0.6b | 1b | 2b | small | tiny (sapiens_jax.vit.SIZES)
  c.model.patch_size = 16
  c.model.patch_padding = 0      # 2 for some task fine-tunes (reference §1.3): same grid, shifted windows
  c.model.dtype = "float32"      # compute dtype; parameters stay float32. "bfloat16" on accelerators.
  c.model.scan_layers = size in TABLE2_BATCH  # one compiled block body for all layers
  # Activation checkpointing (sapiens_jax.vit.REMAT_POLICIES): more of it for bigger models.
  c.model.remat_policy = {"0.3b": "dots", "0.6b": "dots", "1b": "full", "2b": "full"}.get(size, "none")

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 1.5e-4       # peak lr = base_lr * batch_size / lr_base_batch
  c.optim.lr_base_batch = 256    # 0: the peak lr is base_lr whatever the batch
  c.optim.schedule = "cosine"    # cosine | linear | multistep (sapiens_jax.optim.schedule)
  c.optim.min_lr = 0.0
  c.optim.warmup_steps = 0
  c.optim.warmup_start_factor = 0.0
  c.optim.milestones = ()        # multistep: fractions of total_steps where lr drops by gamma
  c.optim.gamma = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.05
  c.optim.grad_clip_norm = 1.0
  c.optim.mu_dtype = "float32"   # Adam first moment; "bfloat16" halves its memory
  c.optim.layer_decay = 1.0      # layer-wise lr decay (fine-tuning); 1.0 = off
  c.optim.frozen = ("pos_embed", "decoder_pos_embed")  # fixed sin-cos embeddings never move

  c.data = ml_collections.ConfigDict()
  c.data.source = "generated"    # see make_source in sapiens_jax/data/sources.py (MAE) and pipeline.py (tasks)
  c.data.path = ""               # folder root, or ArrayRecord file / directory / glob
  c.data.num_generated = 10_000  # size of the built-in generated dataset
  c.data.on_error = "raise"      # raise | skip (unreadable images)
  c.data.num_workers = 0         # Grain worker processes; 0 = decode in the main process

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1               # -1 = all remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.sharding_rules = [list(rule) for rule in sharding.DEFAULT_RULES]
  return c


def pretrain(size):
  """The paper's recipe for `size`; sizes outside Table 2 get batch 256 and 10k steps."""
  batch = TABLE2_BATCH.get(size, 256)
  # 1.2T tokens at 4096 tokens per 1024x1024 image.
  steps = TOKENS_SEEN // (batch * 4096) if size in TABLE2_BATCH else 10_000
  c = _run(size, batch, steps, (1024, 1024))  # eval: loss + reconstruction PNG on a fixed batch
  c.model.mask_ratio = 0.75
  c.model.decoder_width = 512
  c.model.decoder_depth = 8
  c.model.decoder_heads = 16
  c.model.norm_pix_loss = True
  c.data.resize = "pil"  # crop resize: "pil" (the reference's) | "cv2" (faster; transforms.resize)
  c.optim.warmup_steps = steps // 40  # reference: 40 of 1600 epochs
  return c


def finetune(dataset, size):
  """The reference fine-tuning recipe of `dataset` (a key of DATASETS) for `size`."""
  task, labels, padding, lr, lr_base_batch, batch = DATASETS[dataset]
  # Pose: 210 epochs of COCO's person instances; dense tasks: 200 epochs of a dataset whose size
  # the reference does not fix -- set total_steps = epochs * examples / batch_size for yours.
  steps = 210 * COCO_TRAIN_PERSONS // batch if task == "pose" else 100_000
  c = _run(size, batch, steps, (1024, 768))
  c.task = task
  c.model.patch_padding = padding
  c.model.head_channels = 384 if task == "depth" else 768
  c.optim.base_lr = lr
  c.optim.lr_base_batch = lr_base_batch
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.1
  c.optim.layer_decay = 0.95 if (dataset, size) == ("goliath", "1b") else 0.85
  c.optim.warmup_start_factor = 1e-3
  c.optim.warmup_steps = 500 if task == "pose" else 400
  c.optim.frozen = ()            # the fine-tuned position embedding is learnt
  if task == "pose":             # MultiStepLR at epochs 170 and 200 of 210
    c.optim.schedule, c.optim.milestones = "multistep", (170 / 210, 200 / 210)
  else:                          # PolyLR power 1
    c.optim.schedule = "linear"
  c.loss = ml_collections.ConfigDict()
  if task == "pose":
    c.loss.name = "ohkm" if (dataset, size) in (("goliath", "0.3b"), ("goliath", "1b")) else "mse"
    c.loss.ohkm_topk = 128
    c.heatmap_sigma = 6.0        # UDP Gaussian heatmaps at 1/4 of the input size
  c.data.source = dataset        # or "synthetic": humans rendered by sapiens_jax.data.synthetic_humans
  c.data.labels = labels         # skeleton or class vocabulary in sapiens_jax/data/meta/
  c.data.annotations = ""        # pose: COCO keypoint JSON (image paths relative to data.path)
  c.data.eval_path = ""          # held-out split, same layout as data.path
  c.data.eval_annotations = ""
  c.data.num_eval = 0            # 0 = the whole eval split
  c.data.backgrounds = ""        # folder of non-human images pasted behind people (seg/depth/normal)
  c.data.framing = "scene"       # synthetic source: scene (1-3 people) | portrait (one, frame-filling)
                                 # | studio (portrait facing the camera, before a plain background)
  c.data.scale_range = (0.2, 2.0)  # seg/depth/normal random resize; the reference's, for 1024x768
  c.eval_batch_size = c.batch_size
  c.best_metric = {"pose": "AP", "seg": "mIoU", "depth": "rmse", "normal": "mean_angle"}[task]
  return c
