"""LoRA against full fine-tuning, fairly: tuned rates, several seeds, a paired test, and a look at the update.

* ``compare_methods``: every method trains on the same reviews from the same backbone through
  ``runner.run``; optionally each method's own learning rate is first chosen on the validation
  split (``lrs``: a small sweep per method; the head-only sweep picks the head rate that every
  method then shares); the chosen rates are trained with several seeds and scored on the test
  split once;
* ``summary_rows`` / ``results_table`` / ``paired_tests``: mean ± sd over seeds, and McNemar's
  test of each method against full fine-tuning on the shared test reviews, per seed;
* ``plot_sweep`` / ``plot_val_curves`` / ``plot_accuracy``: the sweep, the validation curves, the
  accuracies per seed;
* ``checkpoint_bytes`` / ``optimizer_bytes``: what each method must save and what its gradients
  and AdamW states weigh (exact, from the shapes);
* ``low_rank_report`` / ``plot_update_spectra``: is the full
  fine-tuning update dW low rank, and does LoRA's B A point the same way (paper Section 7)?

* ``committed_run``: a comparison run with the package (``lora_helpers/results/*.json``), read
  from wherever the package is installed, so a notebook opened on its own can show it.

Introduced in notebook 04 (``04_lora_vs_full_finetuning.ipynb``); also
``python -m lora_helpers compare``.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import torch
from safetensors.torch import save_file

from .adapters import lora_state_dict, save_adapter
from .analysis import energy_in_top, expected_random_similarity, random_like, subspace_similarity, top_directions
from .backbone import load_backbone
from .lora import count_parameters
from .memory import training_memory_formula
from .methods import HEAD_MODULES, MethodSpec, head_learning_rate, method_spec, prepare_method
from .runner import TokenizedData, best_run, load_splits, mcnemar, mean_sd, run, score_test, sweep, tokenize
from .stats import EQUIVALENCE_MARGIN, compare_runs, gap_recovered
from .utils import get_device

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .profiles import Profile


def committed_runs() -> list[str]:
    """Names of the comparison runs shipped with the package (``committed_run`` reads them)."""
    folder = importlib.resources.files("lora_helpers") / "results"
    return sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".json"))


def committed_run(name: str) -> dict:
    """The saved ``python -m lora_helpers compare`` run ``name`` (e.g. ``"compare-cpu"``), shipped with the package.

    Its keys are those ``compare_methods`` returns, with ``command``, ``machine`` and ``wall_time_s`` of the run.
    """
    known = committed_runs()
    if name not in known:
        raise FileNotFoundError(
            f"no committed run named {name!r} in this installation of lora_helpers: choose one "
            f"of {known}, or reinstall the package (pip install lora_helpers from the repository)"
        )
    text = (importlib.resources.files("lora_helpers") / "results" / f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


CHECKPOINT_WHAT = {"full": "whole model state", "lora": "LoRA A, B + head", "head": "head only"}

# ------------------------------------------------------------------ costs, exact


def checkpoint_bytes(model: torch.nn.Module, kind: str, head_modules: Iterable[str] = HEAD_MODULES) -> int:
    """Bytes on disk of what must be saved to keep the fine-tuned model (written to a temporary folder).

    Depends only on the shapes, so a freshly prepared (untrained) model gives the same number.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "lora":  # safetensors + its small JSON config
            save_adapter(model, Path(tmp) / "adapter", extra=head_modules)
        else:
            state = lora_state_dict(model, head_modules) if kind == "head" else model.state_dict()
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(Path(tmp) / "w.safetensors"))
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())


def optimizer_bytes(n_trainable: int, bytes_per_value: int = 4) -> int:
    """Gradients plus AdamW's two running averages: 3 values per trainable parameter (float32: 12 bytes).

    ``memory.training_memory_formula``'s count, without the (frozen or trained) weights.
    """
    f = training_memory_formula(n_trainable, n_trainable, bytes_per_param=bytes_per_value)
    return f["gradients"] + f["optimizer_state"]


