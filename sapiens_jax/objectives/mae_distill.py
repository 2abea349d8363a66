"""Masked reconstruction + self-distillation with an EMA teacher: the Sapiens2 pretraining objective, in the
open (sapiens2.md §2: Meta will not release theirs; self_distillation.md for the parts it combines).

Every image gives two global views (and `distill.num_local_crops` local crops). The design is §5's option C,
one MAE-style student pass:
- the **student** encoder sees each global view with `model.mask_ratio` of its patches dropped (MAE's uniform
  masking), and each local crop whole; the MAE **decoder** predicts every patch's normalised pixels (loss on the
  masked ones, as MAE);
- the **teacher** (EMA of the student, no gradient) encodes both global views whole;
- **CLS term** (DINO): the student CLS of every view, through the DINO head, against the teacher's centred CLS
  distribution of the *other* global view;
- **dense term** (iBOT-style): at masked patches of each global view, the decoder's features (which see every
  position), projected to the encoder width (`dense_proj`) and put through the same head, against the teacher's
  centred distribution of its own patch token there. The head is shared (DINOv2's default, ibot.separate_head
  off), so the teacher's copy of it stays an EMA of the student's. `distill.dense_tokens` of the masked patches
  per view (the first of a random order) are scored: all 3072 of a 1024 px view against 65536 prototypes would
  cost gigabytes of logits per device;
- **KoLeo** on the student's backbone CLS of each global view.
The project page's diagram (masked View1 -> student, EMA teacher, pixel decoder, CLS decoders) is consistent with
this; which views are masked, where the dense term is read and every value below are our choices, not Sapiens2's.

State: `params` = {encoder, decoder, dense_proj, head}; `teacher` = the EMA of all of it (the decoder and
projection too, unused: as DINOv2 EMAs every module of its student dict, so the teacher tree mirrors the student,
exports and resumes like it); `centers` (CLS, dense) with softmax centring. Exports, `init_from` of a run and
predict read the teacher: released Sapiens2 pretrain files are teacher weights.
"""
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sapiens_jax import losses
from sapiens_jax import models
from sapiens_jax import prng
from sapiens_jax import step as train_step
from sapiens_jax import torch_names
from sapiens_jax.data import pipeline
from sapiens_jax.data import sources
from sapiens_jax.data import transforms
from sapiens_jax.data import views
from sapiens_jax.models import layers
from sapiens_jax.objectives import distillation
from sapiens_jax.objectives import mae

PICTURES = mae.PICTURES
WEIGHTS = "teacher"  # the state entry that export, predict and init_from read
CENTERINGS = ("sinkhorn_knopp", "softmax")
NUM_GLOBAL = 2


def configure(config):
  """The objective's keys; each default's source is named (none is Sapiens2's: it published none)."""
  mae.configure(config)  # model.mask_ratio 0.75, the decoder 512 x 8 x 16, norm_pix_loss: MAE's
  d = config.distill = ml_collections.ConfigDict()
  d.mae_weight = 1.0              # ours: MAE and DINOv2 each weigh their terms 1
  d.dino_weight = 1.0             # DINOv2 dino.loss_weight
  d.dense_weight = 1.0            # DINOv2 ibot.loss_weight
  d.koleo_weight = 0.1            # DINOv2 dino.koleo_loss_weight
  d.num_prototypes = distillation.NUM_PROTOTYPES  # DINOv2 dino.head_n_prototypes 65536
  d.head_hidden_dim = distillation.HIDDEN_DIM     # DINOv2 2048
  d.head_bottleneck_dim = distillation.BOTTLENECK_DIM  # DINOv2 256
  d.head_layers = distillation.NUM_LAYERS          # DINOv2 3
  d.dense_tokens = 128            # masked patches per view in the dense term: DINOv2's most per image (0.5 x 256)
  d.student_temperature = distillation.STUDENT_TEMPERATURE  # DINOv2 0.1
  d.teacher_temperature = distillation.TEACHER_TEMPERATURE_END  # DINOv2 0.07 ...
  d.teacher_temperature_start = distillation.TEACHER_TEMPERATURE_START  # ... warmed up from 0.04
  d.teacher_temperature_warmup_steps = 30 * 1250  # DINOv2: 30 epochs of 1250 iterations
  d.centering = "sinkhorn_knopp"  # | softmax. DINOv2's ViT-L/14 and g/14 configs (its default is softmax)
  d.center_momentum = distillation.CENTER_MOMENTUM  # softmax centring: DINOv2 0.9
  d.freeze_prototypes_steps = 1250  # no gradient to the prototypes at first: DINOv2 freeze_last_layer_epochs, 1 epoch
  d.momentum_start = 0.994        # EMA teacher, cosine to momentum_end: DINOv2's ViT-L/14, g/14 (default 0.992)
  d.momentum_end = distillation.MOMENTUM_END  # 1.0
  d.num_local_crops = 8           # DINOv2 8; Sapiens2 backbones only (RoPE takes any grid)
  d.local_size = (448, 448)       # DINOv2's 96 px of a 224 px global, scaled to 1024 px views (to a x16 side)
  d.global_scale = views.GLOBAL_SCALE  # DINOv2 (0.32, 1.0)
  d.local_scale = views.LOCAL_SCALE    # DINOv2 (0.05, 0.32)
  # A CLS feature spread below this (see `cls_std` in the metrics) is reported as a collapse.
  d.collapse_cls_std = 0.05
  config.optim.grad_clip_norm = 3.0  # DINOv2 clip_grad (MAE has none); the rest of the optimizer is MAE's
  config.data.resize = "pil"


