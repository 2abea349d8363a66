"""The Pallas splash-attention kernel (TPU) behind models.attention's "splash".

Splash wants per-example (heads, length, head dim) arrays with lengths a multiple of its block and
head dims of 128 (models.attention pads those before calling here): sequences are padded to a
multiple of BLOCK and the padding keys, like keys the caller masks, get another segment id than
every query, so no query attends to them. Grouped-query attention runs as one multi-query kernel
per kv head. INTERPRET runs the kernel in Pallas' interpreter, on any backend: the tests check
it against the plain formula on CPU that way.
"""
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

BLOCK = 128
INTERPRET = False


def _kernel(num_heads, q_length, kv_length, multi_query):
  mask = masks.MultiHeadMask([masks.FullMask((q_length, kv_length))] * num_heads)
  sizes = kernels.BlockSizes(block_q=BLOCK, block_kv=BLOCK, block_kv_compute=BLOCK, block_q_dkv=BLOCK,
                             block_kv_dkv=BLOCK, block_kv_dkv_compute=BLOCK, block_q_dq=BLOCK, block_kv_dq=BLOCK)
  make = kernels.make_splash_mqa if multi_query else kernels.make_splash_mha
  return make(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=INTERPRET)


def attention(q, k, v, kv_mask, scale):
  """q (B, Tq, H, D), k and v (B, Tk, Hkv, D), D a multiple of 128 -> (B, Tq, H, D)."""
  b, tq, h, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  pad_q, pad_k = -tq % BLOCK, -tk % BLOCK
  keep = jnp.ones((b, tk), bool) if kv_mask is None else kv_mask
  kv_segments = jnp.pad(jnp.where(keep, 0, 1), ((0, 0), (0, pad_k)), constant_values=1).astype(jnp.int32)
  q_segments = jnp.zeros((b, tq + pad_q), jnp.int32)
  # (B, T, H, D) -> (B, Hkv, G, T, D): one multi-query kernel per kv head over its G query heads.
  q = jnp.pad(q * jnp.asarray(scale, q.dtype), ((0, 0), (0, pad_q), (0, 0), (0, 0)))
  q = q.reshape(b, tq + pad_q, hkv, h // hkv, d).transpose(0, 2, 3, 1, 4)
  k, v = (jnp.pad(x, ((0, 0), (0, pad_k), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for x in (k, v))
  kernel = _kernel(h // hkv, tq + pad_q, tk + pad_k, multi_query=True)

  def one_example(q, k, v, q_seg, kv_seg):
    segments = kernels.SegmentIds(q=q_seg, kv=kv_seg)
    return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=segments))(q, k, v)

  out = jax.vmap(one_example)(q, k, v, q_segments, kv_segments)  # (B, Hkv, G, T, D)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, tq + pad_q, h, d)[:, :tq]
