"""Test configuration: float64 everywhere, and small reference problems.

Every problem is ``(obj, params, data)`` with ``data = (x, y)``, small enough that dense
``(P, P)`` references (``jax.hessian``, explicit Jacobians) are cheap.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import influx  # noqa: E402
from influx import losses  # noqa: E402

# Every compiled XLA:CPU executable holds ~6 memory maps, and the kernel allows 65,530 per
# process (vm.max_map_count): the whole suite compiles enough programs to exhaust them, and
# LLVM's JIT then segfaults inside a later compile. Dropping JAX's caches after each test
# module (and within a module once the count passes a threshold) frees those maps.
_MAPS_LIMIT = 30_000


def _map_count() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


def _release_compiled():
    import gc

    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs_per_module():
    yield
    _release_compiled()


@pytest.fixture(autouse=True)
def _release_compiled_programs_when_many():
    yield
    if _map_count() > _MAPS_LIMIT:
        _release_compiled()


def _dense(key, n_in, n_out, scale=None):
    k1, k2 = jax.random.split(key)
    scale = scale if scale is not None else 1.0 / np.sqrt(n_in)
    return {"w": scale * jax.random.normal(k1, (n_in, n_out)),
            "b": 0.1 * jax.random.normal(k2, (n_out,))}


def mlp_apply(activation):
    def apply(params, x):
        h = x
        for layer in params[:-1]:
            h = activation(h @ layer["w"] + layer["b"])
        return h @ params[-1]["w"] + params[-1]["b"]
    return apply


def make_problem(name, *, n=37, seed=0):
    """Returns (obj, params, data) for a named small problem."""
    key = jax.random.PRNGKey(seed)
    kx, ky, kp = jax.random.split(key, 3)
    if name == "logistic":
        d, k = 5, 3
        x = jax.random.normal(kx, (n, d))
        y = jax.random.randint(ky, (n,), 0, k)
        params = [_dense(kp, d, k)]
        obj = influx.Objective(mlp_apply(jnp.tanh), losses.softmax_cross_entropy, l2=1e-2)
    elif name in ("tanh_mlp", "relu_mlp"):
        d, h, k = 4, 6, 3
        x = jax.random.normal(kx, (n, d))
        y = jax.random.randint(ky, (n,), 0, k)
        k1, k2 = jax.random.split(kp)
        params = [_dense(k1, d, h), _dense(k2, h, k)]
        act = jnp.tanh if name == "tanh_mlp" else jax.nn.relu
        obj = influx.Objective(mlp_apply(act), losses.softmax_cross_entropy, l2=1e-3)
    elif name == "regression_mlp":
        d, h = 3, 5
        x = jax.random.normal(kx, (n, d))
        y = jnp.sin(x[:, :1]) + 0.1 * jax.random.normal(ky, (n, 1))
        k1, k2 = jax.random.split(kp)
        params = [_dense(k1, d, h), _dense(k2, h, 1)]
        obj = influx.Objective(mlp_apply(jnp.tanh), losses.squared_error, l2=1e-3)
    elif name == "binary_mlp":
        d, h = 3, 4
        x = jax.random.normal(kx, (n, d))
        y = (jax.random.uniform(ky, (n, 2)) > 0.5).astype(jnp.float64)
        k1, k2 = jax.random.split(kp)
        params = [_dense(k1, d, h), _dense(k2, h, 2)]
        obj = influx.Objective(mlp_apply(jnp.tanh), losses.sigmoid_binary_cross_entropy, l2=0.0)
    elif name == "cnn":
        x = jax.random.normal(kx, (n, 6, 6, 1))
        y = jax.random.randint(ky, (n,), 0, 3)
        k1, k2 = jax.random.split(kp)
        params = {"conv": 0.3 * jax.random.normal(k1, (3, 3, 1, 2)),
                  "dense": _dense(k2, 2 * 4 * 4, 3)}

        def apply(p, x):
            h = jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = jnp.tanh(h).reshape(h.shape[0], -1)
            return h @ p["dense"]["w"] + p["dense"]["b"]

        obj = influx.Objective(apply, losses.softmax_cross_entropy, l2=1e-3)
    else:
        raise KeyError(name)
    return obj, params, (x, y)


PROBLEMS = ["logistic", "tanh_mlp", "relu_mlp", "regression_mlp", "binary_mlp", "cnn"]


@pytest.fixture(params=PROBLEMS)
def problem(request):
    return make_problem(request.param)
