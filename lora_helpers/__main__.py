"""Command line: train and evaluate one fine-tuning method without a notebook.

    python -m lora_helpers train --method lora --profile quick
    python -m lora_helpers train --method head --profile cpu --out runs/head.json
    python -m lora_helpers train --method lora --profile quick --save-adapter runs/lora-quick-adapter
    python -m lora_helpers train --method lora --profile quick --n-train 200 --max-length 64
    python -m lora_helpers compare --profile quick --seeds 3 --sweep
    python -m lora_helpers estimate --profile gpu --max-length 512 --epochs 2   # before a long run

``train`` runs one method through ``runner.run`` (the runner of notebooks 03-05):
train on the training split, validation scored as it goes, the test split once at
the end; it prints a short summary and writes the metrics as JSON (default
``runs/<method>-<profile>.json``). ``compare`` is notebook 04's comparison
(``compare.compare_methods``): with ``--sweep`` each method's learning rate is first
chosen on the validation split. Installed, the same entry point is the
``lora-helpers`` command.

Adding a subcommand: write ``_cmd_<name>(args, parser)``, then register it in
``build_parser`` with ``sub.add_parser``, ``add_profile_arguments`` (if it runs
a profile) and ``set_defaults(func=_cmd_<name>)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from .methods import HEAD_MODULES, METHODS
from .profiles import PROFILES, Profile, default_profile_name, get_profile
from .utils import machine_line, write_files_atomically

# Profile fields that a run can override from the command line (--n-train sets n_train, ...)
PROFILE_OVERRIDES = ("n_train", "n_val", "n_test", "max_length", "epochs", "seed", "backbone")


MAX_POSITIONS = 512  # DistilBERT's position embeddings: the longest review a backbone of the series reads
MAX_SEED = 2**32 - 1  # NumPy's generator takes seeds below 2**32


def _int_at_least(minimum: int, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            within = f"in {minimum} .. {maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"expected an integer {within}, got {value}")
        return value

    return parse


def _max_length(text: str) -> int:
    """Tokens per review: at least 3 ([CLS], [SEP] and one token of the review), at most the model's 512 positions."""
    value = _int_at_least(1)(text)
    if value < 3:
        raise argparse.ArgumentTypeError(
            f"{value} leaves no room for the review: the tokenizer adds [CLS] and [SEP] "
            "to each review, so use at least 3 (e.g. 128)"
        )
    if value > MAX_POSITIONS:
        raise argparse.ArgumentTypeError(
            f"{value} is longer than DistilBERT reads: it has {MAX_POSITIONS} position embeddings, "
            f"so use at most {MAX_POSITIONS}"
        )
    return value


