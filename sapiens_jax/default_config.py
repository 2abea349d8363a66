"""Every config key of a run, with its default; config files start from here.

Keeping the full key set in one place is what makes `--config.some_key=...` typos an error
(configs are locked) and keeps the per-size and per-dataset configs down to what actually
differs. `pretrain(size)` is the pretraining recipe (the objective adds its keys),
`finetune(dataset, size)` the fine-tuning ones (the task adds its part of the recipe; reference:
shared sapiens_v1.md §4-§7).
"""
import copy
import dataclasses
from typing import NamedTuple

import ml_collections

from sapiens_jax import objectives
from sapiens_jax import sharding
from sapiens_jax import tasks

# Paper Table 2 pretraining batch sizes.
TABLE2_BATCH = {"0.3b": 98_304, "0.6b": 65_536, "1b": 40_960, "2b": 20_480}
# Activation checkpointing of the released sizes (more of it for bigger models); these scan their
# blocks too. The CPU sizes (small, tiny, sapiens2_small, ...) keep everything and unroll.
REMAT_POLICY = {"0.3b": "qkv_proj", "0.6b": "qkv_proj", "1b": "full", "2b": "full",
                "sapiens2_0.1b": "qkv_proj", "sapiens2_0.4b": "qkv_proj", "sapiens2_0.8b": "qkv_proj",
                "sapiens2_1b": "full", "sapiens2_1b_4k": "full", "sapiens2_5b": "full"}
TOKENS_SEEN = 1_200_000_000_000  # patch tokens each Sapiens model saw in pretraining (paper)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A fine-tuning dataset of the reference recipes."""
  task: str
  labels: str  # skeleton or class vocabulary in sapiens_jax/data/meta ("" if none)
  patch_padding: int  # reference §1.3: the same 64x48 grid, shifted windows
  lr: float  # peak learning rate
  lr_base_batch: int  # the lr is lr * batch / lr_base_batch; 0 = lr as given
  batch_size: int  # global
  recipe: str = "sapiens"  # whose head, loss and schedule: "sapiens" (v1, §4-§7) | "sapiens2" (sapiens2.md §3-§4)


DATASETS = {
    "coco": Dataset(task="pose", labels="coco17", patch_padding=2, lr=5e-4, lr_base_batch=0, batch_size=64),
    "coco_wholebody": Dataset(task="pose", labels="coco_wholebody133", patch_padding=2, lr=5e-4,
                              lr_base_batch=512, batch_size=64),  # auto_scale_lr on
    "goliath": Dataset(task="pose", labels="goliath308", patch_padding=2, lr=5e-5, lr_base_batch=0, batch_size=64),
    "goliath_seg": Dataset(task="seg", labels="seg28", patch_padding=0, lr=5e-4, lr_base_batch=0, batch_size=16),
    "cihp": Dataset(task="seg", labels="seg20", patch_padding=2, lr=5e-4, lr_base_batch=0, batch_size=16),
    "render_people_depth": Dataset(task="depth", labels="", patch_padding=0, lr=5e-4, lr_base_batch=0,
                                   batch_size=16),
    "render_people_normal": Dataset(task="normal", labels="", patch_padding=2, lr=5e-4, lr_base_batch=0,
                                    batch_size=16),
    # Sapiens2 (sapiens2.md §3-§4): lr, batch and schedule per size come from SAPIENS2_RECIPES.
    **{f"sapiens2_{task}": Dataset(task=task, labels=labels, patch_padding=0, lr=5e-4, lr_base_batch=0,
                                   batch_size=64, recipe="sapiens2")
       for task, labels in (("seg", "seg29"), ("normal", ""), ("pointmap", ""), ("albedo", ""),
                            ("matting", ""), ("pose", "goliath308"))},
}


class Sapiens2Recipe(NamedTuple):
  """One cell of sapiens2.md §4's table: peak lr, iterations, gradient clip, batch per GPU (x8 GPUs)."""
  lr: float
  steps: int
  clip: float
  batch_per_gpu: int


