"""`config.init_from`: start a run from released Sapiens weights or from another run of ours.

Sources: an original PyTorch file (`.pth` / `.safetensors`), either a pretrain file (bare backbone
keys: Sapiens' `_clean` files, Sapiens2's) or a full checkpoint {'state_dict': {'backbone.*',
'neck.*', 'decode_head.*', ...}}; a directory holding `model.safetensors` (what transformers'
save_pretrained writes; its native key names are read too); or an Orbax workdir of ours, `DIR` or
`DIR:STEP`. A workdir is turned into PyTorch keys first, so both go
through the same names (the parts that the objective, backbone family and task declare) and the
same checks, and scanned blocks convert either way.

Position tables on another grid are resized as the reference does (the family's and objective's
`adapt_state_dict`), the cls slot kept or dropped to match the model. Whatever else does not fit
is one error listing every mismatch. Parts allowed to be absent start fresh, with a warning: the
MAE decoder of a backbone-only file, the task head of a pretrained encoder, or a head of another
shape. Parts the model does not have (the decoder when fine-tuning, a head when pretraining) are
skipped.
"""
import os
import pickle
import re

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sapiens_jax import checkpoint
from sapiens_jax import default_config
from sapiens_jax import models
from sapiens_jax import objectives
from sapiens_jax import tasks
from sapiens_jax import torch_names

TORCH_EXTENSIONS = (".pth", ".safetensors")
BACKBONE_PREFIX = "backbone."  # encoder keys inside full MAE and task checkpoints
LISTED = 10  # mismatched keys shown per kind


def load_params(init_from, target_params, config):
  """Params from `init_from`, shaped like `target_params` for the model of `config`.

  Returns numpy arrays in the target's dtypes. `target_params` may be abstract (shapes and dtypes);
  a part that starts fresh is returned as target_params holds it, so pass the freshly initialised
  params then.
  """
  if init_from.endswith(TORCH_EXTENSIONS) or os.path.isfile(os.path.join(init_from, SAFETENSORS_DIR_FILE)):
    state_dict, source_grid = read_weights(init_from), None
  else:
    state_dict, source_grid = _read_workdir(init_from)
  return _fit(state_dict, source_grid, target_params, config, init_from)


SAFETENSORS_DIR_FILE = "model.safetensors"  # inside a transformers-style directory


def read_weights(path):
  """{upstream key: float32 numpy array} of a PyTorch file or a directory holding model.safetensors
  (keys in the transformers port's native names are renamed to upstream's)."""
  if os.path.isdir(path):
    inside = os.path.join(path, SAFETENSORS_DIR_FILE)
    if not os.path.isfile(inside):
      raise FileNotFoundError(f"{path!r} is a directory without {SAFETENSORS_DIR_FILE} (it holds "
                              f"{sorted(os.listdir(path))[:LISTED]})")
    path = inside
  return models.upstream_names(read_torch_file(path))


def model_from_file(path, image_size, backbone_only=False):
  """(config, params) of a PyTorch file or directory, read once: its task model when it holds a task
  head (`_task_model`) and not `backbone_only`, else its backbone (`backbone_from_file`)."""
  state_dict = read_weights(path)
  found = None if backbone_only else _task_model(state_dict, image_size, path)
  return found or _backbone(state_dict, image_size, path)


def backbone_from_file(path, image_size):
  """(config, {"encoder": params}) of the backbone in a PyTorch file or directory, any family and
  size, its architecture read from the tensors; other parts of the file (heads, MAE neck) are left.
  The config is a pretraining one (a task fine-tune's backbone without cls token: `finetune`
  without a task), for `image_size` (H, W)."""
  return _backbone(read_weights(path), image_size, path)


def _backbone(state_dict, image_size, path):
  prefix = _backbone_prefix(state_dict)
  size = models.size_of(state_dict, prefix)
  if size is None:
    sample = sorted(state_dict)[:LISTED]
    raise ValueError(f"{path!r} holds no Sapiens or Sapiens2 backbone of a known size (keys {sample} ...)")
  config = default_config.pretrain(size)
  config.image_size = tuple(image_size)
  if prefix + "cls_token" not in state_dict:
    config.objective, config.task = "finetune", None
  family = models.family(config.model)
  encoder = objectives.get(config).encoder(config)
  boxed = jax.eval_shape(lambda: encoder.init(jax.random.key(0), jnp.zeros((1, *image_size, 3))))["params"]
  abstract = {"encoder": nn.unbox(boxed)}
  parts = [family.torch_part(prefix)]
  state_dict = {k: v for k, v in state_dict.items() if k.startswith(prefix) and
                not k[len(prefix):].startswith(torch_names.PART_PREFIXES)}
  expected = {k: v.shape for k, v in torch_names.to_torch(torch_names.stand_ins(abstract), parts).items()}
  family.adapt_state_dict(state_dict, expected, prefix, None, encoder.grid, path)
  params = torch_names.from_torch(state_dict, abstract, parts)
  logging.info("%s: %s backbone %s for %s images", path, models.family_name(config.model), size, image_size)
  return config, jax.tree.map(lambda x, t: np.asarray(x, t.dtype), params, abstract)


