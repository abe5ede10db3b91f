"""The studies of the paper's Section 7, on DistilBERT/IMDb: which matrices, which rank, which init.

Introduced in notebook 05 (``05_rank_and_what_lora_learns.ipynb``). It offers

* ``TARGET_SETS``: the choices of weight matrices the notebook compares (paper Table 5);
* ``lora_param_count`` / ``rank_for_budget``: trainable LoRA parameters of a
  choice at rank ``r``, and the rank that spends a given budget;
* ``study_profile``: the run settings for the studies (shorter reviews than the
  profile's own runs, so that the notebook's runs fit in minutes);
* ``pissa_init_``: a PiSSA-like init (A, B from W's top-r singular directions,
  the base weight replaced by the residual), the model unchanged at init;
* ``lora_variant``: the ``MethodSpec`` of one LoRA variant (targets, r, alpha,
  rsLoRA, init, dropout), trained with ``runner.run`` like every other run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .lora import (LoRALinear, _matches, _summarise, apply_lora, count_parameters, linear_names, lora_layers,
                   mark_only_lora_trainable)
from .loop import encode, evaluate, make_batches, train
from .methods import MethodSpec
from .profiles import Profile
from .runner import lora_factors
from .utils import get_device, set_seed

# The paper's Table 5 compares subsets of {W_q, W_k, W_v, W_o}; we add the feed-forward pair too.
TARGET_SETS = {
    "q": ("q_lin",),
    "v": ("v_lin",),
    "q,v": ("q_lin", "v_lin"),
    "q,k,v,o": ("q_lin", "k_lin", "v_lin", "out_lin"),
    "q,k,v,o,ffn": ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
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
        raise ValueError(f"targets {missing or targets} match no nn.Linear in {type(model).__name__}. "
                         f"Linear layers here: {_summarise(sorted(linears))}")
    return {n: m for n, m in linears.items() if _matches(n, targets)}


def lora_param_count(model: nn.Module, targets, r: int) -> int:
    """Trainable LoRA parameters of rank ``r`` on ``targets``: ``sum r * (d_in + d_out)`` (model unchanged)."""
    return sum(r * (m.in_features + m.out_features) for m in _target_linears(model, targets).values())


def max_rank(model: nn.Module, targets) -> int:
    """The largest rank every targeted layer admits: ``min(d_in, d_out)`` over the layers."""
    return min(min(m.in_features, m.out_features) for m in _target_linears(model, targets).values())


def rank_for_budget(model: nn.Module, targets, budget: int) -> int:
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

def study_profile(profile: Profile, **overrides) -> Profile:
    """The settings the notebook-05 studies run with, derived from ``profile``.

    About fifteen runs share one notebook, so each must be shorter than the
    profile's own run: ``smoke`` keeps its data size and halves the review length
    to 64 tokens (a LoRA run is then 63 steps of 16 reviews, about 25 s on 2 CPU
    cores); ``cpu`` halves the review length too (128). ``gpu`` keeps the full
    25,000 training and test reviews but trains one epoch at 256 tokens: fifteen
    two-epoch runs at 512 tokens would take many hours, beyond a Colab session.
    ``overrides`` change any field afterwards.
    """
    if profile.name == "smoke":
        # lr 1e-3 for LoRA and head: the rate notebook 05's committed run used (its rewrite on the
        # validation split, issue 12, will choose its own)
        profile = profile.replace(max_length=min(profile.max_length, 64), lr_lora=1e-3)
    elif profile.name == "cpu":
        profile = profile.replace(max_length=min(profile.max_length, 128))
    elif profile.name == "gpu":
        profile = profile.replace(max_length=min(profile.max_length, 256), epochs=1)
    return profile.replace(**overrides)


# ------------------------------------------------------------------ PiSSA-like init

@torch.no_grad()
def pissa_init_(layer: LoRALinear) -> LoRALinear:
    """Initialise ``layer`` from the top-r singular directions of its weight, in place (PiSSA-like).

    With ``W = U S V^T`` and the principal part ``P = U_r S_r V_r^T``:
    ``B = U_r sqrt(S_r) / sqrt(s)``, ``A = sqrt(S_r) V_r^T / sqrt(s)`` (``s`` the
    layer's scaling), so ``s * B A = P``, and the frozen weight becomes the
    residual ``W - P``. The layer's output is unchanged; training now starts on
    W's principal directions instead of on a zero update (Meng et al. 2024).

    The layer is marked (``layer.pissa = True``, also in its ``state_dict``):
    ``save_adapter`` records it and ``load_adapter`` makes the same residual from a
    fresh base model. A second call on the same layer is refused (it would take the
    residual's own top part out too).
    """
    if not isinstance(layer, LoRALinear):
        raise TypeError(f"pissa_init_ needs a LoRALinear, got {type(layer).__name__}")
    if layer.merged:
        raise RuntimeError("pissa_init_ on a merged layer: unmerge() it first")
    if layer.pissa:
        raise RuntimeError("this layer is already PiSSA-initialised: its base weight is the residual W - P, and a "
                           "second call would remove the residual's top part too. Start from a fresh layer")
    W = layer.base.weight
    U, S, Vh = torch.linalg.svd(W.detach().double().cpu(), full_matrices=False)  # float64 on CPU: exact, any device
    r, root_s = layer.r, math.sqrt(layer.scaling)
    root = S[:layer.r].sqrt()
    principal = (U[:, :r] * S[:r]) @ Vh[:r]
    layer.lora_B.copy_((U[:, :r] * root) / root_s)
    layer.lora_A.copy_((root[:, None] * Vh[:r]) / root_s)
    W.copy_(W.double().cpu() - principal)
    layer.pissa = True
    return layer


# ------------------------------------------------------------------ one variant

def lora_variant(targets, r: int, alpha: float | None = None, profile: Profile | None = None, rslora: bool = False,
                 init: str = "zero", lora_dropout: float | None = None, name: str | None = None) -> MethodSpec:
    """The ``MethodSpec`` of a LoRA variant; train it with ``runner.run(spec, data, profile, seed=...)``.

    ``targets``: module names (``TARGET_SETS[...]``); ``alpha`` and ``lora_dropout`` default
    to the profile's; ``rslora=True`` scales by ``alpha / sqrt(r)``; ``init="pissa"`` starts
    from ``pissa_init_`` (use ``lora_dropout=0`` with it: dropout on the branch that carries
    W's top directions would change the pretrained model at step 0).
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    alpha = (profile.lora_alpha if profile is not None else 16) if alpha is None else alpha
    dropout = (profile.lora_dropout if profile is not None else 0.1) if lora_dropout is None else lora_dropout
    return MethodSpec(name or f"{','.join(t.removesuffix('_lin') for t in targets)} r={r}", "lora",
                      targets=targets, r=r, lora_alpha=alpha, lora_dropout=dropout, rslora=rslora, init=init)


# ------------------------------------------------------------------ notebook 05's committed run (legacy path)
# Notebook 05 as committed was run with these helpers: a study tokenized without a validation split, LoRA and
# head at one rate, the test split scored after every run. They stay, unchanged, until notebook 05 is rebuilt on
# ``runner.run`` with validation-based choices (issue 12); new code should use ``lora_variant`` + ``runner.run``.

@dataclass
class StudyData:
    """Reviews tokenized once: training ids (re-batched per seed) and fixed test batches."""
    train_ids: list
    train_labels: list
    test_batches: list
    batch_size: int
    pad_id: int

    def train_batches(self, seed: int = 0) -> list:
        """The training batches in the order of ``seed`` (shuffled, dynamically padded)."""
        return make_batches(self.train_ids, self.train_labels, self.batch_size, self.pad_id, True, seed)

    @property
    def n_train(self) -> int:
        return len(self.train_ids)

    @property
    def n_test(self) -> int:
        return sum(len(b["labels"]) for b in self.test_batches)


def tokenize_once(profile: Profile, data, tokenizer) -> StudyData:
    """Encode ``data`` (``load_imdb``'s DatasetDict) at ``profile.max_length``, once for all runs."""
    test_ids = encode(data["test"]["text"], tokenizer, profile.max_length)
    return StudyData(train_ids=encode(data["train"]["text"], tokenizer, profile.max_length),
                     train_labels=list(data["train"]["label"]),
                     test_batches=make_batches(test_ids, data["test"]["label"], profile.eval_batch_size,
                                               tokenizer.pad_token_id),
                     batch_size=profile.batch_size, pad_id=tokenizer.pad_token_id)




@dataclass
class VariantResult:
    """What one LoRA run of the studies leaves behind."""
    name: str
    targets: tuple
    r: int
    lora_alpha: float
    scaling: float
    seed: int
    init: str
    rslora: bool
    lora_params: int            # lora_A + lora_B only
    trainable_params: int       # + the classification head
    accuracy: float
    test_loss: float
    losses: list = field(default_factory=list)
    steps: int = 0
    train_time_s: float = 0.0
    factors: dict = field(default_factory=dict, repr=False)          # lora_factors after training
    initial_factors: dict = field(default_factory=dict, repr=False)  # ... and before it

    def delta_weight(self, layer: str) -> torch.Tensor:
        """The trained update ``scaling * B A`` of one LoRA layer (float32, CPU)."""
        f = self.factors[layer]
        return f["scaling"] * f["B"] @ f["A"]

    def update_norm(self, initial: bool = False) -> float:
        """``sqrt(sum over layers ||scaling * B A||_F^2)``: the size of the whole trained update (or of the init's)."""
        factors = self.initial_factors if initial else self.factors
        return math.sqrt(sum(float((f["scaling"] * f["B"] @ f["A"]).square().sum()) for f in factors.values()))

    def line(self) -> str:
        """One compact line for a log."""
        return (f"{self.name:<16} r={self.r:<3} scale={self.scaling:<6.3g} LoRA params={self.lora_params:>9,}  "
                f"test acc={self.accuracy:.3f}  loss last10={sum(self.losses[-10:]) / max(1, len(self.losses[-10:])):.3f}"
                f"  ({self.steps} steps, {self.train_time_s:.0f} s)")


def train_lora_variant(profile: Profile, batches: StudyData, targets, r: int, alpha: float | None = None,
                       seed: int = 0, init: str = "zero", rslora: bool = False, name: str | None = None,
                       backbone=None, device=None, verbose: bool = True):
    """Train one LoRA variant from a fresh backbone; returns ``(model, VariantResult)``.

    ``targets``: module names (``TARGET_SETS[...]``); ``alpha`` defaults to the
    profile's ``lora_alpha`` (kept fixed across ranks, as in the paper);
    ``seed`` sets the head init, the LoRA init, the dropout masks and the data
    order; ``init="pissa"`` applies ``pissa_init_`` to every LoRA layer;
    ``rslora=True`` scales by ``alpha / sqrt(r)`` instead of ``alpha / r``.
    ``backbone`` is a ``load_backbone``-style callable (default: ``load_backbone``).
    """
    from .backbone import load_backbone

    if init not in ("zero", "pissa"):
        raise ValueError(f"init must be 'zero' (B = 0, the paper's) or 'pissa', got {init!r}")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    alpha = profile.lora_alpha if alpha is None else alpha
    name = name or f"{','.join(targets)} r={r}"
    device = get_device() if device is None else torch.device(device)
    set_seed(seed)
    model, _, _ = (backbone or load_backbone)(profile.backbone, seed=seed, verbose=False)
    apply_lora(model, targets, r=r, lora_alpha=alpha, lora_dropout=profile.lora_dropout, use_rslora=rslora)
    layers = lora_layers(model)
    if init == "pissa":
        for layer in layers.values():
            pissa_init_(layer)
    mark_only_lora_trainable(model, extra_trainable=profile.head_modules)
    initial = lora_factors(model)
    lora_params = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in layers.values())
    trainable = count_parameters(model).trainable
    set_seed(seed)  # the same dropout masks whatever happened before
    result = train(model, batches.train_batches(seed), None, lr=profile.lr_lora, epochs=profile.epochs,
                   warmup_ratio=profile.warmup_ratio, weight_decay=profile.weight_decay,
                   max_grad_norm=profile.max_grad_norm, device=device, desc=name)
    final = evaluate(model, batches.test_batches, device)
    out = VariantResult(name=name, targets=targets, r=r, lora_alpha=alpha, scaling=next(iter(layers.values())).scaling,
                        seed=seed, init=init, rslora=rslora, lora_params=lora_params, trainable_params=trainable,
                        accuracy=final["accuracy"], test_loss=final["loss"], losses=result.losses,
                        steps=result.steps, train_time_s=result.wall_time_s, factors=lora_factors(model),
                        initial_factors=initial)
    if verbose:
        print(out.line())
    return model, out
