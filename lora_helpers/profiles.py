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
from dataclasses import dataclass, field
from typing import Any

import torch

IMDB_SPLIT = 25_000  # reviews in each of IMDb's train and test splits (Maas et al. 2011)


@dataclass(frozen=True)
class Profile:
    """The sizes of one kind of run, and the loop's settings shared by every method (see the module docstring).

    What is tuned per method (learning rates, LoRA's dropout) lives with the method: ``methods.REGISTRY``.
    """

    name: str
    backbone: str  # "auto", "distilbert-base-uncased" or "minilm-standin"
    n_train: int | None  # training reviews (None: the whole split, less the validation reviews)
    n_test: int | None
    max_length: int  # tokens per review after truncation
    batch_size: int
    epochs: int
    n_val: int = 200  # validation reviews, carved from the training split: for tuning and curves
    eval_every: int | None = None  # score the validation split every this many steps (None: once per epoch)
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    eval_batch_size: int = 64
    seed: int = 0
    # notebook 05's sizes (study_profile; max_length a cap)
    study: dict = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_saved(cls, saved: dict) -> Profile:
        """The profile a saved run recorded (``vars(profile)`` in its JSON); fields this version has not are skipped
        (runs saved before the tuned rates moved to ``methods.REGISTRY`` also recorded them here)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known})

    def replace(self, **changes: Any) -> Profile:
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
            f"batch={self.batch_size}, epochs={self.epochs}"
        )


PROFILES = {
    # quick: 63 steps of 16 reviews cut at 64 tokens, so that notebook 04's 12 runs (4 methods x 3 seeds)
    # take minutes on a laptop CPU. Notebook 05's studies (about twenty runs) train on 640 reviews.
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
        study={"n_train": 640},
    ),
    # cpu: a laptop, 125 steps of 16 x 128 tokens; the studies keep 128 tokens.
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
        study={"max_length": 128},
    ),
    # gpu: a Colab T4. Sized so that notebook 04 (12 runs) takes about half an hour there, estimated (FLOPs at an
    # assumed 20% of the T4's peak, not measured) by `python -m lora_helpers estimate --profile gpu --notebook 04`:
    # every training review, 256 tokens, one epoch. Full size (512 tokens, 2 epochs, about 4x the compute) is a
    # command line away: --max-length 512 --epochs 2. The studies train on 12,000 reviews, test on 10,000, one epoch
    # of at most 256 tokens: about twenty minutes on a T4, estimated the same way (`estimate --notebook 05`).
    "gpu": Profile(
        "gpu",
        backbone="auto",
        n_train=None,
        n_val=1000,
        n_test=None,
        max_length=256,
        batch_size=32,
        epochs=1,
        eval_batch_size=128,
        eval_every=250,
        study={"max_length": 256, "epochs": 1, "n_train": 12_000, "n_test": 10_000},
    ),
}


def default_profile_name() -> str:
    """``$LORA_PROFILE`` if set, else ``gpu`` when CUDA is available, otherwise ``quick``."""
    return os.environ.get("LORA_PROFILE") or ("gpu" if torch.cuda.is_available() else "quick")


def get_profile(name: str | None = None, **overrides: Any) -> Profile:
    """The profile ``name``, else ``$LORA_PROFILE``, else ``gpu``/``quick`` by hardware; fields overridable."""
    name = name or default_profile_name()
    if name not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r}: choose one of {sorted(PROFILES)} "
            "(argument or the LORA_PROFILE environment variable)"
        )
    return PROFILES[name].replace(**overrides)
