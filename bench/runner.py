"""``make bench`` (``python -m bench [--only SECTION ...] [--quick]``): run the benchmarks and
rewrite docs/BENCHMARKS.md and the measured keys of docs/measurements.json.

Each section lives in its own module (``bench.ranker``, ``bench.batching``, ``bench.dataplane``,
``bench.service``, ``bench.redis_scale`` for the section ``redis``, ``bench.faiss_scale`` for the section
``faiss``) and returns a ``SectionResult``: its markdown and the figures the capacity plan reads. In
BENCHMARKS.md every section sits between ``<!-- section:NAME -->`` and ``<!-- /section:NAME -->`` so that
``--only NAME`` replaces that block and leaves the others as they were measured.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.artifacts import BUILD_DIR, REPO_ROOT

log = logging.getLogger(__name__)

BENCHMARKS_PATH = REPO_ROOT / "docs" / "BENCHMARKS.md"
MEASUREMENTS_PATH = REPO_ROOT / "docs" / "measurements.json"
IMAGES_DIR = REPO_ROOT / "docs" / "img"
BENCH_DIR = BUILD_DIR / "bench"
BASE_COMMAND = "python -m bench"
HEADER = "header"
SECTION_ORDER: tuple[str, ...] = ("ranker", "batching", "dataplane", "service", "redis", "faiss")
_NAME = re.compile(r"^[a-z0-9_-]+$")


# --- figures -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100, linear interpolation, as numpy) of a non-empty sample."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must lie in 0..100, got {q}")
    if len(values) == 0:
        raise ValueError("percentile of an empty sample: the benchmark recorded no observations")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; a zero or negative denominator means the baseline run measured nothing."""
    if denominator <= 0:
        raise ValueError(f"ratio needs a positive denominator, got {denominator} (numerator {numerator})")
    return numerator / denominator


def format_ratio(value: float) -> str:
    return f"{value:.2f}x"


def format_rate(value: float) -> str:
    """Rows or requests per second, to three significant figures with a thousands separator."""
    if value >= 1000:
        return f"{round(value, -int(np.floor(np.log10(value))) + 2):,.0f}"
    return f"{value:.3g}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A GitHub table; ``align`` is one char per column (``l``/``r``), right-aligned by default."""
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"align has {len(align)} columns but header has {len(header)}")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row has {len(row)} cells but the header has {len(header)}: {list(row)}")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


# --- the machine and the run ---------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    cores: int
    cpu_model: str

    @classmethod
    def detect(cls, cpuinfo: Path = Path("/proc/cpuinfo")) -> Machine:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        model = "unknown CPU"
        try:
            for line in cpuinfo.read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return cls(cores, model)

    def describe(self) -> str:
        return f"{self.cores} cores ({self.cpu_model})"


def load_average() -> str:
    """The 1-minute load average over the core count: how busy the shared machine was."""
    try:
        one_minute = os.getloadavg()[0]
    except OSError:
        return "unknown"
    return f"{one_minute:.2f}/{Machine.detect().cores}"


@dataclass(frozen=True)
class BenchContext:
    """What every section needs: the exact command, when and where it ran, and how long to run."""

    command: str
    date: str
    machine: Machine
    quick: bool = False
    work_dir: Path = BENCH_DIR
    images_dir: Path = IMAGES_DIR

    def provenance(self) -> str:
        """The line every section opens with, so that a figure is never quoted without its run."""
        return f"Command: `{self.command}` · date: {self.date} · machine: {self.machine.describe()}"

    def source(self) -> str:
        return f"{self.command} ({self.date})"


@dataclass(frozen=True)
class Measured:
    """One figure for docs/measurements.json."""

    value: float
    unit: str


@dataclass
class SectionResult:
    markdown: str
    measurements: dict[str, Measured] = field(default_factory=dict)


Section = Callable[[BenchContext], SectionResult]


# --- BENCHMARKS.md -------------------------------------------------------------------------------


def _markers(name: str) -> tuple[str, str]:
    if not _NAME.match(name):
        raise ValueError(f"section name must match {_NAME.pattern}, got {name!r}")
    return f"<!-- section:{name} -->", f"<!-- /section:{name} -->"


def replace_section_text(text: str, name: str, markdown: str) -> str:
    """``text`` with the block of section ``name`` replaced by ``markdown``, or appended if absent (the
    header block goes first, replacing a bare ``# Benchmarks`` title another writer may have left)."""
    begin, end = _markers(name)
    block = f"{begin}\n{markdown.strip()}\n{end}"
    start = text.find(begin)
    if start < 0 and name == HEADER:
        rest = text.removeprefix("# Benchmarks\n").lstrip("\n")
        return f"{block}\n\n{rest}" if rest else f"{block}\n"
    if start < 0:
        if text and not text.endswith("\n"):
            text += "\n"
        return f"{text}\n{block}\n" if text else f"{block}\n"
    stop = text.find(end, start)
    if stop < 0:
        raise ValueError(f"section {name!r} opens with {begin} but has no closing {end}: fix the file by hand")
    return text[:start] + block + text[stop + len(end) :]


def replace_section(path: Path, name: str, markdown: str) -> None:
    """Replace (or append) one section's block in the markdown file at ``path``; other blocks stay."""
    text = path.read_text() if path.exists() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(replace_section_text(text, name, markdown))


