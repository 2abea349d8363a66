"""The one mapping between our parameter tree and the original Sapiens PyTorch state-dict keys.

Both directions read the same table, so export and import cannot drift apart: `to_torch` turns
`{"encoder": ..., "decoder": ...}` into `{"layers.0.attn.qkv.weight": array, ...}` and `from_torch`
undoes it bit for bit. Layouts (reference §2): Linear weights are (out, in), the patch conv is
(C, 3, p, p), and the fused qkv / proj weights are plain (3C, C) / (C, C) matrices whose rows or
columns run over heads contiguously. Scanned blocks (`config.model.scan_layers`: one subtree with
a leading depth axis) are written as the separate `layers.{i}` they stand for. Every parameter
must be mapped and every key consumed, so a parameter added to the model without an entry here
is an error, not a silently dropped weight.

Task heads (`head.*` for pose, `decode_head.*` for seg/depth/normal) have their own pair,
`head_to_torch` / `head_from_torch`, over the same layouts.
"""
import re

import numpy as np

NECK_PREFIX = "neck."  # the MAE decoder's keys in the original full MAE state dict
HEAD_PREFIXES = ("head.", "decode_head.")  # task heads: mmpose's and mmseg's

# layout: (ours -> torch, torch -> ours given the number of heads). Pure transposes and reshapes,
# so a roundtrip is exact.
_LAYOUTS = {
    "same": (lambda x: x, lambda t, heads: t),
    # Dense kernel (in, out) <-> Linear weight (out, in).
    "linear": (lambda k: k.T, lambda w, heads: w.T),
    # Conv kernel (kh, kw, in, out) <-> Conv2d weight (out, in, kh, kw).
    "conv": (lambda k: k.transpose(3, 2, 0, 1), lambda w, heads: w.transpose(2, 3, 1, 0)),
    # (C, 3, heads, hd) <-> (3C, C): output rows q|k|v, each heads x hd.
    "qkv_kernel": (lambda k: k.reshape(k.shape[0], -1).T,
                   lambda w, heads: w.T.reshape(w.shape[1], 3, heads, -1)),
    "qkv_bias": (lambda b: b.reshape(-1), lambda b, heads: b.reshape(3, heads, -1)),
    # (heads, hd, C) <-> (C, C): input columns heads x hd.
    "proj_kernel": (lambda k: k.reshape(-1, k.shape[-1]).T,
                    lambda w, heads: w.T.reshape(heads, -1, w.shape[0])),
}


def _norm(ours, theirs):
  return [((*ours, "scale"), f"{theirs}.weight", "same"), ((*ours, "bias"), f"{theirs}.bias", "same")]


def _dense(ours, theirs):
  return [((*ours, "kernel"), f"{theirs}.weight", "linear"), ((*ours, "bias"), f"{theirs}.bias", "same")]


def _block_entries(ours, theirs):
  """One pre-norm transformer block; `ours`/`theirs` are its name in each tree."""
  entries = _norm((ours, "ln1"), f"{theirs}.ln1") + _norm((ours, "ln2"), f"{theirs}.ln2")
  entries += [((ours, "attn", name), f"{theirs}.attn.{key}", layout) for name, key, layout in (
      ("qkv_kernel", "qkv.weight", "qkv_kernel"), ("qkv_bias", "qkv.bias", "qkv_bias"),
      ("proj_kernel", "proj.weight", "proj_kernel"), ("proj_bias", "proj.bias", "same"))]
  entries += _dense((ours, "ffn", "fc1"), f"{theirs}.ffn.layers.0.0")
  entries += _dense((ours, "ffn", "fc2"), f"{theirs}.ffn.layers.1")
  return entries


def _backbone_entries(depth, cls_token):
  """(path in params["encoder"], torch key without prefix, layout) for the ViT."""
  entries = [(("patch_embed", "kernel"), "patch_embed.projection.weight", "conv"),
             (("patch_embed", "bias"), "patch_embed.projection.bias", "same"),
             (("pos_embed",), "pos_embed", "same")]
  if cls_token:
    entries.append((("cls_token",), "cls_token", "same"))
  for i in range(depth):
    entries += _block_entries(f"layers_{i}", f"layers.{i}")
  return entries + _norm(("ln1",), "ln1")


