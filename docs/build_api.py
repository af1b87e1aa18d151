"""Build influx's API reference from its docstrings with pdoc, offline.

    python docs/build_api.py                # writes docs/api/ (open docs/api/index.html)
    python docs/build_api.py -o DIR

The reference covers the package ``influx`` and every public submodule (no leading
underscore, recursively); the guides
(``docs/sign-convention.md``, ``docs/solvers.md``, ``docs/flax.md``) are rendered next to it
into ``DIR/guides/`` and linked from the package docstring, the reference's index page.

The build fails (exit status 1, every problem listed) on any warning pdoc raises -- a
submodule that does not import, a docstring pdoc cannot render -- or any warning raised
from influx's own code while it is imported, and when the index does not link every
guide. One known pdoc limitation is tolerated, checked case by case: pdoc evaluates the
string annotations of a ``NamedTuple``'s generated ``__init__`` in the namespace of
``collections`` (where ``np`` or ``Any`` do not exist) and warns; the fields are
documented all the same.
"""

from __future__ import annotations

import argparse
import html
import importlib
import re
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDES = {"sign-convention": "The sign convention", "solvers": "Which solver when",
          "flax": "Bringing your own Flax model"}

_NAMEDTUPLE_INIT = re.compile(
    r"Error parsing type annotation .* for ([\w.]+)\.__init__\. Import of \w+ failed", re.S)


def _resolve(dotted: str):
    """The object a dotted path names (module prefix imported, then attributes)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name, None)
        return obj
    return None


def _tolerated(message: str) -> bool:
    m = _NAMEDTUPLE_INIT.match(message)
    if not m:
        return False
    cls = _resolve(m[1])
    return isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")


def _counts(w: warnings.WarningMessage) -> bool:
    """A warning that fails the build: raised by pdoc, or from influx's own code."""
    import pdoc

    where = Path(w.filename).resolve()
    from_pdoc = Path(pdoc.__file__).resolve().parent in where.parents
    from_influx = (ROOT / "influx") in where.parents
    return (from_pdoc or from_influx) and not _tolerated(str(w.message))


def _guide_page(title: str, body_html: str) -> str:
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)} - influx</title>"
            "<style>body{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;"
            "line-height:1.5}pre,code{background:#f6f6f6}pre{padding:.6rem;overflow-x:auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25rem .5rem}</style>"
            "</head><body>\n<p><a href=\"../influx.html\">influx API reference</a></p>\n"
            f"{body_html}\n</body></html>\n")


def module_specs() -> list[str]:
    """The module names to give pdoc so that ``influx`` and every submodule without a
    leading underscore get a page. pdoc follows a package's ``__all__`` to its
    submodules, and ``influx.__all__`` names functions more than modules, so each public
    module that no ``__all__`` chain reaches is named explicitly (once: naming a module
    twice is a pdoc warning)."""
    import pkgutil

    import influx

    def reached(spec: str, name: str) -> bool:  # does pdoc reach `name` from `spec`?
        if name == spec:
            return True
        if not name.startswith(spec + "."):
            return False
        parts = name.split(".")
        for i in range(len(spec.split(".")), len(parts)):
            names = getattr(importlib.import_module(".".join(parts[:i])), "__all__", None)
            if names is not None and parts[i] not in names:
                return False
        return True

    public = ["influx"] + [m.name for m in pkgutil.walk_packages(influx.__path__, "influx.")
                           if not any(p.startswith("_") for p in m.name.split("."))]
    specs: list[str] = []
    for name in public:
        if not any(reached(s, name) for s in specs):
            specs.append(name)
    return specs


def build(out: Path) -> list[str]:
    """Writes the reference and the guides to ``out``; returns the problems found."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import pdoc
    import pdoc.render
    import pdoc.render_helpers

    import influx

    out = Path(out)
    pdoc.render.configure(docformat="google", footer_text=f"influx {influx.__version__}", show_source=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*module_specs(), output_directory=out)
    problems = sorted({f"{w.category.__name__}: {' '.join(str(w.message).split())}"
                       for w in caught if _counts(w)})

    (out / "guides").mkdir(parents=True, exist_ok=True)
    for name, title in GUIDES.items():
        src = ROOT / "docs" / f"{name}.md"
        if not src.is_file():
            problems.append(f"guide {src} is missing")
            continue
        body = pdoc.render_helpers.to_html(src.read_text())
        (out / "guides" / f"{name}.html").write_text(_guide_page(title, body))
    index = (out / "influx.html").read_text() if (out / "influx.html").is_file() else ""
    for name in GUIDES:
        if f'href="guides/{name}.html"' not in index:
            problems.append(f"the index (influx.html) does not link guides/{name}.html: "
                            "add it to the package docstring")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build influx's API reference (pdoc, offline).")
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "api",
                    help="output directory (default: docs/api)")
    args = ap.parse_args(argv)
    problems = build(args.output)
    for p in problems:
        print(f"build_api: {p}", file=sys.stderr)
    if problems:
        print(f"build_api: {len(problems)} problem(s); the reference in {args.output} is incomplete",
              file=sys.stderr)
        return 1
    print(f"API reference written to {args.output} (open {args.output / 'index.html'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
