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

import sys as _sys

from influx import attribution, curvature, flax, gaps, losses, metagrad, response, scoring, solvers
from influx.attribution import (
    grad_dot,
    group_influence,
    influence,
    measurements,
    self_influence,
    tracin,
)
from influx.curvature import gnhvp, hvp
from influx.ihvp import ihvp
from influx.metagrad import metagradients
from influx.objective import Objective
from influx.solvers.saved import Prepared, prepare

# The pairwise/self/group influence module is ``influx.attribution``; ``influx.influence`` is the
# function. The module's former name stays importable for one release (deprecated alias):
# ``from influx.influence import default_solver`` still works and does not shadow the function.
_sys.modules.setdefault("influx.influence", attribution)

__version__ = "0.1.0"

__all__ = ["attribution", "flax", "grad_dot", "group_influence", "influence", "measurements", "scoring",
           "self_influence", "tracin", "Objective", "curvature", "gnhvp", "hvp", "ihvp", "losses", "solvers",
           "gaps", "response", "metagrad", "metagradients", "Prepared", "prepare"]

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