def method_costs(
    profile: Profile,
    methods: Iterable[str],
    backbone: Callable[..., tuple[torch.nn.Module, PreTrainedTokenizerBase, str]] | None = None,
) -> dict:
    """Per method: trainable / total parameters, gradient + AdamW bytes, checkpoint bytes (from the shapes)."""
    base, _, _ = (backbone or load_backbone)(profile.backbone, seed=profile.seed, verbose=False)
    out = {}
    for name in methods:
        spec = method_spec(name, profile)
        model = copy.deepcopy(base)
        prepare_method(model, spec)
        count = count_parameters(model)
        out[name] = {
            "trainable_params": count.trainable,
            "total_params": count.total,
            "trainable_percent": count.percent,
            "optimizer_bytes": optimizer_bytes(count.trainable),
            "checkpoint_bytes": checkpoint_bytes(model, spec.kind),
            "checkpoint_what": CHECKPOINT_WHAT[spec.kind],
        }
        del model
    return out


# ------------------------------------------------------------------ the comparison


def next_rate(lr: float, up: bool) -> float:
    """The next rate of the half-decade grid ``1, 3, 10, 30, ...`` (times a power of ten) above or below ``lr``."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = lr / 10**exponent  # 1 or 3 on the grid
    nxt = ((3 if mantissa < 2 else 10) if up else (1 if mantissa > 2 else 0.3)) * 10**exponent
    return float(f"{nxt:.0e}")  # 3e-05, not 2.9999999999999997e-05


def extended_sweep(
    spec: MethodSpec,
    data: TokenizedData,
    profile: Profile,
    lrs: Iterable[float],
    *,
    seed: int | None,
    head_lr: float | None,
    device: str | torch.device | None,
    backbone: Callable[..., tuple[torch.nn.Module, PreTrainedTokenizerBase, str]] | None,
    verbose: bool,
    max_extra: int = 4,
) -> list:
    """``runner.sweep`` over ``lrs``, then one more rate beyond the edge while the best is at an edge of the grid.

    A rate chosen at the edge of its grid may be under- or over-tuned: the grid grows (half a decade at a
    time) until the best validation accuracy has a tried rate on each side, or ``max_extra`` rates were
    added (then the choice stays at the edge; ``grid_edges`` reports it).
    """
    runs = sweep(
        spec, data, profile, sorted(lrs), seed=seed, head_lr=head_lr, device=device, backbone=backbone, verbose=verbose
    )
    for _ in range(max_extra):
        runs.sort(key=lambda r: r.lr)
        best = best_run(runs)
        if best is not runs[0] and best is not runs[-1]:
            break
        lr = next_rate(best.lr, up=best is runs[-1])
        if verbose:
            print(f"   best rate {best.lr:g} is at the edge of the grid: trying {lr:g} too")
        try:
            runs += sweep(
                spec, data, profile, [lr], seed=seed, head_lr=head_lr, device=device, backbone=backbone, verbose=verbose
            )
        except FloatingPointError:  # the rate beyond the edge diverged: the edge is the largest rate that trains
            break
    return sorted(runs, key=lambda r: r.lr)


def compare_methods(
    profile: Profile,
    methods: Sequence[str | MethodSpec] = ("full", "lora", "lora-all", "head"),
    seeds: Iterable[int] = (0, 1, 2),
    lrs: dict | None = None,
    data: TokenizedData | None = None,
    device: str | torch.device | None = None,
    backbone: Callable[..., tuple[torch.nn.Module, PreTrainedTokenizerBase, str]] | None = None,
    verbose: bool = True,
    extend_grid: bool = False,
    control: str | None = None,
    sweep_seed: int | None = None,
    head_lr: float | None = None,
) -> dict:
    """Train each method with each seed on the same reviews; test each once, at the end.

    ``methods``: names from ``methods.METHODS`` or ``MethodSpec`` variants (named by their ``name``).
    ``lrs`` (optional): ``{method: [learning rates]}`` to choose each method's own rate on the
    validation split at ``seeds[0]``. If ``"head"`` is swept, it goes first and its best rate
    becomes the head rate of every method (each method trains the same new head alike). The
    winning sweep run is reused as that method's ``seeds[0]`` run, which saves a run but makes that
    seed a selected one (its test accuracy is biased up a little, more so with more rates tried);
    ``sweep_seed``: sweep with this seed instead, one that is never tested, and train every seed
    afresh. Methods not swept train at their spec's ``lr``, else the rate tuned for the profile
    (``methods.REGISTRY``); every new head at ``head_lr`` (default: the head-only method's tuned rate).
    ``extend_grid``: grow a grid whose best rate sits at its edge (``extended_sweep``).
    ``control``: one of ``methods`` trained again with as many new seeds (``seeds`` shifted past the
    last), at its chosen rate: two groups of seeds of one configuration, the noise yardstick of the
    seed-level verdicts (``control_comparison``). ``data``: a ``TokenizedData`` (default: ``load_splits``
    + ``tokenize``); ``backbone``: a ``load_backbone``-style callable (default ``load_backbone``).

    Returns ``{"profile", "backbone", "device", "lrs": {method: chosen}, "head_lr", "sweep":
    {method: [RunResult]}, "runs": {method: [RunResult per seed]}, "control": {"method", "runs"} or None}``.
    """
    from .methods import METHODS

    specs = {m.name: m for m in methods if isinstance(m, MethodSpec)}  # variants (notebook 05's study)
    methods = [m.name if isinstance(m, MethodSpec) else m for m in methods]
    unknown = [m for m in list(methods) + list(lrs or {}) if m not in METHODS and m not in specs]
    if unknown:
        raise ValueError(f"unknown methods {unknown}: choose from {list(METHODS)} or pass a MethodSpec")
    specs.update({m: method_spec(m, profile) for m in methods if m not in specs})
    if control is not None and control not in methods:
        raise ValueError(f"control {control!r} must be one of the methods compared: {list(methods)}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("need at least one seed")
    if sweep_seed is not None and (sweep_seed in seeds or sweep_seed < 0):
        raise ValueError(f"sweep_seed {sweep_seed} must be a seed that is never tested (not one of {seeds})")
    tune_seed = seeds[0] if sweep_seed is None else sweep_seed
    device = get_device() if device is None else torch.device(device)
    if data is None:
        _, tokenizer, _ = (backbone or load_backbone)(profile.backbone, seed=profile.seed, verbose=verbose)
        data = tokenize(load_splits(profile, verbose=verbose), tokenizer, profile)
    lrs = dict(lrs or {})
    order = sorted(methods, key=lambda m: m != "head") if "head" in lrs else list(methods)
    head_lr = head_learning_rate(profile) if head_lr is None else head_lr
    chosen, swept, runs = {}, {}, {}
    for method in order:
        spec = specs[method]
        first = None
        if method in lrs:
            if verbose:
                print(f"-- {method}: learning-rate sweep {lrs[method]} on the validation split (seed {tune_seed})")
            tune = extended_sweep if extend_grid else sweep  # extended: grow a grid whose best rate is at its edge
            swept[method] = tune(
                spec,
                data,
                profile,
                lrs[method],
                seed=tune_seed,
                head_lr=head_lr,
                device=device,
                backbone=backbone,
                verbose=verbose,
            )
            first = best_run(swept[method])
            if method == "head":
                head_lr = first.lr
            for r in swept[method]:
                if r is not first:
                    r.model = None  # free the losers' weights
        chosen[method] = first.lr if first is not None else None
        if verbose:
            print(f"-- {method}: {len(seeds)} seeds at the chosen rate, each scored on the test split once")
        runs[method] = []
        for seed in seeds:
            if first is not None and seed == tune_seed:
                result = score_test(first, data)
                result.model = None
                if verbose:
                    print(result.line() + "  (the sweep's best run)")
            else:
                result = run(
                    spec,
                    data,
                    profile,
                    seed=seed,
                    lr=chosen[method],
                    head_lr=head_lr,
                    test=True,
                    device=device,
                    backbone=backbone,
                    verbose=verbose,
                )
            runs[method].append(result)
        if first is not None:
            first.model = None  # a sweep seed that is never tested: its model is not needed any more
        chosen[method] = runs[method][0].lr
    control_runs = None
    if control is not None:
        spec = specs[control]
        control_seeds = [max(seeds) + 1 + i for i in range(len(seeds))]
        if verbose:
            print(f"-- control: {control} again with seeds {control_seeds} (the same configuration, other seeds)")
        control_runs = {
            "method": control,
            "runs": [
                run(
                    spec,
                    data,
                    profile,
                    seed=seed,
                    lr=chosen[control],
                    head_lr=head_lr,
                    test=True,
                    device=device,
                    backbone=backbone,
                    verbose=verbose,
                )
                for seed in control_seeds
            ],
        }
    backbone = next(iter(runs.values()))[0].backbone
    return {
        "profile": profile,
        "backbone": backbone,
        "device": str(device),
        "lrs": chosen,
        "head_lr": head_lr,
        "methods": {m: specs[m].replace(lr=chosen.get(m, specs[m].lr)).summary() for m in methods},
        "sweep": swept,
        "runs": {m: runs[m] for m in methods},
        "seeds": seeds,
        "control": control_runs,
        "sweep_seed": tune_seed,
        "test_labels": list(data.test_labels),
        "n_train": data.n_train,
        "n_val": data.n_val,
        "n_test": data.n_test,
    }


def paired(runs_a: list, runs_b: list, labels: Sequence[int]) -> list[dict]:
    """McNemar's test of ``runs_a`` against ``runs_b`` seed by seed (the runs of one seed paired), on the test split.

    A per-model test: is *this* model of A more accurate than *this* model of B on these reviews? It ignores
    how much another seed would change either, so it is not a verdict on the methods (``stats.seed_verdict``).
    ``[{"seed", "a_only", "b_only", "p_value", "accuracy_difference"}]``, one per seed the two share.
    """
    seed = lambda r: r["seed"] if isinstance(r, dict) else r.seed  # noqa: E731
    predictions = lambda r: r["test_predictions"] if isinstance(r, dict) else r.test["predictions"]  # noqa: E731
    by_seed = {seed(b): b for b in runs_b}
    shared = [a for a in runs_a if seed(a) in by_seed]
    if not shared:
        raise ValueError(f"no seed in common: {[seed(a) for a in runs_a]} against {sorted(by_seed)}")
    return [{"seed": seed(a), **mcnemar(predictions(a), predictions(by_seed[seed(a)]), labels)} for a in shared]


def _metrics(run) -> dict:
    """A run as its ``metrics()`` dict (live ``RunResult`` or already a dict from a saved JSON)."""
    return run if isinstance(run, dict) else run.metrics()


def paired_tests(results: dict, reference: str = "full") -> dict:
    """``paired`` for each method against ``reference`` (``compare_methods``' result or a saved JSON).

    ``{method: [{"seed", "a_only", "b_only", "p_value", "accuracy_difference"}]}`` (a = the method).
    """
    labels, out = _test_labels(results), {}
    if reference not in results["runs"]:
        return out
    for method, runs in results["runs"].items():
        if method != reference:
            out[method] = paired(runs, results["runs"][reference], labels)
    return out


def _test_labels(results: dict) -> list:
    """The test labels of a live result or of a saved JSON (``results_json`` keeps them)."""
    if "test_labels" not in results:
        raise KeyError("this result has no test labels: McNemar's test needs them (compare_methods keeps them)")
    return results["test_labels"]


def control_comparison(results: dict, margin: float = EQUIVALENCE_MARGIN) -> dict | None:
    """The same-configuration control: the control method's seeds against its other seeds (paired in order).

    Two groups of seeds of one configuration differ only by chance, so this is the noise every verdict must
    beat. ``None`` when the run has no control (``compare_methods(control=...)``).
    """
    control = results.get("control")
    if not control:
        return None
    method = control["method"]
    first, second = [_metrics(r) for r in results["runs"][method]], [_metrics(r) for r in control["runs"]]
    n = min(len(first), len(second))
    out = compare_runs(second[:n], first[:n], results["n_test"], margin, by_seed=False)
    return {
        **out,
        "method": method,
        "seeds_a": [r["seed"] for r in second[:n]],
        "seeds_b": [r["seed"] for r in first[:n]],
    }


def summary_rows(
    results: dict, costs: dict | None = None, reference: str = "full", margin: float = EQUIVALENCE_MARGIN
) -> list[dict]:
    """One row per method: rate, test accuracy mean ± sd over seeds, and against ``reference``: the seed-level
    difference with its 95% interval and verdict (``stats.seed_verdict``, margin ``margin``), McNemar's p per
    seed (per model), and the share of the head-only -> full gap recovered. Works on a live result or a saved JSON.
    """
    costs = costs if costs is not None else results.get("costs")
    runs = {m: [_metrics(r) for r in rs] for m, rs in results["runs"].items()}
    tests = paired_tests(results, reference) if "test_labels" in results else {}
    rows = []
    for method, rs in runs.items():
        acc = [r["test_accuracy"] for r in rs]
        mean, sd = mean_sd(acc)
        row = {
            "method": method,
            "lr": rs[0]["lr"],
            "head_lr": rs[0]["head_lr"],
            "seeds": [r["seed"] for r in rs],
            "test_accuracy": acc,
            "test_mean": mean,
            "test_sd": sd,
            "val_mean": mean_sd(r["val_accuracy"] for r in rs)[0],
            "trainable_params": rs[0]["trainable_params"],
            "trainable_percent": rs[0]["trainable_percent"],
            "steps": rs[0]["train_steps"],
        }
        if reference in runs and method != reference:
            vs = compare_runs(rs, runs[reference], results["n_test"], margin)
            row.update(
                vs=reference,
                difference=vs["mean"],
                difference_sd=vs["sd"],
                low=vs["low"],
                high=vs["high"],
                verdict=vs["verdict"],
                direction=vs["direction"],
                margin=margin,
            )
            if method in tests:
                row["mcnemar_p"] = [t["p_value"] for t in tests[method]]
        if reference == "full" and "full" in runs and "head" in runs and method not in ("head", "full"):
            try:
                gap = gap_recovered(rs, runs[reference], runs["head"])
                row.update(gap=gap["mean"], gap_low=gap["low"], gap_high=gap["high"])
            except ValueError:
                pass
        if costs and method in costs:
            row.update({k: costs[method][k] for k in ("optimizer_bytes", "checkpoint_bytes", "checkpoint_what")})
        rows.append(row)
    return rows


def results_json(results: dict, costs: dict | None = None) -> dict:
    """The JSON-serialisable part of ``compare_methods``' result: settings, summary, every run's metrics."""
    return {
        "profile": vars(results["profile"]),
        "backbone": results["backbone"],
        "device": results["device"],
        "seeds": results["seeds"],
        "sweep_seed": results.get("sweep_seed"),
        "lrs": results["lrs"],
        "head_lr": results["head_lr"],
        "methods": results.get("methods"),
        "n_train": results["n_train"],
        "n_val": results["n_val"],
        "n_test": results["n_test"],
        "test_labels": list(results["test_labels"]),
        "summary": summary_rows(results, costs),
        "costs": costs,
        "sweep": {m: [r.metrics() for r in rs] for m, rs in results["sweep"].items()},
        "runs": {m: [r.metrics() for r in rs] for m, rs in results["runs"].items()},
        "control": None
        if not results.get("control")
        else {"method": results["control"]["method"], "runs": [r.metrics() for r in results["control"]["runs"]]},
    }


# ------------------------------------------------------------------ showing


def _interval(low, high, digits: int = 3) -> str:
    return "" if low is None else f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def _verdict_text(row: dict) -> str:
    """The verdict, with the direction when an "equivalent" interval also excludes 0 ("equivalent, worse")."""
    if "verdict" not in row:
        return "reference"
    return row["verdict"] + (f", {row['direction']}" if row.get("direction") and row["verdict"] == "equivalent" else "")


def results_table(rows: Sequence[dict]) -> str:
    """A markdown table, one row per method (``summary_rows``): accuracy over seeds; against the reference the
    mean seed-level difference, its 95% interval and verdict, the share of the head -> full gap recovered, and
    McNemar's p per seed (a per-model test, not the verdict)."""
    margin = next((r["margin"] for r in rows if "margin" in r), EQUIVALENCE_MARGIN)
    reference = next((r["vs"] for r in rows if "vs" in r), "full")
    lines = [
        "| method | trainable | rate (method / head) | test accuracy, mean ± sd | per seed "
        f"| vs {reference}: mean difference [95% interval] | verdict (margin ±{margin:g}) | gap recovered [95%] "
        "| McNemar p per seed |",
        "|---|---:|---|---:|---|---|---|---|---|",
    ]
    for r in rows:
        vs = f"{r['difference']:+.3f} {_interval(r['low'], r['high'])}" if "verdict" in r else ""
        gap = (
            ""
            if "gap" not in r
            else (f"{r['gap']:.0%}" + ("" if r["gap_low"] is None else f" [{r['gap_low']:.0%}, {r['gap_high']:.0%}]"))
        )
        ps = ", ".join(f"{p:.2g}" for p in r.get("mcnemar_p", []))
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} ({r['trainable_percent']:.2f}%) "
            f"| {r['lr']:.0e} / {r['head_lr']:.0e} | {r['test_mean']:.3f} ± {r['test_sd']:.3f} "
            f"| {' '.join(f'{a:.3f}' for a in r['test_accuracy'])} | {vs} | {_verdict_text(r)} "
            f"| {gap} | {ps} |"
        )
    return "\n".join(lines)


