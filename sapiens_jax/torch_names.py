"""Our parameter trees <-> PyTorch state dicts under the original key names, both ways, bit for bit.

A model's parameters come in groups (`encoder`, `decoder`, `head`); each group is a `Part`: its
key prefix in the state dict and a function listing its entries (path in our tree, PyTorch key,
layout). The backbone family, the objective and the task each name their own group's entries,
next to the modules they name; this file only applies them. Both directions read the same
entries, so export and import cannot drift apart, and every parameter must be named and every
key consumed: a parameter added without an entry is an error, not a silently dropped weight.

Layouts (sapiens_v1.md §2): Linear weights are (out, in), convolutions (out, in, kh, kw), the
fused qkv / proj weights plain (3C, C) / (C, C) matrices whose rows or columns run over heads
contiguously. Scanned blocks (one subtree stacked on a leading depth axis) are written as the
separate `name_{i}` blocks they stand for. Import reshapes to the target model's own shapes, so
it needs no head counts.
"""
import re
from typing import Callable, NamedTuple

import jax
import numpy as np

# The parts of the checkpoints besides the backbone: mmpretrain's MAE neck, mmpose's head and
# mmseg's decode head (upstream's); the self-distillation run's projection and DINO head (ours).
PART_PREFIXES = ("neck.", "head.", "decode_head.", "dense_proj.", "dino_head.")

# layout: (ours -> torch, torch -> ours of the given shape). Pure transposes and reshapes.
LAYOUTS = {
    "same": (lambda x: x, lambda t, shape: t),
    "reshape": (lambda x: x.reshape(-1), lambda t, shape: t.reshape(shape)),
    # Dense kernel (in, out) <-> Linear weight (out, in).
    "linear": (lambda k: k.T, lambda w, shape: w.T),
    # Conv kernel (kh, kw, in, out) <-> Conv2d weight (out, in, kh, kw).
    "conv": (lambda k: k.transpose(3, 2, 0, 1), lambda w, shape: w.transpose(2, 3, 1, 0)),
    # Kernel (in, *out) <-> Linear weight (prod(out), in): e.g. qkv (C, 3, heads, hd) <-> (3C, C) with
    # output rows q|k|v, each heads x hd; SwiGLU's w12 (C, 2, F) <-> (2F, C).
    "split_out": (lambda k: k.reshape(k.shape[0], -1).T, lambda w, shape: w.T.reshape(shape)),
    # Kernel (*in, out) <-> Linear weight (out, prod(in)): e.g. proj (heads, hd, C) <-> (C, C).
    "split_in": (lambda k: k.reshape(-1, k.shape[-1]).T, lambda w, shape: w.T.reshape(shape)),
}


class Part(NamedTuple):
  """One parameter group of a model and where it lives in a PyTorch state dict."""
  group: str  # key in the params tree
  prefix: str  # of its PyTorch keys
  entries: Callable  # unscanned group params -> [(path tuple, key without prefix, layout)]
  # nn.scan subtree(s) of blocks, if any: a name, or a tuple of consecutive segments (written as
  # `first_name_{i}`, numbered on across them)
  scanned: str | tuple = ""
  # init_from: a file without this part (or, with fresh_if_misfit, with one of other shapes)
  # leaves it freshly initialised, with a warning, instead of failing.
  fresh_if_absent: bool = False
  fresh_if_misfit: bool = False


def norm_entries(ours, theirs):
  return [((*ours, "scale"), f"{theirs}.weight", "same"), ((*ours, "bias"), f"{theirs}.bias", "same")]


def dense_entries(ours, theirs):
  return [((*ours, "kernel"), f"{theirs}.weight", "linear"), ((*ours, "bias"), f"{theirs}.bias", "same")]


def stand_ins(tree):
  """Shape-only stand-ins for a (possibly abstract) tree: arrays of a zero-byte dtype, which can
  be sliced and mapped at no memory cost, even for a 2B model."""
  return jax.tree.map(lambda a: np.empty(a.shape, np.dtype([])), tree)


