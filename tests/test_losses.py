"""Closed-form output-space Hessian products against autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from influx import losses


@pytest.mark.parametrize("loss,make_y", [
    (losses.softmax_cross_entropy, lambda k, z: jax.random.randint(k, z.shape[:-1], 0, z.shape[-1])),
    (losses.squared_error, lambda k, z: jax.random.normal(k, z.shape)),
    (losses.sigmoid_binary_cross_entropy, lambda k, z: jax.random.uniform(k, z.shape)),
])
def test_hessian_product_matches_autodiff(loss, make_y):
    kz, ky, ku = jax.random.split(jax.random.PRNGKey(0), 3)
    z = 2.0 * jax.random.normal(kz, (7, 4))
    y = make_y(ky, z)
    u = jax.random.normal(ku, z.shape)
    ref = jax.jvp(jax.grad(lambda zz: jnp.sum(loss(zz, y))), (z,), (u,))[1]
    np.testing.assert_allclose(loss.hessian_product(z, y, u), ref, rtol=1e-12, atol=1e-14)
    # per-example values, and single-example calls agree with batched
    assert loss(z, y).shape == (7,)
    np.testing.assert_allclose(loss(z[0], y[0]), loss(z, y)[0], rtol=1e-14)
    # custom-loss fallback is the same
    np.testing.assert_allclose(losses.output_hvp(lambda a, b: loss(a, b))(z, y, u), ref,
                               rtol=1e-12, atol=1e-14)


def test_softmax_cross_entropy_value():
    z = jnp.array([[1.0, 2.0, 3.0]])
    y = jnp.array([2])
    np.testing.assert_allclose(losses.softmax_cross_entropy(z, y),
                               jax.nn.logsumexp(z[0]) - 3.0, rtol=1e-14)


def test_target_checks():
    with pytest.raises(ValueError, match="out of range"):
        losses.check_targets(losses.softmax_cross_entropy, (3, 4), np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="shape"):
        losses.check_targets(losses.softmax_cross_entropy, (3, 4), np.zeros((3, 4), int))
    with pytest.raises(ValueError, match="shape"):
        losses.check_targets(losses.squared_error, (3, 1), np.zeros(3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        losses.check_targets(losses.sigmoid_binary_cross_entropy, (2, 1), np.array([[0.0], [2.0]]))
