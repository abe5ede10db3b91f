"""Write the README's result tables from the committed runs, so that no figure in them is copied by hand.

    python tools/readme_tables.py          # rewrite every generated block of README.md
    python tools/readme_tables.py --check  # exit 1 if README.md differs from what the runs give (a test runs this)

A generated block sits between ``<!-- begin: NAME -->`` and ``<!-- end: NAME -->``; NAME is a committed
comparison run (``lora_helpers/results/NAME.json``, read with ``committed_run``) or ``bench-cpu``
(``results/bench-cpu.json``, through the benchmark's own report). Prose outside the blocks is written by hand
and carries no numbers from the runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

from lora_helpers.compare import committed_run, control_comparison, control_line, results_table, summary_rows
from lora_helpers.experiments import SECTION7_CLAIMS, claim_reading
from lora_helpers.methods import method_spec
from lora_helpers.stats import EQUIVALENCE_MARGIN, seed_verdict, seeds_needed

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- begin: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)", re.S)


def made_by(run: dict) -> str:
    versions = run.get("versions") or {}
    commit = f", commit {versions['commit'][:7]}" if versions.get("commit") else ""
    return (
        f"Made by `{run['command']}` in {run['wall_time_s'] / 60:.0f} min on {run['machine']}{commit}; "
        f"{run['backbone'].split(';')[0]}; {run['n_train']:,} training / {run['n_val']:,} validation / "
        f"{run['n_test']:,} test reviews, {run['profile']['max_length']} tokens, "
        f"{run['runs'][next(iter(run['runs']))][0]['train_steps']} steps, seeds {run['seeds']}."
    )


def sweep_line(run: dict) -> str:
    parts = []
    for method, tried in run["sweep"].items():
        points = ", ".join(f"{r['lr']:g}: {r['val_accuracy']:.3f}" for r in sorted(tried, key=lambda r: r["lr"]))
        parts.append(f"{method} {points}")
    grew = "; the grid grew while the best was at its edge" if "--extend-grid" in run["command"] else ""
    edges = [
        f"{m} ({'largest' if run['lrs'][m] == max(r['lr'] for r in tried) else 'smallest'})"
        for m, tried in run["sweep"].items()
        if run["lrs"][m] in (min(r["lr"] for r in tried), max(r["lr"] for r in tried))
    ]
    at_edge = (" Chosen at the edge of its grid, so possibly under-tuned: " + ", ".join(edges) + ".") if edges else ""
    return f"Validation accuracy of the sweep (rate: accuracy{grew}): " + "; ".join(parts) + "." + at_edge


def headline(run: dict, rows: list) -> str:
    by = {r["method"]: r for r in rows}
    if "lora" not in by or "full" not in by or "gap" not in by["lora"]:
        return ""
    r = by["lora"]
    control = control_comparison(run)
    sd = control["sd"] if control else r["difference_sd"]
    text = (
        f"**LoRA on q, v against full fine-tuning: {r['difference'] * 100:+.1f} points, 95% interval "
        f"[{r['low'] * 100:+.1f}, {r['high'] * 100:+.1f}], verdict {r['verdict']}** (equivalent would need the "
        f"interval inside ±{EQUIVALENCE_MARGIN * 100:.0f} points); it recovers {r['gap']:.0%} "
        f"[{r['gap_low']:.0%}, {r['gap_high']:.0%}] of the head-only to full fine-tuning gap, training "
        f"{r['trainable_percent']:.2f}% of the weights."
    )
    plans = []
    spreads = (("the control's", sd),) if control else ()
    for label, value in spreads + (("this pair's own", r["difference_sd"]),):
        n = seeds_needed(value, EQUIVALENCE_MARGIN, mean=r["difference"])
        plans.append(
            f"with {label} spread (sd {value * 100:.1f} points) about {n} seeds per method"
            if n
            else f"with {label} spread (sd {value * 100:.1f} points) no number of seeds"
        )
    text += (
        " If the mean stayed as observed, the interval would just fit inside the margin (about even odds) "
        + "; ".join(plans)
        + "."
    )
    return text


def dropout_line(run: dict, rows: list) -> str:
    by = {r["method"]: r for r in rows}
    if "lora-nodrop" not in by:
        return ""
    drop, nodrop = by["lora"], by["lora-nodrop"]
    val = seed_verdict(
        [a["val_accuracy"] - b["val_accuracy"] for a, b in zip(run["runs"]["lora-nodrop"], run["runs"]["lora"])]
    )
    setting = "trains LoRA without dropout" if method_spec("lora", "cpu").lora_dropout == 0 else "keeps dropout 0.1"
    return (
        f"Dropout on LoRA's branch, on validation (each at its own rate): 0.1 reached {drop['val_mean']:.3f} "
        f"at {drop['lr']:g}, 0 reached {nodrop['val_mean']:.3f} at {nodrop['lr']:g}; seed by seed, no dropout "
        f"minus dropout {val['mean'] * 100:+.1f} points [{val['low'] * 100:+.1f}, {val['high'] * 100:+.1f}]: "
        f"{val['verdict']}. The `cpu` profile {setting}."
    )


def compare_block(name: str) -> str:
    run = committed_run(name)
    rows = summary_rows(run)
    parts = [
        made_by(run),
        results_table(rows),
        control_line(run),
        headline(run, rows),
        dropout_line(run, rows),
        sweep_line(run),
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


def study_block(name: str) -> str:
    run = committed_run(name)
    rows = summary_rows(run, reference=run["reference"])
    by = {r["method"]: r for r in rows}
    claims = [
        "| the published finding | here: a against b | difference [95% interval] | verdict | reading |",
        "|---|---|---|---|---|",
    ]
    for a, b, finding, expected in SECTION7_CLAIMS:
        r = by[a] if b == run["reference"] else None
        if r is None:
            continue
        claims.append(
            f"| {finding} | {a} against {b} | {r['difference'] * 100:+.1f} "
            f"[{r['low'] * 100:+.1f}, {r['high'] * 100:+.1f}] points | {r['verdict']} "
            f"| {claim_reading(expected, r['verdict'], r.get('direction'))} |"
        )
    rates = "; ".join(
        f"{m} {lr:g}"
        + (
            " (edge of its grid)"
            if lr in (min(x["lr"] for x in run["sweep"][m]), max(x["lr"] for x in run["sweep"][m]))
            else ""
        )
        for m, lr in run["lrs"].items()
    )
    parts = [
        made_by(run),
        results_table(rows),
        control_line(run),
        "\n".join(claims),
        f"Learning rates chosen on validation (seed {run.get('sweep_seed')}, never tested), each variant its "
        f"own: {rates}.",
    ]
    return "\n\n".join(parts) + "\n"


def bench_block(path: Path) -> str:
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    text = bench.report(json.loads(path.read_text())).strip("\n")
    return re.sub(r"\A#.*\n+", "", text) + "\n"  # the report's own title: the README has its heading


def block(name: str) -> str:
    if name == "bench-cpu":
        return bench_block(ROOT / "results" / "bench-cpu.json")
    if name.startswith("study-"):
        return study_block(name)
    return compare_block(name)


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + block(m.group("name")) + m.group(4), text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when README.md is stale")
    args = parser.parse_args(argv)
    old = README.read_text(encoding="utf-8")
    names = [m.group("name") for m in BLOCK.finditer(old)]
    new = render(old)
    if args.check:
        if new != old:
            print(f"README.md is stale: run python tools/readme_tables.py (blocks: {names})", file=sys.stderr)
            return 1
        print(f"README.md matches the committed runs (blocks: {names})")
        return 0
    tmp = README.with_name(README.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(README)
    print(f"README.md: {len(names)} blocks written ({names})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
