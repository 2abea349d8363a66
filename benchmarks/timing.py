"""Timing helpers shared by the benchmark scripts (each script runs with benchmarks/ on sys.path)."""
import platform
import statistics
import time


def first_call_s(fn):
  """Seconds of one call of fn() (the first one compiles); fn must wait for its result."""
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def time_calls(fn, steps, warmup):
  """(median s, min s, process CPU s per call) of `steps` calls of fn() after `warmup` untimed ones;
  fn must wait for its result (jax.block_until_ready).

  CPU time (all threads, user + sys) is the number to trust on a shared machine: other processes
  stretch wall time but not the CPU seconds this one spends.
  """
  for _ in range(warmup):
    fn()
  times = []
  cpu0 = time.process_time()
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), min(times), (time.process_time() - cpu0) / steps


def jax_matmul_flops(n=2048, repeats=10):
  """FLOP/s of the best of `repeats` float32 n x n jnp.dot matmuls on the default device: this
  machine's practical matmul peak."""
  import jax  # pylint: disable=g-import-not-at-top
  a, b = jax.random.normal(jax.random.key(0), (2, n, n), jax.numpy.float32)
  dot = jax.jit(jax.numpy.dot)
  return 2 * n ** 3 / time_calls(lambda: jax.block_until_ready(dot(a, b)), repeats, warmup=1)[1]


def cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()