def control_line(results: dict) -> str:
    """One sentence on the same-configuration control (``control_comparison``), or "" without one."""
    c = control_comparison(results)
    if c is None:
        return ""
    return (
        f"Control: `{c['method']}` seeds {c['seeds_a']} against its seeds {c['seeds_b']} (one configuration): "
        f"{c['mean']:+.3f} {_interval(c['low'], c['high'])}, verdict {c['verdict']}. "
        "Differences between methods that this much chance could make are not evidence."
    )


def _runs_json(results: dict, key: str) -> dict:
    """``{method: [metrics dict]}`` from a live result or a saved JSON."""
    runs = results[key]
    return {m: [r if isinstance(r, dict) else r.metrics() for r in rs] for m, rs in runs.items()}


# One colour per method in every figure (sweep, curves, bars), so a method is recognised at a glance.
METHOD_COLORS = {
    "full": "tab:blue",
    "lora": "tab:orange",
    "lora-all": "tab:green",
    "head": "tab:red",
    "lora-nodrop": "tab:brown",
}


def _color(method: str, i: int):
    return METHOD_COLORS.get(method, plt.cm.tab10(4 + i % 6))


def _percent(p: float) -> str:
    """100 -> "100%", 2.08 -> "2.1%", 0.976 -> "0.98%" (not "1e+02%")."""
    return f"{p:.0f}%" if p >= 10 else f"{p:.2g}%"


