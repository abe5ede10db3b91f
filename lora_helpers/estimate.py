"""How long will it take? A run's FLOPs from the model's shape, its time from a device's throughput.

Almost all the work of a run is matrix products. For a DistilBERT-shaped encoder (``L`` blocks,
width ``d``, feed-forward width ``f``) the forward pass over one review of ``s`` tokens costs,
counting a multiply-add as 2 FLOPs,

    per block  8 s d^2      products with the weights W_q, W_k, W_v, W_o
             + 4 s d f      products with the two feed-forward weights
             + 4 s^2 d      attention: Q K^T and the attention-weighted sum of V (no weights)
    the head   2 d^2 + 2 d c  pre_classifier and classifier, on the [CLS] token only

The backward pass computes, for every product, the gradient of its inputs (one forward's worth)
and, for a weight that trains, the gradient of that weight (one more). So a training step costs

* full fine-tuning: **3x** the forward pass;
* LoRA: **2x** for the products with frozen weights (their input still passes the gradient back:
  the floor of ``benchmarks/README.md``), **3x** for attention (both of its inputs depend on LoRA
  factors below), plus the small branch (6 FLOPs per LoRA parameter and token);
* the head alone: **1x** (nothing flows back into the backbone).

Evaluation is forward passes only. A slightly high count for LoRA: the first block's frozen
inputs need no gradient.

Time is FLOPs divided by what a device sustains. A GPU: its published peak times an *assumed*
utilisation (``GPU_UTILISATION``; eager PyTorch on a model this small reaches a fraction of the
tensor cores' peak), not yet checked on a T4. The CPU: rates measured on a quiet 2-core CPU,
per method (a LoRA step on a CPU is slower per FLOP than a full one). Good to about a factor of
two for long runs; compare with the s/step that your first run prints.

``python -m lora_helpers estimate`` prints it for any profile or command, before a long run.
(The notebooks time a few steps on the reader's own machine instead: ``banner.print_banner``.)
"""

from __future__ import annotations

import importlib.resources
import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from transformers import DistilBertConfig

from .lora import lora_parameters
from .methods import ALL_BLOCK_LINEARS, MethodSpec, method_spec
from .utils import check_int

if TYPE_CHECKING:
    from .profiles import Profile

# The two backbones of the series, by shape only (no weights needed to count FLOPs).
SHAPES = {
    "distilbert-base-uncased": DistilBertConfig(),  # 768 wide, 66M parameters
    "minilm-standin": DistilBertConfig(dim=384, hidden_dim=1536, n_layers=6, n_heads=12),  # the offline stand-in
}
LABELS = {"distilbert-base-uncased": "DistilBERT (768 wide)", "minilm-standin": "stand-in (384 wide)"}

# Training step / forward pass: (products with weights, attention products); see the module docstring.
TRAIN_MULTIPLIER = {"full": (3, 3), "lora": (2, 3), "head": (1, 1)}
GPU_UTILISATION = 0.2  # assumed share of the published tensor-core peak (eager PyTorch, a 66M-parameter model)


@dataclass(frozen=True)
class Device:
    """A device class and the FLOP rates it sustains (1e12 FLOP/s)."""

    name: str
    tflops: float  # forward passes (evaluation), and training unless per_kind says
    how: str  # where the numbers come from
    per_kind: dict = field(default_factory=dict)  # training rate by method kind ("full", "lora", "head")

    def train_tflops(self, kind: str) -> float:
        return self.per_kind.get(kind, self.tflops)


DEVICES = {
    "T4": Device(
        "NVIDIA T4 (Colab's free GPU)",
        65 * GPU_UTILISATION,
        "65 TFLOPS fp16 tensor-core peak (NVIDIA T4 datasheet) x 20% assumed utilisation",
    ),
    "A100": Device(
        "NVIDIA A100",
        312 * GPU_UTILISATION,
        "312 TFLOPS bf16 dense peak (NVIDIA A100 datasheet) x 20% assumed utilisation",
    ),
}
# The CPU's rates are data, not code: measured_rates() of the committed quiet cpu comparison run
# (compare-cpu-timing-epyc, a 2-core AMD EPYC, torch with 2 threads, the stand-in at 16 x 128 tokens), added below.
CPU_TIMING_RUN = "compare-cpu-timing-epyc"


def _read_package_json(*parts: str) -> dict:
    return json.loads((importlib.resources.files("lora_helpers").joinpath(*parts)).read_text(encoding="utf-8"))


# What each notebook trains at its default settings (its banner's plan): lora_helpers/notebook_plans.json
NOTEBOOK_PLANS = {k: v for k, v in _read_package_json("notebook_plans.json").items() if k != "about"}


