"""Run profiles: every size-dependent setting of the DistilBERT/IMDb runs, in one place.

* ``quick`` - the default on a CPU: the offline stand-in backbone, 1,000 training
  reviews of at most 64 tokens, one epoch (63 steps of 16). Every notebook finishes
  in minutes on a laptop; this is the size whose outputs the notebooks show.
* ``cpu``   - a longer CPU run, by name: real DistilBERT where available (else the
  stand-in), 2,000 reviews of 128 tokens, 125 steps; about four times the compute
  of ``quick`` per run.
* ``gpu``   - the default on a GPU (Colab's T4): every training review and the whole
  test split, 256 tokens, one epoch, mixed precision.

Chosen by argument, else the ``LORA_PROFILE`` environment variable, else the
hardware (``gpu`` when CUDA is available, otherwise ``quick``). Notebooks print the
profile and their estimated time first (``banner.print_banner``). Introduced in
notebook 03 (``03_lora_distilbert_imdb.ipynb``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

IMDB_SPLIT = 25_000  # reviews in each of IMDb's train and test splits (Maas et al. 2011)


@dataclass(frozen=True)
class Profile:
    """Sizes and hyper-parameters of one kind of run (see the module docstring)."""

    name: str
    backbone: str  # "auto", "distilbert-base-uncased" or "minilm-standin"
    n_train: int | None  # training reviews (None: the whole split, less the validation reviews)
    n_test: int | None
    max_length: int  # tokens per review after truncation
    batch_size: int
    epochs: int
    n_val: int = 200  # validation reviews, carved from the training split: for tuning and curves
    eval_every: int | None = None  # score the validation split every this many steps (None: once per epoch)
    # Learning rates: the method's own parameters (LoRA factors / every weight) at lr_lora / lr_full,
    # the new classification head at lr_head in every method. See PROFILES for how they were chosen.
    lr_lora: float = 1e-3
    lr_full: float = 5e-5
    lr_head: float = 1e-3
    lr_lora_all: float | None = None  # LoRA on every Linear, if its tuned rate differs from lr_lora
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    r: int = 8  # the paper's GLUE setting: r = 8 on W_q and W_v
    lora_alpha: float = 16
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_lin", "v_lin")
    head_modules: tuple[str, ...] = ("pre_classifier", "classifier")
    eval_batch_size: int = 64
    seed: int = 0

    def replace(self, **changes) -> Profile:
        """A copy with some fields changed, e.g. ``profile.replace(n_train=200)``."""
        return dataclasses.replace(self, **changes)

    def run_shape(self) -> dict:
        """Reviews, steps, validation passes and evaluation batches of one run of ``loop.train`` on this profile."""
        n_train = IMDB_SPLIT - self.n_val if self.n_train is None else self.n_train
        n_test = IMDB_SPLIT if self.n_test is None else self.n_test
        steps_per_epoch = math.ceil(n_train / self.batch_size)
        steps = self.epochs * steps_per_epoch
        every = (
            self.eval_every or steps_per_epoch
        )  # loop.train: every eval_every steps (else every epoch) and at the end
        val_passes = len(range(every, steps, every)) + 1
        eval_batches = val_passes * math.ceil(self.n_val / self.eval_batch_size) + math.ceil(
            n_test / self.eval_batch_size
        )
        return {
            "n_train": n_train,
            "n_test": n_test,
            "steps": steps,
            "val_passes": val_passes,
            "eval_batches": eval_batches,
        }

    def summary(self) -> str:
        size = lambda n: "all" if n is None else f"{n:,}"  # noqa: E731
        return (
            f"profile {self.name!r}: backbone={self.backbone}, train={size(self.n_train)}, "
            f"validation={self.n_val:,}, test={size(self.n_test)}, max_length={self.max_length}, "
            f"batch={self.batch_size}, "
            f"epochs={self.epochs}, LoRA r={self.r} alpha={self.lora_alpha:g} on {list(self.target_modules)}"
        )


PROFILES = {
    # quick: 63 steps of 16 reviews cut at 64 tokens, so that notebook 04's 12 runs (4 methods x 3 seeds)
    # take minutes on a laptop CPU. Rates chosen by `python -m lora_helpers compare --profile quick --seeds 3 --sweep`
    # (lora_helpers/results/compare-quick.json): each the best validation accuracy of its method's sweep, the head's
    # from the head-only sweep. LoRA's 3e-3 is the largest rate its grid tried. LoRA dropout stays 0.1 here: the
    # committed run and the notebooks' outputs were made with it (the cpu run found dropout 0 no worse).
    "quick": Profile(
        "quick",
        backbone="minilm-standin",
        n_train=1000,
        n_val=200,
        n_test=500,
        max_length=64,
        batch_size=16,
        epochs=1,
        eval_every=16,
        lr_full=1e-4,
        lr_lora=3e-3,
        lr_lora_all=1e-3,
        lr_head=1e-3,
    ),
    # cpu: a laptop, 125 steps of 16 x 128 tokens. Rates chosen by the committed run
    # lora_helpers/results/compare-cpu.json
    # (`python -m lora_helpers compare --profile cpu --seeds 3 --sweep --extend-grid --methods full lora lora-all
    # lora-nodrop head --control lora ...`, 86 min on a 2-core Intel Xeon, stand-in backbone): each the best validation
    # accuracy of its method's sweep, inside its grid; the head's from the head-only sweep. LoRA dropout 0: without it
    # LoRA (q, v) was no worse on validation (+1.7 points over three seeds, each at its own rate, 3e-3 both) and a step
    # is cheaper (benchmarks/bench.py). lora-all's rate was chosen with dropout 0.1.
    "cpu": Profile(
        "cpu",
        backbone="auto",
        n_train=2000,
        n_val=400,
        n_test=1000,
        max_length=128,
        batch_size=16,
        epochs=1,
        eval_every=42,
        lr_full=3e-4,
        lr_lora=3e-3,
        lr_lora_all=3e-3,
        lr_head=3e-3,
        lora_dropout=0.0,
    ),
    # gpu: a Colab T4. Sized so that notebook 04 (12 runs) takes about half an hour there, estimated (FLOPs at an
    # assumed 20% of the T4's peak, not measured) by `python -m lora_helpers estimate --profile gpu --notebook 04`:
    # every training review, 256 tokens, one epoch. Full size (512 tokens, 2 epochs, about 4x the compute) is a
    # command line away: --max-length 512 --epochs 2. Its rates are not tuned (no GPU run yet): `compare --profile gpu
    # --sweep` tunes them.
    "gpu": Profile(
        "gpu",
        backbone="auto",
        n_train=None,
        n_val=1000,
        n_test=None,
        max_length=256,
        batch_size=32,
        epochs=1,
        lr_lora=5e-4,
        lr_full=2e-5,
        eval_batch_size=128,
        eval_every=250,
    ),
}


def default_profile_name() -> str:
    """``$LORA_PROFILE`` if set, else ``gpu`` when CUDA is available, otherwise ``quick``."""
    return os.environ.get("LORA_PROFILE") or ("gpu" if torch.cuda.is_available() else "quick")


def get_profile(name: str | None = None, **overrides) -> Profile:
    """The profile ``name``, else ``$LORA_PROFILE``, else ``gpu``/``quick`` by hardware; fields overridable."""
    name = name or default_profile_name()
    if name not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r}: choose one of {sorted(PROFILES)} "
            "(argument or the LORA_PROFILE environment variable)"
        )
    return PROFILES[name].replace(**overrides)
