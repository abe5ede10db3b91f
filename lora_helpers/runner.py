"""One training run of any method, and the statistics to compare runs fairly.

Every experiment of the series goes through ``run``: notebook 03's LoRA run,
notebook 04's comparison and learning-rate sweep, notebook 05's studies, the
command line (``python -m lora_helpers train|compare``).

* ``load_splits``: train / validation / test reviews (the validation split is
  carved from the training reviews, seeded and label-balanced; the test split
  is only touched once, at the end);
* ``tokenize``: the three splits tokenized once (``TokenizedData``), re-batched
  per seed for training;
* ``run(spec, data, profile, seed=..., lr=...)``: a fresh backbone, the method
  prepared (``methods.prepare_method``), the head at the shared head rate and the
  method's parameters at its own (``methods.param_groups``), trained with
  ``loop.train`` while the validation split is scored every few steps; the test
  split only with ``test=True``. Returns a ``RunResult``;
* ``sweep``: one run per learning rate, scored on validation only;
* ``mcnemar`` and ``mean_sd``: a paired test of two methods on the same test
  reviews, and the spread over seeds.

Introduced in notebook 04 (``04_lora_vs_full_finetuning.ipynb``); notebook 03
trains through it once its own loop has been written out.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
from datasets import DatasetDict

from .loop import encode, evaluate, make_batches, train
from .lora import count_parameters, lora_layers, lora_update
from .methods import MethodSpec, head_learning_rate, learning_rate, param_groups, prepare_method
from .utils import get_device, set_seed

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .profiles import Profile

TRACKED = ("q_lin.weight", "v_lin.weight")  # matrices whose update dW a run keeps (for the Section 7 analyses)


# ------------------------------------------------------------------ data


def split_validation(data: DatasetDict, n_val: int, seed: int = 0) -> DatasetDict:
    """``train`` / ``validation`` / ``test``: ``n_val`` label-balanced reviews moved out of ``train`` (seeded)."""
    train_part = data["train"]
    labels = np.asarray(train_part["label"])
    wanted = {0: n_val // 2, 1: n_val - n_val // 2}
    if n_val < 2 or any(wanted[k] >= int((labels == k).sum()) for k in (0, 1)):
        raise ValueError(
            f"n_val={n_val} needs 2 <= n_val and fewer reviews of each label than the training "
            f"split has ({int((labels == 0).sum())} negative, {int((labels == 1).sum())} positive)"
        )
    rng = np.random.default_rng(seed + 1000)  # not the seed that drew the subset
    val = np.concatenate([rng.choice(np.flatnonzero(labels == k), wanted[k], replace=False) for k in (0, 1)])
    keep = np.setdiff1d(np.arange(len(labels)), val)
    return DatasetDict(train=train_part.select(keep), validation=train_part.select(np.sort(val)), test=data["test"])


def load_splits(profile: Profile, verbose: bool = True) -> DatasetDict:
    """``profile.n_train`` training, ``profile.n_val`` validation and ``profile.n_test`` test reviews."""
    from .data import describe_imdb, load_imdb

    n_train = None if profile.n_train is None else profile.n_train + profile.n_val
    try:
        data = load_imdb(n_train, profile.n_test, seed=profile.seed, verbose=False)
    except ValueError as err:
        if n_train is None or "n_train=" not in str(err):
            raise
        raise ValueError(
            f"the training split must supply n_train ({profile.n_train:,}) + n_val ({profile.n_val:,}) = "
            f"{n_train:,} reviews: {str(err).replace(f'n_train={n_train} asks', 'that asks')} "
            "Lower n_train or n_val"
        ) from None
    data = split_validation(data, profile.n_val, profile.seed)
    if verbose:
        print(describe_imdb(data))
    return data


@dataclass
class TokenizedData:
    """The splits tokenized once: training ids (re-batched per seed), fixed validation and test batches."""

    train_ids: list
    train_labels: list
    val_batches: list
    test_batches: list
    test_labels: list
    batch_size: int
    pad_id: int
    max_length: int

    def train_batches(self, seed: int = 0) -> list:
        """The training batches in the order of ``seed`` (shuffled, dynamically padded)."""
        return make_batches(self.train_ids, self.train_labels, self.batch_size, self.pad_id, True, seed)

    @property
    def n_train(self) -> int:
        return len(self.train_ids)

    @property
    def n_val(self) -> int:
        return sum(len(b["labels"]) for b in self.val_batches)

    @property
    def n_test(self) -> int:
        return len(self.test_labels)

    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.batch_size)


def tokenize(data: DatasetDict, tokenizer: PreTrainedTokenizerBase, profile: Profile) -> TokenizedData:
    """Encode ``train``/``validation``/``test`` at ``profile.max_length``, once for every run."""
    pad = tokenizer.pad_token_id
    ids = {split: encode(data[split]["text"], tokenizer, profile.max_length) for split in data}
    labels = {split: list(data[split]["label"]) for split in data}
    return TokenizedData(
        train_ids=ids["train"],
        train_labels=labels["train"],
        val_batches=make_batches(ids["validation"], labels["validation"], profile.eval_batch_size, pad),
        test_batches=make_batches(ids["test"], labels["test"], profile.eval_batch_size, pad),
        test_labels=labels["test"],
        batch_size=profile.batch_size,
        pad_id=pad,
        max_length=profile.max_length,
    )


# ------------------------------------------------------------------ one run


def lora_factors(model: nn.Module) -> dict[str, dict]:
    """``{layer name: {"A", "B", "scaling"}}``: detached float32 CPU copies of every LoRA layer's factors."""
    return {
        name: {
            "A": layer.lora_A.detach().float().cpu().clone(),
            "B": layer.lora_B.detach().float().cpu().clone(),
            "scaling": layer.scaling,
        }
        for name, layer in lora_layers(model).items()
    }


