r"""Times forward + backward of each task head, with our sub-pixel deconv and with XLA's own
transposed conv (what `nn.ConvTranspose` lowers to); prints one JSON line per head and form.

  python benchmarks/heads.py [--batch=16] [--grid=8,6] [--channels=64] [--steps=5]

The default is the head of `configs/synthetic.py` with `model.size=tiny` (128x96 input: an 8x6
token grid, 64 channels). The two forms compute the same function (tests/tasks/test_heads.py).
"""
import json
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from sapiens_jax import tasks
from sapiens_jax.tasks import heads

_BATCH = flags.DEFINE_integer("batch", 16, "Feature maps per step.")
_GRID = flags.DEFINE_list("grid", ["8", "6"], "Token grid h,w the head upsamples.")
_CHANNELS = flags.DEFINE_integer("channels", 64, "Encoder width = head width.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps; the median is printed.")


def xla_conv_transpose(x, kernel):
  return jax.lax.conv_transpose(x, kernel.astype(x.dtype), (2, 2), ((2, 2), (2, 2)),
                                dimension_numbers=("NHWC", "HWIO", "NHWC"), transpose_kernel=True)


def time_head(head, features):
  params = head.init(jax.random.PRNGKey(0), features)
  grad = jax.jit(jax.grad(lambda p: jnp.sum(jnp.square(head.apply(p, features)))))
  jax.block_until_ready(grad(params))  # compile
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    jax.block_until_ready(grad(params))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  c = _CHANNELS.value
  h, w = (int(s) for s in _GRID.value)
  features = jax.random.normal(jax.random.PRNGKey(1), (_BATCH.value, h, w, c))
  makers = {"pose": lambda: tasks.pose.head(17, c), "seg": lambda: tasks.seg.head(28, c),
            "depth": lambda: tasks.depth.head(c)}
  ours = heads.deconv4x4_stride2
  for name, make in makers.items():
    row = {"head": name, "input": [_BATCH.value, h, w, c], "device": jax.devices()[0].device_kind}
    for form, deconv in (("sub_pixel", ours), ("xla_conv_transpose", xla_conv_transpose)):
      heads.deconv4x4_stride2 = deconv  # the Deconv module looks it up at trace time
      row[f"{form}_s"] = round(time_head(make(), features), 4)
    heads.deconv4x4_stride2 = ours
    row["speedup"] = round(row["xla_conv_transpose_s"] / row["sub_pixel_s"], 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  app.run(main)