def check_config(config):
  d = config.distill
  if d.centering not in CENTERINGS:
    raise ValueError(f"config.distill.centering={d.centering!r}; expected one of {CENTERINGS}")
  if d.num_local_crops and models.family_name(config.model) != "sapiens2":
    raise ValueError(f"config.distill.num_local_crops={d.num_local_crops} needs a Sapiens2 backbone (RoPE); "
                     f"config.model.size={config.model.size!r} has position tables for one grid. Set it to 0.")
  num_masked = _num_tokens(config) - _num_keep(config)
  if not 0 < d.dense_tokens <= num_masked:
    raise ValueError(f"config.distill.dense_tokens={d.dense_tokens} must be in [1, {num_masked}], the masked "
                     f"patches of a view at image_size {tuple(config.image_size)} and mask_ratio "
                     f"{config.model.mask_ratio}")


def _num_tokens(config):
  return math.prod(models.family(config.model).grid(config.model, config.image_size))


def _num_keep(config):
  return int(_num_tokens(config) * (1 - config.model.mask_ratio))


# ---------------------------------------------------------------- model

class Networks(NamedTuple):
  """The student's modules, each applied to its own params group (the teacher applies `encoder` and `head`
  to its copies). `local_encoder` is `encoder` built for the local crops' size: the same parameters."""
  encoder: nn.Module
  local_encoder: Any
  decoder: mae.Decoder
  dense_proj: nn.Module
  head: distillation.DinoHead


def encoder(config):
  return mae.encoder(config)


def build_model(config):
  m, d = config.model, config.distill
  enc = encoder(config)
  local = enc.clone(image_size=tuple(d.local_size)) if d.num_local_crops else None
  width = models.family(m).size(m.size).width
  dense_proj = nn.Dense(width, dtype=jnp.dtype(m.dtype),
                        kernel_init=layers.partitioned(nn.initializers.xavier_uniform(), (None, "embed")),
                        bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)))
  head = distillation.DinoHead(d.num_prototypes, d.head_hidden_dim, d.head_bottleneck_dim, d.head_layers,
                               dtype=jnp.dtype(m.dtype))
  return Networks(enc, local, mae.decoder(config, enc), dense_proj, head)


def init_params(model, config, key):
  keys = jax.random.split(key, 4)
  n, keep = _num_tokens(config), _num_keep(config)
  width = model.dense_proj.features
  images = jnp.zeros((1, *config.image_size, 3), jnp.float32)
  latent = jnp.zeros((1, 1 + keep, width), jnp.float32)
  return {"encoder": model.encoder.init(keys[0], images)["params"],
          "decoder": model.decoder.init(keys[1], latent, jnp.arange(n)[None])["params"],
          "dense_proj": model.dense_proj.init(keys[2], jnp.zeros((1, model.decoder.width)))["params"],
          "head": model.head.init(keys[3], jnp.zeros((1, width)))["params"]}


def init_extra_state(params, config):
  """The teacher starts as the student (DINOv2; Sapiens2's periods-buffer comment says the same)."""
  state = {"teacher": jax.tree.map(lambda x: x, params)}
  if config.distill.centering == "softmax":
    k = config.distill.num_prototypes
    state["centers"] = {"cls": jnp.zeros((k,), jnp.float32), "dense": jnp.zeros((k,), jnp.float32)}
  return state