def _neck_entries(depth):
  """(path in params["decoder"], torch key without `neck.`, layout) for the MAE decoder."""
  entries = _dense(("decoder_embed",), "decoder_embed")
  entries += [(("mask_token",), "mask_token", "same"), (("decoder_pos_embed",), "decoder_pos_embed", "same")]
  for j in range(depth):
    entries += _block_entries(f"decoder_blocks_{j}", f"decoder_blocks.{j}")
  return entries + _norm(("ln1",), "ln1") + _dense(("decoder_pred",), "decoder_pred")


def _count(names, pattern):
  """Number of blocks: 1 + the largest index captured by `pattern` among `names` (0 if none)."""
  found = [int(m.group(1)) for m in map(re.compile(pattern).fullmatch, names) if m]
  return max(found) + 1 if found else 0


def _unscan(tree, name):
  """Scanned blocks (subtree `name`, every leaf stacked on axis 0) -> `name_0`, `name_1`, ..."""
  if name not in tree:
    return tree
  stacked = _flat(tree[name])
  out = {k: v for k, v in tree.items() if k != name}
  for i in range(len(next(iter(stacked.values())))):
    out[f"{name}_{i}"] = _nest({path: leaf[i] for path, leaf in stacked.items()})
  return out


def _scan(tree, name, depth):
  """The inverse of `_unscan`: `name_0` ... `name_{depth-1}` -> one subtree `name` stacked on axis 0."""
  if not depth:
    return tree
  blocks = [_flat(tree.pop(f"{name}_{i}")) for i in range(depth)]
  tree[name] = _nest({path: np.stack([b[path] for b in blocks]) for path in blocks[0]})
  return tree


def _nest(flat):
  tree = {}
  for path, leaf in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = leaf
  return tree


def _flat(tree, path=()):
  if not isinstance(tree, dict):
    return {path: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, (*path, k)))
  return out


def _export(entries, tree, prefix, what):
  flat = _flat(tree)
  unmapped = sorted("/".join(p) for p in set(flat) - {path for path, _, _ in entries})
  if unmapped:
    raise ValueError(f"{what} parameters with no PyTorch name in torch_names: {unmapped}")
  return {prefix + key: np.ascontiguousarray(_LAYOUTS[layout][0](np.asarray(flat[path])))
          for path, key, layout in entries}


def head_prefix(head_params):
  """The head's key prefix in the original task checkpoints: mmpose's `head.` (pose, whose last
  layer is `final_layer`) or mmseg's `decode_head.` (seg, depth, normal: `conv_seg`)."""
  return "head." if "final_layer" in head_params else "decode_head."


def to_torch(params, prefix="", include_decoder=True):
  """Our params -> flat {original Sapiens key: numpy array} (dtype kept).

  Encoder keys get `prefix` ("" as in the released `_clean` pretrain files, "backbone." as inside
  full MAE and task checkpoints); the decoder, if present and wanted, gets `neck.`; a task head
  gets `head.` or `decode_head.` (see `head_prefix`).
  """
  unknown = sorted(set(params) - {"encoder", "decoder", "head"})
  if unknown:
    raise ValueError(f"parameter groups {unknown} have no PyTorch names; expected encoder, decoder, head")
  encoder = _unscan(params["encoder"], "layers")
  out = _export(_backbone_entries(_count(encoder, r"layers_(\d+)"), "cls_token" in encoder),
                encoder, prefix, "encoder")
  if include_decoder and "decoder" in params:
    decoder = _unscan(params["decoder"], "decoder_blocks")
    out.update(_export(_neck_entries(_count(decoder, r"decoder_blocks_(\d+)")), decoder, NECK_PREFIX, "decoder"))
  if "head" in params:
    out.update(head_to_torch(params["head"], head_prefix(params["head"])))
  return out


def _import(entries, state_dict, prefix, heads):
  missing = [prefix + key for _, key, _ in entries if prefix + key not in state_dict]
  if missing:
    raise KeyError(f"state dict lacks {len(missing)} expected keys: {missing[:8]}")
  tree = _nest({path: np.ascontiguousarray(_LAYOUTS[layout][1](np.asarray(state_dict[prefix + key]), heads))
                for path, key, layout in entries})
  return tree, {prefix + key for _, key, _ in entries}


