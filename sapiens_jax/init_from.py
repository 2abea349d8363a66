"""`config.init_from`: start a run from released Sapiens weights or from another run of ours.

Sources: an original PyTorch file (`.pth` / `.safetensors`), either a `_clean` pretrain file (bare
backbone keys) or a full checkpoint {'state_dict': {'backbone.*', 'neck.*', ...}}; or an Orbax
workdir of ours, `DIR` or `DIR:STEP`. A workdir is turned into Sapiens keys first, so both go
through the one name mapping (torch_names) and the same checks, and scanned blocks convert either way.

Position embeddings on another grid are resized as the reference does (posemb), the cls slot
kept or dropped to match the model. Whatever else does not fit the model is one error listing
every mismatch. Parts allowed to be absent start fresh, with a warning: the MAE decoder of a
backbone-only file, and the task head of a fine-tuning model started from a pretrained encoder (or
from a checkpoint of another task). Parts the model does not have (the decoder when fine-tuning,
a head when pretraining) are skipped.
"""
import os
import pickle
import re

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from sapiens_jax import export
from sapiens_jax import posemb
from sapiens_jax import torch_names
from sapiens_jax import vit

TORCH_EXTENSIONS = (".pth", ".safetensors")
BACKBONE_PREFIX = "backbone."  # encoder keys inside full MAE and task checkpoints
LISTED = 10  # mismatched keys shown per kind


def load_params(init_from, target_params, config):
  """Params from `init_from`, shaped like `target_params` for the model of `config`.

  Returns numpy arrays in the target's dtypes. `target_params` may be abstract (shapes and dtypes);
  where the source has no MAE decoder by design, the returned tree holds target_params["decoder"]
  unchanged, so pass the freshly initialised params then.
  """
  if init_from.endswith(TORCH_EXTENSIONS):
    state_dict, source_grid = read_torch_file(init_from), None
  else:
    state_dict, source_grid = _read_workdir(init_from)
  return _fit(state_dict, source_grid, target_params, config, init_from)


def read_torch_file(path):
  """{key: float32 numpy array} of a `.safetensors` file or a `.pth` state dict (plain or under 'state_dict')."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"init_from={path!r}: no such file")
  import torch  # pylint: disable=g-import-not-at-top
  if path.endswith(".safetensors"):
    from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
    tensors = load_file(path)
  else:
    try:
      tensors = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
      raise ValueError(
          f"init_from={path!r} holds Python objects besides tensors (e.g. a training checkpoint with "
          f"optimizer state or logs), which are not loaded, for safety. Save its 'state_dict' alone "
          f"with torch and point init_from at that file.") from e
    if isinstance(tensors, dict) and "state_dict" in tensors:
      tensors = tensors["state_dict"]
  if not isinstance(tensors, dict):
    raise ValueError(f"init_from={path!r} holds a {type(tensors).__name__}, not a state dict")
  bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
  if bad:
    raise ValueError(f"init_from={path!r}: entries that are not tensors: {bad[:LISTED]}")
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in tensors.items()}


def _read_workdir(spec):
  """(Sapiens-keyed state dict, token grid) of checkpoint `DIR` (newest) or `DIR:STEP`.

  The grid is the run's own (from its saved config), never guessed from a token count.
  """
  workdir, step = spec, None
  match = re.fullmatch(r"(.+):(\d+)", spec)
  if match and not os.path.isdir(spec):
    workdir, step = match.group(1), int(match.group(2))
  params, step = export.restore_params(workdir, step)
  manager, _ = export.checkpoint_steps(workdir)
  saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  grid = vit.vit_from_config(ml_collections.ConfigDict(saved["model"]), saved["image_size"]).grid
  logging.info("init_from: step %d of %s", step, workdir)
  return torch_names.to_torch(params), grid


def _shapes(tree, prefix):
  """{Sapiens key: shape} the model expects, mapped from shape-only stand-ins: arrays of a
  zero-byte dtype, so mapping a 2B model's tree costs no memory."""
  stand_ins = jax.tree.map(lambda a: np.empty(a.shape, np.dtype([])), tree)
  return {k: v.shape for k, v in torch_names.to_torch(stand_ins, prefix=prefix).items()}


def _count_blocks(keys, prefix):
  found = [int(m.group(1)) for m in map(re.compile(re.escape(prefix) + r"layers\.(\d+)\..*").fullmatch, keys) if m]
  return max(found) + 1 if found else 0


def _check_size(state_dict, prefix, config, what):
  """A backbone of another size is named as such, not drowned in a list of mis-shaped keys."""
  key = prefix + "patch_embed.projection.weight"
  if key not in state_dict:
    return
  found = (state_dict[key].shape[0], _count_blocks(state_dict, prefix))
  width, depth, _ = vit.size_dims(config.model.size)
  if found != (width, depth):
    sizes = [name for name, dims in vit.SIZES.items() if dims[:2] == found]
    looks = f"model.size={sizes[0]!r}" if sizes else "no known size"
    raise ValueError(f"init_from={what!r} holds a ViT of width {found[0]} with {found[1]} blocks ({looks}), "
                     f"but config.model.size={config.model.size!r} is width {width} with {depth} blocks")