def _tracked_weights(model: nn.Module, suffixes) -> dict[str, torch.Tensor]:
    """Effective weights (LoRA layers: ``W0 + scaling B A``) of the tracked matrices, float32 on the CPU."""
    layers = lora_layers(model)
    out = {}
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if not key.endswith(tuple(suffixes)):
            continue
        if name in layers:
            W = layers[name].effective_weight()
        elif isinstance(module, nn.Linear):
            W = module.weight
        else:
            continue
        out[key] = W.detach().float().cpu().clone()
    return out


@dataclass
class RunResult:
    """What one training run leaves behind (``metrics()`` is its JSON-ready summary)."""

    method: str
    kind: str
    seed: int
    lr: float  # the method's own rate (backbone or LoRA factors; the head's for head only)
    head_lr: float
    trainable_params: int
    total_params: int
    lora_layers: int
    losses: list  # training loss of every step
    val_curve: list  # [{"step", "accuracy", "loss"}] on the validation split
    train_steps: int
    train_time_s: float
    peak_memory_mib: float
    memory_kind: str
    backbone: str
    device: str
    profile: str = ""
    test: dict | None = None  # evaluate(...) on the test split (accuracy, loss, confusion, predictions)
    factors: dict = field(default_factory=dict, repr=False)  # LoRA A, B after training
    initial_factors: dict = field(default_factory=dict, repr=False)  # ... and before it
    updates: dict = field(default_factory=dict, repr=False)  # dW of the TRACKED matrices
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params

    @property
    def val_accuracy(self) -> float:
        return self.val_curve[-1]["accuracy"]

    @property
    def val_loss(self) -> float:
        return self.val_curve[-1]["loss"]

    @property
    def test_accuracy(self) -> float | None:
        return None if self.test is None else self.test["accuracy"]

    @property
    def s_per_step(self) -> float:
        return self.train_time_s / max(1, self.train_steps)

    def delta_weight(self, layer: str) -> torch.Tensor:
        """LoRA's trained update ``scaling * B A`` of one layer (float32, CPU)."""
        f = self.factors[layer]
        return lora_update(f["A"], f["B"], f["scaling"])

    def update_norm(self, initial: bool = False) -> float:
        """``sqrt(sum over LoRA layers ||scaling B A||_F^2)``: the size of the whole trained update (or the init's)."""
        factors = self.initial_factors if initial else self.factors
        return math.sqrt(sum(float(lora_update(f["A"], f["B"], f["scaling"]).square().sum()) for f in factors.values()))

    def metrics(self) -> dict:
        """Flat, JSON-serialisable: what the CLI writes (``test_*`` only when the test split was scored)."""
        out = {
            "method": self.method,
            "profile": self.profile,
            "seed": self.seed,
            "lr": self.lr,
            "head_lr": self.head_lr,
            "backbone": self.backbone,
            "device": self.device,
            "lora_layers": self.lora_layers,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "trainable_percent": self.trainable_percent,
            "val_accuracy": self.val_accuracy,
            "val_loss": self.val_loss,
            "val_curve": self.val_curve,
            "train_steps": self.train_steps,
            "train_time_s": self.train_time_s,
            "s_per_step": self.s_per_step,
            "peak_memory_mib": self.peak_memory_mib,
            "memory_kind": self.memory_kind,
            "final_train_loss": sum(self.losses[-10:]) / max(1, len(self.losses[-10:])),
            "losses": self.losses,
        }
        if self.test is not None:
            out.update(
                test_accuracy=self.test["accuracy"],
                test_loss=self.test["loss"],
                confusion=self.test["confusion"],
                test_predictions=self.test["predictions"],
            )
        return out

    def line(self) -> str:
        """One line for a log."""
        test = f"  test {self.test_accuracy:.3f}" if self.test is not None else ""
        return (
            f"{self.method:<10} seed {self.seed}  lr {self.lr:<7.2g} val {self.val_accuracy:.3f}{test}  "
            f"({self.train_steps} steps, {self.train_time_s:.0f} s)"
        )