def _shape(profile):
    """The stand-in's shape if the profile names it, else DistilBERT's (what ``auto`` loads when online)."""
    return SHAPES["minilm-standin" if profile.backbone == "minilm-standin" else "distilbert-base-uncased"]


def forward_parts(config: DistilBertConfig, seq_len: int, num_labels: int = 2) -> tuple[int, int]:
    """FLOPs of one forward pass over one sequence: (products with weights, attention products)."""
    check_int("seq_len (max_length)", seq_len, 1, getattr(config, "max_position_embeddings", None))
    check_int("num_labels", num_labels, 1)
    d, f, s = config.dim, config.hidden_dim, seq_len
    weights = config.n_layers * (8 * s * d * d + 4 * s * d * f) + 2 * d * d + 2 * d * num_labels
    attention = config.n_layers * 4 * s * s * d
    return weights, attention


def forward_flops(config: DistilBertConfig, seq_len: int, num_labels: int = 2) -> int:
    """FLOPs of one forward pass over one sequence of ``seq_len`` tokens (matrix products only)."""
    return sum(forward_parts(config, seq_len, num_labels))


def lora_params(config: DistilBertConfig, targets: Sequence[str], r: int) -> int:
    """A and B of every wrapped matrix: r (d_in + d_out) each, in every block."""
    shapes = {
        "q_lin": (config.dim, config.dim),
        "k_lin": (config.dim, config.dim),
        "v_lin": (config.dim, config.dim),
        "out_lin": (config.dim, config.dim),
        "lin1": (config.dim, config.hidden_dim),
        "lin2": (config.hidden_dim, config.dim),
    }
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"unknown target matrices {unknown}: choose from {list(ALL_BLOCK_LINEARS)}")
    return config.n_layers * lora_parameters((shapes[t] for t in targets), r)


def train_step_flops(config: DistilBertConfig, method: str | MethodSpec, profile: Profile) -> float:
    """FLOPs of one training step of ``method`` (a name or a ``MethodSpec``) on a batch of ``profile.batch_size`` x
    ``profile.max_length``."""
    spec = method if isinstance(method, MethodSpec) else method_spec(method, profile)
    weights, attention = forward_parts(config, profile.max_length)
    times_weights, times_attention = TRAIN_MULTIPLIER[spec.kind]
    per_sequence = times_weights * weights + times_attention * attention
    if spec.kind == "lora":  # the branch: 2 FLOPs per parameter and token forward, twice that backward
        per_sequence += 6 * lora_params(config, spec.targets, spec.r) * profile.max_length
    return profile.batch_size * per_sequence


def run_flops(profile: Profile, method: str = "lora", config: DistilBertConfig | None = None) -> dict:
    """FLOPs of one run of ``method`` on ``profile`` (batches padded to ``max_length``): ``train``, ``val`` (every
    validation pass), ``test`` (the one test pass), ``total``; and its ``steps`` and validation passes ``evals``."""
    config = config or _shape(profile)
    shape = profile.run_shape()
    steps, evals = shape["steps"], shape["val_passes"]
    forward = forward_flops(config, profile.max_length)
    cost = {
        "train": steps * train_step_flops(config, method, profile),
        "val": forward * evals * profile.n_val,
        "test": forward * shape["n_test"],
    }
    return {"steps": steps, "evals": evals, **cost, "total": sum(cost.values())}


def compare_plan(methods: Iterable[str], seeds: int, sweep: bool) -> list:
    """The runs of ``python -m lora_helpers compare``: ``(method, runs, of them tested)``. With ``sweep``, one run
    per rate of the method's sweep grid at the first seed (the best one reused), then the other seeds."""

    return [(m, (len(method_spec(m).sweep) + seeds - 1) if sweep else seeds, seeds) for m in methods]


def notebook_plan(notebook: str, profile: Profile) -> tuple:
    """``(profile the notebook's runs use, [(method, runs, tested)])`` for notebook 03, 04, 05 or 07."""
    if notebook not in NOTEBOOK_PLANS:
        raise ValueError(f"no estimate for notebook {notebook!r}: choose one of {sorted(NOTEBOOK_PLANS)}")
    plan = NOTEBOOK_PLANS[notebook]
    if plan["study"]:
        from .experiments import study_profile

        profile = study_profile(profile, **({"n_train": profile.n_train} if plan["keeps_n_train"] else {}))
    return profile, [(m, n, n) for m, n in plan["runs"].items()]


