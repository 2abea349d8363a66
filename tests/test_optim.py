"""AdamW setup: lr scaling and schedule, which parameters decay, frozen position embeddings."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sapiens_jax import default_config
from sapiens_jax import optim
from sapiens_jax.models import sapiens
from sapiens_jax.objectives import mae
from sapiens_jax.prng import example_keys


def test_peak_lr_scales_with_global_batch(tiny_config):
  tiny_config.batch_size = 4096
  assert np.isclose(optim.learning_rate(tiny_config), 2.4e-3 * tiny_config.optim.base_lr / 1.5e-4)
  tiny_config.optim.base_lr = 1.5e-4
  assert np.isclose(optim.learning_rate(tiny_config), 2.4e-3)  # the reference's 8x512 setting


def test_schedule_warms_up_linearly_then_cosine_to_min(tiny_config):
  tiny_config.total_steps, tiny_config.optim.warmup_steps = 100, 10
  lr = optim.schedule(tiny_config)
  peak = optim.learning_rate(tiny_config)
  np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, peak / 2, peak], rtol=1e-6)
  np.testing.assert_allclose(lr(55), peak * 0.5, rtol=1e-5)  # half-way through the cosine
  np.testing.assert_allclose(lr(100), 0.0, atol=1e-12)


def _params():
  encoder = sapiens.ViT(64, 1, 4, (32, 32))
  model = mae.MAE(encoder=encoder, decoder=mae.Decoder(32, 1, 2, encoder.grid, encoder.patch_size))
  keys = example_keys(jax.random.key(1), 1)
  return model, nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), keys)["params"])


def test_weight_decay_only_on_weights():
  _, params = _params()
  flat = flax.traverse_util.flatten_dict(optim.decay_mask(params), sep="/")
  decayed = sorted(k for k, v in flat.items() if v)
  assert "encoder/layers_0/attn/qkv_kernel" in decayed
  assert "encoder/patch_embed/kernel" in decayed
  assert "decoder/decoder_pred/kernel" in decayed
  for name in ("encoder/cls_token", "encoder/pos_embed", "decoder/mask_token", "decoder/decoder_pos_embed",
               "encoder/layers_0/ln1/scale", "encoder/layers_0/attn/qkv_bias", "encoder/ln1/bias"):
    assert not flat[name], name


def test_frozen_position_embeddings_never_move_but_others_do(tiny_config):
  model, params = _params()
  tx = optim.make_optimizer(tiny_config)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  new = params
  for _ in range(3):
    updates, state = tx.update(grads, state, new)
    new = optax.apply_updates(new, updates)
  np.testing.assert_array_equal(new["encoder"]["pos_embed"], params["encoder"]["pos_embed"])
  np.testing.assert_array_equal(new["decoder"]["decoder_pos_embed"], params["decoder"]["decoder_pos_embed"])
  assert not np.array_equal(new["encoder"]["cls_token"], params["encoder"]["cls_token"])
  assert not np.array_equal(new["encoder"]["layers_0"]["ffn"]["fc1"]["kernel"],
                            params["encoder"]["layers_0"]["ffn"]["fc1"]["kernel"])


def test_gradients_are_clipped_to_global_norm(tiny_config):
  _, params = _params()
  tiny_config.optim.weight_decay = 0.0
  tx = optim.make_optimizer(tiny_config)
  state = tx.init(params)
  big = jax.tree.map(lambda p: 1e6 * jnp.ones_like(p), params)
  # Adam's first step is sign-like whatever the scale; clipping shows in the first moment.
  _, state = tx.update(big, state, params)
  mu = state.inner_states["train"].inner_state[1][0].mu
  norm = optax.tree.norm(jax.tree.map(lambda m: m / (1 - tiny_config.optim.b1), mu))
  np.testing.assert_allclose(norm, tiny_config.optim.grad_clip_norm, rtol=1e-4)


def _finetune_params(depth, scan):
  """A param tree shaped like a fine-tuning model's: encoder blocks (stacked when scanned) + head."""
  block = {"ln1": {"scale": np.ones(4)}, "attn": {"qkv_kernel": np.ones((4, 3, 2, 2))}}
  encoder = {"patch_embed": {"kernel": np.ones((16, 16, 3, 4)), "bias": np.ones(4)},
             "pos_embed": np.ones((1, 6, 4)), "ln1": {"scale": np.ones(4), "bias": np.ones(4)}}
  if scan:
    encoder["layers"] = jax.tree.map(lambda x: np.stack([x] * depth), block)
  else:
    encoder.update({f"layers_{i}": block for i in range(depth)})
  return {"encoder": encoder, "head": {"final_layer": {"kernel": np.ones((1, 1, 4, 3))}}}