def plot_sweep(results: dict, ax: plt.Axes | None = None) -> plt.Axes:
    """Validation accuracy against the method's own learning rate (log axis), one line per method."""
    sweep = _runs_json(results, "sweep")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for i, (method, rs) in enumerate(sweep.items()):
        xs = [r["lr"] for r in rs]
        ys = [r["val_accuracy"] for r in rs]
        ax.plot(xs, ys, "o-", label=method, color=_color(method, i))
        best = max(range(len(rs)), key=lambda i: (ys[i], -rs[i]["val_loss"]))
        ax.plot(xs[best], ys[best], "*", ms=14, color=_color(method, i))
    ax.axhline(0.5, color="gray", ls="--", lw=1)
    ax.set(
        xscale="log",
        xlabel="learning rate of the method's own parameters",
        ylabel="validation accuracy",
        title="Learning-rate sweep on the validation split (star: chosen; dashed: chance)",
    )
    ax.title.set_fontsize(10)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: no point hidden
    ax.grid(alpha=0.3, which="both")
    return ax


def plot_val_curves(results: dict, ax: plt.Axes | None = None) -> plt.Axes:
    """Validation accuracy during training, mean over seeds (band: min to max), one line per method."""
    runs = _runs_json(results, "runs")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for i, (method, rs) in enumerate(runs.items()):
        steps = [p["step"] for p in rs[0]["val_curve"]]
        acc = np.array([[p["accuracy"] for p in r["val_curve"]] for r in rs])
        ax.plot(steps, acc.mean(0), "o-", label=method, color=_color(method, i))
        ax.fill_between(steps, acc.min(0), acc.max(0), color=_color(method, i), alpha=0.15)
    ax.axhline(0.5, color="gray", ls="--", lw=1)
    n_seeds = len(next(iter(runs.values())))
    ax.set(
        xlabel="training step",
        ylabel="validation accuracy",
        title=f"Validation accuracy while training ({n_seeds} seeds: mean, band min to max)",
    )
    ax.title.set_fontsize(10)
    ax.legend(fontsize=9, loc="best")
    ax.grid(alpha=0.3)
    return ax


