"""Scaled dot-product attention over thousands of tokens, on every backend: the one function the
backbones call, `attention(q, k, v, implementation)`.

Implementations (`config.model.attention`; "auto" picks per backend, dtype and head dim):
- "blocked" (CPU): online-softmax attention over 128 x 128 blocks with its own backward
  (FlashAttention-2's), never holding more than one block of scores. XLA:CPU runs the plain
  formula as written: it materialises the (heads, T, T) score matrix, its softmax and, for the
  backward, their gradients -- passes over gigabytes per layer at the MAE decoder's 4,097 tokens,
  each paying memory traffic and, for every fresh buffer, page faults. Here every block's scores
  stay in cache between the matmul that makes them and the one that uses them (BENCHMARKS.md).
- "cudnn" (GPU, 16-bit): cuDNN's fused flash attention, head dims zero-padded to a multiple of 8
  (the softmax scale stays the true head dim's), so Sapiens-2B's 60 qualifies too.
- "splash" (TPU): the Pallas splash-attention kernel MaxText uses; head dims zero-padded to 128 and
  sequences to its block size, padding keys masked out.
- "xla": jax.nn.dot_product_attention's XLA path, the plain formula (the reference of the tests).

Shapes: q (B, Tq, H, D), k and v (B, Tk, Hkv, D) with H a multiple of Hkv: grouped-query
attention, query head h reading kv head h // (H / Hkv) (contiguous groups, as repeat_interleave).
`kv_mask` (B, Tk), optional: False keys are not attended (dropped or padding tokens).
"""
import functools
import math
from typing import NamedTuple

import jax
from jax import lax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("auto", "xla", "blocked", "cudnn", "splash")
BLOCK = 128  # query and key block of "blocked": 128 x 128 scores per head, cache-sized
_NEG = -1e30  # the bias of a masked key: exp(_NEG - anything finite) is 0 in float32
RESIDUALS = "attention_residuals"  # checkpoint_name of what the blocked backward needs besides q, k, v


def resolve(implementation, head_dim, dtype, backend=None):
  """The implementation "auto" stands for on `backend` (default: JAX's), or `implementation` itself."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"config.model.attention={implementation!r}; expected one of {IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  backend = backend or jax.default_backend()
  if backend == "cpu":
    return "blocked"
  if backend == "gpu":
    return "cudnn" if jnp.dtype(dtype).itemsize == 2 and head_dim <= 128 else "xla"
  if backend == "tpu":
    return "splash"
  return "xla"


def attention(q, k, v, implementation="auto", kv_mask=None, partition=None):
  """softmax(q k^T / sqrt(D)) v per head, in `q`'s dtype; see the module doc for shapes.

  `partition`: the PartitionSpec of q over the mesh that is set (batch, length, heads, head dim), for
  the kernels XLA cannot partition (splash runs per device under shard_map)."""
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"attention wants q (B, Tq, H, D) and k, v (B, Tk, Hkv, D); got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{q.shape[2]} query heads do not split into groups over {k.shape[2]} kv heads")
  implementation = resolve(implementation, q.shape[-1], q.dtype)
  if implementation == "blocked":
    return blocked_attention(q, k, v, kv_mask)
  if implementation == "cudnn":
    return padded_head_dim(functools.partial(_xla, implementation="cudnn"), 8)(q, k, v, kv_mask)
  if implementation == "splash":
    from sapiens_jax.models import splash  # pylint: disable=g-import-not-at-top  (Pallas: TPU only)
    return per_device(padded_head_dim(splash.attention, 128), partition)(q, k, v, kv_mask)
  return _xla(q, k, v, kv_mask)


def _xla(q, k, v, kv_mask, scale=None, implementation="xla"):
  mask = None if kv_mask is None else kv_mask[:, None, None, :]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=implementation)


def padded_head_dim(fn, multiple):
  """`fn(q, k, v, kv_mask, scale)` on head dims zero-padded to `multiple`, with the softmax scale of
  the true head dim: padded q and k columns add 0 to every score, padded v columns give output
  columns that are cut off again."""
  def padded(q, k, v, kv_mask):
    d = q.shape[-1]
    extra = -d % multiple
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
    return fn(pad(q), pad(k), pad(v), kv_mask, scale=1.0 / math.sqrt(d))[..., :d]
  return padded


def per_device(fn, partition):
  """`fn(q, k, v, kv_mask)` under shard_map over the mesh that is set, each device on its examples
  and heads (`partition` of q: batch and head axes; lengths and head dims whole). XLA would gather
  a custom kernel's operands onto every device instead. Without a multi-device mesh, `fn` itself."""
  mesh = jax.sharding.get_abstract_mesh()
  if partition is None or mesh.empty or mesh.size == 1:
    return fn
  batch, heads = partition[0], partition[2]
  qkv, mask = P(batch, None, heads, None), P(batch, None)

  def sharded(q, k, v, kv_mask):
    keep = jnp.ones(k.shape[:2], bool) if kv_mask is None else kv_mask
    return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, mask), out_specs=qkv, check_vma=False)(
        q, k, v, keep)
  return sharded


