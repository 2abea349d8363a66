"""Backbone families. Each family module owns its size table, Flax module, PyTorch names, layer
ids for layer-wise lr decay, FLOPs and position-table adaptation; `config.model.family` picks one
by name and the generic code calls it through `family(config.model)`.

A family module provides (see docs/extending.md):
  SIZES, size(name)                   named sizes, every dimension a named field
  build(model_config, image_size, cls_token) -> encoder with embed / encode / __call__, `grid`
                                      and `num_prefix_tokens`
  grid(model_config, image_size)      the patch-token grid
  torch_part(prefix)                  torch_names.Part of params["encoder"]
  check_state_dict(...), adapt_state_dict(...)   checks and position adaptation on load
  layer_id(names, leaf, depth), num_layers(model_config)   layer-wise lr decay
  paper_flops(model_config, image_size), encoder_activation_bytes(model_config, tokens)
"""
from sapiens_jax.models import sapiens

FAMILIES = {"sapiens": sapiens}


def family(model_config):
  """The family module named by `model_config.family`."""
  name = model_config.family
  if name not in FAMILIES:
    raise ValueError(f"config.model.family={name!r}; expected one of {sorted(FAMILIES)}")
  return FAMILIES[name]