def run(
    spec: MethodSpec,
    data: TokenizedData,
    profile: Profile,
    *,
    seed: int | None = None,
    lr: float | None = None,
    head_lr: float | None = None,
    test: bool = False,
    backbone: Callable[..., tuple[nn.Module, PreTrainedTokenizerBase, str]] | None = None,
    device: str | torch.device | None = None,
    keep_model: bool = False,
    track: Sequence[str] = TRACKED,
    verbose: bool = False,
) -> RunResult:
    """Train ``spec`` from a fresh backbone on ``data``; score validation as it goes, test only if ``test``.

    ``seed`` (default ``profile.seed``) sets the head init, LoRA's A, the dropout masks
    and the batch order. ``lr`` is the method's own rate (default: ``methods.learning_rate``,
    tuned for the profile); ``head_lr`` the new head's (default: ``methods.head_learning_rate``,
    the same for every method). ``backbone``: a ``load_backbone``-style callable. ``keep_model`` keeps the
    trained model in the result; the updates dW of the ``track``-ed matrices are always kept.
    """
    from .backbone import load_backbone

    seed = profile.seed if seed is None else seed
    head_lr = head_learning_rate(profile) if head_lr is None else head_lr
    lr = (head_lr if spec.kind == "head" else learning_rate(spec, profile)) if lr is None else lr
    if spec.kind == "head":
        lr = head_lr = lr  # head only: the head is the method
    device = get_device() if device is None else torch.device(device)
    set_seed(seed)
    model, _, description = (backbone or load_backbone)(profile.backbone, seed=seed, verbose=False)
    pretrained = _tracked_weights(model, track) if track else {}
    names = prepare_method(model, spec)
    initial = lora_factors(model)
    params = count_parameters(model)
    groups = param_groups(model, lr, head_lr)
    set_seed(seed)  # the same dropout masks whatever happened before
    result = train(
        model,
        data.train_batches(seed),
        data.val_batches,
        param_groups=groups,
        epochs=profile.epochs,
        eval_every=profile.eval_every,
        warmup_ratio=profile.warmup_ratio,
        weight_decay=profile.weight_decay,
        max_grad_norm=profile.max_grad_norm,
        device=device,
        desc=spec.name,
    )
    trained = _tracked_weights(model, track) if track else {}
    out = RunResult(
        method=spec.name,
        kind=spec.kind,
        seed=seed,
        lr=lr,
        head_lr=head_lr,
        trainable_params=params.trainable,
        total_params=params.total,
        lora_layers=len(names),
        losses=result.losses,
        val_curve=[{"step": e["step"], "accuracy": e["accuracy"], "loss": e["loss"]} for e in result.evals],
        train_steps=result.steps,
        train_time_s=result.wall_time_s,
        peak_memory_mib=result.peak_memory_mib,
        memory_kind=result.memory_kind,
        backbone=description,
        device=str(device),
        profile=profile.name,
        factors=lora_factors(model),
        initial_factors=initial,
        updates={k: trained[k] - pretrained[k] for k in trained},
    )
    if test:
        out.test = evaluate(model, data.test_batches, device)
    if keep_model:
        out.model = model
    if verbose:
        print(out.line())
    return out


