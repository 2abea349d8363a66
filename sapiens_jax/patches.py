"""Image <-> patch-token conversion shared by the MAE model, its loss and the visualiser.

Tokens are row-major over the (H/p, W/p) grid; each token is its patch flattened in
(row-in-patch, col-in-patch, channel) order. Works on numpy and jax arrays alike.
"""
import einops


def patchify(images, patch_size):
  """(B, H, W, C) -> (B, H/p * W/p, p*p*C)."""
  return einops.rearrange(
      images, "b (h p) (w q) c -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(patches, patch_size, grid_hw):
  """Inverse of `patchify`; `grid_hw` = (H/p, W/p) since N alone is ambiguous."""
  grid_h, grid_w = grid_hw
  return einops.rearrange(
      patches, "b (h w) (p q c) -> b (h p) (w q) c",
      h=grid_h, w=grid_w, p=patch_size, q=patch_size)