def flatten(tree, path=()):
  if not isinstance(tree, dict):
    return {path: tree}
  out = {}
  for k, v in tree.items():
    out.update(flatten(v, (*path, k)))
  return out


def nest(flat):
  tree = {}
  for path, leaf in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = leaf
  return tree


def segments(scanned):
  """The nn.scan subtrees a Part names: one name, or a tuple of consecutive segments (blocks of
  different shapes, e.g. full and grouped-query attention, scan separately)."""
  return (scanned,) if isinstance(scanned, str) else tuple(scanned)


def unscan(tree, scanned):
  """Scanned blocks (subtrees `scanned`, every leaf stacked on axis 0) -> `name_0`, `name_1`, ...,
  numbered on across the segments after the first segment's name."""
  names = [n for n in segments(scanned) if n and n in tree]
  if not names:
    return tree
  out = {k: v for k, v in tree.items() if k not in names}
  base, count = segments(scanned)[0], 0
  for name in names:
    stacked = flatten(tree[name])
    for i in range(len(next(iter(stacked.values())))):
      out[f"{base}_{count}"] = nest({path: leaf[i] for path, leaf in stacked.items()})
      count += 1
  return out


def rescan(tree, scanned, target):
  """The inverse of `unscan`: `name_0` ... `name_{n-1}` -> the segments of `target` (a tree with the
  scanned subtrees), each stacked on axis 0 with as many blocks as the target's."""
  base, count = segments(scanned)[0], 0
  for name in segments(scanned):
    if name not in target:
      continue
    length = len(next(iter(flatten(target[name]).values())))
    blocks = [flatten(tree.pop(f"{base}_{count + i}")) for i in range(length)]
    tree[name] = nest({path: np.stack([b[path] for b in blocks]) for path in blocks[0]})
    count += length
  return tree


def to_torch(params, parts):
  """Our params -> flat {PyTorch key: numpy array} (dtype kept), the groups of `parts` in order."""
  out = {}
  for part in parts:
    tree = unscan(params[part.group], part.scanned)
    entries = part.entries(tree)
    flat = flatten(tree)
    unmapped = sorted("/".join(p) for p in set(flat) - {path for path, _, _ in entries})
    if unmapped:
      raise ValueError(f"{part.group} parameters with no PyTorch name: {unmapped}")
    out.update({part.prefix + key: np.ascontiguousarray(LAYOUTS[layout][0](np.asarray(flat[path])))
                for path, key, layout in entries})
  return out


def from_torch(state_dict, target, parts):
  """Flat {PyTorch key: array} -> params shaped like `target` (arrays or abstract), for the groups
  of `parts`: the inverse of `to_torch`, bit for bit. Values may be numpy arrays or anything
  `np.asarray` reads. A missing key, or a key of these parts that maps to nothing, is an error."""
  params, used = {}, set()
  for part in parts:
    tree = unscan(stand_ins(target[part.group]), part.scanned)
    flat = flatten(tree)
    entries = part.entries(tree)
    missing = [part.prefix + key for _, key, _ in entries if part.prefix + key not in state_dict]
    if missing:
      raise KeyError(f"state dict lacks {len(missing)} {part.group} keys: {missing[:8]}")
    group = nest({path: np.ascontiguousarray(LAYOUTS[layout][1](
        np.asarray(state_dict[part.prefix + key]), flat[path].shape)) for path, key, layout in entries})
    params[part.group] = rescan(group, part.scanned, target[part.group])
    used |= {part.prefix + key for _, key, _ in entries}
  unexpected = sorted(set(state_dict) - used)
  if unexpected:
    raise KeyError(f"state dict has {len(unexpected)} keys with no parameter: {unexpected[:8]}")
  return params


def count_blocks(keys, pattern):
  """Number of blocks: 1 + the largest index captured by regex `pattern` among `keys` (0 if none)."""
  found = [int(m.group(1)) for m in map(re.compile(pattern).fullmatch, keys) if m]
  return max(found) + 1 if found else 0
