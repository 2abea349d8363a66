"""Fine-tuning models and their losses: the Sapiens ViT without cls token, its patch tokens as a
(h, w) feature map, and one task head (pose heatmaps, part logits, depth or surface normals).

The encoder is the same `vit.ViT` MAE pretrains, under the same param name ("encoder"), so an MAE
checkpoint's encoder drops straight in (its cls token and 64x64 position grid are adapted by
init_from).
"""
import flax.linen as nn
import jax.numpy as jnp

from sapiens_jax import heads
from sapiens_jax import losses
from sapiens_jax import vit
from sapiens_jax.data import meta


class TaskModel(nn.Module):
  encoder: vit.ViT
  head: heads.DenseHead

  def __call__(self, images, train=False):
    """(B, H, W, 3) normalised images -> float32 NHWC head output (size set by the head)."""
    tokens = self.encoder(images)
    features = heads.tokens_to_map(tokens, self.encoder.grid)
    return self.head(features, deterministic=not train).astype(jnp.float32)


def num_outputs(config):
  if config.task == "pose":
    return len(meta.skeleton(config.data.labels).names)
  if config.task == "seg":
    return len(meta.seg_classes(config.data.labels).names)
  return {"depth": 1, "normal": 3}[config.task]


def model_from_config(config):
  m = config.model
  encoder = vit.vit_from_config(m, config.image_size, use_cls_token=False)
  dtype, channels = jnp.dtype(m.dtype), m.head_channels
  head = {"pose": lambda: heads.pose_head(num_outputs(config), channels, dtype),
          "seg": lambda: heads.seg_head(num_outputs(config), channels, dtype),
          "depth": lambda: heads.depth_head(channels, dtype),
          "normal": lambda: heads.normal_head(channels, dtype)}[config.task]()
  return TaskModel(encoder=encoder, head=head)


def loss(config, outputs, batch):
  """The task's training loss on the model's float32 outputs and the batch's targets."""
  if config.task == "pose":
    if config.loss.name == "ohkm":
      return losses.keypoint_ohkm_mse(outputs, batch["heatmaps"], batch["target_weight"], config.loss.ohkm_topk)
    return losses.keypoint_mse(outputs, batch["heatmaps"], batch["target_weight"])
  if config.task == "seg":
    class_weight = jnp.asarray(meta.seg_classes(config.data.labels).class_weight)
    return losses.seg_cross_entropy(outputs, batch["label"], class_weight)
  if config.task == "depth":
    return losses.silog_loss(outputs, batch["depth"])
  return losses.normal_loss(outputs, batch["normal"])


def target_keys(task):
  """The batch entries besides "image" that the task's loss reads."""
  return {"pose": ("heatmaps", "target_weight"), "seg": ("label",), "depth": ("depth",),
          "normal": ("normal",)}[task]
