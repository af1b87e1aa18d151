"""The ``influx`` command: run the studies from a shell.

    influx demo                      all three studies, small, on bundled data (offline)
    influx fragility [options]       influence vs leave-one-out over depth/width/weight decay
    influx gaps [options]            the five-gap decomposition over width and training time
    influx mislabeled [options]      find flipped labels by self-influence and baselines

Every command prints its tables and writes ``report.md``, ``results.json`` and PNG plots
into an output directory (``--out``, default ``./influx-out/<command>-<timestamp>``),
named on the last line. Errors influx diagnoses end with a one-line message on stderr,
never a traceback: exit status 2 for bad input (:class:`influx.errors.InputError`: unknown
data set, bad grid, sizes too small for a study) and for a missing ``studies`` extra, 1 for
other diagnosed failures (:class:`influx.errors.InfluxError`: a solve that failed, a refused
allocation; missing data files). Anything else is a bug and shows its traceback. Ctrl-C
ends a run with ``interrupted`` and exit status 130.

The command needs the ``studies`` extra (``pip install "influx[studies]"``: scikit-learn,
matplotlib, tqdm); the library itself does not.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path

from influx.errors import InfluxError, InputError

__all__ = ["main", "build_parser"]

_DATASETS_HELP = ("iris, digits, diabetes (bundled with scikit-learn, offline); mnist, concrete, "
                  "energy (files in --data-dir); tfds:<name> (a prepared tensorflow-datasets set); "
                  "or a path to a whitespace-separated .txt file (last column the target)")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit status 2)."""

    def error(self, message):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------------- grid parsing


