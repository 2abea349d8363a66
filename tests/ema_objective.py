"""A pretraining objective written outside the package: MAE plus an EMA copy of the params (a
"teacher", as self-distillation keeps one). tests/objectives/test_extra_state.py registers it to
check that an objective's extra train state is created, updated after each step, checkpointed and
resumed like the params, without the trainer knowing about it."""
import jax

from sapiens_jax.objectives import mae

MOMENTUM = 0.75

configure = mae.configure
check_config = mae.check_config
build_model = mae.build_model
encoder = mae.encoder
init_params = mae.init_params
loss = mae.loss
batch_spec = mae.batch_spec
activation_bytes_per_example = mae.activation_bytes_per_example
prepare_data = mae.prepare_data
train_iterator = mae.train_iterator
inspect_samples = mae.inspect_samples
Evaluation = mae.Evaluation
PICTURES = mae.PICTURES
best_metric = mae.best_metric
torch_parts = mae.torch_parts
adapt_state_dict = mae.adapt_state_dict
predict_task = mae.predict_task
step_outputs = mae.step_outputs
alerts = mae.alerts
WEIGHTS = mae.WEIGHTS


def init_extra_state(params, config):
  del config
  return {"teacher": params}


def post_update(state, outputs, config):
  del outputs, config
  teacher = jax.tree.map(lambda t, p: MOMENTUM * t + (1 - MOMENTUM) * p, state["teacher"], state["params"])
  return {**state, "teacher": teacher}
