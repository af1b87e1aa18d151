"""Markdown helpers shared by the benchmark scripts: tables and README sections."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path


def fmt(x, digits: int = 3) -> str:
    """Compact number formatting for tables (``-`` for None, ``nan`` kept visible)."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if x != x:  # nan
        return "nan"
    ax = abs(x)
    if ax != 0 and (ax >= 1e5 or ax < 1e-3):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(c) for c in r) + " |")
    return "\n".join(lines)


def replace_section(path: Path, heading: str, body: str, *, title: str = "# Benchmarks") -> None:
    """Replace (or append) the section that starts with ``heading`` (e.g. ``## Peers``) in
    ``path``, up to the next heading of the same or a higher level; other sections are kept
    verbatim. Creates the file (with ``title``) when absent."""
    path = Path(path)
    text = path.read_text() if path.exists() else f"{title}\n"
    level = len(heading) - len(heading.lstrip("#"))
    new = f"{heading}\n\n{body.strip()}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == heading), None)
    if start is None:
        if not text.endswith("\n"):
            text += "\n"
        path.write_text(text + "\n" + new)
        return
    stop = len(lines)
    pat = re.compile("^#{1," + str(level) + "} ")
    in_code = False
    for i in range(start + 1, len(lines)):
        if lines[i].startswith("```"):
            in_code = not in_code
        if not in_code and pat.match(lines[i]):
            stop = i
            break
    tail = "".join(lines[stop:])
    path.write_text("".join(lines[:start]) + new + ("\n" + tail if tail else ""))


def machine() -> dict:
    """Platform, CPU, memory, versions and JAX devices (imports jax lazily; torch-free)."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import jax
        import jaxlib

        info["jax"] = jax.__version__
        info["jaxlib"] = jaxlib.__version__
        devs = jax.devices()
        info["device"] = f"{len(devs)} x {devs[0].device_kind} ({devs[0].platform})"
    except Exception as e:  # noqa: BLE001
        info["device"] = f"unknown ({e})"
    for mod in ("flax", "optax", "numpy", "influx"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    return info
