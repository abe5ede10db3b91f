"""The studies of the paper's Section 7, on DistilBERT/IMDb: which matrices, which rank, which init.

Introduced in notebook 05 (``05_rank_and_what_lora_learns.ipynb``). It offers

* ``TARGET_SETS``: the choices of weight matrices the notebook compares (paper Table 5);
* ``lora_param_count`` / ``rank_for_budget``: trainable LoRA parameters of a
  choice at rank ``r``, and the rank that spends a given budget;
* ``study_profile``: the run settings for the studies (each profile's ``study`` sizes,
  one validation pass per run), so that the notebook's runs fit;
* ``PAPER_TABLE7``: the paper's amplification numbers (GPT-3, W_q of layer 48);
* ``lora_variant``: the ``MethodSpec`` of one LoRA variant (targets, r, alpha,
  rsLoRA, init (``lora.pissa_init_``), dropout), trained with ``runner.run`` like every other run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch.nn as nn

from .lora import _matches, _summarise, linear_names, lora_layers, lora_parameters
from .methods import MethodSpec
from .profiles import Profile

# The paper's Table 5 compares subsets of {W_q, W_k, W_v, W_o}; we add the feed-forward pair too.
TARGET_SETS = {
    "q": ("q_lin",),
    "v": ("v_lin",),
    "q,v": ("q_lin", "v_lin"),
    "q,k,v,o": ("q_lin", "k_lin", "v_lin", "out_lin"),
    "q,k,v,o,ffn": ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
}

# The paper's Table 7 (Hu et al. 2021, Section 7.3): W_q of GPT-3 175B's 48th layer (12,288 x 12,288) and the
# LoRA update dW_q learned at rank r. "proj_*" are ||U^T W_q V||_F with U, V the top-r singular directions of
# dW_q, of W_q itself, or random. The ratios the notebook compares are derived from these numbers.
PAPER_TABLE7 = {
    4: {"d": 12288, "norm_W": 61.95, "norm_dW": 6.91, "proj_on_dW": 0.32, "proj_on_W": 21.67, "proj_on_random": 0.02},
    64: {"d": 12288, "norm_W": 61.95, "norm_dW": 3.57, "proj_on_dW": 1.90, "proj_on_W": 37.71, "proj_on_random": 0.33},
}


# ------------------------------------------------------------------ parameter budgets


def _target_linears(model: nn.Module, targets) -> dict[str, nn.Linear]:
    """``{name: nn.Linear}`` for every plain Linear layer (or LoRA base) whose name ends with a target.

    Every target must match at least one layer (a typo is an error, not a smaller count).
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    modules = dict(model.named_modules())
    linears = {n: modules[n] for n in linear_names(model)}
    linears.update({n: layer.base for n, layer in lora_layers(model).items()})
    missing = [t for t in targets if not any(_matches(n, [t]) for n in linears)]
    if missing or not targets:
        raise ValueError(
            f"targets {missing or targets} match no nn.Linear in {type(model).__name__}. "
            f"Linear layers here: {_summarise(sorted(linears))}"
        )
    return {n: m for n, m in linears.items() if _matches(n, targets)}


def lora_param_count(model: nn.Module, targets: str | Iterable[str], r: int) -> int:
    """Trainable LoRA parameters of rank ``r`` on ``targets``: ``sum r * (d_in + d_out)`` (model unchanged)."""
    return lora_parameters(((m.in_features, m.out_features) for m in _target_linears(model, targets).values()), r)


def max_rank(model: nn.Module, targets: str | Iterable[str]) -> int:
    """The largest rank every targeted layer admits: ``min(d_in, d_out)`` over the layers."""
    return min(min(m.in_features, m.out_features) for m in _target_linears(model, targets).values())


def rank_for_budget(model: nn.Module, targets: str | Sequence[str], budget: int) -> int:
    """The rank whose LoRA parameter count on ``targets`` is nearest to ``budget`` (at least 1).

    The count is linear in r (``r * per_rank``), so the nearest count is
    ``round(budget / per_rank)``; the result is then within half a rank step
    (``per_rank / 2`` parameters) of the budget unless clipped to [1, max rank].
    """
    if budget <= 0:
        raise ValueError(f"budget must be a positive number of parameters, got {budget!r}")
    per_rank = lora_param_count(model, targets, 1)
    r = math.floor(budget / per_rank + 0.5)  # round half up, not to even
    return int(min(max(1, r), max_rank(model, targets)))


# ------------------------------------------------------------------ run settings and data


def study_profile(profile: Profile, **overrides: Any) -> Profile:
    """The settings notebook 05's studies run with: ``profile`` with its ``study`` sizes, then ``overrides``.

    About twenty runs share one notebook, so each must be short (``profiles.PROFILES`` says how
    each profile shrinks). The validation split is scored once, after the last step
    (``eval_every=None``): the studies compare final models, and each extra pass costs time.
    The studies' LoRA runs have no dropout (``lora_variant``).
    """
    study = dict(profile.study)
    if "max_length" in study:  # a cap: a profile already cut shorter stays so
        study["max_length"] = min(study["max_length"], profile.max_length)
    return profile.replace(eval_every=None, **study).replace(**overrides)


