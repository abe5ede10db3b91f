"""LoRA in one page: a frozen ``nn.Linear`` plus a trainable low-rank update.

    h = W0 x + (lora_alpha / r) * B A x        (Hu et al. 2021, Eq. 3)

``W0`` (d_out x d_in) stays frozen; only ``lora_A`` (r x d_in) and ``lora_B``
(d_out x r) train. ``B`` starts at zero, so at step 0 the model is exactly the
pretrained one. Symbols follow the paper and Microsoft's ``loralib``.

Introduced in notebook 02 (``02_lora_linear_from_scratch.ipynb``), where it is
first written out cell by cell; every later notebook imports it from here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """Wrap a frozen ``nn.Linear`` with a trainable rank-``r`` update ``scaling * B @ A``.

    Args:
        base: the pretrained layer; its weight and bias are frozen in place.
        r: rank of the update, 1 <= r <= min(d_in, d_out).
        lora_alpha: scale numerator; ``scaling = lora_alpha / r`` (or
            ``lora_alpha / sqrt(r)`` with ``use_rslora=True``, Kalajdzievski 2023).
        lora_dropout: dropout on the LoRA branch's input only, in [0, 1).
    """

    def __init__(self, base: nn.Linear, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        _check_lora_args(base, r, lora_alpha, lora_dropout)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **factory))
        # A random, B zero: the update B @ A is exactly zero at init, yet B's
        # gradient (which depends on A x) is not, so training can start.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """The update this adapter adds to ``W0``: ``scaling * B @ A`` (d_out x d_in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            if self.training and torch.is_grad_enabled():
                raise RuntimeError(
                    "this LoRALinear is merged: lora_A/lora_B would get no gradient and a later "
                    "unmerge() would subtract a different update. Call unmerge() (or "
                    "unmerge_lora(model)) before training, or use model.eval() / torch.no_grad() "
                    "for inference.")
            return self.base(x)  # W0 already holds W0 + scaling * B A
        # Two thin matmuls (x A^T, then B^T): never forms the d_out x d_in product.
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + update * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (``W0 += scaling * B A``): zero added latency."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight (``W0 -= scaling * B A``)."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, merged={self.merged}")


def _check_lora_args(base, r, lora_alpha, lora_dropout) -> None:
    if not isinstance(base, nn.Linear):
        raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
    max_r = min(base.in_features, base.out_features)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= max_r:
        raise ValueError(f"r must be an int in [1, min(in_features, out_features)] = [1, {max_r}] "
                         f"for a {base.in_features}->{base.out_features} layer, got {r!r}")
    if not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be > 0 (scaling = lora_alpha / r), got {lora_alpha!r}")
    if not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")


# ---------------------------------------------------------------- whole models

def _matches(name: str, targets: Iterable[str]) -> bool:
    """``True`` if a qualified module name ends with one of the targets on a dot boundary."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """``{qualified name: LoRALinear}`` for every LoRA layer in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the plain ``nn.Linear`` layers (LoRA's own ``.base`` excluded)."""
    wrapped = {f"{n}.base" for n in lora_layers(model)}
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in wrapped]


def apply_lora(model: nn.Module, target_modules, r: int = 8, lora_alpha: float = 16,
               lora_dropout: float = 0.0, use_rslora: bool = False) -> list[str]:
    """Replace every ``nn.Linear`` whose name ends with a target by a ``LoRALinear``, in place.

    ``target_modules`` is a name or a list of names matched on a dot boundary
    (``"q_lin"`` matches ``...attention.q_lin`` but not ``...attention.xq_lin``).
    Everything is checked before anything changes. Returns the wrapped names.
    """
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not targets:
        raise ValueError("target_modules is empty: name at least one nn.Linear, e.g. ['q_lin', 'v_lin']")
    linears = linear_names(model)
    modules = dict(model.named_modules())
    wrapped = set(lora_layers(model))
    chosen = []
    for t in targets:
        hits = [n for n in modules if n and _matches(n, [t])]
        if any(n in wrapped for n in hits):
            raise ValueError(f"target {t!r} is already LoRA-wrapped ({[n for n in hits if n in wrapped][:3]}); "
                             "use a fresh model, or merge_and_unload(model) first")
        lin_hits = [n for n in hits if n in linears]
        if not lin_hits:
            if hits:
                kinds = sorted({type(modules[n]).__name__ for n in hits})
                raise TypeError(f"target {t!r} matches {kinds} modules, not nn.Linear; LoRALinear only "
                                f"wraps nn.Linear. Linear layers here: {_summarise(linears + sorted(wrapped))}")
            raise ValueError(f"target {t!r} matches no nn.Linear in {type(model).__name__}. "
                             f"Linear layers here: {_summarise(linears + sorted(wrapped))}")
        chosen += [n for n in lin_hits if n not in chosen]
    for n in chosen:  # validate every layer before changing any
        _check_lora_args(modules[n], r, lora_alpha, lora_dropout)
    for n in chosen:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(modules[n], r, lora_alpha, lora_dropout, use_rslora))
    return chosen


def _summarise(names: list[str], limit: int = 12) -> str:
    """The distinct last parts of the names (what a target usually is), then a few full names."""
    leaves = sorted({n.rpartition(".")[2] for n in names})
    return f"leaf names {leaves}; e.g. {names[:limit]}" + (" ..." if len(names) > limit else "")


def freeze_all_except(model: nn.Module, module_names: Iterable[str] = ()) -> list[str]:
    """Freeze every parameter, then unfreeze the modules whose names end with one of ``module_names``.

    Returns the names of the modules left trainable. An entry that matches no
    module raises (a silently frozen classifier head trains nothing).
    """
    module_names = [module_names] if isinstance(module_names, str) else list(module_names)
    found = []
    for t in module_names:  # resolve every name before freezing anything
        hits = [(n, m) for n, m in model.named_modules() if n and _matches(n, [t])]
        if not hits:
            top = [n for n, _ in model.named_children()]
            raise ValueError(f"no module named {t!r} in {type(model).__name__}; top-level modules: {top}, "
                             f"Linear layers: {_summarise(linear_names(model))}")
        found += hits
    for p in model.parameters():
        p.requires_grad_(False)
    unfrozen = []
    for n, m in found:
        for p in m.parameters():
            p.requires_grad_(True)
        unfrozen.append(n)
    return unfrozen


def mark_only_lora_trainable(model: nn.Module, extra_trainable: Iterable[str] = ()) -> None:
    """Train only ``lora_A``/``lora_B`` and the modules in ``extra_trainable`` (e.g. a new head).

    A freshly initialised classifier head must be listed here: frozen at its
    random init it would cap accuracy near chance, whatever LoRA learns.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRALinear layers: call apply_lora(model, ...) first")
    freeze_all_except(model, extra_trainable)
    for layer in layers.values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA layer (``W0 += scaling * B A``); returns how many. Merging twice is a no-op."""
    layers = lora_layers(model).values()
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Undo ``merge_lora``: every base weight is ``W0`` again; returns how many layers."""
    layers = lora_layers(model).values()
    for layer in layers:
        layer.unmerge()
    return len(layers)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then put the plain ``nn.Linear`` back in each LoRA layer's place: same outputs, no LoRA."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    return model


@dataclass
class ParamCount:
    """Trainable and total parameters; ``print`` it for a one-line summary."""
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} "
                f"|| trainable: {self.percent:.2f}%")


def count_parameters(model: nn.Module) -> ParamCount:
    """Count trainable and total parameters (``parameters()`` yields a shared tensor once)."""
    params = list(model.parameters())
    return ParamCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