def _apply(module, params, *args, **kwargs):
  return module.apply({"params": params}, *args, **kwargs)


def _view_major(x):
  """(B, V, ...) -> (V * B, ...), view 0's examples first."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def student_forward(model, params, images, local_crops, keys, config):
  """The student on normalised views (V * B, H, W, 3) (view-major) and local crops (L * B, h, w, 3) or None.

  Returns pixels (V*B, N, p*p*3), mask (V*B, N), backbone CLS (V*B, D) and of the local crops (L*B, D) or None,
  the dense features at the scored masked patches (V*B, dense_tokens, D) and their grid ids.
  """
  enc = model.encoder
  tokens = _apply(enc, params["encoder"], images, method="embed")
  keep_ids, mask, restore_ids = mae.random_masking(keys, tokens.shape[1], config.model.mask_ratio)
  latent = _apply(enc, params["encoder"], mae.gather_tokens(tokens, keep_ids), keep_ids, method="encode")
  prefix = enc.num_prefix_tokens
  pixels, features = _apply(model.decoder, params["decoder"],
                            jnp.concatenate([latent[:, :1], latent[:, prefix:]], axis=1), restore_ids,
                            return_features=True)
  # restore_ids inverts the random order; its argsort is that order, whose tail is the masked patches.
  dense_ids = jnp.argsort(restore_ids, axis=1)[:, keep_ids.shape[1]:][:, :config.distill.dense_tokens]
  dense = _apply(model.dense_proj, params["dense_proj"], mae.gather_tokens(features, dense_ids))
  local_cls = None
  if local_crops is not None:
    local_cls = _apply(model.local_encoder, params["encoder"], local_crops)[:, 0]
  return pixels.astype(jnp.float32), mask, latent[:, 0], local_cls, dense, dense_ids


def teacher_forward(model, teacher, images, dense_ids):
  """The teacher's head logits: CLS (V*B, K) and at the student's scored masked patches (V*B, T, K)."""
  tokens = _apply(model.encoder, teacher["encoder"], images)
  patches = mae.gather_tokens(tokens[:, model.encoder.num_prefix_tokens:], dense_ids)
  head = functools.partial(_apply, model.head, teacher["head"])
  return head(tokens[:, 0]), head(patches)


def teacher_probs(logits, center, temperature, config):
  """Centred, sharpened teacher targets over the last axis (any leading shape)."""
  flat = logits.reshape(-1, logits.shape[-1])
  if config.distill.centering == "sinkhorn_knopp":
    probs = distillation.sinkhorn_knopp(flat, temperature)
  else:
    probs = distillation.softmax_centering(flat, center, temperature)
  return probs.reshape(logits.shape)


def cls_spread(cls):
  """Std over the batch of the unit-normalised features, averaged over dims, x sqrt(D): about 1 when they point
  every way, 0 when every image gives the same vector (collapse)."""
  unit = losses.unit(cls.astype(jnp.float32))
  return jnp.mean(jnp.std(unit, axis=0)) * math.sqrt(cls.shape[-1])


def _entropy(probs):
  return -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), axis=-1)


def _frozen_prototypes(head_params, step, steps):
  """The head's params with no gradient to its prototypes before `steps`: DINOv2 keeps the last layer's lr at 0
  for the first epoch, so that the prototypes cannot all drift to one answer while the features carry no
  signal yet. Adam then sees zero gradients and moves nothing; the prototypes are normalised, so weight decay
  (a uniform shrink) changes no logit."""
  frozen = jax.tree.map(lambda v: jnp.where(step < steps, jax.lax.stop_gradient(v), v), head_params["last_layer"])
  return {**head_params, "last_layer": frozen}


def loss(model, params, state, batch, keys, config):
  """The weighted sum of the four terms, and {"metrics": per-term losses and monitors, "centers": new centres,
  "pixels", "mask", "images": for the pictures}. `keys`: one per example; view v's mask key is fold_in(key, v)."""
  d = config.distill
  batch_size = batch["image"].shape[0]
  images = _view_major(transforms.normalize(batch["image"]))
  view_keys = jnp.concatenate([jax.vmap(lambda k, v=v: jax.random.fold_in(k, v))(keys) for v in range(NUM_GLOBAL)])
  local_crops = _view_major(transforms.normalize(batch["local"])) if "local" in batch else None
  pixels, mask, cls, local_cls, dense, dense_ids = student_forward(model, params, images, local_crops, view_keys,
                                                                   config)
  mae_loss = mae.mae_loss(pixels, images, mask, mae.token_stride(config), config.model.norm_pix_loss)

  teacher_cls, teacher_dense = jax.lax.stop_gradient(teacher_forward(model, state["teacher"], images, dense_ids))
  step = state["step"]
  temperature = distillation.teacher_temperature(step, d.teacher_temperature_warmup_steps,
                                                 d.teacher_temperature_start, d.teacher_temperature)
  centers = state.get("centers", {"cls": None, "dense": None})
  target_cls = teacher_probs(teacher_cls, centers["cls"], temperature, config)
  target_dense = teacher_probs(teacher_dense, centers["dense"], temperature, config)

  head = functools.partial(_apply, model.head, _frozen_prototypes(params["head"], step, d.freeze_prototypes_steps))
  student_cls = cls if local_cls is None else jnp.concatenate([cls, local_cls])
  per_view = lambda x: x.reshape(-1, batch_size, x.shape[-1])
  dino = distillation.dino_cls_loss(per_view(head(student_cls)), per_view(target_cls), d.student_temperature)
  dense_loss = distillation.ibot_patch_loss(head(dense), target_dense, jnp.ones(dense_ids.shape),
                                            d.student_temperature)
  koleo = sum(distillation.koleo_loss(c) for c in per_view(cls))
  total = d.mae_weight * mae_loss + d.dino_weight * dino + d.dense_weight * dense_loss + d.koleo_weight * koleo

  teacher_entropy = jnp.mean(_entropy(target_cls))
  metrics = {"mae_loss": mae_loss, "dino_loss": dino, "dense_loss": dense_loss, "koleo_loss": koleo,
             # every teacher view meets the same number of student views, so CE - H(teacher) is their mean KL
             "teacher_entropy": teacher_entropy, "student_teacher_kl": dino - teacher_entropy,
             "cls_std": jnp.mean(jax.vmap(cls_spread)(per_view(cls))),
             "teacher_temperature": temperature,
             "ema_momentum": distillation.ema_momentum(step, config.total_steps, d.momentum_start, d.momentum_end)}
  outputs = {"metrics": metrics, "pixels": pixels, "mask": mask, "images": images}
  if d.centering == "softmax":
    outputs["centers"] = {"cls": distillation.update_center(centers["cls"], teacher_cls, d.center_momentum),
                          "dense": distillation.update_center(centers["dense"], teacher_dense, d.center_momentum)}
  return total, outputs


