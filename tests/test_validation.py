"""The validation boundary: one exception class, parameters, per-example losses, data forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import influx
from influx import curvature, losses, solvers, validation
from influx.errors import InputError
from tests.conftest import make_problem

DIRECT = solvers.direct()


def _named_problem(n=20):
    """A 4-3-3 MLP with flax-like parameter names (paths such as params['Dense_1']['kernel'])."""
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    params = {"Dense_0": {"kernel": 0.5 * jax.random.normal(k[0], (4, 3)), "bias": jnp.zeros(3)},
              "Dense_1": {"kernel": 0.5 * jax.random.normal(k[1], (3, 3)), "bias": jnp.zeros(3)}}

    def apply(p, x):
        h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]

    x = jax.random.normal(k[2], (n, 4))
    y = jax.random.randint(k[3], (n,), 0, 3)
    obj = influx.Objective(apply, losses.softmax_cross_entropy, l2=1e-2)
    return obj, params, (x[:-4], y[:-4]), (x[-4:], y[-4:])


# ------------------------------------------------------------------ options: one error class
def test_positive_int_one_error_class_for_every_form():
    for bad in (0, -3):
        with pytest.raises(InputError, match="n must be an integer >= 1, got"):
            validation.check_positive_int(bad, "n")
    for bad in (1.5, "2", True, None, np.float64(3.0)):
        with pytest.raises(InputError) as info:
            validation.check_positive_int(bad, "n")
        # a wrong type is an InputError that is also a TypeError (and a ValueError)
        assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    assert validation.check_positive_int(np.int64(4), "n") == 4
    assert type(validation.check_positive_int(np.int32(4), "n")) is int
    assert validation.check_positive_int(None, "n", allow_none=True) is None
    assert validation.check_int(0, "k", minimum=0) == 0
    with pytest.raises(InputError, match="<= 5"):
        validation.check_int(6, "k", minimum=0, maximum=5)


def test_nonnegative_and_choice():
    assert validation.check_nonnegative(0, "damping") == 0.0
    assert validation.check_nonnegative(np.float32(2.5), "damping") == 2.5
    d = jnp.asarray(1e-3)
    assert validation.check_nonnegative(d, "damping", as_float=False) is d
    for bad in (-1e-9, float("nan"), float("inf")):
        with pytest.raises(InputError, match="damping must be finite and >= 0"):
            validation.check_nonnegative(bad, "damping")
    for bad in ("1e-3", None, [1.0, 2.0], True):
        with pytest.raises(InputError, match="damping"):
            validation.check_nonnegative(bad, "damping")
    assert validation.check_choice("gnh", "kind", ("gnh", "hessian")) == "gnh"
    with pytest.raises(InputError, match=r"kind must be one of \('gnh', 'hessian'\), got 'fisher'"):
        validation.check_choice("fisher", "kind", ("gnh", "hessian"))
    with pytest.raises(InputError, match="kind must be one of"):
        validation.check_choice(["gnh"], "kind", ("gnh", "hessian"))  # unhashable


def test_objective_errors_are_input_errors():
    obj, *_ = _named_problem()
    with pytest.raises(InputError, match="l2"):
        influx.Objective(obj.apply_fn, obj.loss_fn, l2=-1.0)
    with pytest.raises(InputError, match="loss_fn must be callable"):
        influx.Objective(obj.apply_fn, "softmax", l2=0.0)
    with pytest.raises(TypeError, match="apply_fn must be callable"):  # still a TypeError too
        influx.Objective(None, obj.loss_fn)


def test_objective_module_reexports_the_checks():
    from influx import objective

    assert objective.check_data is validation.check_data
    assert objective.num_examples is validation.num_examples
    assert objective.check_like is validation.check_like
    assert objective.check_finite is validation.check_finite


# ------------------------------------------------------------------ 14.4 non-finite parameters
@pytest.mark.parametrize("value, what", [(np.inf, "3 inf values"), (np.nan, "3 NaN values")])
def test_nonfinite_params_rejected_naming_the_leaf(value, what):
    obj, params, train, test = _named_problem()
    bad = jax.tree_util.tree_map(lambda a: a, params)
    bad["Dense_1"]["kernel"] = params["Dense_1"]["kernel"].at[0, :].set(value)
    msg = r"params\['Dense_1'\]\['kernel'\] has " + what
    with pytest.raises(InputError, match=msg):
        influx.influence(obj, bad, train, test, solver=DIRECT)
    with pytest.raises(InputError, match=msg):
        influx.influence(obj, bad, train, test)  # CG: was an all-NaN matrix
    with pytest.raises(InputError, match=msg):
        influx.self_influence(obj, bad, train, solver=DIRECT)
    with pytest.raises(InputError, match=msg):
        curvature.operator(obj, bad, train)
    # NumPy leaves are checked too
    bad_np = jax.tree_util.tree_map(np.asarray, bad)
    with pytest.raises(InputError, match=msg):
        curvature.operator(obj, bad_np, train)


def test_inf_in_hidden_layer_rejected():
    # tanh saturates, so an inf here used to give finite scores with no warning
    obj, params, train, test = _named_problem()
    bad = jax.tree_util.tree_map(lambda a: a, params)
    bad["Dense_0"]["kernel"] = params["Dense_0"]["kernel"].at[0, 0].set(jnp.inf)
    with pytest.raises(InputError, match=r"params\['Dense_0'\]\['kernel'\] has 1 inf value \(of 12\)"):
        influx.influence(obj, bad, train, test, solver=DIRECT)


# ------------------------------------------------------------------ 14.17 integer leaves, lists
def test_integer_parameter_leaf_named():
    obj, params, train, test = _named_problem()
    bad = dict(params, step=jnp.asarray([3], dtype=jnp.int32))
    apply = obj.apply_fn
    obj2 = influx.Objective(lambda p, x: apply({k: v for k, v in p.items() if k != "step"}, x),
                            obj.loss_fn)
    with pytest.raises(InputError, match=r"params\['step'\] has dtype int32.*floating point"):
        influx.influence(obj2, bad, train, test, solver=DIRECT)
    with pytest.raises(InputError, match=r"params\['step'\]"):
        curvature.operator(obj2, bad, train)


def test_python_lists_as_data_say_what_is_expected():
    obj, params, train, test = _named_problem()
    x_list = np.asarray(train[0]).tolist()
    y_list = np.asarray(train[1]).tolist()
    with pytest.raises(InputError, match="Python numbers.*leading example axis.*np.asarray"):
        influx.influence(obj, params, (x_list, y_list), test, solver=DIRECT)
    with pytest.raises(InputError, match="Python numbers"):
        influx.self_influence(obj, params, (train[0], y_list), solver=DIRECT)
    with pytest.raises(InputError, match="pair"):
        influx.influence(obj, params, train[0], test, solver=DIRECT)
    rows = [np.asarray(r) for r in np.asarray(train[0])]  # a list of per-example arrays
    with pytest.raises(InputError, match="disagree.*Python list is a pytree.*np.stack"):
        influx.influence(obj, params, (rows, train[1]), test, solver=DIRECT)


# ------------------------------------------------------------------ 14.4b per-example loss
def test_batch_mean_loss_rejected():
    obj, params, train, test = _named_problem()
    mean_loss = influx.Objective(obj.apply_fn, lambda z, y: jnp.mean(losses.softmax_cross_entropy(z, y)))
    msg = "loss_fn must return one loss per example.*returned shape \\(\\).*mean or sum"
    with pytest.raises(InputError, match=msg):
        curvature.operator(mean_loss, params, train)  # was a curvature 1/N too small
    with pytest.raises(InputError, match=msg):
        influx.self_influence(mean_loss, params, train, solver=DIRECT)
    with pytest.raises(InputError, match=msg):
        influx.influence(mean_loss, params, train, test, solver=DIRECT)  # was IndexError
    keepdims = influx.Objective(obj.apply_fn, lambda z, y: losses.softmax_cross_entropy(z, y)[:, None])
    with pytest.raises(InputError, match=r"returned shape \(2, 1\)"):
        curvature.operator(keepdims, params, train)
    # a custom per-example loss passes and agrees with the registered one
    own = influx.Objective(obj.apply_fn, lambda z, y: losses.softmax_cross_entropy(z, y), l2=obj.l2)
    np.testing.assert_allclose(influx.self_influence(own, params, train, solver=DIRECT),
                               influx.self_influence(obj, params, train, solver=DIRECT), rtol=1e-9)


# ------------------------------------------------------------------ error classes of the data checks
def test_data_checks_raise_input_error():
    obj, params, data = make_problem("tanh_mlp")
    x, y = data
    cases = [((x.at[0, 0].set(jnp.nan), y), "train inputs: contains NaN or inf.*1 NaN value"),
             ((x[:, :3], y), "per-example shape"),
             ((x, y[:-1]), "disagree"),
             ((x[:0], y[:0]), "empty"),
             ((x, y.at[0].set(7)), "out of range")]
    for data_, msg in cases:
        with pytest.raises(InputError, match=msg):
            validation.check_data(obj, params, data_, name="train")
    with pytest.raises(InputError) as info:  # float labels: the loss's type check
        validation.check_data(obj, params, (x, y.astype(jnp.float64)))
    assert isinstance(info.value, TypeError)
    with pytest.raises(InputError) as info:
        validation.check_like(params, {"w": 1.0})
    assert isinstance(info.value, TypeError)
    assert validation.check_data(obj, params, data) == x.shape[0]


def test_label_free_test_set_checks_inputs():
    obj, params, train, test = _named_problem()
    assert validation.check_test(obj, params, (test[0], None)) == 4
    with pytest.raises(InputError, match="test inputs: contains NaN"):
        validation.check_test(obj, params, (test[0].at[1, 1].set(jnp.inf), None))
    with pytest.raises(InputError, match="apply_fn does not accept"):
        validation.check_test(obj, params, (test[0][:, :2], None))


# ------------------------------------------------------------------ one scan per public call
def test_boundary_scope_scans_each_dataset_once(monkeypatch):
    obj, params, train, test = _named_problem()
    scanned = []
    real = validation._nonfinite_leaves
    monkeypatch.setattr(validation, "_nonfinite_leaves", lambda tree: scanned.append(1) or real(tree))

    def three_checks():
        for _ in range(3):
            validation.check_data(obj, params, train, name="train")
        validation.check_test(obj, params, test)

    three_checks()
    unscoped = len(scanned)
    assert unscoped == 3 * 3 + 3  # x, y, params per check_data, each time
    scanned.clear()
    validation.boundary(three_checks)()
    # train: x, y and params once; test: x and y (params already checked in this scope)
    assert len(scanned) == 3 + 2
    # a new scope (a new public call) checks again: data may have changed in between
    scanned.clear()
    with validation.boundary():
        with validation.boundary():  # nested: shares the outer scope
            three_checks()
        validation.check_data(obj, params, train)
    assert len(scanned) == 5
    # a failed check is not remembered
    bad = (train[0].at[0, 0].set(jnp.nan), train[1])
    with validation.boundary():
        for _ in range(2):
            with pytest.raises(InputError, match="NaN"):
                validation.check_data(obj, params, bad)


def test_boundary_memo_is_per_object_identity():
    obj, params, train, _ = _named_problem()
    with validation.boundary():
        validation.check_data(obj, params, train)
        x = np.array(train[0])
        x[0, 0] = np.nan  # a different array object is checked afresh
        with pytest.raises(InputError, match="NaN"):
            validation.check_data(obj, params, (x, train[1]))


@pytest.mark.parametrize("on_host", [True, False])
def test_finiteness_paths_agree(monkeypatch, on_host):
    """The host path (NumPy, CPU arrays) and the device path (one jitted count) find the same leaves."""
    monkeypatch.setattr(validation, "_on_host", lambda leaf: on_host)
    _, params, train, _ = _named_problem()
    validation.check_params(params)
    validation.check_finite(train, name="train")
    bad = jax.tree_util.tree_map(lambda a: a, params)
    bad["Dense_0"]["bias"] = params["Dense_0"]["bias"].at[1].set(jnp.nan).at[2].set(-jnp.inf)
    bad["Dense_1"]["kernel"] = params["Dense_1"]["kernel"].at[0, 0].set(jnp.inf)
    msg = (r"params\['Dense_0'\]\['bias'\] has 1 NaN value and 1 inf value \(of 3\); "
           r"params\['Dense_1'\]\['kernel'\] has 1 inf value \(of 9\)")
    with pytest.raises(InputError, match=msg):
        validation.check_params(bad)
    x = train[0].at[3, 1].set(jnp.nan)
    with pytest.raises(InputError, match=r"train: contains NaN or inf \(leaf \[0\]\): 1 NaN value"):
        validation.check_finite((x, train[1]), name="train")


def _count_scans(monkeypatch):
    """Patches the finiteness scan; returns a list of the ids of every concrete tree it scans
    (a solver's check of traced right-hand sides inside a compiled solve reads no data)."""
    scanned = []
    real = validation._nonfinite_leaves

    def spy(tree):
        if not all(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree)):
            scanned.append(id(tree))
        return real(tree)

    monkeypatch.setattr(validation, "_nonfinite_leaves", spy)
    return scanned