def plot_accuracy(
    rows: Sequence[dict], ax: plt.Axes | None = None, title: str = "Test accuracy per seed (bar: mean)"
) -> plt.Axes:
    """Test accuracy of every seed as dots, the mean as a bar, per method."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(rows):
        color = _color(r["method"], i)
        ax.bar(i, r["test_mean"], color=color, alpha=0.35)
        ax.errorbar(i, r["test_mean"], yerr=r["test_sd"], color="k", capsize=4)
        ax.plot([i] * len(r["test_accuracy"]), r["test_accuracy"], "o", color=color)
    ax.set_xticks(range(len(rows)), [f"{r['method']}\n{_percent(r['trainable_percent'])}" for r in rows])
    low = min(a for r in rows for a in r["test_accuracy"])
    ax.set(
        ylim=(min(0.5, low - 0.02), 1.0),
        xlabel="method (share of the weights trained)",
        ylabel="test accuracy",
        title=title,
    )
    ax.title.set_fontsize(10)
    ax.axhline(0.5, color="gray", ls="--", lw=1)
    ax.grid(alpha=0.3, axis="y")
    return ax


# ------------------------------------------------------------------ is the update low rank?


@contextmanager
def single_thread() -> Iterator[None]:
    """torch on one thread inside the block: a 384 x 384 SVD gains nothing from a second thread, and on
    a busy CPU two threads made it ~100x slower (6.7 s instead of 0.04 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def short_name(key: str) -> str:
    """``distilbert.transformer.layer.3.attention.q_lin.weight`` -> ``L3 q_lin``."""
    parts = key.split(".")
    layer = parts[parts.index("layer") + 1] if "layer" in parts else "?"
    return f"L{layer} {parts[-2]}"


@single_thread()
def low_rank_report(
    full_updates: dict,
    lora_updates: dict | None = None,
    k: int = 8,
    r: int = 8,
    side: str = "left",
    seed: int = 0,
    pretrained: dict | None = None,
    lora_updates_other_seed: dict | None = None,
) -> list[dict]:
    """Per matrix: share of ||dW||^2 in the top ``k`` directions, against two nulls: a ``random_like`` dW
    and (given ``pretrained``) the pretrained W0 itself. Given LoRA's updates: phi between the top-``r``
    ``side`` subspaces of dW and of B A (paper Eq. 4), against a random r-dimensional subspace (expected
    r / d) and (given ``lora_updates_other_seed``) LoRA trained with another seed, which shares neither
    the head init, the batch order nor the dropout masks with the full run."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, (name, dW) in enumerate(full_updates.items()):
        row = {
            "matrix": short_name(name),
            "norm": float(dW.norm()),
            "energy_top_k": energy_in_top(dW, k),
            "energy_top_k_random": energy_in_top(random_like(dW, seed=seed + i), k),
            "k": k,
        }
        if pretrained is not None:
            row["energy_top_k_W0"] = energy_in_top(pretrained[name].detach().float().cpu(), k)
        if lora_updates is not None:
            full_dirs = top_directions(dW, r, side)
            random_dirs, _ = torch.linalg.qr(torch.randn(full_dirs.shape[0], r, generator=g, dtype=torch.float64))
            row.update(
                r=r,
                side=side,
                phi=subspace_similarity(full_dirs, top_directions(lora_updates[name], r, side), r, r),
                phi_random=subspace_similarity(full_dirs, random_dirs, r, r),
                phi_expected_random=expected_random_similarity(full_dirs.shape[0], r, r),
            )
            if lora_updates_other_seed is not None:
                other = top_directions(lora_updates_other_seed[name], r, side)
                row["phi_other_seed"] = subspace_similarity(full_dirs, other, r, r)
        rows.append(row)
    return rows


@single_thread()
def plot_update_spectra(
    updates: dict, k: int = 8, title: str = "Singular values of the full fine-tuning update dW"
) -> plt.Figure:
    """Normalised singular values of each dW (q_lin blue, v_lin orange), and of a ``random_like`` matrix."""
    fig, ax = plt.subplots(figsize=(8, 4))
    spectra = {short_name(n): dW for n, dW in updates.items()}
    spectra["random, same shape and norm"] = random_like(next(iter(updates.values())))
    labelled = set()
    for i, (label, M) in enumerate(spectra.items()):
        S = torch.linalg.svdvals(M.detach().cpu().double()).numpy()
        kind = "random" if label.startswith("random") else label.split()[-1]  # "L3 q_lin" -> "q_lin"
        cmap = plt.cm.Blues if "q_lin" in label else plt.cm.Oranges
        style = (
            dict(color="k", ls="--", lw=1.5)
            if kind == "random"
            else dict(color=cmap(0.4 + 0.5 * i / len(updates)), lw=1)
        )
        # one legend entry per kind of matrix (W_q, W_v, ...), not one per block
        name = label if kind == "random" else f"{kind}, one line per block"
        ax.plot(np.arange(1, len(S) + 1), S / S[0], label=None if name in labelled else name, **style)
        labelled.add(name)
    ax.axvline(k, color="gray", ls=":", lw=1)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="index i of the singular value (largest first)",
        ylabel="σ_i / σ_1",
        title=title,
    )
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3, which="both")
    return fig