def _int_list(minimum: int):
    def parse(text: str) -> tuple[int, ...]:
        parts = [p.strip() for p in str(text).split(",")]
        if not parts or any(not p for p in parts):
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        try:
            vals = tuple(int(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        low = [v for v in vals if v < minimum]
        if low:
            raise argparse.ArgumentTypeError(f"values must be >= {minimum}, got {low[0]} in {text!r}")
        return vals

    parse.__name__ = "integer list"
    return parse


def _float_list(minimum: float | None = None, maximum: float | None = None):
    def parse(text: str) -> tuple[float, ...]:
        parts = [p.strip() for p in str(text).split(",")]
        try:
            vals = tuple(float(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        for v in vals:
            if v != v or v in (float("inf"), float("-inf")):
                raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
            if minimum is not None and v < minimum:
                raise argparse.ArgumentTypeError(f"values must be >= {minimum:g}, got {v:g}")
            if maximum is not None and v > maximum:
                raise argparse.ArgumentTypeError(f"values must be <= {maximum:g}, got {v:g}")
        return vals

    parse.__name__ = "number list"
    return parse


def _pos_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


def _fraction(text: str) -> float:
    v = _nonneg_float(text)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}")
    return v


def _name_list(text: str) -> tuple[str, ...]:
    vals = tuple(p.strip() for p in str(text).split(",") if p.strip())
    if not vals:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return vals


# --------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``influx`` command (subcommands demo/fragility/gaps/mislabeled).

    (Over 80 lines: a declarative table of subcommands and options, one statement each.)"""
    from influx.studies._common import SOLVERS
    from influx.studies.mislabel import METHODS

    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(
        prog="influx",
        description=(
            "Check whether influence functions can be trusted for a model, and reproduce the\n"
            "studies that asked: Basu et al. 2021 (fragility in deep nets), Bae et al. 2022\n"
            "(five gaps between influence and leave-one-out), and mislabel detection.\n\n"
            "Start with `influx demo`: all three, small, offline, on bundled data. Each command\n"
            "prints tables and writes report.md, results.json and PNG plots to an output\n"
            "directory it names at the end (default ./influx-out/COMMAND-TIMESTAMP/)."),
        epilog="Run `influx <command> --help` for the options of a command.",
        formatter_class=fmt,
    )
    p.add_argument("--version", action="version", version=f"influx {_version()}")
    sub = p.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)

    def common(sp, *, dataset_default, quick_help):
        g = sp.add_argument_group("data")
        g.add_argument("--dataset", default=dataset_default, metavar="NAME",
                       help=f"data set (default: {dataset_default}). One of: {_DATASETS_HELP}")
        g.add_argument("--data-dir", metavar="DIR",
                       help="directory with the data files for mnist/concrete/energy "
                            "(default: $INFLUX_DATA_DIR, else ../shared/data if present)")
        g.add_argument("--n-train", type=_pos_int, metavar="N",
                       help="training examples (default: all / 8000 for mnist)")
        g.add_argument("--n-test", type=_pos_int, metavar="N",
                       help="test examples (default: 20%% / 2000 for mnist)")
        o = sp.add_argument_group("run")
        o.add_argument("--quick", action="store_true", help=quick_help)
        o.add_argument("--seed", type=int, default=0, help="random seed: split, init, samples (default 0)")
        o.add_argument("--damping", type=_nonneg_float, metavar="LAMBDA",
                       help="damping lambda added to the curvature (default 1e-3)")
        o.add_argument("--out", metavar="DIR",
                       help="output directory (default: influx-out/COMMAND-TIME in the current directory)")
        o.add_argument("--no-progress", action="store_true", help="hide the progress bars")
        o.add_argument("--float32", action="store_true",
                       help="compute in float32 (default float64: leave-one-out differences are tiny)")

    d = sub.add_parser(
        "demo", formatter_class=fmt, help="compact run of all three studies on bundled data",
        description=(
            "A compact run of all three studies on data bundled with scikit-learn (no network):\n"
            "  fragility  on Iris    (MLP depth 1 and 3, width 8, weight decay off/on)\n"
            "  gaps       on diabetes (regression MLP, two training lengths)\n"
            "  mislabeled on digits  (10% of 500 labels flipped; self-influence vs baselines)\n"
            "Writes report.md, results.json, fragility.png, gaps.png, mislabeled.png."))
    d.add_argument("--out", metavar="DIR",
                   help="output directory (default: influx-out/demo-TIME in the current directory)")
    d.add_argument("--quick", action="store_true", help="an even smaller run, for smoke tests")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    f = sub.add_parser(
        "fragility", formatter_class=fmt, help="influence vs leave-one-out over depth/width/weight decay",
        description=(
            "Fragility study (Basu, Pope, Feizi 2021). For each MLP of the grid (depth x width x\n"
            "weight decay), trained to a minimiser: take the highest-loss test point and a sample\n"
            "of others, predict the change of each one's loss when each of its top-k training\n"
            "examples (by |influence|) is removed, retrain without it (warm-start leave-one-out),\n"
            "and report Pearson/Spearman correlation of predicted vs actual per configuration."),
        epilog="example: influx fragility --dataset iris --depths 1,2,3,4 --widths 8,16 --top-k 10")
    common(f, dataset_default="iris", quick_help=_quick_help("fragility"))
    g = f.add_argument_group("grid and estimator")
    g.add_argument("--depths", type=_int_list(1), metavar="LIST",
                   help="hidden layers, e.g. 1,2,3 (default 1..8)")
    g.add_argument("--widths", type=_int_list(1), metavar="LIST", help="hidden units per layer (default 8)")
    g.add_argument("--weight-decays", type=_float_list(0.0), metavar="LIST",
                   help="l2 values, 0 = off (default 0,0.001)")
    g.add_argument("--top-k", type=_pos_int, metavar="K", help="removed examples per test point (default 10)")
    g.add_argument("--test-points", type=_pos_int, metavar="N",
                   help="highest-loss test point + N-1 random ones (default 5)")
    g.add_argument("--kind", choices=("hessian", "gnh"), help="curvature (default hessian, as the paper)")
    g.add_argument("--solver", choices=SOLVERS, help="iHVP solver (default direct: exact, small models)")

    ga = sub.add_parser(
        "gaps", formatter_class=fmt, help="five-gap decomposition over width and training time",
        description=(
            "Gap decomposition (Bae et al. 2022). Splits the difference between cold-start\n"
            "leave-one-out retraining and the influence estimate into five gaps: warm start,\n"
            "proximity, non-convergence, linearisation, solver; and correlates each\n"
            "approximation with LOO and with the proximal Bregman response function (PBRF)."),
        epilog="example: influx gaps --dataset concrete --data-dir ../shared/data --widths 16,64 "
               "--steps 300,3000")
    common(ga, dataset_default="diabetes,digits", quick_help=_quick_help("gaps"))
    g = ga.add_argument_group("grid and estimator")
    g.add_argument("--widths", type=_int_list(1), metavar="LIST", help="hidden units (default 16,64)")
    g.add_argument("--depth", type=_pos_int, metavar="D", help="hidden layers (default 1)")
    g.add_argument("--steps", type=_int_list(1), metavar="LIST",
                   help="training lengths in Adam steps (default 300,3000)")
    g.add_argument("--removed", type=_pos_int, metavar="N", help="training examples removed (default 20)")
    g.add_argument("--test-points", type=_pos_int, metavar="N", help="test points (default 50)")
    g.add_argument("--solver", choices=SOLVERS, help="practical iHVP solver, the last gap (default arnoldi)")

    m = sub.add_parser(
        "mislabeled", formatter_class=fmt, help="find flipped labels by self-influence and baselines",
        description=(
            "Mislabel detection. Flips a fraction of the training labels, trains an MLP, ranks\n"
            "training examples by self-influence (per iHVP solver), gradient norm, training loss\n"
            "and at random, and reports the fraction of flipped labels found after inspecting\n"
            "5/10/20/30% of the data, with the detection curve."),
        epilog="example: influx mislabeled --dataset digits --fraction 0.1 "
               "--methods direct,arnoldi,loss,random")
    common(m, dataset_default="digits", quick_help=_quick_help("mislabeled"))
    g = m.add_argument_group("ranking")
    g.add_argument("--fraction", type=_fraction, metavar="Q", help="share of labels flipped (default 0.1)")
    g.add_argument("--methods", type=_name_list, metavar="LIST",
                   help=f"rankings to compare, from: {', '.join(METHODS)} "
                        "(default all but pbrf; pbrf costs one optimisation per example)")
    g.add_argument("--solver", choices=SOLVERS,
                   help="shorthand for --methods SOLVER,grad_dot,loss,random")
    g.add_argument("--width", type=_pos_int, metavar="W", help="hidden units (default 32)")
    g.add_argument("--depth", type=_pos_int, metavar="D", help="hidden layers (default 1)")

    ld = sub.add_parser(
        "lds", formatter_class=fmt, help="LDS of every attribution method vs subset retraining, with cost",
        description=(
            "Linear datamodeling score. Trains one model, scores it with every attribution method\n"
            "(grad-dot, TracIn, influence with CG / EK-FAC / Arnoldi / LiSSA, linearised PBRF,\n"
            "metagradients), retrains it on M random subsets per drop fraction (same init, order and\n"
            "seed) and reports each method's LDS with a bootstrap 95% interval and its cost in\n"
            "seconds and training runs. Problems: digits, mnist, mnist_cnn."),
        epilog="example: influx lds --dataset digits --subsets 64 --fractions 0.01,0.05,0.1,0.5")
    common(ld, dataset_default="digits", quick_help="200 examples, width 16, 100 steps, M=16")
    g = ld.add_argument_group("study")
    g.add_argument("--subsets", type=_pos_int, metavar="M",
                   help="random subsets per drop fraction (default 64)")
    g.add_argument("--fractions", type=_float_list(0.0, 1.0), metavar="LIST",
                   help="drop fractions in (0, 1) (default 0.01,0.05,0.1,0.5)")
    g.add_argument("--methods", type=_name_list, metavar="LIST", help="attribution methods (default all)")
    g.add_argument("--steps", type=_pos_int, metavar="T", help="training steps (default 300)")
    g.add_argument("--batch-size", type=_pos_int, metavar="B", help="minibatch size (default full batch)")
    g.add_argument("--optimizer", choices=("sgd", "momentum", "adam"),
                   help="training optimizer (default sgd)")
    g.add_argument("--learning-rate", type=_nonneg_float, metavar="LR",
                   help="learning rate (default sgd 0.1 (0.03 on mnist), momentum 0.05, adam 0.01)")
    g.add_argument("--width", type=_pos_int, metavar="W", help="hidden units (default 32)")
    g.add_argument("--test-points", type=_pos_int, metavar="N", help="test losses (default 50)")
    return p


# --quick on MNIST: training / test examples unless --n-train / --n-test say otherwise (the
# full 8000-example pool makes even the quick grids take many minutes on 2 cores)
_MNIST_QUICK = (500, 200)


def _csv(values) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _quick_help(command: str) -> str:
    """The ``--quick`` help of a study command, stating the sizes its config uses."""
    from influx.studies import fragility, mislabel
    from influx.studies import gap_study as gaps

    mnist = f"; on mnist {_MNIST_QUICK[0]} training / {_MNIST_QUICK[1]} test examples"
    if command == "fragility":
        q = fragility.FragilityConfig.quick()
        return (f"small grid: depths {_csv(q.depths)}, widths {_csv(q.widths)}, weight decays "
                f"{_csv(q.weight_decays)}, top-{q.top_k} removed for each of {q.n_test_points} test points"
                + mnist)
    if command == "gaps":
        q = gaps.GapsConfig.quick()
        return (f"small: at most {q.n_train} training examples per data set, widths {_csv(q.widths)}, "
                f"{_csv(q.steps)} training steps, {q.n_removed} removed x {q.n_test_points} test points"
                + mnist)
    q = mislabel.MislabelConfig.quick()
    return (f"small: {q.n_train} training examples, width {q.width}, methods {_csv(q.methods)}"
            f"; on mnist {_MNIST_QUICK[1]} test examples")


def _version() -> str:
    try:
        from influx import __version__

        return __version__
    except Exception:  # noqa: BLE001
        return "?"


# --------------------------------------------------------------------------- commands


def _out_dir(args, command: str) -> Path:
    if args.out:
        out = Path(args.out).expanduser()
    else:
        out = Path("influx-out") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} exists and is not a directory")
    return out  # created by _write, once there is something to write


_FILE_DATASETS = ("mnist", "concrete", "energy")  # read from a data directory


def _check_data_dir(args, datasets) -> None:
    """A missing data directory, said in the command's terms (``--data-dir``)."""
    from influx import data

    if getattr(args, "data_dir", None) is not None:
        if not Path(args.data_dir).expanduser().is_dir():
            raise InputError(f"data directory {args.data_dir!r} (--data-dir) does not exist")
        return
    need = [d for d in datasets if d.lower() in _FILE_DATASETS]
    if need and data.default_data_dir() is None:
        raise InputError(f"data set {need[0]!r} needs a data directory: pass --data-dir DIR or set "
                         "INFLUX_DATA_DIR (no ../shared/data found next to the current directory)")


def _set(kw: dict, **pairs):
    kw.update({k: v for k, v in pairs.items() if v is not None})


def _base_kw(args, datasets) -> dict:
    """The options every study shares. Only what the user gave is passed on, so that a
    ``--quick`` config keeps its own defaults (sizes) for the rest."""
    kw = dict(seed=args.seed, progress=not args.no_progress, dtype="float32" if args.float32 else "float64")
    _set(kw, data_dir=args.data_dir, n_train=args.n_train, n_test=args.n_test, damping=args.damping)
    if args.quick and "mnist" in [d.lower() for d in datasets]:
        kw.setdefault("n_train", _MNIST_QUICK[0])
        kw.setdefault("n_test", _MNIST_QUICK[1])
    return kw


def _datasets(args) -> tuple[str, ...]:
    """The ``--dataset`` names (gaps takes a comma-separated list); InputError when empty."""
    names = tuple(p.strip() for p in str(args.dataset).split(",")) if args.command == "gaps" \
        else (str(args.dataset).strip(),)
    if not names or not all(names):
        what = "comma-separated data set names" if args.command == "gaps" else "a data set name"
        raise InputError(f"--dataset: expected {what}, got {args.dataset!r} (see '--help' for the names)")
    return names


def _fragility_config(args):
    from influx.studies import fragility

    kw = _base_kw(args, _datasets(args))
    kw["dataset"] = _datasets(args)[0]
    _set(kw, depths=args.depths, widths=args.widths, weight_decays=args.weight_decays, top_k=args.top_k,
         n_test_points=args.test_points, kind=args.kind, solver=args.solver)
    return fragility.FragilityConfig.quick(**kw) if args.quick else fragility.FragilityConfig(**kw)


def _gaps_config(args):
    from influx.studies import gap_study as gaps

    kw = _base_kw(args, _datasets(args))
    kw["datasets"] = _datasets(args)
    _set(kw, widths=args.widths, depth=args.depth, steps=args.steps, n_removed=args.removed,
         n_test_points=args.test_points, solver=args.solver)
    return gaps.GapsConfig.quick(**kw) if args.quick else gaps.GapsConfig(**kw)


def _mislabel_config(args):
    from influx.studies import mislabel

    kw = _base_kw(args, _datasets(args))
    kw["dataset"] = _datasets(args)[0]
    methods = args.methods
    if args.solver is not None:
        if methods is not None:
            raise InputError("give either --methods or --solver, not both")
        methods = (args.solver, "grad_dot", "loss", "random")
    _set(kw, fraction=args.fraction, methods=methods, width=args.width, depth=args.depth)
    return mislabel.MislabelConfig.quick(**kw) if args.quick else mislabel.MislabelConfig(**kw)


def _lds_config(args):
    from influx.studies import lds

    kw = _base_kw(args, (args.dataset,))
    kw["problem"] = args.dataset
    _set(kw, n_subsets=args.subsets, fractions=args.fractions, methods=args.methods, steps=args.steps,
         batch_size=args.batch_size, optimizer=args.optimizer, learning_rate=args.learning_rate,
         width=args.width, n_test_points=args.test_points)
    return lds.LDSConfig.quick(**kw) if args.quick else lds.LDSConfig(**kw)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        import jax

        dev = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    except Exception:  # noqa: BLE001
        dev = "?"
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores ({cpu}), jax devices: {dev}"


def _meta(command: str, argv, seconds: float) -> dict:
    import jax

    return {"command": "influx " + " ".join(argv), "study": command, "influx": _version(),
            "jax": jax.__version__, "python": platform.python_version(), "machine": _machine(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "seconds": round(seconds, 1)}


def _write(out: Path, meta: dict, results: dict, plots: dict) -> None:
    """results: name -> study result. plots: name -> file name."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, res in results.items():
        if name in plots:
            res.plot(out / plots[name])
            written.append(plots[name])
    doc = {"meta": meta, **{name: res.to_dict() for name, res in results.items()}}
    (out / "results.json").write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    lines = [f"# influx report: {meta['study']}", "",
             f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
             f"Versions: influx {meta['influx']}, jax {meta['jax']}, Python {meta['python']}  ",
             f"Date (UTC): {meta['date_utc']}, wall time {meta['seconds']} s", ""]
    for name, res in results.items():
        lines += [res.to_markdown(), ""]
        if name in plots:
            lines += [f"![{name}]({plots[name]})", ""]
    (out / "report.md").write_text("\n".join(lines))


def _run_study(args, argv, command: str, make_config, module: str, plot_name: str) -> int:
    import importlib

    config = make_config(args)
    _check_data_dir(args, _datasets(args))
    out = _out_dir(args, command)
    study = importlib.import_module(f"influx.studies.{module}")
    t0 = time.perf_counter()
    res = study.run(config)
    print(res.to_markdown(), flush=True)
    _write(out, _meta(command, argv, time.perf_counter() - t0), {module: res}, {module: plot_name})
    print(f"\nWrote report.md, results.json and {plot_name} to {out}")
    return 0


def _demo(args, argv) -> int:
    from influx.studies import fragility, mislabel
    from influx.studies import gap_study as gaps

    prog = not args.no_progress
    seed = args.seed
    if args.quick:
        configs = {
            "fragility": fragility.FragilityConfig.quick(depths=(1,), weight_decays=(1e-3,), top_k=6,
                                                         n_test_points=2, seed=seed, progress=prog),
            "gaps": gaps.GapsConfig.quick(datasets=("diabetes",), steps=(200,), n_removed=5,
                                          n_test_points=10, seed=seed, progress=prog),
            "mislabel": mislabel.MislabelConfig.quick(n_train=200, methods=("direct", "loss", "random"),
                                                      seed=seed, progress=prog),
        }
    else:
        configs = {
            "fragility": fragility.FragilityConfig.quick(seed=seed, progress=prog),
            "gaps": gaps.GapsConfig.quick(datasets=("diabetes",), seed=seed, progress=prog),
            "mislabel": mislabel.MislabelConfig.quick(
                methods=("direct", "cg", "arnoldi", "ekfac", "grad_dot", "loss", "random"), seed=seed,
                progress=prog),
        }
    out = _out_dir(args, "demo")
    t0 = time.perf_counter()
    results = {}
    runners = {"fragility": fragility.run, "gaps": gaps.run, "mislabel": mislabel.run}
    for i, (name, cfg) in enumerate(configs.items(), 1):
        print(f"[{i}/3] {name} ...", file=sys.stderr, flush=True)
        results[name] = runners[name](cfg)
        print(results[name].to_markdown() + "\n", flush=True)
    plots = {"fragility": "fragility.png", "gaps": "gaps.png", "mislabel": "mislabeled.png"}
    _write(out, _meta("demo", argv, time.perf_counter() - t0), results, plots)
    print(f"Demo finished in {time.perf_counter() - t0:.0f} s. Wrote report.md, results.json, "
          f"{', '.join(plots.values())} to {out}")
    return 0


_STUDIES_EXTRA = ("sklearn", "matplotlib", "tqdm")  # import names of the `studies` extra


def _missing_extra() -> str | None:
    """The first module of the ``studies`` extra that cannot be imported, else None."""
    for name in _STUDIES_EXTRA:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    return None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class _Interrupt:
    """Ctrl-C ends the run at once with ``interrupted`` and exit status 130.

    A KeyboardInterrupt unwinding through JAX while XLA's threads still run can crash the
    interpreter at shutdown ("Fatal Python error: Segmentation fault"), and the main thread
    sees a Python-level signal only between bytecodes (not inside a long compile or
    solve). So the signal is taken by a watcher thread woken through
    :func:`signal.set_wakeup_fd`, which flushes the output and leaves with ``os._exit(130)``:
    no interpreter shutdown, whatever the main thread is doing. Installed only in the main
    thread, and not when SIGINT is ignored (a background job); leaving restores the
    previous handler.
    """

    def __init__(self, command: str):
        self.command = command
        self._prev = self._prev_fd = None
        self._r = self._w = None
        self._lock = threading.Lock()

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            return self  # started with SIGINT ignored (nohup, a background job): keep it so
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._prev = signal.signal(signal.SIGINT, lambda signum, frame: self._exit())
        self._prev_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(self._r,), name="influx-sigint", daemon=True).start()
        return self

    def _watch(self, fd):
        # the watcher owns the read end and closes it itself: closed from the main thread, its
        # number could be reused (by XLA, a file) while this thread still reads it
        try:
            while True:
                try:
                    data = os.read(fd, 64)
                except OSError:
                    return
                if not data:  # the write end was closed: the run ended
                    return
                if signal.SIGINT in data:
                    self._exit()
        finally:
            os.close(fd)

    def _exit(self):
        if not self._lock.acquire(blocking=False):
            return  # the other path is already leaving
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 -- leaving anyway
                pass
        os.write(2, f"influx {self.command}: interrupted\n".encode())
        os._exit(130)

    def __exit__(self, *exc):
        if self._w is None:
            return False
        signal.set_wakeup_fd(self._prev_fd if self._prev_fd is not None else -1)
        signal.signal(signal.SIGINT, self._prev if self._prev is not None else signal.default_int_handler)
        os.close(self._w)  # the watcher sees EOF and closes the read end (see _watch)
        self._w = self._r = None
        return False


def main(argv=None) -> int:
    """Entry point of the ``influx`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    missing = _missing_extra()
    if missing is not None:
        print(f"influx {args.command}: error: the studies need the 'studies' extra ({missing} is not "
              f"installed): pip install \"influx[studies]\"", file=sys.stderr)
        return 2
    with _Interrupt(args.command):
        try:
            if args.command == "demo":
                return _demo(args, argv)
            if args.command == "fragility":
                return _run_study(args, argv, "fragility", _fragility_config, "fragility", "fragility.png")
            if args.command == "gaps":
                return _run_study(args, argv, "gaps", _gaps_config, "gaps", "gaps.png")
            if args.command == "lds":
                return _run_study(args, argv, "lds", _lds_config, "lds", "lds.png")
            return _run_study(args, argv, "mislabeled", _mislabel_config, "mislabel", "mislabeled.png")
        except InputError as e:
            print(f"influx {args.command}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        except (InfluxError, OSError) as e:  # diagnosed failures; missing files, unwritable --out
            print(f"influx {args.command}: error: {_one_line(e)}", file=sys.stderr)
            return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
