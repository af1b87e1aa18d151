"""influx._xla.jit: CPU compile options on the outermost program, plain jit elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from influx import _xla


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
    monkeypatch.setattr(_xla, "_disabled", False)
    monkeypatch.setattr(_xla, "_enabled", True)
    yield


def test_options_on_cpu_and_switch_off():
    assert jax.default_backend() == "cpu"
    assert _xla.compiler_options() == _xla.CPU_OPTIONS
    f = _xla.jit(lambda a: a + 1)
    f(jnp.zeros(2))
    _xla.set_enabled(False)
    assert _xla.compiler_options() == {}
    f(jnp.zeros(2))
    assert f._tuned._cache_size() == 1 and f._plain._cache_size() == 1  # one program each
    _xla.set_enabled(True)
    f(jnp.zeros(2))
    assert f._tuned._cache_size() == 1  # switching back does not recompile


def test_environment_switch():
    import subprocess
    import sys

    code = "import influx._xla as x; print(x.compiler_options())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "INFLUX_XLA_OPTIONS": "0"})
    assert out.stdout.strip() == "{}"


def test_outermost_program_compiled_with_the_options():
    f = _xla.jit(lambda a, *, k: a * k, static_argnames="k")
    np.testing.assert_allclose(f(jnp.arange(3.0), k=2), [0.0, 2.0, 4.0])
    assert f._tuned is not None and f._tuned._cache_size() == 1  # compiled with the options
    assert f._plain._cache_size() == 0
    assert f._cache_size() == 1
    compiled = f.lower(jnp.arange(3.0), k=2).compile()
    np.testing.assert_allclose(compiled(jnp.arange(3.0)), [0.0, 2.0, 4.0])


def test_nested_call_is_inlined_without_options():
    inner = _xla.jit(lambda a: jnp.sin(a) * 2)
    outer = _xla.jit(lambda a: inner(a) + 1)  # jax refuses options on a nested jit
    np.testing.assert_allclose(outer(jnp.ones(2)), 2 * np.sin(1.0) + 1, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda a: inner(a))(jnp.ones(2)), 2 * np.sin(1.0), rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(inner)(jnp.ones((2, 2))), 2 * np.sin(1.0), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda a: inner(a).sum())(jnp.zeros(2)), 2.0)


def test_unknown_option_falls_back_to_plain_jit(monkeypatch):
    monkeypatch.setattr(_xla, "CPU_OPTIONS", {"xla_cpu_no_such_option_for_influx": "1"})
    f = _xla.jit(lambda a: a + 1)
    np.testing.assert_allclose(f(jnp.zeros(2)), 1.0)
    assert _xla._disabled
    assert _xla.compiler_options() == {}
    g = _xla.jit(lambda a: a - 1)
    np.testing.assert_allclose(g(jnp.zeros(2)), -1.0)


def test_other_errors_propagate():
    f = _xla.jit(lambda a: a @ a)
    with pytest.raises(TypeError):
        f(jnp.ones((2, 3)))
    assert not _xla._disabled


def test_wrapping_a_wrapped_function_keeps_its_own_options():
    inner = _xla.jit(lambda a, k: a * k, static_argnames="k")
    outer = _xla.jit(inner, static_argnames="k")
    assert outer._fun is inner and outer._kwargs == {"static_argnames": "k"}
    np.testing.assert_allclose(outer(jnp.ones(2), k=3), 3.0)
    assert outer.__name__ == "<lambda>"
