r"""Times attention forward and forward + backward at the MAE decoder's size, for each path; JSON lines.

  taskset -c 0 python benchmarks/attention.py [--shape=1,4097,16,32] [--paths=blocked,xla,torch] [--repeats=3]

Shape is (batch, tokens, heads, head dim); the MAE decoder at 1024x1024 is 1, 4097, 16, 32 and a
0.3b fine-tune at 1024x768 is 1, 3072, 16, 64. "torch" is F.scaled_dot_product_attention (one
thread: --threads). Each number is the best of --repeats calls after a compiling one.
"""
import json

from absl import app
from absl import flags
import jax
import numpy as np

from sapiens_jax.models import attention
import timing  # pylint: disable=g-bad-import-order  (benchmarks/timing.py)

_SHAPE = flags.DEFINE_list("shape", ["1", "4097", "16", "32"], "batch, tokens, heads, head dim")
_PATHS = flags.DEFINE_list("paths", ["blocked", "xla", "torch"], "Attention paths to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls; the best is reported.")
_THREADS = flags.DEFINE_integer("threads", 1, "torch.set_num_threads.")


def best_time(fn, repeats):
  """The fastest of `repeats` calls after an untimed (compiling) one."""
  return timing.time_calls(fn, repeats, warmup=1)[1]


def time_jax(path, q, k, v, d_out, repeats):
  attend = lambda q, k, v: attention.attention(q, k, v, path)
  forward = jax.jit(attend)

  @jax.jit
  def forward_backward(q, k, v):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(d_out)
  return (best_time(lambda: jax.block_until_ready(forward(q, k, v)), repeats),
          best_time(lambda: jax.block_until_ready(forward_backward(q, k, v)), repeats))


def time_torch(q, k, v, d_out, repeats, threads):
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  as_torch = lambda x: torch.from_numpy(np.array(x)).permute(0, 2, 1, 3).contiguous()
  q, k, v, d_out = (as_torch(x) for x in (q, k, v, d_out))
  for x in (q, k, v):
    x.requires_grad_(True)

  def forward():
    with torch.no_grad():
      torch.nn.functional.scaled_dot_product_attention(q, k, v)

  def forward_backward():
    torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(d_out)
  return best_time(forward, repeats), best_time(forward_backward, repeats)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  shape = tuple(int(s) for s in _SHAPE.value)
  rng = np.random.default_rng(0)
  q, k, v, d_out = (jax.numpy.asarray(rng.standard_normal(shape), jax.numpy.float32) for _ in range(4))
  for path in _PATHS.value:
    if path == "torch":
      forward, both = time_torch(q, k, v, d_out, _REPEATS.value, _THREADS.value)
    else:
      forward, both = time_jax(path, q, k, v, d_out, _REPEATS.value)
    print(json.dumps({"path": path, "shape": shape, "forward_s": forward, "forward_backward_s": both}), flush=True)


if __name__ == "__main__":
  app.run(main)