# ---------------------------------------------------------------- blocked (online softmax) attention

def _blocks(x, count, size, groups=1):
  """(B, T, H, D) padded to count * size tokens -> (count, B, H / groups, groups * size, D): the
  `groups` query heads that share a kv head become rows of one block (for keys and values,
  groups = 1)."""
  b, t, h, d = x.shape
  x = jnp.pad(x, ((0, 0), (0, count * size - t), (0, 0), (0, 0)))
  x = x.reshape(b, count, size, h // groups, groups, d).transpose(1, 0, 3, 4, 2, 5)
  return x.reshape(count, b, h // groups, groups * size, d)


def _unblock(x, length, groups=1):
  """The inverse of `_blocks`: (count, B, Hkv, groups * size, D) -> (B, length, Hkv * groups, D)."""
  count, b, hkv, rows, d = x.shape
  x = x.reshape(count, b, hkv, groups, rows // groups, d).transpose(1, 0, 4, 2, 3, 5)
  return x.reshape(b, count * (rows // groups), hkv * groups, d)[:, :length]


class _Blocked(NamedTuple):
  """q (scaled), k and v cut into blocks (see `_blocks`), the key bias per key block
  (count_k, B, 1, 1, block_k: 0 or _NEG), and what it takes to undo the query blocking."""
  q: jax.Array
  k: jax.Array
  v: jax.Array
  bias: jax.Array
  groups: int
  block_q: int
  count_q: int
  scale: float


def _to_blocks(q, k, v, kv_mask):
  """What the forward and the backward both start from: the blocks of q (times the softmax scale),
  k and v, and the bias of padding and masked keys."""
  tq, tk = q.shape[1], k.shape[1]
  groups = q.shape[2] // k.shape[2]
  block_q, block_k = min(BLOCK, tq), min(BLOCK, tk)
  count_q, count_k = -(-tq // block_q), -(-tk // block_k)
  keep = jnp.arange(count_k * block_k) < tk
  keep = jnp.broadcast_to(keep, (q.shape[0], count_k * block_k))
  if kv_mask is not None:
    keep = keep & jnp.pad(kv_mask, ((0, 0), (0, count_k * block_k - tk)))
  bias = jnp.where(keep, 0.0, _NEG).astype(jnp.float32)
  bias = bias.reshape(q.shape[0], count_k, 1, 1, block_k).transpose(1, 0, 2, 3, 4)
  scale = 1.0 / math.sqrt(q.shape[-1])
  return _Blocked(q=_blocks(q * jnp.asarray(scale, q.dtype), count_q, block_q, groups),
                  k=_blocks(k, count_k, block_k), v=_blocks(v, count_k, block_k), bias=bias,
                  groups=groups, block_q=block_q, count_q=count_q, scale=scale)


def _scores(q_block, k_block, bias):
  return jnp.einsum("bhqd,bhkd->bhqk", q_block, k_block, preferred_element_type=jnp.float32) + bias


def _forward(q, k, v, kv_mask):
  """(output (B, Tq, H, D) float32, log-sum-exp of every score row (count_q, B, Hkv, G * block_q))."""
  blocked = _to_blocks(q, k, v, kv_mask)

  def query_block(q_block):
    def key_block(carry, xs):
      top, total, acc = carry
      k_block, v_block, key_bias = xs
      s = _scores(q_block, k_block, key_bias)
      new_top = jnp.maximum(top, s.max(-1))
      p = jnp.exp(s - new_top[..., None])
      shrink = jnp.exp(top - new_top)
      total = total * shrink + p.sum(-1)
      acc = acc * shrink[..., None] + jnp.einsum("bhqk,bhkd->bhqd", p.astype(v_block.dtype), v_block,
                                                 preferred_element_type=jnp.float32)
      return (new_top, total, acc), None
    rows = q_block.shape[:-1]
    init = (jnp.full(rows, _NEG, jnp.float32), jnp.zeros(rows, jnp.float32),
            jnp.zeros(q_block.shape, jnp.float32))
    (top, total, acc), _ = lax.scan(key_block, init, (blocked.k, blocked.v, blocked.bias))
    return acc / total[..., None], top + jnp.log(total)

  out, lse = lax.map(query_block, blocked.q)
  return _unblock(out, q.shape[1], blocked.groups), lse


@jax.custom_vjp
def _blocked(q, k, v, kv_mask):
  return _forward(q, k, v, kv_mask)[0].astype(q.dtype)


def _blocked_forward(q, k, v, kv_mask):
  out, lse = _forward(q, k, v, kv_mask)
  # Named, so a remat policy can keep them (layers.REMAT_POLICIES) instead of redoing the forward.
  out, lse = (checkpoint_name(x, RESIDUALS) for x in (out, lse))
  return out.astype(q.dtype), (q, k, v, kv_mask, out, lse)


def _blocked_backward(residuals, d_out):
  """FlashAttention-2's backward: for each key block, over the query blocks, recompute the scores
  from the saved log-sum-exp and accumulate dk, dv (in the carry) and dq (in place, per block).

  dk and dv are accumulated transposed, (D, keys), from q and dO blocks transposed once up front:
  every matmul then contracts its left operand's last axis, the form XLA:CPU hands to its fast
  (YNNPACK) kernels; contracting over query rows of p directly runs as a plain dot at half the speed."""
  q, k, v, kv_mask, out, lse = residuals
  blocked = _to_blocks(q, k, v, kv_mask)
  as_query_blocks = lambda x: _blocks(x, blocked.count_q, blocked.block_q, blocked.groups)
  d_out = d_out.astype(jnp.float32)
  dob = as_query_blocks(d_out)
  qb_t, dob_t = jnp.swapaxes(blocked.q, -1, -2), jnp.swapaxes(dob, -1, -2)
  row_dot = as_query_blocks(jnp.sum(d_out * out, -1, keepdims=True))[..., 0]

  def key_block(dq, xs):
    k_block, v_block, key_bias = xs

    def query_block(carry, ys):
      dk_t, dv_t, dq = carry
      i, q_block, q_block_t, do_block, do_block_t, lse_block, dot_block = ys
      p = jnp.exp(_scores(q_block, k_block, key_bias) - lse_block[..., None])
      dv_t = dv_t + jnp.einsum("bhdq,bhqk->bhdk", do_block_t, p)
      dp = jnp.einsum("bhqd,bhkd->bhqk", do_block, v_block, preferred_element_type=jnp.float32)
      ds = p * (dp - dot_block[..., None])
      dk_t = dk_t + jnp.einsum("bhdq,bhqk->bhdk", q_block_t, ds, preferred_element_type=jnp.float32)
      dq = dq.at[i].add(jnp.einsum("bhqk,bhkd->bhqd", ds, k_block, preferred_element_type=jnp.float32))
      return (dk_t, dv_t, dq), None

    zeros = jnp.zeros(jnp.swapaxes(k_block, -1, -2).shape, jnp.float32)
    (dk_t, dv_t, dq), _ = lax.scan(query_block, (zeros, zeros, dq),
                                   (jnp.arange(blocked.count_q), blocked.q, qb_t, dob, dob_t, lse, row_dot))
    return dq, (dk_t, dv_t)

  dq, (dk_t, dv_t) = lax.scan(key_block, jnp.zeros(blocked.q.shape, jnp.float32),
                              (blocked.k, blocked.v, blocked.bias))
  dq = _unblock(dq * blocked.scale, q.shape[1], blocked.groups).astype(q.dtype)
  dk, dv = (_unblock(jnp.swapaxes(x, -1, -2), k.shape[1]).astype(k.dtype) for x in (dk_t, dv_t))
  return dq, dk, dv, None


_blocked.defvjp(_blocked_forward, _blocked_backward)


def blocked_attention(q, k, v, kv_mask=None):
  """Attention over blocks with an online softmax and its own backward (see the module doc)."""
  return _blocked(q, k, v, kv_mask)