def score_test(result: RunResult, data: TokenizedData) -> RunResult:
    """Score a kept model (``run(..., keep_model=True)``) on the test split, once."""
    if result.model is None:
        raise ValueError(f"run {result.method!r} (seed {result.seed}) kept no model: run it with keep_model=True")
    if result.test is None:
        result.test = evaluate(result.model, data.test_batches, result.device)
    return result


def sweep(
    spec: MethodSpec,
    data: TokenizedData,
    profile: Profile,
    lrs: Iterable[float],
    *,
    seed: int | None = None,
    head_lr: float | None = None,
    verbose: bool = True,
    **kwargs: Any,
) -> list[RunResult]:
    """One run per learning rate in ``lrs``, scored on the validation split only (``keep_model=True``).

    A rate whose run diverges (a non-finite loss, ``loop.train``) is left out with a line saying so: too
    large a rate is an answer of the sweep, not a failure of it. If every rate diverges, that is an error.
    """
    lrs, out = list(lrs), []
    for lr in lrs:
        try:
            out.append(
                run(spec, data, profile, seed=seed, lr=lr, head_lr=head_lr, keep_model=True, verbose=verbose, **kwargs)
            )
        except FloatingPointError:
            print(f"   {spec.name} at lr {lr:g}: the loss became inf or nan (diverged); left out of the sweep")
    if not out:
        raise FloatingPointError(f"every rate of the sweep {lrs} diverged for {spec.name}: try smaller rates")
    return out


def best_run(results: list[RunResult]) -> RunResult:
    """The run with the highest final validation accuracy (ties: the lower validation loss)."""
    return max(results, key=lambda r: (r.val_accuracy, -r.val_loss))


# ------------------------------------------------------------------ statistics


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def mcnemar(pred_a: Sequence[int], pred_b: Sequence[int], labels: Sequence[int]) -> dict:
    """Exact McNemar test of two classifiers on the same examples.

    ``b``: examples A gets right and B wrong; ``c``: the reverse. Under the null
    hypothesis (equal accuracy) each disagreement is a fair coin, so the two-sided
    p-value is ``2 * P(Binomial(b + c, 1/2) <= min(b, c))``, capped at 1.
    """
    if not len(pred_a) == len(pred_b) == len(labels):
        raise ValueError(f"need predictions and labels of one length, got {len(pred_a)}, {len(pred_b)}, {len(labels)}")
    right_a = [int(p == y) for p, y in zip(pred_a, labels)]
    right_b = [int(p == y) for p, y in zip(pred_b, labels)]
    b = sum(ra and not rb for ra, rb in zip(right_a, right_b))
    c = sum(rb and not ra for ra, rb in zip(right_a, right_b))
    n = b + c
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n)
    return {
        "a_only": b,
        "b_only": c,
        "p_value": p,
        "accuracy_difference": (sum(right_a) - sum(right_b)) / max(1, len(labels)),
    }
