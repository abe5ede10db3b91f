"""LoRA against full fine-tuning: what each method costs, what it reaches, what its update looks like.

* ``compare_methods``: train "full", "lora", "head", "lora-all" on the same data from the same
  backbone and measure each (accuracy, trainable parameters, time, memory, checkpoint, latency);
* ``results_table`` / ``plot_comparison`` / ``plot_training_curves``: show the results;
* ``low_rank_report`` / ``plot_update_spectra`` / ``plot_low_rank_report``: is the full
  fine-tuning update dW low rank, and does LoRA's B A point the same way (paper Section 7)?

Introduced in notebook 04 (``04_lora_vs_full_finetuning.ipynb``); also
``python -m lora_helpers compare``.
"""
from __future__ import annotations

import ctypes
import gc
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from safetensors.torch import save_file

from .adapters import lora_state_dict, save_adapter
from .analysis import (energy_in_top, expected_random_similarity, random_like, subspace_similarity, top_directions,
                       weight_updates)
from .backbone import load_backbone
from .loop import METHODS, PeakMemory, encode, make_batches, run_experiment
from .utils import get_device

UPDATE_SUFFIXES = ("q_lin.weight", "v_lin.weight")  # the matrices whose update we analyse
CHECKPOINT_WHAT = {"full": "whole model state", "lora": "LoRA A, B + head", "lora-all": "LoRA A, B + head",
                   "head": "head only"}


# ------------------------------------------------------------------ measuring

def _memory_now_mib(device: torch.device) -> float:
    """Tensors allocated on a GPU; on CPU the process's resident set size (after returning freed memory)."""
    gc.collect()
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:  # glibc keeps freed blocks; hand them back so that the RSS baseline is honest
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return PeakMemory.rss_mib() if os.path.exists("/proc/self/statm") else 0.0


def checkpoint_bytes(model, method: str, head_modules) -> int:
    """Bytes on disk of what must be saved to keep the fine-tuned model (written to a temporary folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        if method in ("lora", "lora-all"):  # safetensors + its small JSON config
            save_adapter(model, Path(tmp) / "adapter", extra=head_modules)
        else:
            state = lora_state_dict(model, head_modules) if method == "head" else model.state_dict()
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(Path(tmp) / "w.safetensors"))
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())


@torch.no_grad()
def inference_latency_ms(model, batch: dict, repeats: int = 5, warmup: int = 2) -> dict:
    """Median (and min, max) milliseconds of one forward pass on ``batch``, after ``warmup`` passes."""
    model.eval()
    sync = torch.cuda.synchronize if batch["input_ids"].is_cuda else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        model(**batch)
        sync()
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - start))
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "repeats": repeats}


# ------------------------------------------------------------------ the comparison

def compare_methods(profile, methods=("full", "lora", "head", "lora-all"), data=None, verbose=True,
                    device=None, latency_repeats: int = 5) -> dict:
    """Train and evaluate each method with ``loop.run_experiment`` on the same data and backbone.

    Every run starts from a fresh backbone loaded with the same seed. Per method, one row:
    trainable parameters, test accuracy, training time, s/step, memory, checkpoint bytes,
    inference latency (the first ``batch_size`` test reviews; LoRA unmerged). Memory:
    ``train_memory_mib`` is the peak during training *minus* what the process held just
    before it, with the model loaded (CPU: resident set size, which also counts allocator
    slack; CUDA: allocated tensors); ``peak_memory_mib`` is the raw peak.

    Returns ``{"profile", "backbone", "device", "rows", "curves": {method: losses},
    "pretrained": {name: W0} (q_lin/v_lin), "full_updates"/"lora_updates": {name: dW},
    "lora_model"}`` (the last three when those methods ran).
    """
    from .data import load_imdb

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}: choose from {list(METHODS)}")
    device = get_device() if device is None else torch.device(device)
    if data is None:
        data = load_imdb(profile.n_train, profile.n_test, seed=profile.seed, verbose=verbose)
    held = {}
    # one-time set-up (autograd engine, thread pool) done here, not billed to the first method's memory
    torch.nn.Linear(8, 8).to(device)(torch.randn(2, 8, device=device)).sum().backward()

    def backbone(name, seed, verbose):  # load_backbone, plus the pretrained weights and a memory baseline
        model, tokenizer, description = load_backbone(name, seed=seed, verbose=verbose)
        held["pretrained"] = {k: v.detach().clone() for k, v in model.state_dict().items()
                              if k.endswith(UPDATE_SUFFIXES)}
        model.to(device)
        held["before_mib"] = _memory_now_mib(device)
        return model, tokenizer, description

    results = {"profile": profile, "device": str(device), "rows": [], "curves": {}}
    batch = None
    for i, method in enumerate(methods):
        if verbose:
            print(f"[{i + 1}/{len(methods)}] {method}: {METHODS[method]}")
        run = run_experiment(method, profile, data=data, backbone=backbone, device=device, verbose=verbose and i == 0)
        model, m = run["model"], run["metrics"]
        if batch is None:  # one fixed batch for every latency measurement
            n = profile.batch_size
            ids = encode(data["test"]["text"][:n], run["tokenizer"], profile.max_length)
            batch = make_batches(ids, data["test"]["label"][:n], n, run["tokenizer"].pad_token_id)[0]
            batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        latency = inference_latency_ms(model, batch, repeats=latency_repeats)
        keys = ("trainable_params", "total_params", "trainable_percent", "test_accuracy", "train_time_s",
                "s_per_step", "peak_memory_mib", "memory_kind")
        row = {"method": method, **{key: m[key] for key in keys}, "steps": m["train_steps"],
               "memory_before_mib": held["before_mib"],
               "train_memory_mib": max(0.0, m["peak_memory_mib"] - held["before_mib"]),
               "checkpoint_bytes": checkpoint_bytes(model, method, profile.head_modules),
               "checkpoint_what": CHECKPOINT_WHAT[method], "latency_ms": latency["median"],
               "latency_min_ms": latency["min"], "latency_max_ms": latency["max"],
               "latency_batch": list(batch["input_ids"].shape)}
        results["rows"].append(row)
        results["curves"][method] = list(run["result"].losses)
        results["backbone"], results["pretrained"] = m["backbone"], held["pretrained"]
        if method == "full":
            results["full_updates"] = weight_updates(held["pretrained"], model, UPDATE_SUFFIXES)
        if method == "lora":
            results["lora_updates"] = weight_updates(held["pretrained"], model, UPDATE_SUFFIXES)
            results["lora_model"] = model
        if verbose:
            print(f"    accuracy {row['test_accuracy']:.3f} | {row['s_per_step']:.2f} s/step | "
                  f"+{row['train_memory_mib']:.0f} MiB | checkpoint {_human_bytes(row['checkpoint_bytes'])}")
        del run, model
    return results


def results_json(results: dict) -> dict:
    """The JSON-serialisable part of ``compare_methods``' result (rows, curves, settings)."""
    return {"profile": vars(results["profile"]), "backbone": results.get("backbone"), "device": results["device"],
            "rows": results["rows"], "curves": results["curves"]}


