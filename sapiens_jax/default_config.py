"""Every config key of an MAE pretraining run, with its default; config files start from here.

Keeping the full key set in one place is what makes `--config.some_key=...` typos an error
(configs are locked) and keeps the four size configs down to what actually differs.
"""
import ml_collections

from sapiens_jax import sharding

# Paper Table 2 pretraining batch sizes.
TABLE2_BATCH = {"0.3b": 98_304, "0.6b": 65_536, "1b": 40_960, "2b": 20_480}
TOKENS_SEEN = 1_200_000_000_000  # patch tokens each Sapiens model saw in pretraining (paper)


def pretrain(size):
  """The paper's recipe for `size`; sizes outside Table 2 get batch 256 and 10k steps."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = TABLE2_BATCH.get(size, 256)  # global, over all processes and devices
  # 1.2T tokens at 4096 tokens per 1024x1024 image.
  c.total_steps = TOKENS_SEEN // (c.batch_size * 4096) if size in TABLE2_BATCH else 10_000
  c.image_size = (1024, 1024)    # (H, W)
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_steps = 1000      # eval loss + reconstruction PNG on a fixed batch
  c.num_viz_images = 8
  c.grad_accum_steps = 1         # sequential micro-batches per step (same result, less memory)
  # Initial weights when the workdir has no checkpoint yet (resuming always wins): an original
  # Sapiens .pth/.safetensors, or a workdir of ours as DIR or DIR:STEP. "" = random init.
  c.init_from = ""

  c.model = ml_collections.ConfigDict()
  c.model.size = size            # 0.3b | 0.6b | 1b | 2b | small | tiny (sapiens_jax.vit.SIZES)
  c.model.patch_size = 16
  c.model.mask_ratio = 0.75
  c.model.decoder_width = 512
  c.model.decoder_depth = 8
  c.model.decoder_heads = 16
  c.model.norm_pix_loss = True
  c.model.dtype = "float32"      # compute dtype; parameters stay float32. "bfloat16" on accelerators.
  c.model.scan_layers = size in TABLE2_BATCH  # one compiled block body for all layers
  # Activation checkpointing (sapiens_jax.vit.REMAT_POLICIES): more of it for bigger models.
  c.model.remat_policy = {"0.3b": "dots", "0.6b": "dots", "1b": "full", "2b": "full"}.get(size, "none")

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 1.5e-4       # peak lr = base_lr * batch_size / 256
  c.optim.min_lr = 0.0
  c.optim.warmup_steps = c.total_steps // 40  # reference: 40 of 1600 epochs
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.05
  c.optim.grad_clip_norm = 1.0
  c.optim.mu_dtype = "float32"   # Adam first moment; "bfloat16" halves its memory

  c.data = ml_collections.ConfigDict()
  c.data.source = "generated"    # generated | folder | array_record
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
