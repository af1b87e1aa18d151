"""The output-Hessian factors losses register for K-FAC/EK-FAC (``influx.losses``):
``L L^T`` equals the dense output Hessian (autodiff of the loss value, independent of the
closed forms), for one output vector and for several rows (a sequence of token logits);
the sampled factor's ``E[L L^T]`` converges to it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from influx import losses


def _dense_hessian(loss_fn, z, y):
    h = jax.hessian(lambda zz: jnp.sum(loss_fn(zz, y)))(z)
    return np.asarray(h).reshape(z.size, z.size)


CASES = {
    "xent": (losses.softmax_cross_entropy, (5,), lambda k, s: jax.random.randint(k, s[:-1], 0, s[-1])),
    "xent_tokens": (losses.softmax_cross_entropy, (3, 4),
                    lambda k, s: jax.random.randint(k, s[:-1], 0, s[-1])),
    "squared": (losses.squared_error, (4,), lambda k, s: jax.random.normal(k, s)),
    "bce": (losses.sigmoid_binary_cross_entropy, (3,),
            lambda k, s: jax.random.bernoulli(k, 0.5, s).astype(jnp.float64)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_registered_factor_squares_to_the_output_hessian(name):
    loss_fn, shape, make_y = CASES[name]
    kz, ky = jax.random.split(jax.random.PRNGKey(0))
    z = 2.0 * jax.random.normal(kz, shape, jnp.float64)
    y = make_y(ky, shape)
    assert loss_fn.hessian_factor is not None
    lf = np.asarray(losses.output_factor(loss_fn, z, y))
    np.testing.assert_allclose(lf @ lf.T, _dense_hessian(loss_fn, z, y), atol=1e-12)
    # the generic fallback (eigendecomposition of the dense output Hessian) agrees
    custom = lambda zz, yy: loss_fn(zz, yy)  # noqa: E731 (a plain callable: no closed form)
    if len(shape) == 1:
        lg = np.asarray(losses.output_factor(custom, z, y))
        np.testing.assert_allclose(lg @ lg.T, _dense_hessian(loss_fn, z, y), atol=1e-12)


@pytest.mark.parametrize("name", ["xent", "squared", "bce"])
def test_sampled_factor_converges_to_the_output_hessian(name):
    loss_fn, shape, make_y = CASES[name]
    z = 1.5 * jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float64)
    y = make_y(jax.random.PRNGKey(2), shape)
    h = _dense_hessian(loss_fn, z, y)
    errs = []
    for samples in (16, 4096):
        lf = np.asarray(losses.sampled_factor(loss_fn, jax.random.PRNGKey(3), z, samples))
        assert lf.shape == (z.size, samples)
        errs.append(np.linalg.norm(lf @ lf.T - h) / np.linalg.norm(h))
    assert errs[1] < errs[0] and errs[1] < 0.1, errs
    with pytest.raises(TypeError, match="predictive distribution"):
        losses.sampled_factor(lambda zz, yy: jnp.sum(zz), jax.random.PRNGKey(0), z, 2)
