"""The fine-tuning methods the series compares, in one registry.

A method is a ``MethodSpec``: what trains (every weight, the head only, or LoRA
factors on some target matrices) and how (rank, alpha, dropout, rsLoRA scaling,
init). ``prepare_method`` turns a fresh backbone into that method, and
``param_groups`` says what the optimizer sees:

* the **new classification head** (``pre_classifier`` + ``classifier``) is
  randomly initialised in every method, so it trains at the *same* head
  learning rate everywhere: a comparison of fine-tuning methods must not be a
  comparison of how well each trains a fresh head;
* the **method's own parameters** (every backbone weight for ``full``, the LoRA
  factors ``A``, ``B`` for LoRA) train at the method's own rate, which is tuned
  per method on a validation split (notebook 04).

Introduced in notebook 04 (``04_lora_vs_full_finetuning.ipynb``); notebook 03
uses ``"lora"`` and notebook 05 builds its variants with ``MethodSpec`` directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.nn as nn

from .lora import apply_lora, freeze_all_except, lora_layers, mark_only_lora_trainable, pissa_init_

ALL_BLOCK_LINEARS = ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2")  # every Linear of a DistilBERT block
HEAD_MODULES = ("pre_classifier", "classifier")  # the new task head


@dataclass(frozen=True)
class MethodSpec:
    """One way to fine-tune: ``kind`` is ``"full"``, ``"head"`` or ``"lora"``; the rest applies to LoRA."""

    name: str
    kind: str
    description: str = ""
    targets: tuple[str, ...] = ()  # LoRA: names of the Linear layers to wrap (suffix match)
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.1
    rslora: bool = False  # scale by alpha / sqrt(r) instead of alpha / r
    init: str = "zero"  # "zero" (B = 0, the paper's) or "pissa" (notebook 05)

    def __post_init__(self):
        if self.kind not in ("full", "head", "lora"):
            raise ValueError(f"MethodSpec kind must be 'full', 'head' or 'lora', got {self.kind!r}")
        if self.kind == "lora" and not self.targets:
            raise ValueError(f"LoRA method {self.name!r} needs target modules, e.g. targets=('q_lin', 'v_lin')")
        if self.init not in ("zero", "pissa"):
            raise ValueError(f"init must be 'zero' (B = 0, the paper's) or 'pissa', got {self.init!r}")

    def replace(self, **changes) -> MethodSpec:
        """A copy with some fields changed, e.g. ``spec.replace(r=4, name="lora r=4")``."""
        return dataclasses.replace(self, **changes)

    def summary(self) -> str:
        if self.kind != "lora":
            return f"{self.name}: {self.description}"
        scale = "alpha/sqrt(r)" if self.rslora else "alpha/r"
        return (
            f"{self.name}: LoRA r={self.r}, alpha={self.lora_alpha:g} ({scale}), dropout={self.lora_dropout:g}, "
            f"init={self.init}, on {list(self.targets)} + head"
        )


def method_spec(name: str, profile=None) -> MethodSpec:
    """The registered method ``name``; LoRA's rank, alpha, dropout and targets come from ``profile`` if given.

    ``lora`` is the paper's GLUE setting (r = 8 on ``q_lin``, ``v_lin``); ``lora-all``
    puts the same r and alpha on every Linear of the blocks (the "all layers" setting that
    Thinking Machines' "LoRA Without Regret" (2025) finds to match full fine-tuning);
    ``lora-nodrop`` is ``lora`` with dropout 0 on the branch (dropout makes a step slower:
    ``python -m lora_helpers compare`` decides on validation whether it earns its cost).
    """
    r = profile.r if profile is not None else 8
    alpha = profile.lora_alpha if profile is not None else 16
    dropout = profile.lora_dropout if profile is not None else 0.1
    targets = tuple(profile.target_modules) if profile is not None else ("q_lin", "v_lin")
    specs = {
        "full": MethodSpec("full", "full", "full fine-tuning: every weight trains"),
        "lora": MethodSpec(
            "lora",
            "lora",
            f"LoRA r={r} on {', '.join(targets)} + the new head",
            targets=targets,
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
        ),
        "lora-all": MethodSpec(
            "lora-all",
            "lora",
            f"LoRA r={r} on every Linear of the blocks + the new head",
            targets=ALL_BLOCK_LINEARS,
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
        ),
        "lora-nodrop": MethodSpec(
            "lora-nodrop",
            "lora",
            "lora without dropout on the branch (is dropout worth it?)",
            targets=targets,
            r=r,
            lora_alpha=alpha,
            lora_dropout=0.0,
        ),
        "head": MethodSpec("head", "head", "head only: the backbone frozen, the new head trains"),
    }
    if name not in specs:
        raise ValueError(f"unknown method {name!r}: choose one of {list(specs)}")
    return specs[name]


METHODS = {name: method_spec(name).description for name in ("full", "lora", "lora-all", "lora-nodrop", "head")}


def prepare_method(model: nn.Module, spec: MethodSpec, head_modules=HEAD_MODULES) -> list[str]:
    """Make ``model`` ready for ``spec`` (wrap with LoRA, set ``requires_grad``); returns the LoRA layer names."""
    if spec.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return []
    if spec.kind == "head":
        freeze_all_except(model, head_modules)
        return []
    names = apply_lora(
        model,
        spec.targets,
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        use_rslora=spec.rslora,
    )
    if spec.init == "pissa":
        for layer in lora_layers(model).values():
            pissa_init_(layer)
    mark_only_lora_trainable(model, extra_trainable=head_modules)
    return names


def param_groups(model: nn.Module, lr: float, head_lr: float, head_modules=HEAD_MODULES) -> list[dict]:
    """Optimizer groups: the new head at ``head_lr``, every other trainable parameter at the method's ``lr``.

    Empty groups are left out (head only has no method group).
    """
    head, method = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        in_head = any(name == h or name.startswith(h + ".") or f".{h}." in f".{name}" for h in head_modules)
        (head if in_head else method).append(p)
    groups = [{"params": method, "lr": lr, "name": "method"}, {"params": head, "lr": head_lr, "name": "head"}]
    return [g for g in groups if g["params"]]
