"""Device mesh and logical-axis rules: where the model's named axes live on the devices.

Models name their axes ("embed", "mlp", "heads", "act_batch", ...); `config.mesh` sizes the
physical axes (data, fsdp, tensor; one may be -1 = the rest) and `config.sharding_rules` maps
names to mesh axes. With the default mesh (all devices on `data`) this is plain data parallelism.
"""
import flax.linen as nn
import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),  # the fewer key/value heads of grouped-query attention
    ("act_kv", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("layers", None),  # the stacked-layers axis of scanned blocks
)


def mesh_shape(mesh_config, num_devices):
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"{num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_config, devices=None):
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules(config):
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.sharding_rules)


def batch_sharding(mesh, rules_):
  """Batch dimension over the mesh axes that 'act_batch' maps to; everything else replicated."""
  spec = nn.logical_to_mesh_axes(("act_batch",), rules_)
  return jax.sharding.NamedSharding(mesh, spec)


FSDP_MIN_BYTES = 1 << 20


def batch_shards(mesh, rules_):
  """Into how many pieces the batch dimension is split."""
  axes = batch_sharding(mesh, rules_).spec[0] or ()
  axes = (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[a] for a in axes]))


def tree_shardings(abstract_boxed_tree, mesh, rules_):
  """NamedShardings for a tree whose leaves carry logical names (LogicallyPartitioned boxes).

  A dimension the rules would split over more devices than it divides into stays whole (e.g. 8
  kv heads on a tensor axis of 16). A leaf of >= 1 MiB that the rules leave fully replicated (e.g.
  the stacked biases of scanned layers) is split over `fsdp` along its largest divisible
  dimension, so FSDP really shards every large tensor.
  """
  specs = nn.get_partition_spec(abstract_boxed_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules_)
  values = jax.tree.map(lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x,
                        abstract_boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  return jax.tree.map(lambda leaf, s: _fsdp_fallback(leaf, _divisible(leaf, s, mesh), mesh), values, shardings)


def _divisible(leaf, named_sharding, mesh):
  spec = list(named_sharding.spec) + [None] * (len(leaf.shape) - len(named_sharding.spec))
  for dim, axes in enumerate(spec):
    names = (axes,) if isinstance(axes, str) else axes or ()
    if leaf.shape[dim] % int(np.prod([mesh.shape[a] for a in names])):
      spec[dim] = None
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def _fsdp_fallback(leaf, named_sharding, mesh):
  fsdp = mesh.shape["fsdp"]
  nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  if fsdp == 1 or nbytes < FSDP_MIN_BYTES or not named_sharding.is_fully_replicated:
    return named_sharding
  divisible = [d for d in range(len(leaf.shape)) if leaf.shape[d] % fsdp == 0]
  if not divisible:
    return named_sharding
  dim = max(divisible, key=lambda d: leaf.shape[d])
  spec = [None] * len(leaf.shape)
  spec[dim] = "fsdp"
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def bytes_per_device(abstract_tree, shardings):
  """Bytes one device holds for a tree of ShapeDtypeStructs laid out with `shardings`."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    shard = sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
  return total


def abstract_arrays(abstract_boxed_tree, shardings):
  """ShapeDtypeStructs carrying their target shardings, from an eval_shape'd boxed tree."""
  unboxed = jax.tree.map(lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x,
                         abstract_boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), unboxed, shardings)
