"""Shared helpers for the benchmark scripts: timing, machine description, result files.

Every benchmark writes ``benchmarks/results/<name>.json`` and replaces its own section
(``## <title>``) of ``benchmarks/README.md``, leaving the other sections as they are.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"


def machine() -> dict:
    """CPU model, cores, memory, versions and JAX devices of this run."""
    import jax
    import jaxlib

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{mem_kb / 2**20:.1f} GiB"
    except (OSError, AttributeError):
        mem = "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "devices": [str(d) for d in jax.devices()],
        "backend": jax.default_backend(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def block(x):
    import jax

    return jax.block_until_ready(x)


def time_fn(fn, *args, repeats: int = 30, warmup: int = 3) -> dict:
    """Wall time of ``fn(*args)`` (blocked until ready): first call, then the median of ``repeats``."""
    t0 = time.perf_counter()
    block(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        block(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "median_s": statistics.median(times), "min_s": min(times),
            "repeats": repeats}


def interleaved(fns: dict, *, repeats: int = 30, warmup: int = 3) -> dict:
    """Times several zero-argument callables round-robin, so load drifts hit all alike."""
    out = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        block(fn())
        out[name] = {"first_s": time.perf_counter() - t0, "times": []}
    for _ in range(warmup):
        for fn in fns.values():
            block(fn())
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            block(fn())
            out[name]["times"].append(time.perf_counter() - t0)
    for v in out.values():
        ts = v.pop("times")
        v.update(median_s=statistics.median(ts), min_s=min(ts), repeats=len(ts))
    return out


def save_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return path


def write_section(title: str, body: str, *, readme: Path = README) -> None:
    """Replaces (or appends) the ``## title`` section of the benchmarks README."""
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    header = f"## {title}"
    block_ = f"{header}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(header)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block_ + "\n", text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block_
    readme.write_text(text.rstrip() + "\n")


def md_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def machine_line(m: dict) -> str:
    return (f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}; backend {m['backend']}; "
            f"jax {m['jax']}; {m['date']}.")