def step_outputs(outputs, config):
  del config
  return {k: v for k, v in outputs.items() if k in ("metrics", "centers")}


def post_update(state, outputs, config):
  """The EMA of the student into the teacher, at the momentum of the step just taken (DINOv2: after the
  optimizer step), and the new centres."""
  d = config.distill
  momentum = distillation.ema_momentum(state["step"] - 1, config.total_steps, d.momentum_start, d.momentum_end)
  state = {**state, "teacher": distillation.ema_update(state["teacher"], state["params"], momentum)}
  if "centers" in outputs:
    state["centers"] = outputs["centers"]
  return state


def alerts(step, metrics, config):
  """What the log should shout about: a collapsed CLS (every image the same vector). Not during the warm-up: a
  fresh Sapiens2 gives every image nearly the same CLS (each block scaled by 1e-4 at init) until it learns."""
  if step > config.optim.warmup_steps and metrics["cls_std"] < config.distill.collapse_cls_std:
    return [f"collapse: the student's CLS features barely vary across the batch (cls_std {metrics['cls_std']:.3g} "
            f"< distill.collapse_cls_std {config.distill.collapse_cls_std}; teacher entropy "
            f"{metrics['teacher_entropy']:.3g}). Lower optim.base_lr, or raise distill.teacher_temperature_"
            f"warmup_steps or distill.momentum_start."]
  return []


def batch_spec(config, batch_size):
  d = config.distill
  spec = {"image": jax.ShapeDtypeStruct((batch_size, NUM_GLOBAL, *config.image_size, 3), jnp.uint8)}
  if d.num_local_crops:
    spec["local"] = jax.ShapeDtypeStruct((batch_size, d.num_local_crops, *d.local_size, 3), jnp.uint8)
  return spec


