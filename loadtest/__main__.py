"""``make loadtest`` (``python -m loadtest``): the side-by-side load run, plots and report.

    python -m loadtest                      # every scenario, the headline pair (naive, full) twice
    python -m loadtest --only full naive    # a subset (the docs are left alone unless --docs)
    python -m loadtest --quick              # four steps per scenario: a smoke run, not figures to quote

Results: build/loadtest/ (per scenario: locust CSV, JSON, HTML report, per-step figures; results.json
and the plots for the whole run); with the full run, docs/BENCHMARKS.md (sections loadtest, ablations),
docs/img/loadtest_*.png and the measured keys of docs/measurements.json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from loadtest.driver import (
    DEFAULT_ORDER,
    HEADLINE,
    LOADTEST_DIR,
    RATE_PER_USER,
    SCENARIOS,
    RunOptions,
    local_stack,
    log,
    run_scenario,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="synthetic", choices=("synthetic", "movielens"))
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), metavar="SCENARIO", help=f"of {list(SCENARIOS)}")
    parser.add_argument("--repeat", type=int, default=2, help="runs of the headline pair (naive, full); default 2")
    parser.add_argument("--step-s", type=float, default=10.0, help="seconds per load step (default 10)")
    parser.add_argument("--quick", action="store_true", help="four steps per scenario, no docs")
    parser.add_argument("--docs", action="store_true", help="write the docs even with --only")
    parser.add_argument("--no-docs", action="store_true", help="leave docs/ alone")
    parser.add_argument("--out", type=Path, default=LOADTEST_DIR)
    parser.add_argument(
        "--from-results", type=Path, metavar="JSON", help="redo plots and report from a results.json, run nothing"
    )
    return parser.parse_args(argv)


def command_line(args: argparse.Namespace) -> str:
    parts = ["python -m loadtest"]
    if args.dataset != "synthetic":
        parts += ["--dataset", args.dataset]
    if args.only:
        parts += ["--only", *args.only]
    if args.repeat != 2:
        parts += ["--repeat", str(args.repeat)]
    if args.step_s != 10.0:
        parts += ["--step-s", f"{args.step_s:g}"]
    if args.quick:
        parts.append("--quick")
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    from bench.runner import Machine
    from loadtest import plots, report

    args = parse_args(argv)
    if args.from_results:
        results = json.loads(args.from_results.read_text())
        images = plots.plot_all(results, args.out)
        print(report.write(results, images, write_docs=not args.no_docs), flush=True)
        return 0
    names = [n for n in DEFAULT_ORDER if n in args.only] if args.only else list(DEFAULT_ORDER)
    # The headline pair again at the end: the spread between the two runs is the noise the report states.
    repeats = [(n, f"{n}_run{i + 1}") for i in range(1, args.repeat) for n in HEADLINE if n in names]
    plan = [(n, n) for n in names] + repeats
    options = RunOptions(step_s=args.step_s, warmup_s=min(2.5, args.step_s / 4), out_dir=args.out, quick=args.quick)
    started = time.monotonic()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = Machine.detect()
    log(f"{len(plan)} runs: {', '.join(label for _, label in plan)}; {machine.describe()}; results in {args.out}")
    runs = []
    with local_stack(args.dataset) as stack:
        for i, (name, label) in enumerate(plan, 1):
            log(f"[{i}/{len(plan)}] {label} (elapsed {time.monotonic() - started:.0f} s)")
            runs.append(run_scenario(stack, SCENARIOS[name], label, options))
            model_version = stack.bundle.model_version
    results = {
        "command": command_line(args),
        "date": date,
        "machine": {"cores": machine.cores, "cpu_model": machine.cpu_model},
        "dataset": args.dataset,
        "model_version": model_version,
        "rate_per_user": RATE_PER_USER,
        "step_s": options.step_s,
        "warmup_s": options.warmup_s,
        "wall_s": round(time.monotonic() - started, 1),
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    images = plots.plot_all(results, args.out)
    log(f"plots: {', '.join(str(p) for p in images)}")
    write_docs = not args.no_docs and not args.quick and (args.docs or not args.only)
    summary = report.write(results, images, write_docs=write_docs)
    print(summary, flush=True)
    log(f"done in {time.monotonic() - started:.0f} s; results.json, HTML reports and CSVs under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
