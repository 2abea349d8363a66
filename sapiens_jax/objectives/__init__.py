"""What a run optimises: a pretraining objective (MAE; MAE + self-distillation, Sapiens2's) or
fine-tuning on a task. `config.objective` picks one from OBJECTIVES; the trainer, dry run, export, prediction and
init_from call its hooks and never name it.

An objective module provides (docs/extending.md):
  configure(config)                          its config keys (pretraining objectives)
  check_config(config)                       errors that name the bad key
  build_model(config), encoder(config)       the whole model; the backbone alone (features)
  init_params(model, config, key)            boxed params, as model.init gives them
  init_extra_state(params, config)           more train state (e.g. an EMA teacher), or {}
  loss(model, params, state, batch, keys, config) -> (loss, outputs)   keys: one per example
  post_update(state, step_outputs, config)   after each optimizer step (e.g. the EMA update)
  step_outputs(outputs, config), alerts(step, metrics, config)   what the step keeps of the loss outputs; warnings
  WEIGHTS                                    the state entry export, predict and init_from read
  batch_spec(config, batch_size)             the training batch as ShapeDtypeStructs
  activation_bytes_per_example(config)       the dry run's estimate without compiling
  prepare_data(config, workdir), train_iterator(config, workdir, ...), inspect_samples(...)
  Evaluation(config, workdir, model, mesh, rules, param_shardings)(step, state) -> (scalars, picture)
  PICTURES, best_metric(config)              where pictures go; (name, "min" | "max") or None
  torch_parts(config, include_decoder), adapt_state_dict(...)   weights in PyTorch names
  predict_task(config)                       the task a run predicts by default, or None
"""
from sapiens_jax.objectives import finetune
from sapiens_jax.objectives import mae
from sapiens_jax.objectives import mae_distill

OBJECTIVES = {"mae": mae, "mae_distill": mae_distill, "finetune": finetune}


def get(config):
  """The objective module of a run config (config.objective)."""
  name = config.objective
  if name not in OBJECTIVES:
    raise ValueError(f"config.objective={name!r}; expected one of {', '.join(OBJECTIVES)}")
  return OBJECTIVES[name]