SAPIENS2_LAYER_DECAY = {"sapiens2_0.4b": 0.8, "sapiens2_0.8b": 0.85, "sapiens2_1b": 0.9, "sapiens2_5b": 0.94}
SAPIENS2_GPUS = 8
SAPIENS2_WARMUP = 500  # LinearLR from x1e-3, then linear to 0
_R = Sapiens2Recipe
SAPIENS2_RECIPES = {  # task -> size -> recipe (§4)
    "seg": {"sapiens2_0.4b": _R(5e-4, 20_000, 2, 12), "sapiens2_0.8b": _R(5e-4, 30_000, 4, 5),
            "sapiens2_1b": _R(5e-4, 20_000, 4, 8), "sapiens2_5b": _R(5e-4, 50_000, 4, 2)},
    "normal": {"sapiens2_0.4b": _R(5e-4, 20_000, 2, 20), "sapiens2_0.8b": _R(5e-4, 10_000, 4, 12),
               "sapiens2_1b": _R(5e-4, 40_000, 4, 7), "sapiens2_5b": _R(1e-4, 40_000, 4, 3)},
    "pointmap": {"sapiens2_0.4b": _R(5e-4, 20_000, 2, 8), "sapiens2_0.8b": _R(5e-4, 20_000, 2, 6),
                 "sapiens2_1b": _R(5e-4, 40_000, 4, 3), "sapiens2_5b": _R(1e-4, 40_000, 4, 1)},
    "albedo": {"sapiens2_0.4b": _R(5e-4, 20_000, 2, 20), "sapiens2_0.8b": _R(5e-4, 20_000, 4, 12),
               "sapiens2_1b": _R(5e-4, 40_000, 4, 7), "sapiens2_5b": _R(5e-4, 40_000, 4, 3)},
    "pose": {"sapiens2_0.4b": _R(5e-4, 10_000, 2, 6), "sapiens2_0.8b": _R(5e-4, 10_000, 4, 12),
             "sapiens2_1b": _R(5e-4, 20_000, 4, 7), "sapiens2_5b": _R(1e-4, 20_000, 4, 2)},
}
# Matting has no published recipe (only its 1b checkpoint, through transformers): albedo's, an
# assumption of ours, as its head is the normal/albedo upsampler.
SAPIENS2_RECIPES["matting"] = SAPIENS2_RECIPES["albedo"]
del _R


def _run(objective, size, batch_size, total_steps, image_size):
  """Keys every run has: schedule of the loop, model basics, optimizer basics, data, mesh."""
  c = ml_collections.ConfigDict()
  c.objective = objective        # sapiens_jax.objectives.OBJECTIVES: mae | finetune
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
  # The size names its backbone family (sapiens_jax.models.FAMILIES): Sapiens 0.3b | 0.6b | 1b | 2b
  # (paper Table 2) | small | tiny; Sapiens2 sapiens2_0.1b | _0.4b | _0.8b | _1b | _1b_4k | _5b |
  # sapiens2_small | sapiens2_tiny | sapiens2_tiny_4k | sapiens2_micro.
  c.model.size = size
  c.model.patch_size = 16
  # 2 for some v1 task fine-tunes (reference §1.3): same grid, shifted windows; Sapiens2 pads none.
  c.model.patch_padding = 0
  c.model.dtype = "float32"      # compute dtype; parameters stay float32. "bfloat16" on accelerators.
  c.model.scan_layers = size in REMAT_POLICY  # one compiled block body (per segment) for all layers
  # Activation checkpointing (sapiens_jax.models.layers.REMAT_POLICIES): more of it for bigger models.
  c.model.remat_policy = REMAT_POLICY.get(size, "none")
  # auto: blocked online-softmax on CPU, cuDNN on GPU (16-bit), Pallas splash on TPU (models/attention.py)
  c.model.attention = "auto"
  # Sapiens2: the dtype RoPE rotates q and k in. Upstream rotates in bfloat16 even in float32 models
  # (its released weights were trained so); "float32" is the transformers port's rotation.
  c.model.rope_dtype = "bfloat16"

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
  c.data.source = "generated"    # the reader: sapiens_jax/data/sources.py (pretraining), pipeline.py (tasks)
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


def pretrain(size, objective="mae"):
  """The paper's recipe for `size`; sizes outside Table 2 get batch 256 and 10k steps."""
  batch = TABLE2_BATCH.get(size, 256)
  # 1.2T tokens at 4096 tokens per 1024x1024 image.
  steps = TOKENS_SEEN // (batch * 4096) if size in TABLE2_BATCH else 10_000
  c = _run(objective, size, batch, steps, (1024, 1024))
  objectives.OBJECTIVES[objective].configure(c)
  c.data.resize = "pil"  # crop resize: "pil" (the reference's) | "cv2" (faster; transforms.resize)
  c.optim.warmup_steps = steps // 40  # reference: 40 of 1600 epochs
  return c


# Sapiens2 publishes no pretraining schedule (sapiens2.md §2): ours is one pass over its 1B images
# (the one number it gives) at a global batch of 1024 images (2 global views each), MAE's lr rule and warm-up fraction.
SAPIENS2_PRETRAIN_BATCH = 1024
SAPIENS2_PRETRAIN_IMAGES = 1_000_000_000


def pretrain_sapiens2(size):
  """MAE + self-distillation pretraining of a Sapiens2 `size` at 1024 px global views (objectives/mae_distill.py
  names each default's source)."""
  c = pretrain(size, "mae_distill")
  c.batch_size = SAPIENS2_PRETRAIN_BATCH
  c.total_steps = SAPIENS2_PRETRAIN_IMAGES // SAPIENS2_PRETRAIN_BATCH
  c.optim.warmup_steps = c.total_steps // 40  # MAE: 40 of 1600 epochs
  c.model.dtype = "bfloat16"
  return c