# ------------------------------------------------------------------ one variant


def lora_variant(
    targets: str | Iterable[str],
    r: int,
    alpha: float = 16,
    *,
    rslora: bool = False,
    init: str = "zero",
    lora_dropout: float = 0.0,
    name: str | None = None,
) -> MethodSpec:
    """The ``MethodSpec`` of a LoRA variant; train it with ``runner.run(spec, data, profile, seed=...)``.

    ``targets``: module names (``TARGET_SETS[...]``); ``rslora=True`` scales by ``alpha / sqrt(r)``;
    ``init="pissa"`` starts from ``pissa_init_``. No dropout by default: the PiSSA run must start from
    the pretrained model (dropout on the branch that carries W's top directions would change it at
    step 0), and the zero-B runs it is compared with must match it. The variant trains at ``lora``'s
    tuned rate unless given its own (``spec.replace(lr=...)``, or a sweep).
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    return MethodSpec(
        name or f"{','.join(t.removesuffix('_lin') for t in targets)} r={r}",
        "lora",
        targets=targets,
        r=r,
        lora_alpha=alpha,
        lora_dropout=lora_dropout,
        rslora=rslora,
        init=init,
    )


# ------------------------------------------------------------------ the committed study (Tables 5 and 6)


def section7_specs(
    model: nn.Module, reference: Sequence[str] = ("q_lin", "v_lin"), r: int = 8, ranks: Iterable[int] = (1, 64)
) -> list[MethodSpec]:
    """The LoRA variants of notebook 05's committed IMDb study, all at the paper's scale ``alpha / r``:

    * which matrices at one parameter budget (the paper's Table 5): the budget of ``reference`` at rank
      ``r`` (W_q, W_v at r = 8), spent on each ``TARGET_SETS`` choice at ``rank_for_budget``;
    * which rank (Table 6): ``reference`` at each of ``ranks`` (``r`` itself is in the first list);
    * PiSSA (``init="pissa"``) on ``reference`` at rank ``r``.

    Every variant gets its own learning rate from a sweep on validation (``compare.compare_methods``), which
    removes most of the scale ``alpha / r`` as a confound: with Adam, a constant factor on the update acts
    roughly like a factor on the learning rate (the LoRA paper, Section 4.1), up to the grid's resolution of
    about 3x ("LoRA Without Regret" finds that under ``alpha / r`` the best rate hardly depends on r). No
    dropout (``lora_variant``; PiSSA needs 0).
    """
    budget = lora_param_count(model, reference, r)
    out = []
    for label, targets in TARGET_SETS.items():
        rank = rank_for_budget(model, targets, budget)
        out.append(lora_variant(targets, rank, name=f"{label} r={rank}"))
    label = ",".join(t.removesuffix("_lin") for t in reference)
    out += [lora_variant(reference, k, name=f"{label} r={k}") for k in ranks]
    out.append(lora_variant(reference, r, init="pissa", name=f"{label} r={r} PiSSA"))
    return out


# What the papers found, as (variant a, variant b, the finding, what it predicts for a against b). The verdicts come
# from ``stats.seed_verdict``; ``claim_reading`` says whether a verdict agrees with the prediction.
SECTION7_CLAIMS = [
    ("head", "q,v r=8", "LoRA adds to a trained head (the premise)", "worse"),
    ("q r=16", "q,v r=8", "W_q alone is worse at one budget (Table 5)", "worse"),
    ("v r=16", "q,v r=8", "W_v alone is about as good (Table 5)", "same"),
    ("q,k,v,o r=4", "q,v r=8", "all four attention matrices are as good or better (Table 5)", "not worse"),
    (
        "q,k,v,o,ffn r=2",
        "q,v r=8",
        "every Linear, MLP included, is as good or better (QLoRA; LoRA Without Regret)",
        "not worse",
    ),
    ("q,v r=1", "q,v r=8", "r = 1 is nearly as good (Table 6)", "same"),
    ("q,v r=64", "q,v r=8", "r = 64 is no better (Table 6)", "not better"),
    ("q,v r=8 PiSSA", "q,v r=8", "PiSSA ends better (Meng et al. 2024)", "better"),
]

_AGREES = {
    "worse": {"worse"},
    "better": {"better"},
    "same": {"equivalent"},
    "not worse": {"better", "equivalent"},
    "not better": {"worse", "equivalent"},
}


def claim_reading(expected: str, verdict: str, direction: str | None = None) -> str:
    """ "consistent" / "differs" / "not resolved (...)": a seed-level verdict read against a published prediction.

    An "equivalent" whose interval also excludes 0 (``direction``) is a small but real difference: it is consistent
    with a prediction of that direction ("worse" / "better").
    """
    if verdict == "equivalent" and direction is not None and expected in ("worse", "better"):
        return "consistent (a small difference)" if direction == expected else "differs"
    if verdict == "unstable":
        return "not resolved (a seed at chance)"
    if verdict == "no verdict":
        return "not resolved (one seed)"
    if verdict == "inconclusive":
        return "not resolved (the interval is too wide)"
    return "consistent" if verdict in _AGREES[expected] else "differs"
