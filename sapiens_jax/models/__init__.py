"""Backbone families. Each family module owns its size table, Flax module, PyTorch names, layer
ids for layer-wise lr decay, FLOPs and position-table adaptation; `config.model.family` picks one
by the size name (`config.model.size`: "0.3b" is a Sapiens, "sapiens2_0.4b" a Sapiens2) and the
generic code calls it through `family(config.model)`.

A family module provides (see docs/extending.md):
  SIZES, size(name)                   named sizes, every dimension a named field
  build(model_config, image_size, cls_token) -> encoder with embed(images), encode(tokens, ids),
                                      __call__, `grid` and `num_prefix_tokens`
  grid(model_config, image_size)      the patch-token grid
  torch_part(prefix)                  torch_names.Part of params["encoder"]
  torch_buffers(model_config, prefix) non-parameter tensors of the PyTorch module (may be empty)
  check_state_dict(...), adapt_state_dict(...)   checks and position adaptation on load
  size_of(state_dict, prefix)         the size whose tensors a state dict holds, or None
  upstream_names(state_dict)          other ports' key names (transformers') -> the upstream ones
  transformers_config(model_config, image_size)  config.json of the transformers port, if any
  layer_id(names, leaf, depth), num_layers(model_config)   layer-wise lr decay
  paper_flops(model_config, image_size), encoder_activation_bytes(model_config, tokens)
"""
from sapiens_jax.models import sapiens
from sapiens_jax.models import sapiens2

FAMILIES = {"sapiens": sapiens, "sapiens2": sapiens2}


def family_name(model_config):
  """The family whose SIZES hold `model_config.size`."""
  for name, module in FAMILIES.items():
    if model_config.size in module.SIZES:
      return name
  sizes = sorted(s for module in FAMILIES.values() for s in module.SIZES)
  raise ValueError(f"config.model.size={model_config.size!r} is not a known size; expected one of {sizes}")


def family(model_config):
  """The family module of `model_config.size`."""
  return FAMILIES[family_name(model_config)]


def upstream_names(state_dict):
  """A state dict with every family's third-party key names (the transformers port's) made upstream's."""
  for module in FAMILIES.values():
    state_dict = module.upstream_names(state_dict)
  return state_dict


def size_of(state_dict, prefix=""):
  """The size name (of any family) whose tensors `state_dict` holds under `prefix`, or None."""
  return next((found for found in (module.size_of(state_dict, prefix) for module in FAMILIES.values()) if found),
              None)