def finetune(dataset, size):
  """The reference fine-tuning recipe of `dataset` (a key of DATASETS) for `size`."""
  d = DATASETS[dataset]
  # Dense tasks: 200 epochs of a dataset whose size the reference does not fix -- set
  # total_steps = epochs * examples / batch_size for yours.
  c = _run("finetune", size, d.batch_size, 100_000, (1024, 768))
  c.task = d.task                # sapiens_jax.tasks.TASKS
  c.model.patch_padding = d.patch_padding
  c.model.head_channels = 768    # width of the task head's hidden layers
  c.optim.base_lr = d.lr
  c.optim.lr_base_batch = d.lr_base_batch
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.1
  c.optim.layer_decay = 0.85
  c.optim.warmup_start_factor = 1e-3
  c.optim.warmup_steps = 400
  c.optim.schedule = "linear"    # PolyLR power 1
  c.optim.frozen = ()            # the fine-tuned position embedding is learnt
  c.loss = ml_collections.ConfigDict()  # the task's loss and target settings
  c.data.source = "folder"       # folder (or shards from sapiens_jax.data.convert) | synthetic
  c.data.dataset = dataset       # the recipe's dataset (DATASETS)
  c.data.labels = d.labels       # skeleton or class vocabulary in sapiens_jax/data/meta/
  c.data.annotations = ""        # COCO keypoints: the JSON (image paths relative to data.path)
  c.data.eval_path = ""          # held-out split, same layout as data.path
  c.data.eval_annotations = ""
  c.data.num_eval = 0            # 0 = the whole eval split
  c.data.backgrounds = ""        # folder of non-human images pasted behind people (dense tasks)
  c.data.framing = "scene"       # synthetic source: scene (1-3 people) | portrait (one, frame-filling)
                                 # | studio (portrait facing the camera, before a plain background)
  c.data.scale_range = (0.2, 2.0)  # dense tasks' random resize; the reference's, for 1024x768
  c.eval_batch_size = c.batch_size
  c.best_metric = ""             # the task sets it; its direction is in the task's METRICS
  c.recipe = d.recipe            # whose head, loss and targets the task uses (the dataset row's)
  if d.recipe == "sapiens2":
    _sapiens2_recipe(c, d.task, size)
  tasks.get(d.task).configure(c, dataset, size)
  return c


def _sapiens2_recipe(c, task, size):
  """sapiens2.md §4 for `task` at `size`: AdamW (0.9, 0.999), wd 0.1, layer decay by size, 500
  warm-up steps from x1e-3 then linear to 0, the table's lr, steps, clip and batch (8 GPUs), bf16
  compute, the whole backbone rematerialised. The CPU test sizes take 0.4b's row and keep float32."""
  recipe = SAPIENS2_RECIPES[task].get(size, SAPIENS2_RECIPES[task]["sapiens2_0.4b"])
  c.optim.base_lr = recipe.lr
  c.optim.grad_clip_norm = float(recipe.clip)
  c.optim.layer_decay = SAPIENS2_LAYER_DECAY.get(size, 0.8)
  c.optim.warmup_steps = SAPIENS2_WARMUP
  c.total_steps = recipe.steps
  c.batch_size = c.eval_batch_size = recipe.batch_per_gpu * SAPIENS2_GPUS
  if size in SAPIENS2_LAYER_DECAY:
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"


def upgrade(saved):
  """A config dict saved by an earlier version, in today's layout. Before backbones, objectives and
  tasks became separate modules (2026-11), `task` "mae" was the objective, `model.family` did not
  exist, `heatmap_sigma` was top-level and `data.source` named the dataset; before attention had a
  choice, `model.attention` did not exist (it then meant "auto"); before Sapiens2, `model.family`
  named the family that the size now names, and `model.rope_dtype` did not exist; before Sapiens2
  tasks, `recipe` did not exist (it was "sapiens")."""
  saved = copy.deepcopy(saved)
  if saved.get("objective", "finetune") == "finetune" and saved.get("task", "mae") != "mae":
    saved.setdefault("recipe", "sapiens")  # before Sapiens2 tasks every recipe was v1's
  saved["model"].setdefault("attention", "auto")
  saved["model"].setdefault("rope_dtype", "bfloat16")
  saved["model"].pop("family", None)
  if "objective" in saved:
    return saved
  task = saved.pop("task", "mae")
  saved["objective"] = "mae" if task == "mae" else "finetune"
  if task != "mae":
    saved["task"] = task
    saved.setdefault("loss", {})
    if "heatmap_sigma" in saved:
      saved["loss"]["heatmap_sigma"] = saved.pop("heatmap_sigma")
    data = saved["data"]
    if data["source"] != "synthetic":
      data["dataset"], data["source"] = data["source"], "folder"
  return saved
