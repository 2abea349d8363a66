"""Self-distillation math for a Sapiens2-style objective (self_distillation.md §1-§3): the DINO/iBOT head,
the teacher's centring (softmax centring, Sinkhorn-Knopp), the DINO CLS, iBOT patch and KoLeo losses, the
teacher-temperature and EMA-momentum schedules, and the EMA update.

Pure functions of arrays, computed in float32, so that the objective can keep the centre and the teacher in its
train state and fuse everything into one jitted step. Every default is DINOv2's (cited where it is set), never a
Sapiens2 value: those are unknown (sapiens2.md §2).

Teacher targets carry no gradient: DINOv2 computes them under torch.no_grad; here the caller wraps the teacher's
logits in jax.lax.stop_gradient before centring them (tests/objectives/test_distillation.py shows the pattern).
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sapiens_jax import losses
from sapiens_jax.models import layers

# DINOv2 configs/ssl_default_config.yaml, dino.head_* (ibot.head_* are the same; §2.4).
NUM_PROTOTYPES = 65536
HIDDEN_DIM = 2048
BOTTLENECK_DIM = 256
NUM_LAYERS = 3
BOTTLENECK_EPS = 1e-12  # DINOv2 layers/dino_head.py forward: F.normalize eps (1e-6 for float16 inputs only)
STUDENT_TEMPERATURE = 0.1  # DINOv2 loss/dino_clstoken_loss.py, ibot_patch_loss.py: student_temp=0.1
CENTER_MOMENTUM = 0.9  # DINOv2 DINOLoss and iBOTPatchLoss: center_momentum=0.9
SINKHORN_ITERATIONS = 3  # DINOv2 sinkhorn_knopp_teacher: n_iterations=3
KOLEO_EPS = 1e-8  # DINOv2 loss/koleo_loss.py: forward(eps=1e-8), for F.normalize and the log
KOLEO_PDIST_EPS = 1e-8  # DINOv2 loss/koleo_loss.py: nn.PairwiseDistance(2, eps=1e-8), added to the difference
# DINOv2 configs/ssl_default_config.yaml, teacher.{warmup_teacher_temp, teacher_temp, momentum_teacher,
# final_momentum_teacher}; the warm-up is teacher.warmup_teacher_temp_epochs = 30 epochs of 1250 iterations.
TEACHER_TEMPERATURE_START = 0.04
TEACHER_TEMPERATURE_END = 0.07
MOMENTUM_START = 0.992  # 0.994 in DINOv2 configs/train/vitl14.yaml and vitg14.yaml
MOMENTUM_END = 1.0


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


# ---------------------------------------------------------------- head

def _trunc_normal_002():
  # torch trunc_normal_(std=0.02) cuts at the absolute values +-2, i.e. +-100 std: a plain normal (§2.4 init).
  return nn.initializers.normal(0.02)


def _torch_linear_init(key, shape, dtype=jnp.float32):
  """PyTorch nn.Linear's own init, U(+-1/sqrt(fan_in)): DINOv2's DINOHead applies its trunc-normal init before it
  builds the last layer (layers/dino_head.py __init__), so the prototypes keep this one."""
  bound = 1 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class Prototypes(nn.Module):
  """Weight-normalised linear layer without bias: logits = x @ (g * v / |v|), each prototype (a column of v)
  normalised in every forward pass.

  DINOv2 wraps the layer in torch weight_norm with weight_g filled with 1 (§2.4). Here g is fixed at 1 unless
  `learn_norm`, which adds DINOv2's trainable `weight_g` (K,), initialised to 1: DINOv2 does not freeze it
  (§2.4), DINO v1's norm_last_layer does. `kernel` is torch's weight_v, transposed. No eps: torch has none.
  """
  num_prototypes: int = NUM_PROTOTYPES
  learn_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    v = self.param("kernel", layers.partitioned(_torch_linear_init, ("embed", "mlp")), (x.shape[-1], self.num_prototypes))
    w = v / jnp.sqrt(jnp.sum(jnp.square(v), axis=0, keepdims=True))
    if self.learn_norm:
      w = w * self.param("weight_g", layers.partitioned(nn.initializers.ones, ("mlp",)), (self.num_prototypes,))
    return jnp.dot(x.astype(self.dtype), w.astype(self.dtype), preferred_element_type=jnp.float32)


def _mlp_axes(j, last):
  """Logical axes of linear j's kernel: (in, out) = (embed, mlp), (mlp, embed), (embed, mlp), ... as a transformer
  MLP alternates them, so each layer contracts over the axis its input comes split on, and fsdp splits every
  kernel. The last linear leaves its output whole (None). A hidden-to-hidden layer named (embed, mlp) instead
  made XLA's partitioner (jaxlib 0.10.2) return wrong input gradients on a data x fsdp x tensor mesh: the
  data2_fsdp2_tensor2 setting of tests/test_sharding_distill.py."""
  if j % 2 == 0:
    return ("embed", None if last else "mlp")
  return ("mlp", None if last else "embed")


class DinoHead(nn.Module):
  """DINO/iBOT projection head (§2.4): features (..., D) -> logits (..., num_prototypes), float32.

  MLP of `nlayers` linears with GELU between them (D -> hidden -> ... -> bottleneck, bias, no batch norm),
  the bottleneck L2-normalised, then `Prototypes`: with g = 1 every logit is a cosine in [-1, 1], so
  exp(logit / 0.04) in `sinkhorn_knopp` cannot overflow. Parameter names follow the PyTorch keys
  (mlp.0, mlp.2, mlp.4, last_layer) for DINO-format checkpoints; the MLP is initialised N(0, 0.02), bias 0.
  """
  num_prototypes: int = NUM_PROTOTYPES
  hidden_dim: int = HIDDEN_DIM
  bottleneck_dim: int = BOTTLENECK_DIM
  nlayers: int = NUM_LAYERS
  learn_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.nlayers < 1:
      raise ValueError(f"DinoHead needs nlayers >= 1, got {self.nlayers}")
    for j in range(self.nlayers):
      last = j == self.nlayers - 1
      axes = _mlp_axes(j, last)
      x = nn.Dense(self.bottleneck_dim if last else self.hidden_dim, dtype=self.dtype,
                   name="mlp" if self.nlayers == 1 else f"mlp_{2 * j}",
                   kernel_init=layers.partitioned(_trunc_normal_002(), axes),
                   bias_init=layers.partitioned(nn.initializers.zeros, axes[1:]))(x)
      if not last:
        x = nn.gelu(x, approximate=False)  # torch nn.GELU(): the erf form
    x = losses.unit(x.astype(jnp.float32), BOTTLENECK_EPS)
    return Prototypes(self.num_prototypes, self.learn_norm, self.dtype, name="last_layer")(x)


# ---------------------------------------------------------------- centring

def sinkhorn_knopp(teacher_logits, temperature, num_iterations=SINKHORN_ITERATIONS, axis_name=None, valid=None):
  """Teacher targets spread evenly over the prototypes: DINOv2's sinkhorn_knopp_teacher (§2.1), (B, K) -> (B, K).

  Q = exp(z / temperature)^T (K x B, float32, no max subtracted); Q /= sum(Q); then `num_iterations` times
  {Q /= row sums; Q /= K; Q /= column sums; Q /= B_glob}; finally Q *= B_glob. So every returned row (a sample)
  sums to exactly 1; each prototype's total over the global batch is B_glob/K only after a row step, and the
  last column step moves it off that (towards B_glob/K as the iterations grow).

  The total, the row sums and B_glob are sums over the global batch. Under jit on a sharded array plain sums
  already are global: leave axis_name None. Under shard_map or pmap each device holds its rows: name the batch
  mesh axis (or axes), and those sums are psum'd, as DINOv2 all-reduces them. `valid` (B,) bool, optional:
  rows that take no part (the padding of a static buffer of masked tokens, §5.6) and come back 0; B_glob is
  then the global number of valid rows, as in DINOv2's iBOT variant (n_masked_patches_tensor, §2.2).
  DINOv2 scores both global crops together: pass their (n_global * B, K) logits.
  """
  q = jnp.exp(jnp.asarray(teacher_logits, jnp.float32) / temperature).T
  num_prototypes = q.shape[0]
  if valid is None:
    count = jnp.float32(q.shape[1])
  else:
    valid = jnp.asarray(valid, bool)
    q = jnp.where(valid[None, :], q, 0.0)
    count = jnp.sum(valid, dtype=jnp.float32)
  num_samples = _psum(count, axis_name)
  q = q / _psum(jnp.sum(q), axis_name)
  for _ in range(num_iterations):
    q = q / _psum(jnp.sum(q, axis=1, keepdims=True), axis_name)
    q = q / num_prototypes
    column = jnp.sum(q, axis=0, keepdims=True)
    q = q / (column if valid is None else jnp.where(valid[None, :], column, 1.0))
    q = q / num_samples
  return (q * num_samples).T


def softmax_centering(teacher_logits, center, temperature):
  """DINO's original centring and sharpening (§2.1): softmax((z - c) / temperature) over the prototypes.

  DINOv2 queues the centre update after each use: call this with the current centre, then `update_center`.
  """
  return jax.nn.softmax((jnp.asarray(teacher_logits, jnp.float32) - center) / temperature, axis=-1)


def update_center(center, teacher_logits, momentum=CENTER_MOMENTUM, axis_name=None, valid=None):
  """c <- momentum * c + (1 - momentum) * mean(z) (§2.1), the mean over every row of z (..., K).

  With axis_name (shard_map / pmap) the per-device means are averaged over it: DINOv2's all-reduced sum
  divided by (rows per GPU * world). `valid` (rows,) or z.shape[:-1], optional, keeps only those rows: for the
  iBOT centre, the mean over masked tokens (§2.2; DINOv2 averages each GPU's mean, which is what axis_name does;
  a jit over a sharded array gives the mean over all valid tokens instead). The centre keeps its shape.
  """
  z = jnp.asarray(teacher_logits, jnp.float32)
  z = z.reshape(-1, z.shape[-1])
  if valid is None:
    batch_center = jnp.mean(z, axis=0)
  else:
    valid = jnp.asarray(valid, bool).reshape(-1)
    total = jnp.sum(jnp.where(valid[:, None], z, 0.0), axis=0)
    batch_center = total / jnp.maximum(jnp.sum(valid, dtype=jnp.float32), 1.0)
  if axis_name is not None:
    batch_center = jax.lax.pmean(batch_center, axis_name)
  return center * momentum + batch_center * (1 - momentum)


# ---------------------------------------------------------------- losses

def dino_cls_loss(student_logits, teacher_probs, student_temperature=STUDENT_TEMPERATURE):
  """DINO's CLS cross-entropy over every (teacher view, student view) pair of different views (§1.4, §2.1).

  student_logits (n_student, B, K), its first n_teacher views the same crops as teacher_probs (n_teacher, B, K)
  (the global crops; the rest are local crops). Each pair scores CE(t, s) = -sum_k t_k log softmax(s / T_s)_k,
  averaged over the batch; the result is the sum over the n_teacher * (n_student - 1) pairs with t != s divided
  by their number: 18 terms for 2 global + 8 local crops, as DINOv2 (local term / 18 + 2 x global-pair mean / 18)
  and DINOv3 (global_ignore_diagonal). One quirk not reproduced: with no local crop DINOv2 divides by
  max(n_local * n_global, 1) + 2 = 3, not 2 (train/ssl_meta_arch.py forward_backward).
  """
  t = jnp.asarray(teacher_probs, jnp.float32)
  log_p = jax.nn.log_softmax(jnp.asarray(student_logits, jnp.float32) / student_temperature, axis=-1)
  n_teacher, n_student = t.shape[0], log_p.shape[0]
  if t.ndim != 3 or log_p.shape[1:] != t.shape[1:] or n_student < n_teacher:
    raise ValueError(f"student (n_student, B, K) {log_p.shape} must extend teacher (n_teacher, B, K) {t.shape}")
  num_pairs = n_teacher * (n_student - 1)
  if num_pairs == 0:
    raise ValueError("dino_cls_loss needs a pair of different views")
  pair_ce = -jnp.einsum("tbk,sbk->ts", t, log_p, precision=jax.lax.Precision.HIGHEST) / t.shape[1]
  same_view = jnp.eye(n_teacher, n_student, dtype=bool)
  return jnp.sum(jnp.where(same_view, 0.0, pair_ce)) / num_pairs


def ibot_masks_weight(mask):
  """DINOv2's masks_weight on the (B, N) grid: 1 / |M_i| at each masked patch of image i, else 0 (§1.3; the
  count clamped to 1, so an image without masked patches weighs 0)."""
  mask = jnp.asarray(mask, jnp.float32)
  return mask / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)


def ibot_patch_loss(student_patch_logits, teacher_patch_probs, mask, student_temperature=STUDENT_TEMPERATURE):
  """iBOT's masked-patch cross-entropy (§2.2): -(1/B) sum_i (1/|M_i|) sum_{p in M_i} sum_k t_ipk log p_ipk.

  Logits and probs (B, N, K), mask (B, N), 1 = masked for the student. The per-image mean over masked patches is
  averaged over all B images, those without masked patches counting 0: DINOv2's forward_masked (sum of
  masks_weight * CE over masked tokens / number of images; its x2 and x1/n_global cancel, §1.4). Unmasked
  positions are excluded before the product, so garbage (even NaN) teacher values there change nothing.
  """
  weight = ibot_masks_weight(mask)
  masked = weight > 0
  t = jnp.where(masked[..., None], jnp.asarray(teacher_patch_probs, jnp.float32), 0.0)
  log_p = jax.nn.log_softmax(jnp.asarray(student_patch_logits, jnp.float32) / student_temperature, axis=-1)
  ce = -jnp.sum(t * log_p, axis=-1)
  return jnp.sum(ce * weight) / weight.shape[0]


def koleo_loss(features, eps=KOLEO_EPS):
  """KoLeo entropy estimator (§2.3): -mean_i log(|x_i - x_nn(i) + e| + eps) on L2-normalised rows (B, D).

  nn(i) maximises the dot product over j != i (first index on ties); e = KOLEO_PDIST_EPS in every coordinate, as
  torch's PairwiseDistance adds it, which keeps the gradient finite for duplicated rows. DINOv2 applies it to the
  backbone CLS of each global crop separately, per GPU, and sums the two (x 0.1): call it once per crop, on the
  rows it should compare (under jit on a sharded batch, the whole global batch).
  """
  x = losses.unit(jnp.asarray(features, jnp.float32), eps)
  n = x.shape[0]
  dots = jnp.dot(x, x.T, precision=jax.lax.Precision.HIGHEST)
  dots = jnp.where(jnp.eye(n, dtype=bool), -1.0, dots)  # DINOv2 fills the diagonal with -1
  neighbour = x[jnp.argmax(dots, axis=1)]
  distance = jnp.sqrt(jnp.sum(jnp.square(x - neighbour + KOLEO_PDIST_EPS), axis=-1))
  return -jnp.mean(jnp.log(distance + eps))


# ---------------------------------------------------------------- schedules and EMA

def teacher_temperature(step, warmup_steps, start=TEACHER_TEMPERATURE_START, end=TEACHER_TEMPERATURE_END):
  """np.linspace(start, end, warmup_steps)[step] during the warm-up, then `end` (§2.1, §3.1).

  The linspace is inclusive, so step warmup_steps - 1 already gives `end` (DINOv2's CosineScheduler with equal
  base and final values). `step` may be traced; warmup_steps is a Python int.
  """
  step = jnp.asarray(step, jnp.float32)
  ramp = start + (end - start) * step / max(warmup_steps - 1, 1)
  return jnp.where(step < warmup_steps, ramp, end).astype(jnp.float32)


def ema_momentum(step, total_steps, start=MOMENTUM_START, end=MOMENTUM_END):
  """DINOv2's cosine teacher momentum (§1.5): end + (start - end)(1 + cos(pi step / total_steps)) / 2 for
  step < total_steps, then `end`. `step` may be traced."""
  step = jnp.asarray(step, jnp.float32)
  momentum = end + 0.5 * (start - end) * (1 + jnp.cos(jnp.pi * step / total_steps))
  return jnp.where(step < total_steps, momentum, end).astype(jnp.float32)


def ema_update(teacher, student, momentum):
  """teacher <- momentum * teacher + (1 - momentum) * student on every leaf (§1.5), in float32, each leaf keeping
  its dtype. Pure, so it fuses into a jitted step; DINOv2 applies it after the optimizer step."""
  m = jnp.asarray(momentum, jnp.float32)

  def update(t, s):
    return (m * jnp.asarray(t, jnp.float32) + (1 - m) * jnp.asarray(s, jnp.float32)).astype(jnp.asarray(t).dtype)
  return jax.tree.map(update, teacher, student)
