"""iHVP solvers ``b -> (C + lambda I)^-1 b`` with one interface (see :mod:`._base`).

* :func:`direct`: dense factorisation (small models; the reference).
* :func:`cg`: conjugate gradients (optionally Jacobi-preconditioned), to a tolerance.
* :func:`lissa`: stochastic Neumann series on minibatch curvature, automatic scale.
* :func:`arnoldi`: top eigenpairs by Lanczos once, low-rank inverse for any number of
  right-hand sides.
* :func:`ekfac` / :func:`kfac` (:class:`EKFAC` / :class:`KFAC`): (eigenvalue-corrected)
  Kronecker-factored Gauss-Newton, one block per linear layer that :mod:`.kron` finds in
  ``apply_fn`` -- dense layers (also at every position of a sequence, and the query, key,
  value and output projections of attention), convolutions (any number of spatial
  dimensions), embeddings (a diagonal input factor) and layers stacked under a ``scan`` --
  and the exact diagonal for the other parameters; no curvature product per solve.
  :func:`kron.layers` / :func:`kron.coverage` report which parameters got a block.

Every solver is a value (a frozen dataclass of its options: equal options, equal solvers,
shared compiled programs): ``solver(op, b)``, ``solver(op, B, batched=True)``, or
``state = solver.prepare(op)`` then ``solver.apply(state, op, b)`` /
``solver.apply_batch(state, op, B)`` / ``solver.inverse_quadratic(state, op, chunk)``.
Every solver checks the true residual of what it returns against its ``tol``. Operators:
anything implementing :class:`LinearOperator` (``influx.curvature.Operator`` does).
"""

from influx.solvers import kron
from influx.solvers._base import (
    FunctionSolver,
    LinearOperator,
    Solution,
    Solver,
    Status,
    check_solution,
    status_message,
)
from influx.solvers.arnoldi import Arnoldi, ArnoldiState, arnoldi, lanczos, top_eigenpairs
from influx.solvers.cg import CG, block_cg, cg, diagonal_preconditioner, estimate_diagonal
from influx.solvers.direct import Direct, direct
from influx.solvers.ekfac import EKFAC, KFAC, EKFACState, ekfac, kfac
from influx.solvers.lissa import LiSSA, estimate_top_eigenvalue, lissa
from influx.solvers.saved import Prepared, load_state, prepare, save_state

__all__ = [
    "CG",
    "Arnoldi",
    "ArnoldiState",
    "Direct",
    "EKFAC",
    "EKFACState",
    "FunctionSolver",
    "KFAC",
    "LiSSA",
    "LinearOperator",
    "Prepared",
    "Solution",
    "Solver",
    "Status",
    "arnoldi",
    "block_cg",
    "cg",
    "check_solution",
    "diagonal_preconditioner",
    "direct",
    "ekfac",
    "estimate_diagonal",
    "estimate_top_eigenvalue",
    "kfac",
    "kron",
    "lanczos",
    "lissa",
    "load_state",
    "prepare",
    "save_state",
    "status_message",
    "top_eigenpairs",
]
