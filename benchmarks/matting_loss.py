r"""Times forward + backward of the matting loss (losses.sapiens2_matting_loss: L1, Sobel gradient and
5-level Laplacian pyramid on alpha and foreground), with the pyramid's 5x5 binomial blur as two 1-D
passes of shifted sums (ours) and as one depthwise convolution (`lax.conv_general_dilated` with
feature_group_count = C, the form it replaced), and the same loss in PyTorch eager (grouped conv2d blur, as
upstream's loss computes it; one thread); prints one JSON line per input size.

  taskset -c 0 python benchmarks/matting_loss.py [--sizes=16x128x96,1x1024x768] [--steps=5]

16x128x96 is a step of configs/synthetic.py:matting; 1x1024x768 one image of the released recipe's input.
The two forms compute the same blur (tests/tasks/test_losses_sapiens2.py checks the loss against numpy).
"""
import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

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


def inputs(b, h, w):
  rng = np.random.default_rng(0)
  return (rng.uniform(size=(b, h, w, 4)).astype(np.float32), rng.uniform(size=(b, h, w)).astype(np.float32),
          rng.uniform(size=(b, h, w, 3)).astype(np.float32))


def jax_loss(pred, alpha, foreground):
  mask = jnp.ones(alpha.shape, bool)
  return sum(losses.sapiens2_matting_loss(pred, alpha, foreground, mask).values())


def time_jax(b, h, w):
  pred, alpha, foreground = (jnp.asarray(x) for x in inputs(b, h, w))
  grad = jax.jit(jax.grad(lambda p: jax_loss(p, alpha, foreground)))
  return timing.time_calls(lambda: jax.block_until_ready(grad(pred)), _STEPS.value, warmup=1)[0]


# PyTorch, NCHW, every pixel supervised (the benchmark's mask is all ones).
def torch_blur(x):
  k = torch.tensor(losses._GAUSS_1D)  # pylint: disable=protected-access
  kernel = torch.outer(k, k).expand(x.shape[1], 1, 5, 5)
  return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=x.shape[1])


def torch_laplacian(p, g, levels=5):
  total = 0.0
  for level in range(levels):
    if level < levels - 1:
      pairs = []
      for x in (p, g):
        x = x[:, :, :x.shape[2] // 2 * 2, :x.shape[3] // 2 * 2]
        down = torch_blur(x)[:, :, ::2, ::2]
        up = torch.zeros_like(x)
        up[:, :, ::2, ::2] = 4 * down
        pairs.append((x - torch_blur(up), down))
      (lp, p), (lg, g) = pairs
    else:
      lp, lg = p, g
    total = total + 2 ** level * (lp - lg).abs().mean()
  return total / levels


def torch_sobel(x):
  gx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
  kernel = torch.stack([gx, gx.T]).unsqueeze(1).repeat(x.shape[1], 1, 1, 1)
  g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), kernel, groups=x.shape[1])
  return torch.sqrt(g[:, 0::2] ** 2 + g[:, 1::2] ** 2 + 1e-6)


def torch_loss(pred, alpha, foreground):
  total = 0.0
  for p, g in ((pred[:, 3:], alpha[:, None]), (pred[:, :3], foreground)):
    total = total + (p - g).abs().mean() + (torch_sobel(p) - torch_sobel(g)).abs().mean() + torch_laplacian(p, g)
  return total


def time_torch(b, h, w):
  pred, alpha, foreground = inputs(b, h, w)
  pred = torch.tensor(pred).permute(0, 3, 1, 2).contiguous().requires_grad_()
  alpha, foreground = torch.tensor(alpha), torch.tensor(foreground).permute(0, 3, 1, 2).contiguous()

  def step():
    pred.grad = None
    torch_loss(pred, alpha, foreground).backward()
  return timing.time_calls(step, _STEPS.value, warmup=1)[0]


def check_same_loss():
  """The PyTorch loss above is the same function as ours (else its timing would not compare)."""
  pred, alpha, foreground = inputs(2, 64, 48)
  ours = float(jax_loss(jnp.asarray(pred), jnp.asarray(alpha), jnp.asarray(foreground)))
  theirs = float(torch_loss(torch.tensor(pred).permute(0, 3, 1, 2), torch.tensor(alpha),
                            torch.tensor(foreground).permute(0, 3, 1, 2)))
  if abs(ours - theirs) > 1e-4 * abs(ours):
    raise AssertionError(f"the PyTorch loss {theirs} differs from ours {ours}")


def main(argv):
  del argv
  torch.set_num_threads(1)
  check_same_loss()
  ours = losses._gauss_blur  # pylint: disable=protected-access
  for size in _SIZES.value:
    b, h, w = (int(s) for s in size.split("x"))
    row = {"input": [b, h, w, 4], "device": jax.devices()[0].device_kind, "cpu": timing.cpu_model()}
    for form, blur in (("shifted_sums", ours), ("depthwise_conv", depthwise_blur)):
      losses._gauss_blur = blur  # pylint: disable=protected-access  # looked up at trace time
      row[f"{form}_s"] = round(time_jax(b, h, w), 4)
    losses._gauss_blur = ours  # pylint: disable=protected-access
    row["torch_eager_s"] = round(time_torch(b, h, w), 4)
    row["speedup"] = round(row["depthwise_conv_s"] / row["shifted_sums_s"], 2)
    row["vs_torch"] = round(row["torch_eager_s"] / row["shifted_sums_s"], 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  app.run(main)
