"""Per-example PRNG keys: an example's randomness (its MAE mask, its dropout) depends only on the
step's key and its row in the global batch, never on how the batch is split over devices,
processes or gradient-accumulation micro-batches."""
import jax
import jax.numpy as jnp


def example_keys(key, batch):
  """(batch,) keys: row i gets fold_in(key, i)."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))