# ------------------------------------------------------------------ showing

def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def results_table(rows) -> str:
    """A markdown table, one row per method."""
    lines = ["| method | trainable params | trainable % | test accuracy | train time (s) | s/step "
             "| training memory (+MiB) | checkpoint | latency (ms/batch) |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_percent']:.2f} "
                     f"| {r['test_accuracy']:.3f} | {r['train_time_s']:.1f} | {r['s_per_step']:.3f} "
                     f"| {r['train_memory_mib']:.0f} | {_human_bytes(r['checkpoint_bytes'])} ({r['checkpoint_what']}) "
                     f"| {r['latency_ms']:.0f} |")
    return "\n".join(lines)


def plot_comparison(rows):
    """Six bar charts: accuracy, trainable %, s/step, training memory, checkpoint size, latency."""
    names = [r["method"] for r in rows]
    colors = plt.cm.tab10(np.arange(len(rows)))
    panels = [("test_accuracy", "test accuracy", "accuracy (fraction)", False, 1),
              ("trainable_percent", "trainable parameters", "% of the model (log scale)", True, 1),
              ("s_per_step", "training time per step", "seconds per step", False, 1),
              ("train_memory_mib", "extra memory while training", "MiB over the loaded model", False, 1),
              ("checkpoint_bytes", "what must be saved", "MB on disk (log scale)", True, 1e-6),
              ("latency_ms", "inference latency (unmerged LoRA)", "ms per batch (median)", False, 1)]
    fig, axes = plt.subplots(2, 3, figsize=(10, 6))
    for ax, (key, title, ylabel, log, scale) in zip(axes.flat, panels):
        ax.bar(names, [r[key] * scale for r in rows], color=colors)
        ax.set(yscale="log" if log else "linear", ylabel=ylabel)
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
        if key == "test_accuracy":
            ax.axhline(0.5, color="gray", ls="--", lw=1, label="chance")
            ax.set_ylim(0.4, 1.0)
            ax.legend(loc="upper right", fontsize=8)
    fig.suptitle("Fine-tuning methods side by side (same data, same backbone)")
    fig.tight_layout()
    return fig