def test_layer_decay_multipliers_follow_the_reference_layer_ids():
  rate, depth = 0.85, 3
  family = sapiens  # the backbone family module, as models.family(config.model) gives it
  m = flax.traverse_util.flatten_dict(
      optim.layer_decay_multipliers(_finetune_params(depth, False), rate, family, depth), sep="/")
  # patch/pos embed: id 0 -> rate^(L+1); block i: id i+1 -> rate^(L-i); final norm and head: id L+1 -> 1.
  assert m["encoder/patch_embed/kernel"] == pytest.approx(0.85 ** 4)
  assert m["encoder/pos_embed"] == pytest.approx(0.85 ** 4)
  assert m["encoder/layers_0/attn/qkv_kernel"] == pytest.approx(0.85 ** 3)
  assert m["encoder/layers_2/ln1/scale"] == pytest.approx(0.85)
  assert m["encoder/ln1/bias"] == 1.0 and m["head/final_layer/kernel"] == 1.0
  scanned = optim.layer_decay_multipliers(_finetune_params(depth, True), rate, family, depth)["encoder"]["layers"]
  np.testing.assert_allclose(scanned["attn"]["qkv_kernel"].ravel(), [0.85 ** 3, 0.85 ** 2, 0.85], rtol=1e-6)


def test_finetune_step_scales_each_layer_and_skips_decay_on_biases_and_pos_embed():
  config = default_config.finetune("coco", "tiny")  # tiny: 2 blocks
  config.optim.warmup_steps = 0
  rate, peak = config.optim.layer_decay, optim.learning_rate(config)
  params = jax.tree.map(jnp.asarray, _finetune_params(2, False))
  grads = jax.tree.map(jnp.zeros_like, params)  # only weight decay moves the params
  updates, _ = optim.make_optimizer(config).update(grads, optim.make_optimizer(config).init(params), params)
  u = flax.traverse_util.flatten_dict(updates, sep="/")
  wd = config.optim.weight_decay
  np.testing.assert_allclose(u["encoder/layers_1/attn/qkv_kernel"], -peak * wd * rate, rtol=1e-5)
  np.testing.assert_allclose(u["encoder/patch_embed/kernel"], -peak * wd * rate ** 3, rtol=1e-5)
  np.testing.assert_allclose(u["head/final_layer/kernel"], -peak * wd, rtol=1e-5)
  for name in ("encoder/pos_embed", "encoder/patch_embed/bias", "encoder/ln1/scale"):
    np.testing.assert_array_equal(u[name], 0.0)


@pytest.mark.parametrize("dataset", ["coco", "goliath_seg"])
def test_finetune_schedules_warm_up_from_a_thousandth_then_decay(dataset):
  config = default_config.finetune(dataset, "tiny")
  config.total_steps, config.optim.warmup_steps = 210, 10
  lr, peak = optim.schedule(config), optim.learning_rate(config)
  assert float(lr(0)) == pytest.approx(peak * 1e-3)
  if dataset == "coco":  # x0.1 at epoch 170 and again at 200 of 210
    assert float(lr(169)) == pytest.approx(peak)
    assert float(lr(170)) == pytest.approx(peak * 0.1)
    assert float(lr(205)) == pytest.approx(peak * 0.01)
  else:  # linear to zero, chained with the warm-up factor
    assert float(lr(5)) == pytest.approx(peak * (1e-3 + 0.999 * 0.5) * (1 - 5 / 210))
    assert float(lr(105)) == pytest.approx(peak * 0.5)
    assert float(lr(210)) == pytest.approx(0.0)


def test_clipped_adamw_steps_match_torch_adamw_after_clip_grad_norm(tiny_config):
  """The reference's optimizer step: torch clip_grad_norm_(1.0), then AdamW with decay on weights only."""
  torch = pytest.importorskip("torch")
  config = tiny_config
  config.optim.update(warmup_steps=2, b2=0.999, weight_decay=0.1, frozen=())
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": rng.normal(size=(6, 5)).astype(np.float32),
                      "bias": rng.normal(size=(5,)).astype(np.float32)}}
  # Global norms ~40 (clipped), ~0.4 and ~4 (clipped): both branches of the clip.
  grads = [jax.tree.map(lambda p, s=s: (s * rng.normal(size=p.shape)).astype(np.float32), params)
           for s in (10.0, 0.1, 1.0)]
  tx = optim.make_optimizer(config)
  state, ours = tx.init(params), params
  weight = torch.nn.Parameter(torch.tensor(params["dense"]["kernel"]))
  bias = torch.nn.Parameter(torch.tensor(params["dense"]["bias"]))
  theirs = torch.optim.AdamW([{"params": [weight]}, {"params": [bias], "weight_decay": 0.0}],
                             lr=1.0, betas=(config.optim.b1, config.optim.b2), eps=1e-8,
                             weight_decay=config.optim.weight_decay)
  lr = optim.schedule(config)
  for step, g in enumerate(grads):
    updates, state = tx.update(g, state, ours)
    ours = optax.apply_updates(ours, updates)
    weight.grad, bias.grad = torch.tensor(g["dense"]["kernel"]), torch.tensor(g["dense"]["bias"])
    torch.nn.utils.clip_grad_norm_([weight, bias], config.optim.grad_clip_norm)
    for group in theirs.param_groups:
      group["lr"] = float(lr(step))
    theirs.step()
    np.testing.assert_allclose(ours["dense"]["kernel"], weight.detach().numpy(), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(ours["dense"]["bias"], bias.detach().numpy(), rtol=2e-6, atol=1e-7)