def header_markdown(ctx: BenchContext) -> str:
    return "\n".join(
        [
            "# Benchmarks",
            "",
            f"Written by `make bench` (`{BASE_COMMAND}`); re-run one section with "
            f"`{BASE_COMMAND} --only NAME`, which replaces only that section's block. Each section names the "
            "command, date and machine that produced it; its medians and ratios come from that one run.",
            "",
            "**CPU figures are not GPU figures.** Everything here ran on the development machine's CPUs, with "
            "the load generator on the same cores, shared with other work: absolute numbers are noisy and "
            "far below what the `gpu-t4` profile serves. Use the ratios, not the absolutes, to judge the design.",
            "",
            f"Last run: {ctx.date}, `{ctx.command}`, on {ctx.machine.describe()}.",
        ]
    )


# --- measurements.json ---------------------------------------------------------------------------


def update_measurements(path: Path, measured: dict[str, Measured], source: str) -> None:
    """Set value, unit and source of the measured keys (dropping ``provisional``); keep everything else."""
    if not measured:
        return
    raw: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"measurements": {}}
    entries = raw.setdefault("measurements", {})
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: expected a 'measurements' object, found {type(entries).__name__}")
    for key, figure in measured.items():
        entry = dict(entries.get(key, {}))
        entry.pop("provisional", None)
        entry.update(value=figure.value, unit=figure.unit, source=source)
        entries[key] = entry
    path.write_text(json.dumps(raw, indent=2) + "\n")


# --- sections and the runner ---------------------------------------------------------------------


class SectionUnavailable(Exception):
    """A section that cannot run here (its module is missing): skipped, its old block kept."""


def _dataplane_section(ctx: BenchContext) -> SectionResult:
    """The data-plane engineer's benchmark, adapted to this runner without touching their module."""
    try:
        module = importlib.import_module("bench.dataplane")
    except ModuleNotFoundError as exc:
        if exc.name != "bench.dataplane":
            raise
        raise SectionUnavailable("bench/dataplane.py does not exist yet") from exc
    entry = getattr(module, "run_section", None) or getattr(module, "run", None)
    if entry is None:
        raise SectionUnavailable("bench.dataplane exposes neither run_section nor run")
    out = entry(ctx)
    if isinstance(out, SectionResult):
        return out
    if isinstance(out, str):
        return SectionResult(out)
    markdown = getattr(out, "markdown", None)
    if isinstance(markdown, str):
        raw = getattr(out, "measurements", {}) or {}
        return SectionResult(markdown, {k: v if isinstance(v, Measured) else Measured(**v) for k, v in raw.items()})
    raise TypeError(f"bench.dataplane.{entry.__name__} returned {type(out).__name__}; expected markdown")


def _module_section(module_name: str) -> Section:
    def run(ctx: BenchContext) -> SectionResult:
        # Imported on use: `--only batching` should not pay for importing the others.
        section: Section = importlib.import_module(module_name).run_section
        return section(ctx)

    return run


SECTIONS: dict[str, Section] = {
    "ranker": _module_section("bench.ranker"),
    "batching": _module_section("bench.batching"),
    "dataplane": _dataplane_section,
    "service": _module_section("bench.service"),
    "redis": _module_section("bench.redis_scale"),
    "faiss": _module_section("bench.faiss_scale"),
}


def run_sections(
    names: Sequence[str],
    ctx: BenchContext,
    markdown_path: Path = BENCHMARKS_PATH,
    measurements_path: Path = MEASUREMENTS_PATH,
    sections: dict[str, Section] | None = None,
) -> list[str]:
    """Run ``names`` in order, writing each section as soon as it finishes; returns the failed names."""
    sections = sections or SECTIONS
    replace_section(markdown_path, HEADER, header_markdown(ctx))
    failed = []
    for name in names:
        started = time.perf_counter()
        log.info("bench: section %s ...", name)
        try:
            result = sections[name](ctx)
        except SectionUnavailable as exc:
            log.warning("bench: section %s skipped: %s", name, exc)
            continue
        except Exception:
            log.exception("bench: section %s failed; its previous block is kept", name)
            failed.append(name)
            continue
        replace_section(markdown_path, name, result.markdown)
        update_measurements(measurements_path, result.measurements, ctx.source())
        log.info("bench: section %s done in %.0f s", name, time.perf_counter() - started)
    return failed


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only", nargs="+", choices=SECTION_ORDER, metavar="SECTION", help=f"run only these ({SECTION_ORDER})"
    )
    parser.add_argument("--quick", action="store_true", help="shorter runs: a smoke test, not figures to quote")
    parser.add_argument("--out", type=Path, default=BENCHMARKS_PATH, help="markdown file (%(default)s)")
    parser.add_argument("--measurements", type=Path, default=MEASUREMENTS_PATH, help="(%(default)s)")


def command_line(args: argparse.Namespace) -> str:
    """The command as a user would type it, for the provenance line."""
    parts = [BASE_COMMAND]
    if args.only:
        parts += ["--only", *args.only]
    if args.quick:
        parts.append("--quick")
    if args.out != BENCHMARKS_PATH:
        parts += ["--out", str(args.out)]
    if args.measurements != MEASUREMENTS_PATH:
        parts += ["--measurements", str(args.measurements)]
    return " ".join(parts)


def _cmd_bench(args: argparse.Namespace) -> int:
    names = [n for n in SECTION_ORDER if n in args.only] if args.only else list(SECTION_ORDER)
    ctx = BenchContext(
        command=command_line(args),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine=Machine.detect(),
        quick=args.quick,
    )
    failed = run_sections(names, ctx, args.out, args.measurements)
    if failed:
        log.error("bench: failed sections: %s (see the log above)", ", ".join(failed))
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench`` (``main(["--only", "ranker"])`` from code)."""
    parser = argparse.ArgumentParser(prog=BASE_COMMAND, description=__doc__)
    _add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: a line per request costs the client CPU on the cores it shares with
    # the service under test (the service section sends tens of thousands).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return _cmd_bench(parser.parse_args(argv))
