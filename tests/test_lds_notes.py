"""The LDS study scores an approximate solver (EK-FAC, Arnoldi, LiSSA) on its own answer and
says in the row's notes when that answer is above the solver's residual tolerance."""

import types

import numpy as np

from influx.studies import lds


def test_residual_note():
    ns = types.SimpleNamespace
    info = ns(converged=np.array([True, False, False]), residual_norm=np.array([0.1, 3.0, 7.5]))
    (note,) = lds._residual_note(info)
    assert "2 of 3" in note and "7.5" in note
    assert lds._residual_note(ns(converged=np.array([True, True]), residual_norm=None)) == []
    assert lds._residual_note(ns(converged=None)) == []
    assert set(lds._APPROXIMATE) < set(lds.METHODS)
