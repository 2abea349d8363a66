r"""Times forward + backward of the matting loss (losses.sapiens2_matting_loss: L1, Sobel gradient and
5-level Laplacian pyramid on alpha and foreground), with the pyramid's 5x5 binomial blur as two 1-D
passes of shifted sums (ours) and as one depthwise convolution (`lax.conv_general_dilated` with
feature_group_count = C, the form it replaced); prints one JSON line per input size.

  python benchmarks/matting_loss.py [--sizes=16x128x96,1x1024x768] [--steps=5]

16x128x96 is a step of configs/synthetic.py:matting; 1x1024x768 one image of the released recipe's input.
The two forms compute the same blur (tests/tasks/test_losses_sapiens2.py checks the loss against torch).
"""
import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from sapiens_jax import losses
import timing  # pylint: disable=g-bad-import-order  # benchmarks/timing.py

_SIZES = flags.DEFINE_list("sizes", ["16x128x96", "1x1024x768"], "batch x height x width of each timing.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps; the median is printed.")


def depthwise_blur(x):
  kernel = jnp.outer(jnp.asarray(losses._GAUSS_1D), jnp.asarray(losses._GAUSS_1D))  # pylint: disable=protected-access
  c = x.shape[-1]
  kernel = jnp.broadcast_to(kernel[:, :, None, None], (5, 5, 1, c)).astype(x.dtype)
  padded = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
  return jax.lax.conv_general_dilated(padded, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=c, precision=jax.lax.Precision.HIGHEST)


def time_loss(b, h, w):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  pred = jax.random.uniform(keys[0], (b, h, w, 4))
  alpha, foreground = jax.random.uniform(keys[1], (b, h, w)), jax.random.uniform(keys[2], (b, h, w, 3))
  mask = jnp.ones((b, h, w), bool)
  grad = jax.jit(jax.grad(lambda p: sum(losses.sapiens2_matting_loss(p, alpha, foreground, mask).values())))
  return timing.time_calls(lambda: jax.block_until_ready(grad(pred)), _STEPS.value, warmup=1)[0]


def main(argv):
  del argv
  ours = losses._gauss_blur  # pylint: disable=protected-access
  for size in _SIZES.value:
    b, h, w = (int(s) for s in size.split("x"))
    row = {"input": [b, h, w, 4], "device": jax.devices()[0].device_kind, "cpu": timing.cpu_model()}
    for form, blur in (("shifted_sums", ours), ("depthwise_conv", depthwise_blur)):
      losses._gauss_blur = blur  # pylint: disable=protected-access  # looked up at trace time
      row[f"{form}_s"] = round(time_loss(b, h, w), 4)
    losses._gauss_blur = ours  # pylint: disable=protected-access
    row["speedup"] = round(row["depthwise_conv_s"] / row["shifted_sums_s"], 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  app.run(main)
