"""``jit`` with the XLA compile options influx uses for its own programs.

On the CPU backend, jaxlib 0.9+ hands dot products to YNNPACK library fusions by default.
Influence workloads are dominated by skinny products -- a few dozen right-hand sides or
removed examples times hidden widths of tens to hundreds (minibatch HVPs in LiSSA, dense
Hessian columns, CG products) -- where XLA's own dot emitter is faster: 1.07-1.3x for the
direct, CG and LiSSA solves of ``benchmarks/`` and neutral for the others (measured side by
side in ``benchmarks/xla_options.py``; not used for the vmapped response programs, which
measured slower with it). :func:`jit` compiles with ``CPU_OPTIONS`` when the default
backend is the CPU and with no extra option on any other backend.

* The options apply to the outermost compiled program only: an influx function called
  inside the user's own ``jax.jit`` is inlined and compiled with the user's options.
* ``INFLUX_XLA_OPTIONS=0`` in the environment (read at import) or ``set_enabled(False)``
  turns them off: calls then run the plain ``jax.jit`` program (the two programs are cached
  separately, so switching back and forth does not recompile).
* A jaxlib that no longer knows an option falls back to plain ``jax.jit`` (once, for the
  whole process) instead of failing.
"""

from __future__ import annotations

import functools
import os

import jax

__all__ = ["CPU_OPTIONS", "jit", "compiler_options", "set_enabled", "has_primitive", "conv_on_cpu"]

#: extra XLA options for programs compiled for the CPU backend
CPU_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": ""}

_enabled = os.environ.get("INFLUX_XLA_OPTIONS", "1") != "0"
_disabled = False  # set when this jaxlib rejects an option


def set_enabled(enabled: bool) -> None:
    """Turns the options on or off for every later call (for side-by-side measurements)."""
    global _enabled
    _enabled = bool(enabled)


def compiler_options() -> dict[str, str]:
    """The options :func:`jit` passes now: ``CPU_OPTIONS`` on the CPU backend, else ``{}``."""
    if _disabled or not _enabled:
        return {}
    try:
        backend = jax.default_backend()
    except RuntimeError:  # no backend could be initialised: let jax.jit report it
        return {}
    return dict(CPU_OPTIONS) if backend == "cpu" else {}


def _tracing(args, kwargs) -> bool:
    """Whether this call happens while an outer transformation traces (``jax.jit`` accepts
    compile options on the outermost program only)."""
    try:
        from jax._src.core import trace_state_clean
    except ImportError:  # private API gone: a traced argument means an outer trace
        return any(isinstance(leaf, jax.core.Tracer)
                   for leaf in jax.tree_util.tree_leaves((args, kwargs)))
    return not trace_state_clean()


class _Jitted:
    """``jax.jit(fun, **kwargs)`` whose compile options are chosen at the first call."""

    def __init__(self, fun, kwargs):
        # name and docstring of ``fun``, not its ``__dict__`` (``fun`` may be a _Jitted)
        functools.update_wrapper(self, fun, updated=())
        self._fun = fun
        self._kwargs = kwargs
        self._plain = jax.jit(fun, **kwargs)
        self._tuned = None

    def _pick(self):
        opts = compiler_options()
        if not opts:
            return self._plain
        if self._tuned is None:
            self._tuned = jax.jit(self._fun, compiler_options=opts, **self._kwargs)
        return self._tuned

    def __call__(self, *args, **kwargs):
        global _disabled
        if _tracing(args, kwargs):  # inlined into the caller's program: no options of its own
            return self._plain(*args, **kwargs)
        f = self._pick()
        try:
            return f(*args, **kwargs)
        except jax.errors.JaxRuntimeError as e:
            if f is self._plain or "No such compile option" not in str(e):
                raise
            _disabled = True
            return self._plain(*args, **kwargs)

    def __getattr__(self, name):  # lower, trace, eval_shape, _cache_size, ...
        if name in ("_fun", "_kwargs", "_plain", "_tuned"):  # not yet set (copy, unpickle)
            raise AttributeError(name)
        return getattr(self._pick(), name)


def jit(fun=None, **kwargs):
    """Like ``jax.jit`` (same keyword arguments), compiled with :func:`compiler_options`.

    Usable as ``jit(f, static_argnames=...)``, ``@jit`` or
    ``@functools.partial(jit, static_argnames=...)``.
    """
    if fun is None:
        return functools.partial(jit, **kwargs)
    return _Jitted(fun, kwargs)


CONV_PRIMITIVES = frozenset({"conv_general_dilated"})


def has_primitive(jaxpr, names) -> bool:
    """Whether a (closed) jaxpr, or any jaxpr nested in it, has an equation of a primitive in
    ``names``."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            return True
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns") and has_primitive(inner, names):
                    return True
    return False


def conv_on_cpu(fn, *args) -> bool:
    """Whether ``fn(*args)`` has a convolution and runs on the CPU backend: XLA:CPU runs
    convolutions several times slower inside a compiled loop (``while``/``scan``, jax issue
    12868), so callers drive such loops from the host or vectorise them instead. Traces
    ``fn`` on ``args`` (arrays or ``ShapeDtypeStruct``s; no FLOPs); ``False`` when it cannot
    be traced."""
    if jax.default_backend() != "cpu":
        return False
    try:
        return has_primitive(jax.make_jaxpr(fn)(*args), CONV_PRIMITIVES)
    except Exception:  # noqa: BLE001 -- not traceable here: keep the default
        return False
