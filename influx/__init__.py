"""influx: JAX-native, functional influence functions.

Sign and scale convention (every score, every response function): the predicted or
actual change ``f(theta without m) - f(theta_s)`` of a measurement ``f`` (default: the
test loss) when training example ``m`` is removed, to first order
``(1/N) grad f^T (C + lambda I)^-1 grad L(z_m)``. Positive: removing ``m`` raises ``f``
(``m`` was helpful).
"""

from influx import curvature, losses, solvers
from influx.curvature import gnhvp, hvp
from influx.objective import Objective

__version__ = "0.1.0"

__all__ = ["Objective", "curvature", "gnhvp", "hvp", "losses", "solvers"]