def plan_cost(
    profile: Profile, runs: Iterable[tuple[str, int, int]], device: str, config: DistilBertConfig | None = None
) -> tuple[float, float]:
    """``(FLOPs, estimated seconds on device)`` of ``runs`` (``(method, runs, tested)``) on ``profile``."""
    dev = DEVICES[device]
    flops = secs = 0.0
    for method, n, tested in runs:
        cost = run_flops(profile, method, config)
        kind = method_spec(method, profile).kind
        flops += n * (cost["train"] + cost["val"]) + tested * cost["test"]
        evaluation = n * cost["val"] + tested * cost["test"]
        secs += (n * cost["train"] / dev.train_tflops(kind) + evaluation / dev.tflops) / 1e12
    return flops, secs


def notebook_flops(notebook: str, profile: Profile, config: DistilBertConfig | None = None) -> float:
    """FLOPs of the training runs (and their evaluation) of a notebook on ``profile``."""
    sized, runs = notebook_plan(notebook, profile)
    return plan_cost(sized, runs, "T4", config)[0]


def measured_rates(saved: dict) -> dict:
    """Sustained TFLOPS of a machine, from a saved ``compare`` run (``lora_helpers/results/compare-*.json``).

    Per method kind the median over runs of FLOPs per step / s per step; for evaluation the evaluation FLOPs over
    the run's wall time less its training time (so loading and bookkeeping count as evaluation: a slightly low rate).
    """
    from .profiles import Profile

    profile = Profile.from_saved(saved["profile"])
    config = SHAPES["minilm-standin"] if saved["backbone"].startswith("minilm-standin") else _shape(profile)
    forward = forward_flops(config, profile.max_length)
    rates, eval_flops, train_seconds = {}, 0.0, 0.0
    for method, runs in saved["runs"].items():
        swept = saved["sweep"].get(method, [])
        step = train_step_flops(config, method, profile)
        rates.setdefault(method_spec(method, profile).kind, []).extend(step / r["s_per_step"] for r in swept + runs)
        trained = swept + (runs[1:] if swept else runs)  # the sweep's best run is also the first seed's run
        train_seconds += sum(r["train_time_s"] for r in trained)
        val_passes = sum(len(r["val_curve"]) for r in trained)
        eval_flops += forward * (val_passes * saved["n_val"] + len(runs) * saved["n_test"])
    return {
        "per_kind": {kind: statistics.median(r) / 1e12 for kind, r in rates.items()},
        "eval": eval_flops / (saved["wall_time_s"] - train_seconds) / 1e12,
    }


def _cpu_device() -> Device:
    rates = measured_rates(_read_package_json("results", f"{CPU_TIMING_RUN}.json"))
    return Device(
        "a 2-core CPU (torch, 2 threads)",
        rates["eval"],
        f"measured: the committed quiet cpu comparison run {CPU_TIMING_RUN} (FLOPs of this module / seconds)",
        per_kind=rates["per_kind"],
    )


DEVICES["cpu"] = _cpu_device()


def duration(s: float) -> str:
    """Seconds in words: '45 s', '12 min', '2.5 h'."""
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"


def estimate_table(profile: Profile, runs: Sequence[tuple[str, int, int]]) -> str:
    """Compute (PFLOP) and estimated time per device (rows) and backbone shape (columns) of ``runs`` on ``profile``."""
    lines = [
        f"{'':<38}" + "".join(f"{LABELS[n]:>24}" for n in SHAPES),
        f"{'compute':<38}"
        + "".join(f"{plan_cost(profile, runs, 'T4', c)[0] / 1e15:>18.2f} PFLOP" for c in SHAPES.values()),
    ]
    for key, device in DEVICES.items():
        lines.append(
            f"{device.name:<38}"
            + "".join(f"{duration(plan_cost(profile, runs, key, c)[1]):>24}" for c in SHAPES.values())
        )
    lines.append(
        "How: FLOPs from the shapes (lora_helpers.estimate); a GPU at an assumed 20% of its published peak, "
        "the CPU at its\nmeasured rates. Good to a factor of about 2 for long runs; short ones (the quick profile) are "
        "dominated by per-step overheads\non a GPU."
    )
    return "\n".join(lines)


def print_estimate(notebook: str, profile: Profile) -> None:
    """Print, before the long cells, what notebook ``notebook`` will train on ``profile`` and how long it may take."""
    sized, runs = notebook_plan(notebook, profile)
    steps = run_flops(sized, "lora")["steps"]
    what = ", ".join(f"{m} x{n}" for m, n, _ in runs)
    print(
        f"This notebook trains {sum(n for _, n, _ in runs)} runs ({what}) on the {profile.name!r} profile: "
        f"{steps} steps of {sized.batch_size} x {sized.max_length} tokens each, plus their evaluation."
    )
    print(estimate_table(sized, runs))