def test_public_calls_scan_the_training_data_once(monkeypatch):
    """One ``influx.influence`` (influence -> solve_test_vectors -> operator) scans x, y and the
    parameters once each; the test set's x and y once; nothing twice."""
    obj, params, train, test = _named_problem()
    scanned = _count_scans(monkeypatch)
    scores = influx.influence(obj, params, train, test, damping=1e-3, solver=DIRECT)
    assert np.shape(scores) == (4, 16)
    assert scanned.count(id(train[0])) == 1 and scanned.count(id(train[1])) == 1
    assert scanned.count(id(params)) == 1
    assert len(scanned) == 5  # train x, y; params; test x, y
    # the same holds for the other entry points that call each other
    for call in (lambda: influx.self_influence(obj, params, train, damping=1e-3, solver=DIRECT),
                 lambda: influx.ihvp(obj, params, train, params, damping=1e-3, solver=DIRECT)):
        scanned.clear()
        call()
        assert scanned.count(id(train[0])) == 1 and scanned.count(id(params)) == 1, scanned
    # without the boundary every nested check scans again (the count above can fail)
    scanned.clear()
    with monkeypatch.context() as m:
        m.setattr(validation, "_open_scope", lambda: __import__("contextlib").nullcontext())
        influx.influence(obj, params, train, test, damping=1e-3, solver=DIRECT)
    assert scanned.count(id(train[0])) >= 1 and len(scanned) > 5


def test_shared_option_checks():
    """One check each for the failure policy, damping and fractions, used by every module."""
    assert validation.check_on_failure("keep") == "keep"
    with pytest.raises(InputError, match=r"on_failure must be one of \('raise', 'nan'\), got 'keep'"):
        validation.check_on_failure("keep", allowed=("raise", "nan"))
    d = jnp.asarray(1e-3)
    assert validation.check_damping(d) is d  # a JAX scalar stays a leaf
    for bad in (-1.0, np.inf, np.nan):
        with pytest.raises(InputError, match="damping must be finite and >= 0"):
            validation.check_damping(bad)
    assert validation.check_fraction(0.25, "alpha") == 0.25
    for bad in (0, 1.0, -0.5):
        with pytest.raises(InputError, match=r"alpha must be in \(0, 1\)"):
            validation.check_fraction(bad, "alpha")
    with pytest.raises(TypeError, match="alpha must be a number"):
        validation.check_fraction("0.5", "alpha")
    # the modules' own entry points use them: one message for one mistake
    with pytest.raises(InputError, match="chunk_size must be an integer >= 1, got 0"):
        curvature.operator(*_named_problem()[:3], chunk_size=0)
