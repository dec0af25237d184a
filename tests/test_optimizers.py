import jax.numpy as jnp
import numpy as np
import optax

from t5x_like import optimizers


def test_rsqrt_schedule_matches_t5_numbers():
    lr = optimizers.rsqrt_schedule(base_learning_rate=1.0, warmup_steps=10_000)
    np.testing.assert_allclose([lr(0), lr(5_000), lr(10_000), lr(40_000)],
                               [0.01, 0.01, 0.01, 0.005], rtol=1e-6)


def test_linear_warmup_ramps_then_decays():
    lr = optimizers.rsqrt_schedule(base_learning_rate=1.0, warmup_steps=100,
                                   linear_warmup=True)
    np.testing.assert_allclose([lr(0), lr(49), lr(99), lr(400)],
                               [0.1 / 100, 0.1 * 50 / 100, 0.1, 0.05], rtol=1e-6)


def test_adafactor_factors_large_matrices_and_updates():
    opt = optimizers.adafactor(learning_rate=optimizers.rsqrt_schedule())
    params = {"w": jnp.ones((256, 512)), "b": jnp.ones((3,))}
    state = opt.transform.init(params)
    shapes = sorted(tuple(x.shape) for x in __import__("jax").tree.leaves(state))
    assert (256,) in shapes and (512,) in shapes      # factored row/column stats
    grads = {"w": jnp.full((256, 512), 0.1), "b": jnp.full((3,), 0.1)}
    updates, _ = opt.transform.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    assert float(new["w"][0, 0]) < 1.0


def test_adamw_clips_and_decays():
    opt = optimizers.adamw(learning_rate=lambda step: 1e-3, max_grad_norm=1.0)
    params = {"w": jnp.ones((4,))}
    updates, _ = opt.transform.update({"w": jnp.full((4,), 100.0)},
                                      opt.transform.init(params), params)
    # First Adam step moves each coordinate by ~lr (plus decoupled weight decay).
    np.testing.assert_allclose(updates["w"], -1e-3 * (1 + 0.1), rtol=1e-3)