def _device(text: str) -> str:
    """``--device``: a device that torch knows and this machine has (checked before any work)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise argparse.ArgumentTypeError(
                f"{text!r}: no CUDA GPU is available here; use --device cpu, or leave "
                "--device out (the best available device is chosen)"
            )
        if device.index is not None and device.index >= n:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {n} CUDA GPU(s), cuda:0 .. cuda:{n - 1}")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise argparse.ArgumentTypeError(f"{text!r}: Apple's MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: runs use cpu, cuda, cuda:N or mps")
    return text


def check_output_paths(
    parser: argparse.ArgumentParser, files: Iterable[str | os.PathLike] = (), folders: Iterable[str | os.PathLike] = ()
) -> None:
    """Before any work: every output file and folder can be written (else a one-line error, exit 2)."""
    from .utils import check_can_write

    try:
        for path in files:
            check_can_write(path, "file")
        for path in folders:
            check_can_write(path, "folder")
    except OSError as err:
        parser.error(str(err))


def _size(text: str) -> int | str:
    """A number of reviews, or ``all`` (the whole split; becomes ``None`` in the profile)."""
    return "all" if text.lower() == "all" else _int_at_least(1)(text)


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """``--profile`` plus the per-run overrides of its fields (shared by every subcommand that trains)."""
    parser.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default=None,
        help="run profile (default: $LORA_PROFILE, else gpu when CUDA is available, else cpu)",
    )
    group = parser.add_argument_group("profile overrides (default: the profile's value)")
    group.add_argument("--n-train", type=_size, metavar="N", help="training reviews, or 'all'")
    group.add_argument(
        "--n-val", type=_int_at_least(2), metavar="N", help="validation reviews, held out of the training split"
    )
    group.add_argument("--n-test", type=_size, metavar="N", help="test reviews, or 'all'")
    group.add_argument(
        "--max-length", type=_max_length, metavar="L", help=f"tokens per review after truncation (3 .. {MAX_POSITIONS})"
    )
    group.add_argument("--epochs", type=_int_at_least(1), metavar="E")
    group.add_argument("--seed", type=_int_at_least(0, MAX_SEED), metavar="S")
    group.add_argument(
        "--backbone",
        metavar="NAME",
        help="'auto', 'distilbert-base-uncased', 'minilm-standin' or a folder with a saved DistilBERT",
    )
    parser.add_argument(
        "--device", type=_device, default=None, help="cpu, cuda, cuda:N or mps (default: the best available)"
    )


def profile_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Profile:
    """The chosen profile with the overrides given on the command line applied."""
    try:
        return get_profile(args.profile, **_overrides(args))
    except ValueError as err:  # e.g. a bad $LORA_PROFILE
        parser.error(str(err))


def _overrides(args: argparse.Namespace) -> dict:
    """The profile fields given on the command line (``all`` -> None: the whole split)."""
    overrides = {field: getattr(args, field) for field in PROFILE_OVERRIDES if getattr(args, field, None) is not None}
    return {k: None if v == "all" else v for k, v in overrides.items()}


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _versions() -> dict:
    """The package's commit (when run from a git checkout) and the versions of what the numbers depend on."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("lora_helpers", "torch", "transformers", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if commit.returncode == 0:
            out["commit"] = commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _grid(text: str) -> tuple[str, tuple[float, ...]]:
    """``full=1e-4,3e-4`` -> ``("full", (1e-4, 3e-4))`` (``--grid``)."""
    method, sep, rates = text.partition("=")
    if not sep or method not in METHODS:
        raise argparse.ArgumentTypeError(f"expected METHOD=LR,LR,... with METHOD one of {list(METHODS)}, got {text!r}")
    values = tuple(_positive_float(x) for x in rates.split(",") if x.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"no learning rate in {text!r}: e.g. {method}=1e-4,3e-4,1e-3")
    return method, values


def _cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .adapters import save_adapter
    from .backbone import load_backbone
    from .methods import method_spec
    from .runner import load_splits, run, tokenize

    if args.save_adapter and args.method not in ("lora", "lora-all"):
        parser.error(f"--save-adapter needs a LoRA method (lora, lora-all), not {args.method!r}")
    profile = profile_from_args(args, parser)
    spec = method_spec(args.method, profile)
    out = Path(args.out or f"runs/{args.method}-{profile.name}.json")
    if args.save_adapter:
        from .adapters import CONFIG_NAME, WEIGHTS_NAME

        folder = Path(args.save_adapter).resolve()
        if out.resolve() in (folder, folder / CONFIG_NAME, folder / WEIGHTS_NAME):
            parser.error(
                f"--out {out} and --save-adapter {args.save_adapter} would overwrite each other "
                f"(the adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}): give the metrics another name"
            )
    check_output_paths(parser, files=[out], folders=[args.save_adapter] if args.save_adapter else [])
    print(f"== {spec.summary()}")
    print(profile.summary())
    start = time.perf_counter()
    try:
        _, tokenizer, _ = load_backbone(profile.backbone, seed=profile.seed, verbose=False)
        data = tokenize(load_splits(profile), tokenizer, profile)
        result = run(
            spec,
            data,
            profile,
            lr=args.lr,
            head_lr=args.head_lr,
            test=True,
            device=args.device,
            keep_model=bool(args.save_adapter),
        )
    except (FileNotFoundError, OSError, ValueError, FloatingPointError) as err:  # no data or backbone; diverged
        print(f"error: {err}", file=sys.stderr)
        return 1
    wall = time.perf_counter() - start
    m = result.metrics()

    write_files_atomically(out.parent, {out.name: (json.dumps(m, indent=2) + "\n").encode()})  # all or nothing
    n_test = sum(map(sum, m["confusion"]))
    print(f"\n{args.method} on profile {profile.name!r}")
    print(f"  backbone      : {m['backbone']}")
    print(f"  device        : {m['device']}")
    print(f"  learning rate : {m['lr']:g} (method), {m['head_lr']:g} (head)")
    print(f"  validation    : {m['val_accuracy']:.3f} on {data.n_val:,} reviews held out of the training split")
    print(f"  test accuracy : {m['test_accuracy']:.3f} on {n_test:,} reviews (chance: 0.5)")
    print(
        f"  trainable     : {m['trainable_params']:,} of {m['total_params']:,} parameters "
        f"({m['trainable_percent']:.2f}%)" + (f", LoRA on {m['lora_layers']} layers" if m["lora_layers"] else "")
    )
    print(
        f"  training time : {m['train_time_s']:.1f} s for {m['train_steps']} steps "
        f"({m['s_per_step']:.2f} s/step); whole run {wall:.1f} s"
    )
    print(f"  peak memory   : {m['peak_memory_mib']:.0f} MiB ({m['memory_kind']})")
    print(f"  metrics       : {out}")
    if args.save_adapter:
        folder = save_adapter(result.model, args.save_adapter, extra=HEAD_MODULES)
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        print(f"  adapter       : {folder} ({size / 1024:.0f} KB)")
    return 0


