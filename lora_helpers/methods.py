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

A spec owns everything about its method: what it wraps and how, the grid of learning
rates the sweep tries (``sweep``), and what was chosen on validation for each run
profile (``tuned``: the rate, and any setting the tuning changed). ``method_spec(name,
profile)`` applies the profile's choices; a profile itself holds only sizes.

Introduced in notebook 04 (``04_lora_vs_full_finetuning.ipynb``); notebook 03
uses ``"lora"`` and notebook 05 builds its variants with ``MethodSpec`` directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from .lora import apply_lora, freeze_all_except, lora_layers, mark_only_lora_trainable, pissa_init_

if TYPE_CHECKING:
    from .profiles import Profile

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
    lr: float | None = None  # the method's own learning rate (None: its kind's tuned rate, see learning_rate)
    sweep: tuple[float, ...] = ()  # the rates a validation sweep tries (notebook 04), half a decade apart
    tuned: dict = field(default_factory=dict, compare=False, hash=False, repr=False)  # profile -> chosen settings

    def __post_init__(self):
        if self.kind not in ("full", "head", "lora"):
            raise ValueError(f"MethodSpec kind must be 'full', 'head' or 'lora', got {self.kind!r}")
        if self.kind == "lora" and not self.targets:
            raise ValueError(f"LoRA method {self.name!r} needs target modules, e.g. targets=('q_lin', 'v_lin')")
        if self.init not in ("zero", "pissa"):
            raise ValueError(f"init must be 'zero' (B = 0, the paper's) or 'pissa', got {self.init!r}")

    def replace(self, **changes: Any) -> MethodSpec:
        """A copy with some fields changed, e.g. ``spec.replace(r=4, name="lora r=4")``."""
        return dataclasses.replace(self, **changes)

    def for_profile(self, profile: Profile | str) -> MethodSpec:
        """This method with what was tuned for ``profile`` (a ``Profile`` or its name) applied; unknown: unchanged."""
        name = profile if isinstance(profile, str) else profile.name
        return self.replace(**self.tuned.get(name, {}))

    def summary(self) -> str:
        rate = "" if self.lr is None else f", lr {self.lr:g}"
        if self.kind != "lora":
            return f"{self.name}: {self.description}{rate}"
        scale = "alpha/sqrt(r)" if self.rslora else "alpha/r"
        return (
            f"{self.name}: LoRA r={self.r}, alpha={self.lora_alpha:g} ({scale}), dropout={self.lora_dropout:g}, "
            f"init={self.init}, on {list(self.targets)} + head{rate}"
        )