def _task_model(state_dict, image_size, path):
  """(config, params) of a released task checkpoint (backbone and head), or None when `state_dict`
  holds no task head. The recipe is the fine-tuning dataset (default_config.DATASETS) whose head, for the
  backbone's size, has exactly the file's head tensors (names and shapes): that tells the task,
  the reference's head (Sapiens or Sapiens2) and the labels (28 or 20 parts, 17, 133 or 308
  keypoints). Loaded strictly: every tensor of the model from the file."""
  heads = {k: v.shape for k, v in state_dict.items() if k.startswith(("head.", "decode_head."))}
  size = models.size_of(state_dict, BACKBONE_PREFIX)
  if not heads or size is None:
    return None
  features, closest = None, None
  for dataset, labels in _recipes_and_labels():
    config = default_config.finetune(dataset, size)
    config.image_size = tuple(int(v) for v in image_size)
    config.data.labels = labels
    features = features or _feature_map(config)
    shapes = _head_shapes(config, features)
    if shapes == heads:
      break
    shared = sum(heads.get(k) == v for k, v in shapes.items())
    if shapes and (closest is None or shared > closest[0]):
      closest = (shared, dataset, shapes)
  else:
    raise ValueError(f"{path!r}: its head is none of the fine-tuning recipes' heads for a {size} backbone "
                     f"at {tuple(image_size)} ({', '.join(default_config.DATASETS)}); "
                     + _head_mismatch(heads, *closest[1:]))
  config.model.dtype = "float32"  # prediction on whatever device; bfloat16 is a training choice
  objective = objectives.get(config)
  model = objective.build_model(config)
  abstract = nn.unbox(jax.eval_shape(lambda: objective.init_params(model, config, jax.random.key(0))))
  params = _fit(state_dict, None, abstract, config, path)
  logging.info("%s: %s %s (%s) for %s images", path, config.data.dataset, config.task, size, image_size)
  return config, params


def _recipes_and_labels():
  """(dataset, labels) to try, in order: every recipe with its own labels (a released file is its recipe's),
  then with the other label sets of its task (`LABEL_SETS` of a task with labels: a head fine-tuned on
  other classes or keypoints, e.g. a Sapiens2 seg head on the 28 classes)."""
  rows = default_config.DATASETS
  yield from ((dataset, row.labels) for dataset, row in rows.items())
  for dataset, row in rows.items():
    others = getattr(tasks.get(row.task), "LABEL_SETS", ())
    yield from ((dataset, labels) for labels in others if labels != row.labels)


def _head_mismatch(heads, dataset, expected):
  """What keeps the file's head (`heads`, {key: shape}) from the recipe `dataset`'s (`expected`): its
  missing, unexpected and differently shaped tensors, named."""
  listed = lambda keys: ", ".join(sorted(keys)[:LISTED]) + (" ..." if len(keys) > LISTED else "")
  missing, unexpected = expected.keys() - heads.keys(), heads.keys() - expected.keys()
  shapes = [f"{k} {tuple(heads[k])} (expected {tuple(v)})" for k, v in sorted(expected.items())
            if k in heads and heads[k] != v]
  parts = [f"missing {listed(missing)}" if missing else "", f"unexpected {listed(unexpected)}" if unexpected else "",
           f"shapes {', '.join(shapes[:LISTED])}" if shapes else ""]
  hint = (" (other classes or keypoints; or, for pointmap's scale branch, an image size other than the one it was "
          "trained at)" if shapes and not missing and not unexpected else "")
  return f"closest: {dataset}, " + "; ".join(p for p in parts if p) + hint


def _feature_map(config):
  """The abstract (1, h, w, C) feature map the encoder of `config` gives a head."""
  encoder = objectives.get(config).encoder(config)
  images = jax.ShapeDtypeStruct((1, *config.image_size, 3), jnp.float32)
  tokens = jax.eval_shape(lambda x: encoder.init_with_output(jax.random.key(0), x)[0], images)
  h, w = models.family(config.model).grid(config.model, config.image_size)
  return jax.ShapeDtypeStruct((1, h, w, tokens.shape[-1]), jnp.float32)


def _head_shapes(config, features):
  """{PyTorch key: shape} of the head `config` builds, on the backbone's `features`."""
  try:
    head = tasks.get(config.task).make_head(config)
    boxed = jax.eval_shape(lambda x: head.init(jax.random.key(0), x), features)["params"]
  except ValueError:  # e.g. a Sapiens2 head at a size with no upstream widths
    return {}
  parts = objectives.get(config).torch_parts(config)
  return {k: v.shape for k, v in torch_names.to_torch(torch_names.stand_ins({"head": nn.unbox(boxed)}),
                                                      [p for p in parts if p.group == "head"]).items()}