def activation_bytes_per_example(config):
  """Rough: MAE's for each global view, a whole pass for each local crop (the teacher keeps no activations)."""
  m, d = config.model, config.distill
  local = 0
  if d.num_local_crops:
    tokens = 1 + math.prod(models.family(m).grid(m, d.local_size))
    local = d.num_local_crops * models.family(m).encoder_activation_bytes(m, tokens)
  return NUM_GLOBAL * mae.activation_bytes_per_example(config) + local


# ---------------------------------------------------------------- data

prepare_data = mae.prepare_data


def _data_args(config):
  d = config.distill
  return dict(image_size=tuple(config.image_size), local_size=tuple(d.local_size), num_local=d.num_local_crops,
              global_scale=tuple(d.global_scale), local_scale=tuple(d.local_scale))


def train_iterator(config, workdir, *, batch_size, seed, process_index=0, process_count=1):
  del workdir
  return pipeline.make_multiview_iterator(config.data, batch_size=batch_size, seed=seed,
                                          process_index=process_index, process_count=process_count,
                                          **_data_args(config))


def _views(load, index, rng):
  return np.concatenate(list(load(index, rng)["image"]), axis=1)  # (H, 2W, 3): global view 1 | 2


def inspect_samples(config, split, workdir):
  """(index, rng) -> the two global views of a record, side by side; and the number of records."""
  del workdir
  if split != "train":
    raise ValueError("pretraining has no eval split to inspect; use split='train'")
  args = _data_args(config)
  source = sources.make_source(config.data, args["image_size"], config.seed)
  load = functools.partial(pipeline.load_multiview_example, source, resize=config.data.resize,
                           skip_bad=config.data.on_error == "skip", **args)
  return functools.partial(_views, load), len(source)


# ---------------------------------------------------------------- evaluation

best_metric = mae.best_metric


def _eval_step(params, state, batch, *, model, config):
  keys = prng.example_keys(jax.random.key(config.seed + 1), batch["image"].shape[0])
  total, outputs = loss(model, params, state, batch, keys, config)
  n = config.num_viz_images
  return total, outputs["metrics"], outputs["images"][:n], outputs["pixels"][:n], outputs["mask"][:n]


class Evaluation:
  """Every term on a small fixed batch with fixed masks (the teacher at its current weights), and the
  reconstructions of its first view."""

  def __init__(self, config, workdir, model, mesh, rules, param_shardings):
    self.config = config
    self.batch = mae.fixed_eval_batch(train_iterator, config, workdir, mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.step = jax.jit(functools.partial(_eval_step, model=model, config=config), out_shardings=replicated)

  def __call__(self, step, state):
    extra = {"step": state["step"], **train_step.extra_state(state)}
    total, metrics, images, pixels, mask = jax.device_get(self.step(state["params"], extra, self.batch))
    scalars = {"loss": float(total), **{k: float(v) for k, v in metrics.items()}}
    if jax.process_index():
      return scalars, None
    grid = mae.reconstruction_grid(images, pixels, mask, mae.token_stride(self.config),
                                   self.config.model.norm_pix_loss, max_rows=self.config.num_viz_images)
    return scalars, grid


# ---------------------------------------------------------------- weights

def _head_entries(head):
  entries = []
  for name in sorted(k for k in head if k.startswith("mlp")):
    index = name.split("_")[-1] if "_" in name else "0"
    entries += torch_names.dense_entries((name,), f"mlp.{index}")
  entries.append((("last_layer", "kernel"), "last_layer.weight_v", "linear"))
  if "weight_g" in head["last_layer"]:
    entries.append((("last_layer", "weight_g"), "last_layer.weight_g", "same"))
  return entries


def _dense_proj_entries(dense_proj):
  del dense_proj
  return [(("kernel",), "weight", "linear"), (("bias",), "bias", "same")]


def torch_parts(config, include_decoder=True):
  """The backbone under its bare keys (as the released Sapiens2 pretrain files); with the decoder, the MAE neck
  (`neck.*`), the projection (`dense_proj.*`) and the DINO head (`dino_head.*`, DINOv2's names). A backbone-only
  file starts them fresh."""
  parts = [models.family(config.model).torch_part("")]
  if include_decoder:
    parts += [mae.torch_parts(config)[1],
              torch_names.Part("dense_proj", "dense_proj.", _dense_proj_entries, fresh_if_absent=True),
              torch_names.Part("head", "dino_head.", _head_entries, fresh_if_absent=True)]
  return parts


predict_task = mae.predict_task
adapt_state_dict = mae.adapt_state_dict