# The registry. Rates per profile: each the best validation accuracy of its method's sweep, inside its grid, the head's
# from the head-only sweep (every method's new head trains at it):
# * quick: `python -m lora_helpers compare --profile quick --seeds 3 --sweep` (results/compare-quick.json); LoRA's 3e-3
#   is the largest rate its grid tried. LoRA keeps dropout 0.1 there (the notebooks' outputs were made with it);
# * cpu: results/compare-cpu.json (`compare --profile cpu --seeds 3 --sweep --extend-grid --methods full lora lora-all
#   lora-nodrop head --control lora`, stand-in backbone). LoRA trains without dropout there: lora-nodrop was no worse
#   on validation (+1.7 points over three seeds, each at its own rate, 3e-3 both) and a step is cheaper
#   (benchmarks/bench.py); lora-all's rate was chosen with dropout 0.1;
# * gpu: not tuned yet (no GPU run): `compare --profile gpu --sweep` tunes them.
# Full fine-tuning moves every pretrained weight; LoRA's B starts at zero and its update is scaled by alpha / r, so its
# good rates sit about 10x higher (Thinking Machines, "LoRA Without Regret", 2025); the head, trained from scratch on
# frozen features, tolerates the highest.
_LORA_GRID = (3e-4, 1e-3, 3e-3)
REGISTRY = {
    "full": MethodSpec(
        "full",
        "full",
        "full fine-tuning: every weight trains",
        sweep=(3e-5, 1e-4, 3e-4),
        tuned={"quick": {"lr": 1e-4}, "cpu": {"lr": 3e-4}, "gpu": {"lr": 2e-5}},
    ),
    # the paper's GLUE setting: r = 8 on W_q and W_v
    "lora": MethodSpec(
        "lora",
        "lora",
        "LoRA r=8 on q_lin, v_lin + the new head",
        targets=("q_lin", "v_lin"),
        sweep=_LORA_GRID,
        tuned={"quick": {"lr": 3e-3}, "cpu": {"lr": 3e-3, "lora_dropout": 0.0}, "gpu": {"lr": 5e-4}},
    ),
    # the same r and alpha on every Linear of the blocks: the "all layers" setting that "LoRA Without Regret"
    # finds to match full fine-tuning
    "lora-all": MethodSpec(
        "lora-all",
        "lora",
        "LoRA r=8 on every Linear of the blocks + the new head",
        targets=ALL_BLOCK_LINEARS,
        sweep=_LORA_GRID,
        tuned={"quick": {"lr": 1e-3}, "cpu": {"lr": 3e-3, "lora_dropout": 0.0}, "gpu": {"lr": 5e-4}},
    ),
    # dropout makes a step slower: `python -m lora_helpers compare` decides on validation whether it earns its cost
    "lora-nodrop": MethodSpec(
        "lora-nodrop",
        "lora",
        "lora without dropout on the branch (is dropout worth it?)",
        targets=("q_lin", "v_lin"),
        lora_dropout=0.0,
        sweep=_LORA_GRID,
        tuned={"quick": {"lr": 3e-3}, "cpu": {"lr": 3e-3}, "gpu": {"lr": 5e-4}},
    ),
    "head": MethodSpec(
        "head",
        "head",
        "head only: the backbone frozen, the new head trains",
        sweep=(1e-3, 3e-3, 1e-2),
        tuned={"quick": {"lr": 1e-3}, "cpu": {"lr": 3e-3}, "gpu": {"lr": 1e-3}},
    ),
}
METHODS = {name: spec.description for name, spec in REGISTRY.items()}


def method_spec(name: str, profile: Profile | str | None = None) -> MethodSpec:
    """The registered method ``name``, with what was tuned for ``profile`` (a ``Profile`` or its name) if given.

    ``lora`` is the paper's GLUE setting (r = 8 on ``q_lin``, ``v_lin``); ``lora-all`` the
    same on every Linear of the blocks; ``lora-nodrop`` is ``lora`` without dropout;
    ``head`` trains the new head only; ``full`` every weight. See ``REGISTRY``.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}: choose one of {list(REGISTRY)}")
    spec = REGISTRY[name]
    return spec if profile is None else spec.for_profile(profile)


def learning_rate(spec: MethodSpec, profile: Profile | str) -> float:
    """``spec``'s own rate: its ``lr``, else the rate tuned for ``profile`` for the registered method of its name,
    else of its kind (a variant of LoRA trains at ``lora``'s, notebook 05). A profile with no tuned rates needs one
    given (a sweep finds it)."""
    registered = REGISTRY.get(spec.name, REGISTRY[spec.kind])  # a registered method's own, else its kind's
    lr = spec.lr if spec.lr is not None else registered.for_profile(profile).lr
    if lr is None:
        name = profile if isinstance(profile, str) else profile.name
        raise ValueError(
            f"no learning rate tuned for {spec.name!r} on profile {name!r}: pass lr= (and head_lr=), or run "
            "a sweep (compare_methods with lrs=..., notebook 04)"
        )
    return lr


def head_learning_rate(profile: Profile | str) -> float:
    """The rate every method's new head trains at: the head-only method's, tuned for ``profile``."""
    return learning_rate(REGISTRY["head"], profile)


def prepare_method(model: nn.Module, spec: MethodSpec, head_modules: Iterable[str] = HEAD_MODULES) -> list[str]:
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


def param_groups(model: nn.Module, lr: float, head_lr: float, head_modules: Sequence[str] = HEAD_MODULES) -> list[dict]:
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