def _backbone_prefix(state_dict):
  """`backbone.` for a full checkpoint (MAE or task), "" for a backbone-only file."""
  return BACKBONE_PREFIX if any(k.startswith(BACKBONE_PREFIX) for k in state_dict) else ""


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
  """(PyTorch-keyed state dict, token grid) of checkpoint `DIR` (newest) or `DIR:STEP`.

  The grid is the run's own (from its saved config), never guessed from a token count.
  """
  workdir, step = spec, None
  match = re.fullmatch(r"(.+):(\d+)", spec)
  if match and not os.path.isdir(spec):
    workdir, step = match.group(1), int(match.group(2))
  params, saved, step = checkpoint.restore_params(workdir, step)
  grid = models.family(saved.model).grid(saved.model, saved.image_size)
  logging.info("init_from: step %d of %s", step, workdir)
  return torch_names.to_torch(params, objectives.get(saved).torch_parts(saved)), grid


def _mismatch_error(what, missing, unexpected, misshaped):
  lines = [f"init_from={what!r} does not fit the model:"]
  for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
    if items:
      lines.append(f"  {len(items)} {title} keys" + (f" (first {LISTED})" if len(items) > LISTED else "") + ":")
      lines += [f"    {item}" for item in items[:LISTED]]
  return ValueError("\n".join(lines))


def _fit(state_dict, source_grid, target_params, config, what):
  """Checked, resized and renamed: the source's PyTorch-keyed state dict as our param tree."""
  objective = objectives.get(config)
  prefix = _backbone_prefix(state_dict)
  parts = [p._replace(prefix=prefix) if p.group == "encoder" else p for p in objective.torch_parts(config)]
  models.family(config.model).check_state_dict(state_dict, prefix, config.model, what)

  expected = {k: v.shape for k, v in torch_names.to_torch(torch_names.stand_ins(target_params), parts).items()}
  resized = objective.adapt_state_dict(state_dict, expected, prefix, source_grid, config, what)

  # Parts of the upstream checkpoints this model does not have are skipped.
  ours = tuple(p.prefix for p in parts if p.group != "encoder")
  other = {k for k in state_dict if k.startswith(torch_names.PART_PREFIXES) and not k.startswith(ours)}
  if other:
    logging.info("init_from: not loading %d keys of %s (%s, ...): this model has no such part", len(other), what,
                 min(other))
  state_dict = {k: v for k, v in state_dict.items() if k not in other}

  # Parts that may be absent, or of another shape, start fresh.
  fresh = []
  for part in parts:
    if not (part.fresh_if_absent or part.fresh_if_misfit):
      continue
    keys = {k for k in expected if k.startswith(part.prefix)}
    present = sorted(k for k in state_dict if k.startswith(part.prefix))
    misfit = [k for k in present if k not in keys or state_dict[k].shape != expected[k]]
    misfit += sorted(keys - set(present))
    if not present and part.fresh_if_absent:
      logging.warning("init_from=%r has no %s (%s*): it starts freshly initialised.", what, part.group,
                      part.prefix)
      fresh.append(part)
    elif present and misfit and part.fresh_if_misfit:
      example = misfit[0]
      logging.warning("init_from=%r: its %s does not fit this model's (e.g. %s: file %s, model %s); it starts "
                      "fresh.", what, part.group, example, getattr(state_dict.get(example), "shape", "none"),
                      expected.get(example, "none"))
      fresh.append(part)
  unused = lambda k: any(k.startswith(p.prefix) for p in fresh)
  state_dict = {k: v for k, v in state_dict.items() if not unused(k)}
  loaded = [p for p in parts if p not in fresh]

  wanted = {k for k in expected if not unused(k)}
  missing = sorted(wanted - set(state_dict))
  unexpected = sorted(set(state_dict) - wanted)
  misshaped = sorted(k for k in wanted & set(state_dict) if state_dict[k].shape != expected[k])
  if missing or unexpected or misshaped:
    raise _mismatch_error(what, [f"{k} {expected[k]}" for k in missing],
                          [f"{k} {state_dict[k].shape}" for k in unexpected],
                          [f"{k}: file {state_dict[k].shape}, model {expected[k]}" for k in misshaped])

  params = torch_names.from_torch(state_dict, target_params, loaded)
  targets = {p.group: target_params[p.group] for p in loaded}
  params = jax.tree.map(lambda x, t: np.asarray(x, t.dtype), params, targets)
  count = sum(x.size for x in jax.tree.leaves(params))
  logging.info("init_from: loaded %d tensors (%s parameters) from %s%s", len(state_dict), f"{count:,}", what,
               "".join(f"; resized {r}" for r in resized))
  for part in fresh:
    params[part.group] = target_params[part.group]
  return params
