"""What a notebook is about to do, and how long it will take on *this* machine.

``print_banner`` opens notebooks 03-07: the profile (and the others a reader can pick), the
backbone and why it was chosen, the device, the data sizes, and the notebook's estimated
running time. The estimate is calibrated here, not looked up: a few training steps of each
method the notebook trains are timed on copies of the model, on a batch of the profile's size,
and so is one evaluation batch; the notebook's plan (which methods, how many runs) turns those
into minutes. It covers training and evaluation, which dominate every notebook; loading and
tokenising add seconds.

Introduced in notebook 03 (``03_lora_distilbert_imdb.ipynb``).
"""

from __future__ import annotations

import copy
import textwrap
import time
from collections.abc import Iterable

import torch

from .estimate import duration
from .loop import _grad_scaler, choose_precision, train_step
from .methods import method_spec, param_groups, prepare_method
from .profiles import PROFILES, Profile, default_profile_name


def _batch(model, rows: int, length: int, device) -> dict:
    vocab = model.config.vocab_size
    return {
        "input_ids": torch.randint(1000, vocab, (rows, length), device=device),
        "attention_mask": torch.ones(rows, length, dtype=torch.long, device=device),
        "labels": torch.randint(0, model.config.num_labels, (rows,), device=device),
    }


def time_steps(
    model: torch.nn.Module, profile: Profile, methods: Iterable[str], device: str | torch.device, steps: int = 3
) -> dict:
    """Seconds per training step of each method, and per evaluation batch, timed on copies of ``model``.

    Each copy is prepared as the method's run prepares it, trains one untimed step (warm-up) and
    then ``steps`` timed ones on random token ids of the profile's batch shape. ``model`` and the
    random number generators are left as they were.
    """
    device = torch.device(device)
    seconds = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        for name in methods:
            spec = method_spec(name, profile)
            trial = copy.deepcopy(model).to(device)
            prepare_method(trial, spec)
            groups = param_groups(trial, lr=1e-5, head_lr=1e-5)
            optimizer = torch.optim.AdamW(groups)
            params = [p for g in groups for p in g["params"]]
            scaler = _grad_scaler(choose_precision(device))
            batch = _batch(trial, profile.batch_size, profile.max_length, device)
            trial.train()
            for i in range(steps + 1):
                if i == 1:  # the first step is a warm-up (memory allocation, kernel choice)
                    start = _now(device)
                train_step(trial, batch, optimizer, scaler, params, profile.max_grad_norm, device)
            seconds[name] = (_now(device) - start) / steps
            del trial, optimizer
        evaluation = _batch(model, profile.eval_batch_size, profile.max_length, device)
        was_training = model.training
        model.to(device).eval()
        with torch.no_grad():
            model(**evaluation)
            start = _now(device)
            model(**evaluation)
            seconds["eval_batch"] = _now(device) - start
        model.train(was_training)
    return seconds


def _now(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def estimate_seconds(profile: Profile, plan: dict, seconds: dict) -> float:
    """Seconds of ``plan`` (method -> runs on ``profile``) from the timings of ``time_steps``."""
    shape = profile.run_shape()
    per_run_eval = shape["eval_batches"] * seconds["eval_batch"]
    return sum(runs * (shape["steps"] * seconds[m] + per_run_eval) for m, runs in plan.items())


def _sizes(p: Profile) -> str:
    shape = p.run_shape()
    return (
        f"{shape['n_train']:,} train / {p.n_val:,} validation / {shape['n_test']:,} test reviews, at most "
        f"{p.max_length} tokens; {shape['steps']} steps of {p.batch_size} per run"
    )


def print_banner(
    profile: Profile,
    model: torch.nn.Module,
    about: str,
    device: str | torch.device | None = None,
    plan: dict | None = None,
) -> dict:
    """Print what this notebook runs (profile, backbone, device, data) and its estimated time here.

    ``plan`` maps a method name (``methods.METHODS``) to the number of training runs the notebook
    makes at ``profile``, e.g. ``{"lora": 2}``; the estimate times a few steps of each on copies of
    ``model`` (call this before changing the model). Returns the timings and the estimate.
    """
    from .utils import get_device

    device = get_device() if device is None else torch.device(device)
    how = "the default here" if profile.name == default_profile_name() else "chosen by name"
    others = ", ".join(f"'{n}'" for n in PROFILES if n != profile.name)
    n = torch.get_num_threads()
    threads = f", {n} torch thread{'s' if n > 1 else ''}" if device.type == "cpu" else ""

    def line(key, text):
        print(textwrap.fill(text, 100, initial_indent=f"{key:<8}: ", subsequent_indent=" " * 10))

    line("profile", f"'{profile.name}' ({how}; others: {others}; set LORA_PROFILE before starting Jupyter)")
    line("data", _sizes(profile))
    if profile.backbone == "minilm-standin":
        about += (
            "; this profile's choice: it works offline and is half DistilBERT's width, so runs take "
            "minutes (the others load the real DistilBERT when they can)"
        )
    line("backbone", about)
    line("device", f"{device}{threads}")
    out = {"plan": dict(plan or {})}
    if plan:
        unknown = [m for m, n in plan.items() if not isinstance(n, int) or n < 1]
        if unknown:
            raise ValueError(f"plan maps a method name to a number of runs >= 1; check {unknown}")
        out["seconds"] = time_steps(model, profile, list(plan), device)
        out["estimate_s"] = estimate_seconds(profile, plan, out["seconds"])
        runs = ", ".join(f"{m} x{n}" for m, n in plan.items())
        steps = ", ".join(f"{m} {out['seconds'][m]:.2f} s" for m in plan)
        line("runs", f"{sum(plan.values())} ({runs}); one step here: {steps}")
        line("time", f"about {duration(out['estimate_s'])} of training and evaluation on this machine")
    return out