def _cmd_compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Notebook 04's comparison (``compare.compare_methods``): a markdown table, and everything as JSON."""
    from .compare import compare_methods, method_costs, results_json, results_table, summary_rows
    from .methods import method_spec

    profile = profile_from_args(args, parser)
    out = Path(args.out or f"runs/compare-{profile.name}.json")
    check_output_paths(parser, files=[out])
    print(profile.summary())
    if (args.grid or args.extend_grid) and not args.sweep:
        parser.error("--grid and --extend-grid shape the learning-rate sweep: add --sweep")
    grids = dict(args.grid or [])
    unknown = sorted(set(grids) - set(args.methods))
    if unknown:
        parser.error(f"--grid for {unknown}, which --methods does not compare ({args.methods})")
    if args.control and args.control not in args.methods:
        parser.error(f"--control {args.control} must be one of --methods ({args.methods})")
    lrs = {m: grids.get(m, method_spec(m).sweep) for m in args.methods} if args.sweep else None
    versions = _versions()  # the code that runs, before anything can change it
    start = time.perf_counter()
    try:
        results = compare_methods(
            profile,
            methods=args.methods,
            seeds=range(args.seeds),
            lrs=lrs,
            device=args.device,
            extend_grid=args.extend_grid,
            control=args.control,
            sweep_seed=args.sweep_seed,
        )
        costs = method_costs(profile, args.methods)
    except (FileNotFoundError, OSError, ValueError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    wall = time.perf_counter() - start
    print(
        f"\n{results['backbone']}, device {results['device']}; {results['n_train']:,} training, "
        f"{results['n_val']:,} validation, {results['n_test']:,} test reviews; {args.seeds} seeds\n"
    )
    _save_run(results_json(results, costs), out, args, wall, versions)  # saved first: a failure below loses nothing
    print(results_table(summary_rows(results, costs)))
    return 0


def _save_run(saved: dict, out: Path, args: argparse.Namespace, wall: float, versions: dict) -> None:
    """Write a run's JSON with how and where it was made (command, time, machine, ``versions`` taken when it
    started: the code that ran), atomically."""
    saved["command"] = "python -m lora_helpers " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    saved["wall_time_s"] = wall
    saved["machine"] = machine_line()
    saved["versions"] = versions
    # all or nothing: a failed write never destroys an earlier result
    write_files_atomically(out.parent, {out.name: (json.dumps(saved, indent=1) + "\n").encode()})
    print(f"\nresults: {out} ({wall / 60:.1f} min)")


def _cmd_study(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Notebook 05's committed IMDb study: which matrices at one budget, which rank, PiSSA (paper Tables 5, 6)."""
    from .backbone import load_backbone
    from .compare import compare_methods, control_line, results_json, results_table, summary_rows
    from .experiments import section7_specs, study_profile

    base = profile_from_args(args, parser).replace(
        **{f: getattr(PROFILES[args.profile or default_profile_name()], f) for f in _overrides(args)}
    )
    profile = study_profile(base, **_overrides(args))  # the study's settings, then the command line's
    out = Path(args.out or f"runs/study-{profile.name}.json")
    check_output_paths(parser, files=[out])
    print(profile.summary())
    versions = _versions()  # the code that runs, before anything can change it
    start = time.perf_counter()
    try:
        model, _, _ = load_backbone(profile.backbone, seed=profile.seed, verbose=False)
        specs = section7_specs(model)
        del model
        grid = tuple(args.grid)
        lrs = {"head": grid, **{s.name: grid for s in specs}}
        reference = "q,v r=8"  # W_q, W_v at the paper's r: section7_specs' reference
        results = compare_methods(
            profile,
            methods=["head", *specs],
            seeds=range(args.seeds),
            lrs=lrs,
            device=args.device,
            extend_grid=True,
            control=reference,
            sweep_seed=args.sweep_seed,
        )
    except (FileNotFoundError, OSError, ValueError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    wall = time.perf_counter() - start
    rows = summary_rows(results, reference=reference)
    saved = results_json(results)
    saved["summary"] = rows
    saved["reference"] = reference
    saved["specs"] = {
        s.name: {
            "targets": list(s.targets),
            "r": s.r,
            "lora_alpha": s.lora_alpha,
            "lora_dropout": s.lora_dropout,
            "init": s.init,
            "rslora": s.rslora,
        }
        for s in specs
    }
    _save_run(saved, out, args, wall, versions)  # saved first: a failure below loses nothing
    print(results_table(rows))
    print(control_line(results))
    return 0


def _cmd_estimate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """FLOPs and estimated times of a ``compare`` command (or of a notebook), before running it."""
    from .estimate import compare_plan, estimate_table, print_estimate

    profile = profile_from_args(args, parser)
    if args.notebook:
        given = [flag for flag, value in (("--methods", args.methods), ("--seeds", args.seeds)) if value is not None]
        given += ["--sweep"] if args.sweep else []
        if given:
            parser.error(
                f"--notebook {args.notebook} estimates that notebook's own runs; {', '.join(given)} "
                "shape a comparison's estimate: give one or the other"
            )
        print_estimate(args.notebook, profile)
        return 0
    methods = args.methods or ["full", "lora", "lora-all", "head"]
    plan = compare_plan(methods, 3 if args.seeds is None else args.seeds, args.sweep)
    print(profile.summary())
    print(
        f"{sum(n for _, n, _ in plan)} training runs ({', '.join(f'{m} x{n}' for m, n, _ in plan)})"
        + (" with the sweep" if args.sweep else "")
    )
    print(estimate_table(profile, plan))
    return 0


def build_parser() -> argparse.ArgumentParser:
    prog = "lora-helpers" if Path(sys.argv[0]).name == "lora-helpers" else "python -m lora_helpers"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="LoRA from scratch: run the series' experiments "
        "from the command line (offline: the stand-in backbone and local IMDb).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    methods = "\n".join(f"  {name:<9} {text}" for name, text in METHODS.items())
    train = sub.add_parser(
        "train",
        help="train and evaluate one method with one profile",
        description="Train and evaluate one fine-tuning method on IMDb, print a summary and write the metrics as JSON.",
        epilog=f"methods:\n{methods}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--method", choices=list(METHODS), default="lora", help="fine-tuning method (default: lora)")
    add_profile_arguments(train)
    train.add_argument(
        "--lr",
        type=_positive_float,
        metavar="LR",
        help="the method's own learning rate (default: the one tuned on validation for the profile)",
    )
    train.add_argument(
        "--head-lr",
        type=_positive_float,
        metavar="LR",
        help="the new head's learning rate (default: the head-only method's, tuned for the profile)",
    )
    train.add_argument("--out", metavar="FILE", help="metrics JSON (default: runs/<method>-<profile>.json)")
    train.add_argument("--save-adapter", metavar="DIR", help="also save the LoRA adapter (+ head) into DIR")
    train.set_defaults(func=_cmd_train)

    compare = sub.add_parser(
        "compare",
        help="train several methods on the same data and compare them",
        description="Train each method from a fresh backbone on the same data with several "
        "seeds (notebook 04), test each once, and print a markdown table: "
        "accuracy mean ± sd, McNemar's test against full fine-tuning.",
    )
    compare.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=["full", "lora", "lora-all", "head"],
        help="methods to compare (default: full lora lora-all head)",
    )
    compare.add_argument(
        "--seeds",
        type=_int_at_least(1),
        default=3,
        metavar="N",
        help="train every method with seeds 0 .. N-1 (default: 3)",
    )
    compare.add_argument(
        "--sweep",
        action="store_true",
        help="first choose each method's learning rate on the validation split "
        "(each method's sweep grid in methods.REGISTRY; the head-only sweep sets the head rate of every method)",
    )
    compare.add_argument(
        "--grid",
        type=_grid,
        action="append",
        metavar="METHOD=LR,LR,...",
        help="with --sweep: the rates to try for METHOD instead of its registered grid (repeatable)",
    )
    compare.add_argument(
        "--extend-grid",
        action="store_true",
        help="with --sweep: while a method's best rate is at the edge of its grid, try the next "
        "rate beyond it (half a decade; at most 3 more)",
    )
    compare.add_argument(
        "--sweep-seed",
        type=_int_at_least(0),
        metavar="S",
        help="with --sweep: tune on seed S, never tested, and train every tested seed afresh "
        "(default: tune on the first seed and reuse its best run)",
    )
    compare.add_argument(
        "--control",
        choices=list(METHODS),
        metavar="METHOD",
        help="train METHOD again with as many new seeds: the same-configuration noise yardstick",
    )
    add_profile_arguments(compare)
    compare.add_argument("--out", metavar="FILE", help="results JSON (default: runs/compare-<profile>.json)")
    compare.set_defaults(func=_cmd_compare)

    study = sub.add_parser(
        "study",
        help="notebook 05's committed study: which matrices, which rank (Tables 5, 6)",
        description="Train LoRA on each choice of matrices at one parameter budget, on W_q, W_v at "
        "ranks 1, 8, 64, and PiSSA, each at its own learning rate chosen on "
        "validation (the grid grows past an edge optimum), with several seeds, "
        "plus head only and a second group of seeds of W_q, W_v r = 8 (the noise "
        "yardstick). Settings: experiments.study_profile, then the overrides.",
    )
    study.add_argument("--seeds", type=_int_at_least(2), default=3, metavar="N", help="seeds per variant (default 3)")
    study.add_argument(
        "--sweep-seed",
        type=_int_at_least(0),
        default=100,
        metavar="S",
        help="the seed the learning rates are tuned with, never tested (default: 100)",
    )
    study.add_argument(
        "--grid",
        type=_positive_float,
        nargs="+",
        default=[1e-3, 3e-3, 1e-2],
        metavar="LR",
        help="learning rates every variant and the head start from (default: 1e-3 3e-3 1e-2)",
    )
    add_profile_arguments(study)
    study.add_argument("--out", metavar="FILE", help="results JSON (default: runs/study-<profile>.json)")
    study.set_defaults(func=_cmd_study)

    estimate = sub.add_parser(
        "estimate",
        help="FLOPs and estimated time of a comparison or a notebook, before running",
        description="Count the FLOPs of `compare` with the same options (or of a notebook's "
        "runs) from the model's shape, and estimate the time on a T4, an A100 and "
        "a 2-core CPU. Nothing is trained.",
    )
    estimate.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        help="methods of the comparison (default: full lora lora-all head)",
    )
    estimate.add_argument("--seeds", type=_int_at_least(1), metavar="N", help="seeds of the comparison (default: 3)")
    estimate.add_argument("--sweep", action="store_true", help="include compare's learning-rate sweep")
    estimate.add_argument("--notebook", choices=["03", "04", "05", "07"], help="estimate a notebook's runs instead")
    add_profile_arguments(estimate)
    estimate.set_defaults(func=_cmd_estimate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lora_helpers`` and of the ``lora-helpers`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    return args.func(args, parser)


if __name__ == "__main__":
    sys.exit(main())
