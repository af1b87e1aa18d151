"""Conjugate gradients for ``A x = b`` with ``A = C + (l2 + damping) I``.

Preconditioned CG (Hestenes-Stiefel) from ``x_0 = 0`` on the raveled parameter vector::

    r_0 = b,  z_0 = M^-1 r_0,  p_0 = z_0
    alpha_k = (r_k^T z_k) / (p_k^T A p_k)
    x_{k+1} = x_k + alpha_k p_k,   r_{k+1} = r_k - alpha_k A p_k
    z_{k+1} = M^-1 r_{k+1},  beta_k = (r_{k+1}^T z_{k+1}) / (r_k^T z_k),  p_{k+1} = z_{k+1} + beta_k p_k

stopped when ``||r|| <= max(tol ||b||, atol)``. The recurrence residual drifts from the
true one in finite precision, so every ``recompute_every`` steps (and always before
declaring convergence, at ``max_steps`` and after a breakdown) the true residual
``b - A x`` replaces it (residual replacement: the search direction is kept, ``r^T z`` is
recomputed). At each replacement the iterate with the lowest true residual so far is
kept; the returned ``x`` is that best iterate (never worse than ``x_0 = 0``) and
``residual_norm`` is its true residual.

In float32 the attainable relative residual is ~1e-4..1e-5 on ill-conditioned problems
(small damping); asked for less, CG loses orthogonality and the iterates can blow up
(``benchmarks/README.md``). CG therefore stops as ``STAGNATED`` when the best true
residual has not dropped by 10% over ``stagnation_window`` steps or a true residual
exceeds ``divergence_factor`` times the best, and returns the best iterate.

Failure modes, reported in ``Solution.status`` (never NaN in ``x``):

* ``NEGATIVE_CURVATURE``: ``p^T A p <= 0`` (``A`` is not positive definite, e.g. an
  undamped Hessian of a non-convex net); ``x`` is the best iterate before it.
* ``MAX_STEPS``: ``max_steps`` CG steps without reaching the tolerance.
* ``STAGNATED``: the tolerance is below what the dtype reaches (see above).
* ``NONFINITE``: NaN/inf in ``b`` (``x = 0``) or in an operator product.

Cost: one operator product per CG step plus one per residual replacement;
``Solution.iterations`` counts all of them. The loop is one ``lax.while_loop`` whose
iterations each spend one product (a CG step or a residual replacement), written for a
``(k, P)`` block of independent right-hand sides; ``apply`` runs it with ``k = 1`` and
``apply_many`` with all ``k`` (products of all right-hand sides batched, finished ones
frozen, their counters stopped).

``cg(block=True)`` instead solves batches with block CG (:func:`block_cg`): one Krylov
space shared by all right-hand sides, which typically needs far fewer steps than the
slowest of ``k`` independent CGs (measurements in ``benchmarks/README.md``). It keeps the
best iterate and detects stagnation like plain CG, and takes the same preconditioners
(block PCG); a single right-hand side is plain CG.

Preconditioners (``cg(preconditioner=...)``): ``M^-1`` must be one fixed symmetric positive
definite map. Besides a diagonal (``"jacobi"``) and a user callable, a Kronecker-factored
solver value works: ``cg(preconditioner=influx.solvers.ekfac())`` fits the EK-FAC factors
once in ``prepare`` (two passes over the data) and applies ``M^-1 r = (C_ekfac + s I)^-1 r``
with the factored inverse (two small matrix products per layer, no operator product), SPD
because every corrected eigenvalue is ``>= 0`` and ``s = l2 + damping > 0`` (checked).
Where the Kronecker approximation is good (one dense layer, badly scaled inputs), the
spectrum of ``M^-1 A`` clusters near 1 and CG needs far fewer steps. On trained deep nets
it is not: their GNH is "low rank plus shift" (most eigenvalues of ``A`` sit at the shift
``s``, where CG pays nothing for them, a few large ones set the step count), while a
block-diagonal Kronecker product has curvature in directions where the GNH has none
(cross-layer cancellations such as the ReLU rescaling symmetry, the rank of ``A (x) S``
exceeding that of the GNH). There ``M^-1 A ~ s / (lambda_kron + s) << 1``: the cluster at
the shift is spread over decades and PCG needs *more* steps than plain CG (measured on
a trained ReLU net, CNN and transformer, ``benchmarks/results/solvers_precond.json``).
``precond_damping`` adds to the shift of ``M`` only (fewer steps than with EK-FAC alone,
still more than plain CG there).

Deflation (``cg(deflate=k)``, a spectral two-level preconditioner; Carpentieri, Duff &
Giraud 2003, Saad et al. 2000): ``prepare`` runs ``k`` Lanczos steps on ``M^-1 A`` in the
``M`` inner product (``M = I`` without a preconditioner; full re-orthogonalisation; ``k``
operator products, once per operator, shared by every right-hand side), giving Ritz pairs
``(theta_i, u_i)`` with ``U^T M U = I``, and replaces the preconditioner by::

    M_k^-1 = c^-1 M^-1 + U diag(1/theta_i - 1/c) U^T,     c = s (M = I),  c = 1 (else)

so that ``M_k^-1 A u_i = u_i`` for converged Ritz pairs and the rest of the spectrum is
that of ``c^-1 M^-1 A`` (without a preconditioner: ``A / s >= 1``, the deflated
eigenvalues move to the bottom of the spectrum, 1). ``M_k`` is symmetric positive definite
for any ``U`` with ``U^T M U = I`` and ``theta_i > 0`` (its eigenvalues in the ``M`` metric
are ``1/theta_i`` and ``1/c``), so inexact Ritz vectors cost steps, never correctness;
pairs with ``theta_i <= 0`` (an indefinite Hessian) are left out. Without a
preconditioner this is the damped low-rank inverse of :func:`influx.solvers.arnoldi` with
``complement=True`` used as a preconditioner, and CG then corrects what the rank misses.
It removes the top of the spectrum, which is what sets CG's step count on low-rank-plus-
shift curvature: on the trained CNN of ``benchmarks/models.py`` (N = 2000, shift 1e-2, tol
1e-3, float32) plain CG takes 29 steps, ``deflate=20`` 10 and ``deflate=50`` 6, EK-FAC PCG
60; at shift 2e-3 (a smaller tanh CNN) 99, 63, 45 and not converged in 150
(``benchmarks/README.md``). Cost: ``k`` products
and ``2 k P`` numbers (``3 k P`` with a preconditioner) in ``prepare`` (checked against the
memory available), two ``(k, P)`` products per step.

Loops (``cg(loop=...)``): XLA:CPU runs convolutions several times slower inside a
``lax.while_loop`` than as a standalone program (jax issue 12868). ``loop="host"`` runs the
same iteration with every step one compiled program called from Python (one
device-to-host sync of a boolean per step), ``"compiled"`` as one ``while_loop``, and the
default ``"auto"`` picks ``"host"`` for operators on CPU whose product contains a
convolution (:func:`has_convolution`). Both give the same iterates (same program text per
step) and the same stopping rule; host-driven solves can show a progress bar
(``progress=``).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influx import _memory, _progress
from influx._xla import CONV_PRIMITIVES, has_primitive, jit
from influx.errors import InputError
from influx.solvers._base import (
    Solution,
    Solver,
    Status,
    _concrete_float,
    check_rhs,
    compiled,
    flat_matvec,
    is_positive_semidefinite,
    key_array,
    key_tuple,
    ravel_batch,
)
from influx.solvers.ekfac import EKFAC, EKFACState
from influx.solvers.ekfac import _inverse as _ekfac_inverse
from influx.solvers.ekfac import ekfac as _ekfac_factory
from influx.solvers.ekfac import kfac as _kfac_factory
from influx.validation import check_int, check_positive_int

__all__ = ["CG", "LOOPS", "cg", "block_cg", "diagonal_preconditioner", "estimate_diagonal",
           "has_convolution", "linear_inverse"]


LOOPS = ("auto", "compiled", "host")


@dataclasses.dataclass(frozen=True, repr=False)
class CG(Solver):
    """Conjugate gradients (made by :func:`cg`; the fields are its options)."""

    name: ClassVar[str] = "cg"
    tol: float = 1e-6
    atol: float = 0.0
    max_steps: int = 1000
    preconditioner: Callable | str | Solver | None = None
    recompute_every: int = 50
    stagnation_window: int | None = None
    divergence_factor: float = 100.0
    precond_samples: int = 32
    key: tuple = (0, 0)
    block: bool = False
    loop: str = "auto"
    precond_damping: float = 0.0
    deflate: int = 0
    # not an option of the math: excluded from equality, hashing and options (fingerprints)
    progress: bool | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def window(self) -> int:
        return 3 * self.recompute_every if self.stagnation_window is None else self.stagnation_window

    # -- prepare ------------------------------------------------------------------------
    def prepare(self, op):
        """The preconditioner's state: ``{}`` (none or a callable), ``{"inv_diag": ...}``
        (``"jacobi"``, ``precond_samples`` products) or ``{"precond": state}`` (a solver value
        such as ``ekfac()``: its ``prepare(op)``, e.g. the Kronecker factors); with
        ``deflate=k`` also ``"deflation"``: ``{"u": (k, P) M-orthonormal Ritz vectors,
        "d": 1/theta - 1/c, "scale": 1/c, "ritz": theta}`` (``k`` operator products)."""
        shift = _concrete_float(getattr(op, "shift", None))
        if not is_positive_semidefinite(op) and shift is not None and shift <= 0:
            warnings.warn("cg: the operator is not tagged positive semidefinite (e.g. kind='hessian') and "
                          "has no shift (l2 + damping = 0); CG needs a positive definite operator and "
                          "stops with NEGATIVE_CURVATURE if it meets p^T A p <= 0: add damping or use "
                          "kind='gnh'", RuntimeWarning, stacklevel=2)
        state = self._prepare_base(op)
        if self.deflate:
            state = {**state, "deflation": self._prepare_deflation(state, op, shift)}
        return state

    def _prepare_base(self, op):
        pre = self.preconditioner
        if isinstance(pre, Solver):
            try:
                pstate = pre.prepare(op)
            except InputError as e:
                raise InputError(f"cg: the preconditioner {pre!r} cannot be prepared for this operator: "
                                 f"{e}") from None
            if self.precond_damping and isinstance(pstate, EKFACState):
                pstate = dataclasses.replace(pstate, shift=pstate.shift + self.precond_damping)
            return {"precond": pstate}
        if pre == "jacobi":
            return compiled(CG._prepare_jacobi)(self, op)
        return {}

    def _prepare_jacobi(self, op):
        return {"inv_diag": 1.0 / estimate_diagonal(op, key_array(self.key), samples=self.precond_samples)}

    # -- deflation: a spectral correction of M^-1 from Lanczos on M^-1 A ----------------------
    def _prepare_deflation(self, state, op, shift):
        """``{"u", "d", "scale", "ritz"}`` of :func:`_deflation_finish`, after ``deflate``
        Lanczos steps on ``M^-1 A`` (host-driven like the CG loop, see ``loop``)."""
        p = sum(int(np.size(l)) for l in jax.tree_util.tree_leaves(op.params))
        m = min(self.deflate, p)
        if self.preconditioner is None and shift is not None and shift <= 0:
            raise InputError(f"cg: deflate={self.deflate} without a preconditioner maps the complement of "
                             "the deflated space by 1/shift and needs l2 + damping > 0, got shift "
                             f"{shift:g}: add damping or give a preconditioner")
        itemsize = jnp.result_type(*jax.tree_util.tree_leaves(op.params)).itemsize
        copies = 2 if self.preconditioner is None else 3  # basis (and M times it), Ritz vectors
        _memory.check_fits(copies * m * p * itemsize,
                           what=f"cg: the deflation basis ({m} x {p:,}, deflate={self.deflate})",
                           alternative="lower deflate, or use deflate=0")
        if self._on_host(state, op, ()):
            carry = compiled(CG._lanczos_start)(self, state, op)
            for j in range(m):
                carry = compiled(CG._lanczos_step)(self, state, op, carry, jnp.int32(j))
            return compiled(CG._lanczos_finish)(self, state, op, carry)
        return compiled(CG._lanczos_all)(self, state, op)

    def _lanczos_parts(self, state, op):
        flat, unravel = ravel_pytree(op.params)
        dtype = flat.dtype
        mv = flat_matvec(op, unravel, dtype)
        return flat, dtype, mv, self._base_psolve(state, unravel, dtype)

    def _lanczos_start(self, state, op):
        flat, dtype, _, base = self._lanczos_parts(state, op)
        r = jax.random.normal(jax.random.fold_in(key_array(self.key), 1), flat.shape, dtype)
        return _lanczos_start(r, base, min(self.deflate, flat.shape[0]))

    def _lanczos_step(self, state, op, carry, j):
        _, _, mv, base = self._lanczos_parts(state, op)
        return _lanczos_step(mv, base, carry, j)

    def _lanczos_finish(self, state, op, carry):
        flat, dtype, _, base = self._lanczos_parts(state, op)
        scale = 1.0 / jnp.asarray(op.shift, dtype) if base is None else jnp.ones((), dtype)
        return _deflation_finish(carry, scale)

    def _lanczos_all(self, state, op):
        carry = self._lanczos_start(state, op)
        m = carry["v"].shape[0]
        carry = jax.lax.fori_loop(0, m, lambda j, c: self._lanczos_step(state, op, c, j), carry)
        return self._lanczos_finish(state, op, carry)

    def _psolve(self, state, unravel, dtype):
        """``r -> M^-1 r`` on flat vectors (with the deflation correction when ``deflate``),
        or ``None`` without either."""
        base = self._base_psolve(state, unravel, dtype)
        if "deflation" not in state:
            return base
        dfl = state["deflation"]
        u, d, scale = dfl["u"].astype(dtype), dfl["d"].astype(dtype), dfl["scale"].astype(dtype)
        base = (lambda r: r) if base is None else base
        return lambda r: scale * base(r) + (d * (u @ r)) @ u

    def _base_psolve(self, state, unravel, dtype):
        """``r -> M^-1 r`` of the preconditioner alone, or ``None`` without one."""
        pre = self.preconditioner
        if isinstance(pre, Solver):
            inverse, pstate = linear_inverse(pre), state["precond"]
            return lambda r: ravel_pytree(inverse(pstate, unravel(r)))[0].astype(dtype)
        if pre == "jacobi":
            inv_diag = state["inv_diag"].astype(dtype)
            return lambda r: inv_diag * r
        if callable(pre):
            return lambda r: ravel_pytree(pre(unravel(r)))[0].astype(dtype)
        return None

    # -- the iteration as a program: (start, running, step, finish) ---------------------------
    def _program(self, state, op, bs):
        """The loop over the ``(k, P)`` rows of the batched pytree ``bs``: independent CGs
        (:func:`_cg_program`) or, with ``block=True``, block CG (:func:`_block_program`)."""
        flat_bs, unravel = ravel_batch(bs)
        mv = flat_matvec(op, unravel, flat_bs.dtype)
        psolve = self._psolve(state, unravel, flat_bs.dtype)
        opts = dict(tol=self.tol, atol=self.atol, max_steps=self.max_steps,
                    recompute_every=self.recompute_every, stagnation_window=self.window,
                    divergence_factor=self.divergence_factor)
        if self.block:
            return _block_program(jax.vmap(mv), None if psolve is None else jax.vmap(psolve), flat_bs,
                                  **opts), unravel
        return _cg_program(mv, psolve, flat_bs, **opts), unravel

    def _solve_rows(self, state, op, bs) -> Solution:
        """All rows of ``bs`` in one ``lax.while_loop`` (the compiled loop)."""
        prog, unravel = self._program(state, op, bs)
        c = jax.lax.while_loop(prog.running, prog.step, prog.start())
        return _solution(prog.finish(c), unravel)

    def _apply(self, state, op, b) -> Solution:
        sol = self._plain()._solve_rows(state, op, jax.tree_util.tree_map(lambda a: a[None], b))
        return jax.tree_util.tree_map(lambda a: a[0], sol)

    def apply(self, state, op, b) -> Solution:
        b = check_rhs(op, b)
        if self._on_host(state, op, b):
            sol = self._plain()._host_solve(state, op, jax.tree_util.tree_map(lambda a: a[None], b))
            return jax.tree_util.tree_map(lambda a: a[0], sol)
        return compiled(CG._apply)(self, state, op, b)

    def apply_many(self, state, op, bs) -> Solution:
        """Independent CGs in one loop (``block=False``), or block CG (``block=True``); the
        operator's data chunks are sized for the batch's products at once."""
        if hasattr(op, "for_vectors"):
            op = op.for_vectors(int(jax.tree_util.tree_leaves(bs)[0].shape[0]))
        if not self.block:
            return jax.vmap(lambda b: self._apply(state, op, b))(bs)
        return self._solve_rows(state, op, bs)

    def apply_batch(self, state, op, bs) -> Solution:
        """:meth:`apply_many` in one compiled call, or driven from the host (``loop``)."""
        bs = check_rhs(op, bs, batched=True)
        if self._on_host(state, op, bs):
            return self._host_solve(state, op, bs)
        return compiled(CG.apply_many)(self, state, op, bs)

    def _plain(self) -> CG:
        """This solver for a single right-hand side (block CG of one row is plain CG)."""
        return dataclasses.replace(self, block=False) if self.block else self

    # -- the host-driven loop ---------------------------------------------------------------
    def host_driven(self, op) -> bool:
        """Whether solves of ``op`` called outside any trace run the host-driven loop
        (``loop="host"``, or ``"auto"`` with a convolution on CPU): callers that would wrap
        :meth:`apply_batch` in their own ``jit`` should call it directly instead."""
        return self._on_host({}, op, ())

    def _on_host(self, state, op, b) -> bool:
        """Whether to drive the loop from Python: ``loop="host"``, or ``"auto"`` on a CPU
        operator whose product contains a convolution; never under a trace (``jit``/``vmap``
        of ``apply``), where the loop is necessarily compiled."""
        if self.loop == "compiled":
            return False
        if any(isinstance(l, jax.core.Tracer) for l in jax.tree_util.tree_leaves((state, op, b))):
            return False
        return self.loop == "host" or (_on_cpu(op) and has_convolution(op))

    def _host_start(self, state, op, bs):
        prog, _ = self._program(state, op, bs)
        c = prog.start()
        return c, prog.running(c), prog.info(c)

    def _host_step(self, state, op, bs, c):
        prog, _ = self._program(state, op, bs)
        c = prog.step(c)
        return c, prog.running(c), prog.info(c)

    def _host_finish(self, state, op, bs, c):
        prog, unravel = self._program(state, op, bs)
        return _solution(prog.finish(c), unravel)

    def _host_solve(self, state, op, bs) -> Solution:
        """The loop of :meth:`_solve_rows` with every iteration one compiled program called
        from Python (same state, same stopping rule; XLA:CPU runs convolutions several
        times slower inside a ``while_loop``, jax issue 12868)."""
        c, running, info = compiled(CG._host_start)(self, state, op, bs)
        shown = 0
        with _progress.bar(self.progress, total=self.max_steps, desc="influx.cg", unit="steps") as bar:
            while bool(running):
                c, running, info = compiled(CG._host_step)(self, state, op, bs, c)
                steps, worst = (float(v) for v in info)
                if steps > shown:
                    if hasattr(bar, "set_postfix_str"):  # tqdm: the worst relative residual
                        bar.set_postfix_str(f"rel. residual {worst:.2e}", refresh=False)
                    bar.update(int(steps) - shown)
                    shown = int(steps)
        return compiled(CG._host_finish)(self, state, op, bs, c)


def cg(*, tol: float = 1e-6, atol: float = 0.0, max_steps: int = 1000,
       preconditioner: Callable | str | Solver | None = None, recompute_every: int = 50,
       stagnation_window: int | None = None, divergence_factor: float = 100.0,
       precond_samples: int = 32, key=None, block: bool = False, loop: str = "auto",
       precond_damping: float = 0.0, deflate: int = 0, progress: bool | None = None) -> CG:
    """Conjugate-gradient solver (see module docstring); returns a :class:`CG` value.

    Args:
      tol: relative tolerance, stop when ``||b - A x|| <= tol ||b||`` (true residual).
      atol: absolute tolerance (the stopping threshold is ``max(tol ||b||, atol)``).
      max_steps: maximum number of CG steps per right-hand side.
      preconditioner: ``M^-1`` (``M`` symmetric positive definite, fixed), one of

        * ``None``: plain CG;
        * a Kronecker-factored solver value, ``influx.solvers.ekfac()`` or ``kfac()`` (or the
          strings ``"ekfac"``, ``"kfac"`` for their defaults): prepared once in ``prepare``
          (its factor passes over the data), applied as its factored inverse
          ``(C_kron + shift I)^-1 r`` (no operator product; its ``tol``/``residual`` options
          do not apply). Any solver value with a method ``precondition(state, v)`` works too;
        * ``"jacobi"``: a diagonal estimated once in ``prepare`` by Hutchinson's method with
          ``precond_samples`` products (see :func:`estimate_diagonal`);
        * a callable ``v -> M^-1 v`` on pytrees like the params (the solver then hashes by
          the callable's identity).
      precond_damping: extra damping of a Kronecker-factored preconditioner only:
        ``M = C_kron + (l2 + damping + precond_damping) I`` (``A`` and the answer are
        unchanged). Where the approximation underestimates the curvature, ``M^-1 A`` has
        eigenvalues up to ``C / shift``; a larger shift in ``M`` bounds them (at the price
        of a weaker preconditioner where it is accurate).
      deflate: ``k > 0``: correct the preconditioner (or the identity) by the top of the
        spectrum of ``M^-1 A`` found by ``k`` Lanczos steps in ``prepare`` (``k`` operator
        products, once per operator; see the module docstring): ``M_k^-1 = c^-1 M^-1 + U
        (Theta^-1 - 1/c) U^T``, ``c`` the shift without a preconditioner, else 1. Pays off
        when one ``prepare`` serves many right-hand sides (influence of many queries).
        Needs ``l2 + damping > 0`` without a preconditioner. ``0`` (default): none.
      recompute_every: replace the recurrence residual by the true residual every this
        many steps (one extra product each time).
      stagnation_window: stop with ``Status.STAGNATED`` when the best true residual has
        not dropped by 10% over this many CG steps (default ``3 * recompute_every``).
      divergence_factor: stop with ``Status.STAGNATED`` when a true residual exceeds this
        factor times the best one seen (loss of orthogonality in low precision).
      precond_samples, key: Hutchinson samples and PRNG key for ``"jacobi"``.
      block: solve batches of right-hand sides (``apply_batch``, :func:`influx.influence`)
        with block CG (:func:`block_cg`): one shared Krylov space, fewer iterations than
        independent CGs. A single right-hand side is plain CG.
      loop: ``"compiled"``: the iteration is one ``lax.while_loop`` (one program);
        ``"host"``: every iteration is one compiled program called from Python (same
        math, same stopping rule, one device-to-host sync per iteration); ``"auto"``
        (default): ``"host"`` when the operator lives on CPU and its product contains a
        convolution (XLA:CPU runs convolutions several times slower inside a compiled
        loop, jax issue 12868; see ``docs/solvers.md``), else ``"compiled"``. Under
        ``jit``/``vmap`` of ``apply`` the loop is always compiled.
      progress: a progress bar (steps, worst relative residual) for host-driven solves:
        tqdm when installed (the ``studies`` extra), else a line on stderr every 10 s;
        ``None``: when stderr is a terminal. Not part of the solver's identity.

    CG needs a positive definite ``A``: on an operator not tagged positive semidefinite
    (``kind="hessian"``) it stops with ``NEGATIVE_CURVATURE`` when it meets ``p^T A p <= 0``.
    """
    tol, atol = float(tol), float(atol)
    if not tol >= 0 or not atol >= 0:
        raise InputError(f"cg: tol and atol must be >= 0, got tol={tol}, atol={atol}")
    check_positive_int(max_steps, "cg: max_steps")
    check_positive_int(recompute_every, "cg: recompute_every")
    window = 3 * recompute_every if stagnation_window is None else stagnation_window
    check_positive_int(window, "cg: stagnation_window")
    divergence_factor = float(divergence_factor)
    if not divergence_factor > 1:
        raise InputError(f"cg: divergence_factor must be > 1, got {divergence_factor}")
    preconditioner = _check_preconditioner(preconditioner)
    if preconditioner == "jacobi":
        check_positive_int(precond_samples, "cg: precond_samples")
    precond_damping = float(precond_damping)
    if not precond_damping >= 0:
        raise InputError(f"cg: precond_damping must be >= 0, got {precond_damping}")
    deflate = check_int(deflate, "cg: deflate", minimum=0)
    if loop not in LOOPS:
        raise InputError(f"cg: loop must be one of {LOOPS}, got {loop!r}")
    if progress is not None and not isinstance(progress, bool):
        raise InputError(f"cg: progress must be None, True or False, got {progress!r}")
    return CG(tol=tol, atol=atol, max_steps=int(max_steps), preconditioner=preconditioner,
              recompute_every=int(recompute_every), stagnation_window=stagnation_window,
              divergence_factor=divergence_factor, precond_samples=int(precond_samples),
              key=key_tuple(key), block=bool(block), loop=loop, precond_damping=precond_damping,
              deflate=int(deflate), progress=progress)


# ------------------------------------------------------------------ solver values as preconditioners
def linear_inverse(solver: Solver) -> Callable | None:
    """``(state, v) -> M^-1 v`` of a solver usable as a CG preconditioner, or ``None``.

    A preconditioner must be a *fixed* symmetric positive definite linear map: EK-FAC and
    K-FAC's factored inverse ``Q [(Q^T v) / (Lambda + s)] Q^T`` (blockwise, plus
    ``v / (d + s)`` on the diagonal leaves) is one for ``s > 0``; so is any solver value
    with a method ``precondition(state, v)``. Iterative solvers (cg, lissa) are not fixed
    linear maps (plain CG with them as ``M^-1`` is not valid), and direct solves are the
    answer itself.
    """
    method = getattr(solver, "precondition", None)
    if callable(method):
        return lambda state, v: method(state, v)
    if isinstance(solver, EKFAC):  # also KFAC
        return _ekfac_inverse
    return None


def _check_preconditioner(pre):
    if isinstance(pre, str) and pre in ("ekfac", "kfac"):
        return _ekfac_factory() if pre == "ekfac" else _kfac_factory()
    if isinstance(pre, Solver):
        if linear_inverse(pre) is None:
            raise InputError(f"cg: the preconditioner {pre!r} is a solver without a fixed linear "
                             "inverse (M^-1 must be the same symmetric positive definite map at every "
                             "step): use influx.solvers.ekfac(), kfac(), 'jacobi', or a callable "
                             "v -> M^-1 v")
        return pre
    if pre is None or (isinstance(pre, str) and pre == "jacobi") or callable(pre):
        return pre
    raise InputError("cg: preconditioner must be None, 'jacobi', 'ekfac', 'kfac', a solver value such as "
                     f"influx.solvers.ekfac(), or a callable v -> M^-1 v, got {pre!r}")


def _solution(out, unravel) -> Solution:
    x, res, prods, status, stats = out
    return Solution(jax.vmap(unravel)(x), res, prods, status == Status.CONVERGED, status, stats)


# ------------------------------------------------------------------ host loop helpers
def _on_cpu(op) -> bool:
    leaves = jax.tree_util.tree_leaves(getattr(op, "params", None))
    for leaf in leaves:
        devices = getattr(leaf, "devices", None)
        if callable(devices):
            try:
                return all(d.platform == "cpu" for d in devices())
            except Exception:  # noqa: BLE001 -- a committed/deleted array: fall back to the backend
                break
    return jax.default_backend() == "cpu"


@functools.lru_cache(maxsize=64)
def _product_has_convolution(treedef, avals) -> bool:
    def product(leaves):
        op = jax.tree_util.tree_unflatten(treedef, leaves)
        return op(op.params)

    return has_primitive(jax.make_jaxpr(product)(list(avals)), CONV_PRIMITIVES)


def has_convolution(op) -> bool:
    """Whether the operator product ``op(v)`` contains a convolution (traced once per
    operator structure, shapes and dtypes; ``False`` when it cannot be traced)."""
    leaves, treedef = jax.tree_util.tree_flatten(op)
    try:
        avals = tuple(jax.ShapeDtypeStruct(np.shape(l), jnp.result_type(l)) for l in leaves)
        return _product_has_convolution(treedef, avals)
    except Exception:  # noqa: BLE001 -- an operator we cannot trace abstractly: keep the compiled loop
        return False


def _orthonormal_rows(m):
    """An orthonormal basis of the row space of ``m`` (``(k, P)``), as ``k`` rows of which
    the surplus ones are zero: rows are scaled to unit norm, then ``m <- diag(w)^-1/2 V^T m``
    from the eigendecomposition ``m m^T = V diag(w) V^T`` (cheap for small ``k``), with
    eigenvalues ``<= 100 k eps max(w)`` (dependent directions, e.g. converged columns or
    repeated right-hand sides) dropped; done twice for orthogonality in float32."""
    k = m.shape[0]
    eps = jnp.finfo(m.dtype).eps
    for _ in range(2):
        nrm = jnp.sqrt(jnp.sum(m * m, axis=1, keepdims=True))
        m = m / jnp.where(nrm > 0, nrm, 1.0)
        w, v = jnp.linalg.eigh(m @ m.T)
        keep = w > 100 * k * eps * jnp.max(w)
        m = (v * jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, w, 1.0)), 0.0)).T @ m
    return m


class _Program(NamedTuple):
    """An iteration as pure functions of its loop state ``c``: ``start() -> c``,
    ``running(c) -> bool``, ``step(c) -> c``, ``finish(c) -> (x, res, prods, status, stats)``
    and ``info(c) -> (steps, worst relative residual)`` (the progress bar). The compiled loop
    is ``finish(lax.while_loop(running, step, start()))``; the host loop calls the same
    ``step`` as its own program."""

    start: Callable
    running: Callable
    step: Callable
    finish: Callable
    info: Callable


def block_cg(mv, b, *, tol, atol, max_steps, recompute_every, stagnation_window=None,
             divergence_factor=100.0, psolve=None):
    """Block conjugate gradients (O'Leary 1980) for ``A X = B``, ``B`` of shape ``(k, P)``.

    All ``k`` right-hand sides share one Krylov space ``span{R_0, A R_0, ...}`` (k vectors
    per step), which typically needs far fewer steps than ``k`` independent CGs. Search
    directions are kept orthonormal (Dubrulle 2001, "retooling"; dependent ones dropped,
    see :func:`_orthonormal_rows`),
    and the ``k x k`` systems with ``P^T A P`` are solved through its eigendecomposition,
    dropping directions with eigenvalue ``<= 1e3 eps max|w|`` (rank deficiency once some
    columns have converged)::

        P_0 = orth(Z_0),   Q = A P,   alpha = (P^T Q)^+ P^T R,   X += P alpha,  R -= Q alpha,
        Z = M^-1 R,   beta = -(P^T Q)^+ Q^T Z,   P = orth(Z + P beta)

    (matrices as rows here; ``Z = R`` without a preconditioner). ``mv`` is the operator
    ``vmap``-ed over rows, ``psolve`` (optional) ``M^-1`` ``vmap``-ed over rows, ``M``
    symmetric positive definite: the search space is then the block Krylov space of
    ``M^-1 A`` on ``M^-1 B`` (block PCG), the residual still the true ``B - A X``. The recurrence
    residual is replaced by the true ``B - A X`` every ``recompute_every`` steps and before
    stopping; the loop stops when every true residual is ``<= max(tol ||b||, atol)``, at
    ``max_steps`` steps, or when ``P^T A P`` has an eigenvalue ``< -1e3 eps max|w|``
    (``NEGATIVE_CURVATURE``: the operator is not positive definite). As in :func:`cg`,
    the iterate with the smallest worst-row residual ratio ``max_j ||r_j|| / thresh_j`` is
    kept, and the loop stops as ``STAGNATED`` when that ratio has not dropped by 10% over
    ``stagnation_window`` steps (default ``3 * recompute_every``) or exceeds
    ``divergence_factor`` times its best (loss of orthogonality in low precision); the
    better of the last and the best iterate is returned. Returns ``(x, true residual
    norms, products per column, status, stats)``; non-finite rows of ``B`` are
    ``NONFINITE`` (solved as zero).

    (Over 80 lines: the loop body is one closure over the loop state, so that one
    ``lax.while_loop`` iteration is readable as the recurrence above.)
    """
    prog = _block_program(mv, psolve, b, tol=tol, atol=atol, max_steps=max_steps,
                          recompute_every=recompute_every, stagnation_window=stagnation_window,
                          divergence_factor=divergence_factor)
    return prog.finish(jax.lax.while_loop(prog.running, prog.step, prog.start()))


def _block_program(mv, psolve, b, *, tol, atol, max_steps, recompute_every, stagnation_window=None,
                   divergence_factor=100.0) -> _Program:
    """:func:`block_cg` as a :class:`_Program`."""
    psolve = (lambda r: r) if psolve is None else psolve
    dtype = b.dtype
    k = b.shape[0]
    eps = jnp.finfo(dtype).eps
    norm = lambda u: jnp.sqrt(jnp.sum(u * u, axis=1))
    b_norm = norm(b)
    finite_b = jnp.all(jnp.isfinite(b), axis=1)
    b0 = jnp.where(finite_b[:, None], b, 0)
    b_norm = jnp.where(finite_b, b_norm, 0)
    thresh = jnp.maximum(tol * b_norm, atol).astype(dtype)
    scale = jnp.where(thresh > 0, thresh, jnp.where(b_norm > 0, b_norm, 1.0))
    window = 3 * recompute_every if stagnation_window is None else stagnation_window
    worst = lambda r: jnp.max(jnp.where(finite_b, norm(r) / scale, 0.0))

    def cond(c):
        return c["running"]

    def body(c):
        x, r, p, it, j = c["x"], c["r"], c["p"], c["it"], c["j"]
        q = mv(p)
        pap = p @ q.T
        w, v = jnp.linalg.eigh(0.5 * (pap + pap.T))
        wmax = jnp.max(jnp.abs(w))
        keep = w > 1e3 * eps * wmax
        neg = jnp.any(w < -1e3 * eps * wmax) | ~jnp.all(jnp.isfinite(w))
        pinv = (v * jnp.where(keep, 1.0 / jnp.where(keep, w, 1.0), 0.0)) @ v.T
        alpha = pinv @ (p @ r.T)
        x_new = x + alpha.T @ p
        r_new = r - alpha.T @ q
        # residual replacement: every recompute_every steps and when the recurrence says done
        done_rec = jnp.all(norm(r_new) <= thresh)
        replace = (j + 1 >= recompute_every) | done_rec | (it + 1 >= max_steps)
        r_true = jax.lax.cond(replace, lambda: b0 - mv(x_new), lambda: r_new)
        z = psolve(r_true)
        beta = -pinv @ (q @ z.T)
        p_new = _orthonormal_rows(z + beta.T @ p)
        converged = replace & jnp.all(norm(r_true) <= thresh)
        ok = ~neg & jnp.all(jnp.isfinite(x_new)) & jnp.all(jnp.isfinite(r_true))
        ratio = jnp.where(ok, worst(r_true), jnp.inf)
        improve = ratio < c["best"]
        signif = ratio < 0.9 * c["anchor"]
        anchor_it = jnp.where(signif, it + 1, c["anchor_it"])
        stalled = ((it + 1 - anchor_it) >= window) | (ratio > divergence_factor * c["best"])
        running = ok & ~converged & (it + 1 < max_steps) & ~stalled
        return {"x": jnp.where(ok, x_new, x), "r": jnp.where(ok, r_true, r),
                "p": p_new, "it": it + 1, "j": jnp.where(replace, 0, j + 1),
                "prods": c["prods"] + 1 + replace.astype(jnp.int32), "running": running,
                "neg": neg, "bad": ~jnp.all(jnp.isfinite(x_new)), "stalled": stalled & ok,
                "x_best": jnp.where(improve, x_new, c["x_best"]),
                "best": jnp.where(improve, ratio, c["best"]),
                "anchor": jnp.where(signif, ratio, c["anchor"]), "anchor_it": anchor_it}

    def start():
        r0 = worst(b0)
        return {"x": jnp.zeros_like(b0), "r": b0, "p": _orthonormal_rows(psolve(b0)),
                "it": jnp.int32(0), "j": jnp.int32(0), "prods": jnp.int32(0),
                "running": jnp.any(norm(b0) > thresh), "neg": jnp.bool_(False),
                "bad": jnp.bool_(False), "stalled": jnp.bool_(False), "x_best": jnp.zeros_like(b0),
                "best": r0, "anchor": r0, "anchor_it": jnp.int32(0)}

    def info(c):
        rel = norm(c["r"]) / jnp.where(b_norm > 0, b_norm, 1.0)
        return c["it"], jnp.max(jnp.where(finite_b, rel, 0.0))

    return _Program(start, cond, body, lambda c: _block_finish(c, mv, b0, k, thresh, finite_b, b_norm,
                                                                 worst, norm, dtype), info)


def _block_finish(c, mv, b0, k, thresh, finite_b, b_norm, worst, norm, dtype):
    """Block CG's answer from its final loop state: the better of the last and the best
    iterate, by true residuals (two products per row)."""
    # the better (worst-row residual ratio) of the last and the best iterate, true residuals
    both = mv(jnp.concatenate([c["x"], c["x_best"]]))
    r_last, r_best = b0 - both[:k], b0 - both[k:]
    use_best = worst(r_best) < worst(r_last)
    x = jnp.where(use_best, c["x_best"], c["x"])
    res = norm(jnp.where(use_best, r_best, r_last))
    status = jnp.where(res <= thresh, Status.CONVERGED,
                       jnp.where(c["neg"], Status.NEGATIVE_CURVATURE,
                                 jnp.where(c["bad"], Status.NONFINITE,
                                           jnp.where(c["stalled"], Status.STAGNATED, Status.MAX_STEPS))))
    status = jnp.where(finite_b, status, Status.NONFINITE).astype(jnp.int32)
    res = jnp.where(finite_b, res, jnp.inf).astype(dtype)
    prods = jnp.broadcast_to(c["prods"] + 2, (k,))
    stats = {"steps": jnp.broadcast_to(c["it"], (k,)),
             "relative_residual": res / jnp.where(b_norm > 0, b_norm, 1.0)}
    return x, res, prods, status, stats


def _cg_columns(mv, psolve, b, **options):
    """CG on ``b`` of shape ``(k, P)`` in one ``lax.while_loop`` (:func:`_cg_program`)."""
    prog = _cg_program(mv, psolve, b, **options)
    return prog.finish(jax.lax.while_loop(prog.running, prog.step, prog.start()))


def _cg_program(mv, psolve, b, *, tol, atol, max_steps, recompute_every, stagnation_window,
                divergence_factor) -> _Program:
    """CG on ``b`` of shape ``(k, P)``: every column is an independent CG run.

    ``mv``/``psolve`` act on one flat vector and are ``vmap``-ed over the block. One loop
    iteration spends one product per running column: a CG step, or (every
    ``recompute_every`` steps, when the recurrence residual claims convergence, at
    ``max_steps`` and after a breakdown) a true-residual replacement ``r = b - A x``, at
    which the best iterate so far is updated and stagnation / divergence are checked.

    (Over 80 lines: the loop body is one closure over the loop state -- a CG step and a
    residual replacement side by side, selected per column.)
    """
    dtype = b.dtype
    k = b.shape[0]
    vmv, vpsolve = jax.vmap(mv), jax.vmap((lambda r: r) if psolve is None else psolve)
    dot = lambda u, v: jnp.sum(u * v, axis=1)
    norm = lambda u: jnp.sqrt(jnp.sum(u * u, axis=1))
    col = lambda m: m[:, None]
    b_norm = norm(b)
    finite_b = jnp.all(jnp.isfinite(b), axis=1)
    thresh = jnp.maximum(tol * b_norm, atol).astype(dtype)
    b0 = jnp.where(col(finite_b), b, 0)

    def start():
        z0 = vpsolve(b0)
        status0 = jnp.where(~finite_b, Status.NONFINITE,
                            jnp.where(norm(b0) <= thresh, Status.CONVERGED, Status.RUNNING))
        izero = jnp.zeros((k,), jnp.int32)
        res0 = jnp.where(finite_b, norm(b0), jnp.inf).astype(dtype)
        return {
            "x": jnp.zeros_like(b0), "r": b0, "p": z0, "rz": dot(b0, z0),
            "steps": izero, "prods": izero, "j": izero, "status": status0.astype(jnp.int32),
            "pending": jnp.full((k,), Status.RUNNING, jnp.int32),  # breakdown seen, awaiting true r
            "x_best": jnp.zeros_like(b0), "res_best": res0,
            "anchor": res0, "anchor_step": izero,  # last significant (x0.9) improvement of res_best
        }

    def cond(c):
        return jnp.any(c["status"] == Status.RUNNING)

    def body(c):
        running = c["status"] == Status.RUNNING
        recompute = running & ((c["j"] >= recompute_every) | (norm(c["r"]) <= thresh)
                               | (c["steps"] >= max_steps) | (c["pending"] != Status.RUNNING))
        av = vmv(jnp.where(col(recompute), c["x"], c["p"]))

        # --- CG step (columns running and not recomputing)
        x, r, p, rz = c["x"], c["r"], c["p"], c["rz"]
        pap = dot(p, av)
        bad = ~jnp.isfinite(pap) | ~jnp.all(jnp.isfinite(av), axis=1)
        neg = (pap <= 0) & ~bad
        ok = ~bad & ~neg
        alpha = jnp.where(ok, rz / jnp.where(ok, pap, 1.0), 0.0).astype(dtype)
        x_cg = x + col(alpha) * p
        r_cg = r - col(alpha) * av
        step = running & ~recompute
        take = step & ok
        pending = jnp.where(step & bad, Status.NONFINITE,
                            jnp.where(step & neg, Status.NEGATIVE_CURVATURE, c["pending"]))

        # --- true-residual replacement (columns recomputing)
        r_true = b0 - av
        finite = jnp.all(jnp.isfinite(r_true), axis=1)
        r_rep = jnp.where(col(finite), r_true, r)
        # one preconditioner application per iteration, on the new residual of either kind
        sel = lambda m, a, b_: jnp.where(col(m) if a.ndim == 2 else m, a, b_)
        r_new = sel(take, r_cg, sel(recompute, r_rep, r))
        z_new = vpsolve(r_new)
        rz_new = dot(r_new, z_new)
        beta = jnp.where(take & (rz != 0), rz_new / jnp.where(rz != 0, rz, 1.0), 0.0).astype(dtype)
        p_cg = z_new + col(beta) * p
        res = jnp.where(finite, norm(r_true), jnp.inf)
        improve = recompute & (res < c["res_best"])
        x_best = jnp.where(col(improve), x, c["x_best"])
        res_best = jnp.where(improve, res, c["res_best"])
        signif = recompute & (res < 0.9 * c["anchor"])
        anchor = jnp.where(signif, res, c["anchor"])
        anchor_step = jnp.where(signif, c["steps"], c["anchor_step"])
        stalled = (c["steps"] - anchor_step >= stagnation_window) | (
            res > divergence_factor * res_best)
        new_status = jnp.where(
            pending != Status.RUNNING, pending,
            jnp.where(~finite, Status.NONFINITE,
                      jnp.where(res <= thresh, Status.CONVERGED,
                                jnp.where(c["steps"] >= max_steps, Status.MAX_STEPS,
                                          jnp.where(stalled, Status.STAGNATED, Status.RUNNING)))))

        return {
            "x": sel(take, x_cg, x),
            "r": r_new,
            "p": sel(take, p_cg, p),
            "rz": sel(take | recompute, rz_new, rz),
            "steps": c["steps"] + take.astype(jnp.int32),
            "prods": c["prods"] + running.astype(jnp.int32),
            "j": jnp.where(recompute, 0, c["j"] + take.astype(jnp.int32)),
            "status": jnp.where(recompute, new_status, c["status"]).astype(jnp.int32),
            "pending": pending.astype(jnp.int32),
            "x_best": x_best, "res_best": res_best, "anchor": anchor, "anchor_step": anchor_step,
        }

    def finish(c):
        # x_best holds the iterate with the lowest true residual seen (x0 = 0 if none is better)
        res = c["res_best"]
        rel = res / jnp.where(b_norm > 0, b_norm, 1.0)
        stats = {"steps": c["steps"], "relative_residual": rel}
        return c["x_best"], res, c["prods"], c["status"], stats

    def info(c):
        rel = c["res_best"] / jnp.where(b_norm > 0, b_norm, 1.0)
        return jnp.max(c["steps"]), jnp.max(jnp.where(finite_b, rel, 0.0))

    return _Program(start, cond, body, finish, info)


# ------------------------------------------------------------------ deflation (spectral preconditioner)
def _lanczos_start(r, base, m):
    """Lanczos state for ``m`` steps on ``M^-1 A`` in the ``M`` inner product from ``r``:
    ``v_0 = M^-1 r / sqrt(r^T M^-1 r)`` (rows of ``v``) and ``M v_0`` (rows of ``mv``;
    ``M = I`` and no ``mv`` rows when ``base`` is ``None``)."""
    p, dtype = r.shape[0], r.dtype
    z = r if base is None else base(r)
    nrm = jnp.sqrt(jnp.vdot(r, z))
    carry = {"v": jnp.zeros((m, p), dtype).at[0].set(z / nrm), "alpha": jnp.zeros((m,), dtype),
             "beta": jnp.zeros((m,), dtype), "scale": jnp.zeros((), dtype)}
    if base is not None:
        carry["mv"] = jnp.zeros((m, p), dtype).at[0].set(r / nrm)
    return carry


def _lanczos_step(mv, base, carry, j):
    """Step ``j``: ``w = M^-1 A v_j``, ``M``-orthogonalised twice against all basis rows
    (rows after ``j`` are zero), ``beta_j = sqrt(w^T M w)``; the next row is ``w / beta_j``
    (zero after a breakdown, ``beta_j ~ 0``: an invariant subspace was found)."""
    v = carry["v"]
    m, dtype = v.shape[0], v.dtype
    vj = v[j]
    u = mv(vj)  # A v_j = M w
    alpha = jnp.vdot(vj, u)
    w, mw = (u, u) if base is None else (base(u), u)
    basis_m = v if base is None else carry["mv"]
    for _ in range(2):  # w -= V (V^T M w) ("twice is enough")
        h = v @ mw
        w = w - h @ v
        mw = w if base is None else mw - h @ basis_m
    beta = jnp.sqrt(jnp.maximum(jnp.vdot(w, mw), 0.0))
    scale = jnp.maximum(carry["scale"], jnp.abs(alpha) + beta)
    alive = (beta > 100 * jnp.finfo(dtype).eps * scale) & jnp.all(jnp.isfinite(w)) & (
        jnp.vdot(vj, vj) > 0)
    inv = jnp.where(alive, 1.0 / jnp.where(alive, beta, 1.0), 0.0)
    nxt = jnp.minimum(j + 1, m - 1)
    put = lambda rows, x: jnp.where(j + 1 < m, rows.at[nxt].set(x * inv), rows)
    out = {"v": put(v, w), "alpha": carry["alpha"].at[j].set(alpha),
           "beta": carry["beta"].at[j].set(jnp.where(alive, beta, 0.0)), "scale": scale}
    if base is not None:
        out["mv"] = put(carry["mv"], mw)
    return out


def _deflation_finish(carry, scale):
    """Ritz pairs ``(theta_i, u_i)`` of ``M^-1 A`` from the tridiagonal ``T = V A V^T`` and
    the correction coefficients ``d_i = 1/theta_i - scale`` (``0`` for ``theta_i <= 0`` and
    for basis rows lost to a breakdown)."""
    a, b, v = carry["alpha"], carry["beta"][:-1], carry["v"]
    t = jnp.diag(a) + jnp.diag(b, 1) + jnp.diag(b, -1)
    theta, s = jnp.linalg.eigh(t)
    u = s.T @ v  # rows: M-orthonormal Ritz vectors
    live = jnp.sum(u * u, axis=1) > 0
    tiny = 100 * jnp.finfo(v.dtype).eps * jnp.max(jnp.abs(theta))
    keep = live & (theta > tiny) & jnp.isfinite(theta)
    d = jnp.where(keep, 1.0 / jnp.where(keep, theta, 1.0) - scale, 0.0)
    return {"u": u, "d": d, "scale": scale, "ritz": jnp.where(keep, theta, 0.0)}


# ------------------------------------------------------------------ preconditioning
def estimate_diagonal(op, key, *, samples: int = 32):
    """Hutchinson estimate of ``diag(A)`` (flat, ravel order): ``mean_s z_s * (A z_s)``.

    ``z_s`` are Rademacher vectors; ``samples`` operator products (vmapped). The estimate
    is clipped from below at ``max(shift, 1e-3 * mean |d|)`` so it is positive even for an
    indefinite Hessian (a preconditioner must be positive definite). Standard error of
    each entry: ``sqrt(sum_{j != i} A_ij^2 / samples)``.
    """
    flat, unravel = ravel_pytree(op.params)
    mv = flat_matvec(op, unravel, flat.dtype)
    z = jax.random.rademacher(key, (samples, flat.shape[0]), dtype=flat.dtype)
    d = jnp.mean(z * jax.vmap(mv)(z), axis=0)
    floor = jnp.maximum(jnp.asarray(op.shift, flat.dtype), 1e-3 * jnp.mean(jnp.abs(d)))
    return jnp.maximum(d, floor)


def diagonal_preconditioner(op, key=None, *, samples: int = 32) -> Callable:
    """A Jacobi preconditioner ``v -> D^-1 v`` (pytrees) with ``D`` from :func:`estimate_diagonal`.

    Equivalent to ``cg(preconditioner="jacobi")``, which estimates ``D`` inside ``prepare``.
    """
    key = jax.random.PRNGKey(0) if key is None else key
    inv = 1.0 / jit(estimate_diagonal, static_argnames="samples")(op, key, samples=samples)
    _, unravel = ravel_pytree(op.params)

    def apply(v):
        fv, unr = ravel_pytree(v)
        return unr(inv.astype(fv.dtype) * fv)

    return apply
