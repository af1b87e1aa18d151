"""influx: JAX-native, functional influence functions.

Sign and scale convention (every score, every response function): the predicted or
actual change ``f(theta without m) - f(theta_s)`` of a measurement ``f`` (default: the
test loss) when training example ``m`` is removed, to first order
``(1/N) grad f^T (C + lambda I)^-1 grad L(z_m)``. Positive: removing ``m`` raises ``f``
(``m`` was helpful).

Guides (sources in ``docs/``; ``python docs/build_api.py`` renders them next to this
reference): [the sign convention](guides/sign-convention.html), [which solver
when](guides/solvers.html), [bringing your own Flax model](guides/flax.html).
"""

from influx import curvature, flax, gaps, losses, metagrad, response, scoring, solvers
from influx.curvature import gnhvp, hvp
from influx.ihvp import ihvp
from influx.influence import (  # after the submodules: influx.influence is the function
    grad_dot,
    group_influence,
    influence,
    measurements,
    self_influence,
    tracin,
)
from influx.metagrad import metagradients
from influx.objective import Objective

__version__ = "0.1.0"

__all__ = ["flax", "grad_dot", "group_influence", "influence", "measurements", "scoring",
           "self_influence", "tracin", "Objective", "curvature", "gnhvp", "hvp", "ihvp", "losses", "solvers",
           "gaps", "response", "metagrad", "metagradients"]

__all__ += ["metrics", "studies"]

_LAZY = ("metrics", "studies")


def __getattr__(name):
    # ``influx.studies`` (the research harness) and ``influx.metrics`` (evaluation of
    # scores) are imported on first use, so that ``import influx`` loads only the library:
    # jax, optax, numpy, flax.
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"influx.{name}")
    raise AttributeError(f"module 'influx' has no attribute {name!r}")
