"""iHVP solvers ``b -> (C + lambda I)^-1 b`` with one interface (see :mod:`._base`)."""

from influx.solvers._base import Solution, Solver, Status, check_solution, status_message
from influx.solvers.direct import direct

__all__ = ["Solution", "Solver", "Status", "check_solution", "status_message", "direct"]