def _resize_pos_embeds(state_dict, expected, prefix, source_grid, target_grid, what):
  """Bring `pos_embed` and `neck.decoder_pos_embed` in `state_dict` to the model's grid, in place.

  The source grid is `source_grid` where known (a workdir), else inferred from the token count.
  Extra rows: the encoder's cls slot is kept or dropped to match the model; the decoder always has one.
  """
  done = []
  extra_in = {prefix + "pos_embed": int(prefix + "cls_token" in state_dict), "neck.decoder_pos_embed": 1}
  extra_out = {prefix + "pos_embed": int(prefix + "cls_token" in expected), "neck.decoder_pos_embed": 1}
  for key in extra_in:
    if key not in state_dict or key not in expected:
      continue
    pos, want = state_dict[key], expected[key]
    same_grid = source_grid is None or tuple(source_grid) == tuple(target_grid)
    if (pos.shape == want and same_grid) or pos.ndim != 3 or pos.shape[-1] != want[-1]:
      continue  # nothing to do, or not fixable here: the shape comparison reports it
    try:
      grid = source_grid or posemb.infer_grid(pos.shape[1] - extra_in[key])
    except ValueError as e:
      raise ValueError(f"init_from={what!r}, {key} of shape {pos.shape}: {e}") from None
    state_dict[key] = posemb.resize_pos_embed(pos, grid, target_grid, extra_in[key], extra_out[key])
    done.append(f"{key} {grid[0]}x{grid[1]}+{extra_in[key]} -> {target_grid[0]}x{target_grid[1]}+{extra_out[key]}")
  return done


def _mismatch_error(what, missing, unexpected, misshaped):
  lines = [f"init_from={what!r} does not fit the model:"]
  for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
    if items:
      lines.append(f"  {len(items)} {title} keys" + (f" (first {LISTED})" if len(items) > LISTED else "") + ":")
      lines += [f"    {item}" for item in items[:LISTED]]
  return ValueError("\n".join(lines))


def _drop_unused(state_dict, expected, target_params, what):
  """The source without the parts this model does not take: the cls token and MAE decoder
  (neck.*) when fine-tuning, a task head when pretraining, or a head that does not fit (another task, another
  number of keypoints or classes) -- which then starts fresh, with a warning."""
  def drop(keys, log, message):
    if keys:
      log("init_from: %s %d keys of %s (%s, ...)", message, len(keys), what, keys[0])
    keys = set(keys)
    return {k: v for k, v in state_dict.items() if k not in keys}

  heads = sorted(k for k in state_dict if k.startswith(torch_names.HEAD_PREFIXES))
  state_dict = drop([k for k in state_dict if k.endswith("cls_token") and k not in expected], logging.info,
                    "fine-tuning ViTs have no cls token: not loading")
  if "decoder" not in target_params:
    state_dict = drop(sorted(k for k in state_dict if k.startswith(torch_names.NECK_PREFIX)), logging.info,
                      "fine-tuning: not loading the MAE decoder,")
  if "head" not in target_params:
    return drop(heads, logging.info, "pretraining: ignoring the task head,")
  misfit = [k for k in heads if k not in expected or state_dict[k].shape != expected[k]]
  if misfit:
    wanted = sorted(k for k in expected if k.startswith(torch_names.HEAD_PREFIXES))
    logging.warning("init_from=%r: its task head does not fit this model's (e.g. %s %s, model has %s); "
                    "the head starts fresh.", what, misfit[0], state_dict[misfit[0]].shape,
                    f"{wanted[0]} {expected[wanted[0]]}" if wanted else "no such key")
    return drop(heads, logging.info, "not loading the head,")
  return state_dict


def _fit(state_dict, source_grid, target_params, config, what):
  """Checked, resized and renamed: the source's Sapiens-keyed state dict as our param tree."""
  prefix = BACKBONE_PREFIX if any(k.startswith(BACKBONE_PREFIX) for k in state_dict) else ""
  _check_size(state_dict, prefix, config, what)

  expected = _shapes(target_params, prefix)
  target_grid = vit.vit_from_config(config.model, config.image_size).grid
  resized = _resize_pos_embeds(state_dict, expected, prefix, source_grid, target_grid, what)
  state_dict = _drop_unused(state_dict, expected, target_params, what)

  # What a source may lack by design starts fresh: the decoder of a backbone-only file, the head
  # of a pretrained encoder. Anything else missing is an error.
  part_prefixes = {"decoder": (torch_names.NECK_PREFIX,), "head": torch_names.HEAD_PREFIXES}
  fresh = [part for part, starts in part_prefixes.items()
           if part in target_params and not any(k.startswith(starts) for k in state_dict)]
  missing = sorted(k for k in set(expected) - set(state_dict)
                   if not any(k.startswith(part_prefixes[part]) for part in fresh))
  unexpected = sorted(set(state_dict) - set(expected))
  misshaped = sorted(k for k in set(state_dict) & set(expected) if state_dict[k].shape != expected[k])
  if missing or unexpected or misshaped:
    raise _mismatch_error(what, [f"{k} {expected[k]}" for k in missing],
                          [f"{k} {state_dict[k].shape}" for k in unexpected],
                          [f"{k}: file {state_dict[k].shape}, model {expected[k]}" for k in misshaped])

  num_heads = vit.size_dims(config.model.size)[2]
  params = torch_names.from_torch(state_dict, num_heads, config.model.get("decoder_heads"), prefix=prefix,
                                  scan_layers=config.model.scan_layers)
  loaded = {group: target_params[group] for group in params}
  params = jax.tree.map(lambda x, t: np.asarray(x, t.dtype), params, loaded)
  count = sum(x.size for x in jax.tree.leaves(params))
  logging.info("init_from: loaded %d tensors (%s parameters) from %s%s", len(state_dict), f"{count:,}", what,
               "".join(f"; resized {r}" for r in resized))
  for part in fresh:
    logging.warning("init_from=%r has no %s: it starts freshly initialised.", what,
                    "MAE decoder (neck.*)" if part == "decoder" else "task head for this model")
    params[part] = target_params[part]
  return params