def from_torch(state_dict, num_heads, decoder_heads=None, prefix="", scan_layers=False):
  """Flat {Sapiens key: array} -> our params (the inverse of `to_torch`, bit for bit).

  Values may be numpy arrays or anything `np.asarray` reads (e.g. float32 CPU torch tensors).
  The head counts are not recoverable from the weights, hence arguments. `neck.*` keys, if any,
  become params["decoder"] and need `decoder_heads`; `head.*` / `decode_head.*` keys become
  params["head"]. Keys that map to nothing are an error.
  `scan_layers` stacks the blocks as a model built with `config.model.scan_layers` expects.
  """
  names = [k[len(prefix):] for k in state_dict if k.startswith(prefix)]
  depth = _count(names, r"layers\.(\d+)\..*")
  encoder, used = _import(_backbone_entries(depth, "cls_token" in names), state_dict, prefix, num_heads)
  params = {"encoder": _scan(encoder, "layers", depth) if scan_layers else encoder}
  neck = [k[len(NECK_PREFIX):] for k in state_dict if k.startswith(NECK_PREFIX)]
  if neck:
    if decoder_heads is None:
      raise ValueError("state dict has neck.* (MAE decoder) keys: pass decoder_heads to convert them")
    neck_depth = _count(neck, r"decoder_blocks\.(\d+)\..*")
    decoder, neck_used = _import(_neck_entries(neck_depth), state_dict, NECK_PREFIX, decoder_heads)
    params["decoder"] = _scan(decoder, "decoder_blocks", neck_depth) if scan_layers else decoder
    used |= neck_used
  for head in HEAD_PREFIXES:
    if any(k.startswith(head) for k in state_dict):
      params["head"] = head_from_torch(state_dict, head)
      used |= {k for k in state_dict if k.startswith(head)}
  unexpected = sorted(set(state_dict) - used)
  if unexpected:
    raise KeyError(f"state dict has {len(unexpected)} keys with no parameter (prefix={prefix!r}): {unexpected[:8]}")
  return params


# Task heads (reference §2.4): `deconv_layers_{i}` / `conv_layers_{i}` (i = torch Sequential index 0, 3, ...)
# and the final 1x1 conv, named as in torch (`final_layer` for pose, `conv_seg` for seg/depth/normal).
# Deconv kernels are Flax transpose_kernel (4, 4, out, in) and torch (in, out, 4, 4): the same
# transpose as a conv, so both use the "conv" layout. Deconvs have no bias.
HEAD_FINAL_LAYERS = ("final_layer", "conv_seg")
_HEAD_STAGE = re.compile(r"(deconv_layers|conv_layers)_(\d+)")


def _head_entries(layer_names):
  """(path in the head params, torch key without prefix, layout) for the named head layers.

  Names that are no head layer get no entry, so the caller reports them as unmapped.
  """
  entries = []
  for name in sorted(layer_names):
    stage = _HEAD_STAGE.fullmatch(name)
    if not stage and name not in HEAD_FINAL_LAYERS:
      continue
    theirs = f"{stage.group(1)}.{stage.group(2)}" if stage else name
    entries.append(((name, "kernel"), f"{theirs}.weight", "conv"))
    if not name.startswith("deconv_layers"):
      entries.append(((name, "bias"), f"{theirs}.bias", "same"))
  return entries


def head_to_torch(head_params, prefix):
  """A head's params -> {prefix + torch key: array}; prefix "head." (pose) or "decode_head." (others)."""
  return _export(_head_entries(head_params), head_params, prefix, "head")


def head_from_torch(state_dict, prefix):
  """The `prefix`ed keys of a task checkpoint -> the head's params (the inverse of `head_to_torch`,
  bit for bit). Keys without the prefix (the backbone) are left alone; prefixed keys that map to
  nothing are an error."""
  keys = [k[len(prefix):] for k in state_dict if k.startswith(prefix)]
  if not keys:
    raise KeyError(f"state dict has no head keys with prefix {prefix!r}")
  layers = {re.sub(r"\.(\d+)$", r"_\1", k.rsplit(".", 1)[0]) for k in keys}
  tree, used = _import(_head_entries(layers), state_dict, prefix, None)
  unexpected = sorted({prefix + k for k in keys} - used)
  if unexpected:
    raise KeyError(f"state dict has {len(unexpected)} head keys with no parameter (prefix={prefix!r}): {unexpected[:8]}")
  return tree