def plot_training_curves(results: dict, window: int = 10):
    """Every method's training loss, smoothed by a moving average over ``window`` steps."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for method, losses in results["curves"].items():
        w = max(1, min(window, len(losses)))
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w, len(losses) + 1), smooth, label=method)
    ax.axhline(np.log(2), color="gray", ls="--", lw=1, label="ln 2 (guessing)")
    ax.set(xlabel="training step", ylabel=f"cross-entropy loss ({window}-step moving average)",
           title="Training loss of each method")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


# ------------------------------------------------------------------ is the update low rank?

@contextmanager
def single_thread():
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
def low_rank_report(full_updates: dict, lora_updates: dict | None = None, k: int = 8, r: int = 8,
                    side: str = "left", seed: int = 0) -> list[dict]:
    """Per matrix: share of ||dW||^2 in the top ``k`` directions (and for a ``random_like`` dW), and,
    given LoRA's updates, phi between the top-``r`` ``side`` subspaces of dW and of B A (paper Eq. 4),
    with a random r-dimensional subspace as baseline (expected value r / d)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, (name, dW) in enumerate(full_updates.items()):
        row = {"matrix": short_name(name), "norm": float(dW.norm()), "energy_top_k": energy_in_top(dW, k),
               "energy_top_k_random": energy_in_top(random_like(dW, seed=seed + i), k), "k": k}
        if lora_updates is not None:
            full_dirs = top_directions(dW, r, side)
            lora_dirs = top_directions(lora_updates[name], r, side)
            random_dirs, _ = torch.linalg.qr(torch.randn(full_dirs.shape[0], r, generator=g, dtype=torch.float64))
            row.update(r=r, side=side, phi=subspace_similarity(full_dirs, lora_dirs, r, r),
                       phi_random=subspace_similarity(full_dirs, random_dirs, r, r),
                       phi_expected_random=expected_random_similarity(full_dirs.shape[0], r, r))
        rows.append(row)
    return rows


@single_thread()
def plot_update_spectra(updates: dict, k: int = 8, title: str = "Singular values of the full fine-tuning update dW"):
    """Normalised singular values of each dW (q_lin blue, v_lin orange), and of a ``random_like`` matrix."""
    fig, ax = plt.subplots(figsize=(8, 4))
    spectra = {short_name(n): dW for n, dW in updates.items()}
    spectra["random, same shape and norm"] = random_like(next(iter(updates.values())))
    for i, (label, M) in enumerate(spectra.items()):
        S = torch.linalg.svdvals(M.double()).numpy()
        cmap = plt.cm.Blues if "q_lin" in label else plt.cm.Oranges
        style = dict(color="k", ls="--", lw=1.5) if label.startswith("random") else dict(color=cmap(0.4 + 0.5 * i / len(updates)), lw=1)
        ax.plot(np.arange(1, len(S) + 1), S / S[0], label=label, **style)
    ax.axvline(k, color="gray", ls=":", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="index i of the singular value (largest first)", ylabel="σ_i / σ_1", title=title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    return fig


def plot_low_rank_report(report: list[dict]):
    """Bars per matrix: energy in the top k (dW vs random) and, if present, phi (LoRA vs random)."""
    names = [row["matrix"] for row in report]
    x = np.arange(len(names))
    has_phi = "phi" in report[0]
    fig, axes = plt.subplots(1, 2 if has_phi else 1, figsize=(10 if has_phi else 6, 3.8), squeeze=False)
    ax = axes[0, 0]
    ax.bar(x - 0.2, [row["energy_top_k"] for row in report], 0.4, label="full fine-tuning dW")
    ax.bar(x + 0.2, [row["energy_top_k_random"] for row in report], 0.4, label="random, same shape and norm")
    ax.set(title=f"Share of ||dW||² in the top {report[0]['k']} directions", ylabel="share of the energy")
    if has_phi:
        ax = axes[0, 1]
        ax.bar(x - 0.2, [row["phi"] for row in report], 0.4, label="LoRA's B A vs top-r of dW")
        ax.bar(x + 0.2, [row["phi_random"] for row in report], 0.4, label="random subspace vs top-r of dW")
        ax.axhline(report[0]["phi_expected_random"], color="gray", ls="--", lw=1, label="r / d (random, expected)")
        ax.set(title=f"Subspace overlap φ, r = {report[0]['r']} ({report[0]['side']} singular vectors)",
               ylabel="φ (0: orthogonal, 1: same subspace)")
    for ax in axes.flat:
        ax.set_xticks(x, names, rotation=60, fontsize=8)
        ax.set(xlabel="weight matrix (layer, projection)", ylim=(0, 1))
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
