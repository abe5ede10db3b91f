"""Run profiles: every size-dependent setting of the DistilBERT/IMDb runs, in one place.

* ``smoke`` - CI and quick checks: the offline stand-in backbone, 1,000 training
  reviews of at most 128 tokens, one epoch; a LoRA run takes about a minute on
  2 CPU cores.
* ``cpu``   - a laptop: real DistilBERT where available, a few thousand reviews,
  about ten minutes a run.
* ``gpu``   - a Colab T4 class GPU: the full 25,000/25,000 splits, 512 tokens,
  mixed precision, paper-like settings.

Chosen by argument, else the ``LORA_PROFILE`` environment variable, else the
hardware (``gpu`` when CUDA is available, otherwise ``cpu``). Introduced in
notebook 03 (``03_lora_distilbert_imdb.ipynb``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Profile:
    """Sizes and hyper-parameters of one kind of run (see the module docstring)."""
    name: str
    backbone: str             # "auto", "distilbert-base-uncased" or "minilm-standin"
    n_train: int | None       # None: the whole split
    n_test: int | None
    max_length: int           # tokens per review after truncation
    batch_size: int
    epochs: int
    lr_lora: float = 1e-3     # LoRA factors and the new head
    lr_full: float = 5e-5     # full fine-tuning: every weight moves, so a much smaller step
    lr_head: float = 1e-3     # head only (frozen backbone)
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    r: int = 8                # the paper's GLUE setting: r = 8 on W_q and W_v
    lora_alpha: float = 16
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_lin", "v_lin")
    head_modules: tuple[str, ...] = ("pre_classifier", "classifier")
    eval_batch_size: int = 64
    seed: int = 0

    def replace(self, **changes) -> "Profile":
        """A copy with some fields changed, e.g. ``profile.replace(n_train=200)``."""
        return dataclasses.replace(self, **changes)

    def summary(self) -> str:
        size = lambda n: "all" if n is None else f"{n:,}"  # noqa: E731
        return (f"profile {self.name!r}: backbone={self.backbone}, train={size(self.n_train)}, "
                f"test={size(self.n_test)}, max_length={self.max_length}, batch={self.batch_size}, "
                f"epochs={self.epochs}, LoRA r={self.r} alpha={self.lora_alpha:g} on {list(self.target_modules)}")


PROFILES = {
    "smoke": Profile("smoke", backbone="minilm-standin", n_train=1000, n_test=500, max_length=128,
                     batch_size=16, epochs=1),
    "cpu": Profile("cpu", backbone="auto", n_train=2000, n_test=1000, max_length=256, batch_size=16,
                   epochs=1, lr_lora=5e-4),
    "gpu": Profile("gpu", backbone="auto", n_train=None, n_test=None, max_length=512, batch_size=32,
                   epochs=2, lr_lora=5e-4, lr_full=2e-5, eval_batch_size=128),
}


def get_profile(name: str | None = None, **overrides) -> Profile:
    """The profile ``name``, else ``$LORA_PROFILE``, else ``gpu``/``cpu`` by hardware; fields overridable."""
    name = name or os.environ.get("LORA_PROFILE") or ("gpu" if torch.cuda.is_available() else "cpu")
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: choose one of {sorted(PROFILES)} "
                         "(argument or the LORA_PROFILE environment variable)")
    return PROFILES[name].replace(**overrides)
