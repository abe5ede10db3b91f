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
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .utils import check_int, check_real


class LoRALinear(nn.Module):
    """Wrap a frozen ``nn.Linear`` with a trainable rank-``r`` update ``scaling * B @ A``.

    Args:
        base: the pretrained layer; its weight and bias are frozen in place.
        r: rank of the update, an integer (also a NumPy integer) with 1 <= r <= min(d_in, d_out).
        lora_alpha: scale numerator, a finite number > 0; ``scaling = lora_alpha / r`` (or
            ``lora_alpha / sqrt(r)`` with ``use_rslora=True``, Kalajdzievski 2023).
        lora_dropout: dropout on the LoRA branch's input only, in [0, 1).

    State: besides ``lora_A``/``lora_B`` (and ``base.weight``/``base.bias``), the
    ``state_dict`` holds two flags, ``lora_merged`` (``base.weight`` holds
    ``W0 + scaling * B A``) and ``lora_pissa`` (``base.weight`` is the residual left by
    ``pissa_init_``), so that a state always says what its ``base.weight`` is.
    ``load_state_dict`` keeps ``W0`` exact:

    * a state with ``base.weight`` and its flags is taken as it is (a merged state stays
      merged, an unmerged one into a merged layer leaves it unmerged); the update is never
      added twice, and a later ``unmerge()`` subtracts the update that was added;
    * a state with only ``lora_A``/``lora_B`` (e.g. ``lora_state_dict``) loaded into a
      merged layer first takes the old update out of ``W0``, then merges the new one;
    * a state without the flags (saved before they existed) counts as unmerged, plain ``W0``.

    Meta device: a layer built under ``torch.device("meta")`` holds no memory; after
    ``to_empty(device=...)`` every tensor, ``lora_B`` included, is uninitialised memory
    (not zero). Load a complete ``state_dict`` next, or call ``reset_parameters()``
    (``A`` random, ``B`` zero) and load ``W0`` into ``base``.
    """

    def __init__(
        self, base: nn.Linear, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0, use_rslora: bool = False
    ):
        super().__init__()
        r, lora_alpha, lora_dropout = _check_lora_args(base, r, lora_alpha, lora_dropout)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, bool(use_rslora)
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, **factory))
        self.reset_parameters()
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False  # True while base.weight holds W0 + scaling * B A
        self.register_buffer("_w0", None, persistent=False)  # W0 while merged (see merge)
        self.pissa = False  # True after pissa_init_: base.weight is W0 minus its top-r part
        self._pending_load = None
        self.register_load_state_dict_post_hook(_finish_load)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's init: ``A`` random (``nn.Linear``'s Kaiming uniform), ``B`` zero, so that ``B A = 0``.

        ``W0`` is not touched: it is the pretrained weight (load it into ``base``).
        """
        # A random, B zero: the update B @ A is exactly zero at init, yet B's
        # gradient (which depends on A x) is not, so training can start.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init
        nn.init.zeros_(self.lora_B)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """The update this adapter adds to ``W0``: ``scaling * B @ A`` (d_out x d_in)."""
        return lora_update(self.lora_A, self.lora_B, self.scaling)

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer computes with, ``W0 + scaling * B A`` (merged or not)."""
        return self.base.weight if self.merged else self.base.weight + self.delta_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            if self.training and torch.is_grad_enabled():
                raise RuntimeError(
                    "this LoRALinear is merged: lora_A/lora_B would get no gradient. Call unmerge() (or "
                    "unmerge_lora(model)) before training, or use model.eval() / torch.no_grad() "
                    "for inference."
                )
            return self.base(x)  # W0 already holds W0 + scaling * B A
        # Two thin matmuls (x A^T, then B^T): never forms the d_out x d_in product.
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + update * self.scaling

    def merge_problem(self) -> str | None:
        """Why ``merge()`` would be refused (a non-finite update, an overflow, a computed base weight), or None."""
        if self.merged:
            return None
        W = self.base.weight
        if not isinstance(W, nn.Parameter):
            return (
                f"its base ({type(self.base).__name__}) computes its weight (e.g. NF4 codes), so W0 + scaling * B A "
                "cannot be stored in it: keep the adapter unmerged, or merge in full precision "
                "(layer.base = layer.base.dequantize(); layer.merge())"
            )
        if W.is_meta or self.lora_B.is_meta:  # no values yet (built under torch.device("meta")): nothing to check
            return None
        with torch.no_grad():
            delta = self.delta_weight()
            if not torch.isfinite(delta).all():
                return "its update scaling * B A has inf or nan entries (did training diverge?)"
            if not torch.isfinite(W + delta.to(W.dtype)).all():
                return f"W0 + scaling * B A overflows {W.dtype} (a very large update): merge in float32"
        return None

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (``W0 += scaling * B A``): zero added latency.

        Refused, with nothing changed, if the update is not finite or the sum overflows the
        weight's dtype. ``W0`` is kept aside while merged (a copy the size of the weight, not in
        the ``state_dict``), so that ``unmerge()`` gives it back bit for bit: in float16/bfloat16
        ``(W0 + BA) - BA`` is not ``W0``, and ``A``, ``B`` may change while merged.
        """
        if self.merged:
            return
        problem = self.merge_problem()
        if problem:
            raise ValueError(f"cannot merge this LoRALinear: {problem}. Nothing was changed")
        W = self.base.weight
        self._w0 = W.detach().clone()
        W += self.delta_weight().to(W.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Give the base weight back its ``W0``: the copy kept by ``merge()``, else ``W0 = W - scaling * B A``.

        The subtraction is used only for a merged state loaded from a file (no copy travels
        with it); it is exact up to rounding, and refused if the update is not finite.
        """
        if not self.merged:
            return
        W = self.base.weight
        if self._w0 is not None:
            W.copy_(self._w0)
        else:
            delta = self.delta_weight()
            if not torch.isfinite(delta).all():
                raise ValueError(
                    "cannot unmerge: the update scaling * B A has inf or nan entries, so W0 cannot be "
                    "recovered from the merged weight. Load lora_A and lora_B as they were when merged"
                )
            W -= delta.to(W.dtype)
        self._w0 = None
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, merged={self.merged}"
            + (", pissa=True" if self.pissa else "")
        )

    # -------------------------------------------------------------- state_dict
    # The two flags travel with the tensors, so that a state says what its base.weight holds.

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        device = self.lora_A.device if self.lora_A.device.type != "meta" else "cpu"
        for key, value in ((MERGED_KEY, self.merged), (PISSA_KEY, self.pissa)):
            destination[prefix + key] = torch.tensor(value, device=device)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        flags = {key: bool(state_dict[prefix + key]) for key in (MERGED_KEY, PISSA_KEY) if prefix + key in state_dict}
        has_w = prefix + "base.weight" in state_dict
        has_ab = [prefix + p in state_dict for p in ("lora_A", "lora_B")]
        name = prefix.rstrip(".") or "LoRALinear"
        if has_w and flags.get(MERGED_KEY) and not all(has_ab):
            error_msgs.append(
                f"{name}: the state holds a merged base.weight (W0 + scaling * B A) without its "
                "lora_A and lora_B, so the update in it cannot be taken out again; load a complete "
                "state_dict"
            )
            has_w = False  # handled below as if base.weight were absent: W0 stays as it is
        if not has_w and PISSA_KEY in flags and flags[PISSA_KEY] != self.pissa:
            error_msgs.append(
                f"{name}: the state's lora_A/lora_B were made for a base weight "
                f"{'with' if flags[PISSA_KEY] else 'without'} the PiSSA residual, this layer's is "
                f"{'' if self.pissa else 'not '}one; load a state that includes base.weight"
            )
        if has_w or any(has_ab) or MERGED_KEY in flags:
            wanted = flags.get(MERGED_KEY, self.merged)  # no flag in the state: the layer stays as it was
            if has_w:  # the incoming W0 holds the update exactly when the state says so (no flag: it does not)
                form = flags.get(MERGED_KEY, False)
            else:  # our own W0 stays: take the current update out of it before A and B change
                self.unmerge()
                form = False
            self._pending_load = (form, wanted, flags.get(PISSA_KEY, False) if has_w else self.pissa)
        own = {k: v for k, v in state_dict.items() if k not in (prefix + MERGED_KEY, prefix + PISSA_KEY)}
        super()._load_from_state_dict(own, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


MERGED_KEY, PISSA_KEY = "lora_merged", "lora_pissa"


def lora_update(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * B @ A``: the update of Eq. 3 from its factors (the one place it is computed)."""
    return (B @ A) * scaling


def _finish_load(layer: LoRALinear, incompatible_keys) -> None:
    """After ``load_state_dict`` filled the layer (and its ``base``): set the flags, merge or unmerge as asked."""
    if layer._pending_load is None:
        return
    form, wanted, pissa = layer._pending_load
    layer._pending_load = None
    layer._w0 = None  # a loaded base.weight replaced what the copy was of (else unmerge above used it)
    layer.merged, layer.pissa = form, pissa
    if wanted:
        layer.merge()
    else:
        layer.unmerge()


def _check_lora_args(base, r, lora_alpha, lora_dropout) -> tuple[int, float, float]:
    """Check the arguments of ``LoRALinear``; returns them as plain Python numbers (``int``, number, ``float``)."""
    if not isinstance(base, nn.Linear):
        raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
    max_r = min(base.in_features, base.out_features)
    where = f"at most min(in_features, out_features) for a {base.in_features}->{base.out_features} layer"
    r = check_int("r", r, 1, max_r, hint=where)  # NumPy integers are ranks too; bool and 2.0 are not
    check_real("lora_alpha", lora_alpha, 0, None, True, hint="scaling = lora_alpha / r")
    lora_dropout = check_real("lora_dropout", lora_dropout, 0, 1, False, True)
    alpha = int(lora_alpha) if isinstance(lora_alpha, numbers.Integral) else float(lora_alpha)
    return r, alpha, lora_dropout


def lora_parameters(shapes: Iterable[tuple[int, int]], r: int) -> int:
    """Trainable parameters of rank-``r`` LoRA on matrices of the given ``(d_in, d_out)`` shapes.

    ``A`` is ``r x d_in`` and ``B`` is ``d_out x r``: ``r (d_in + d_out)`` per matrix, against
    ``d_in d_out`` for the matrix itself (notebook 02). The one count every table uses.
    """
    r = check_int("r", r, 1)
    total = 0
    for d_in, d_out in shapes:
        total += r * (check_int("d_in", d_in, 1) + check_int("d_out", d_out, 1))
    return total


# ---------------------------------------------------------------- an init variant: PiSSA (notebook 05)


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
        raise RuntimeError(
            "this layer is already PiSSA-initialised: its base weight is the residual W - P, and a "
            "second call would remove the residual's top part too. Start from a fresh layer"
        )
    W = layer.base.weight
    if not isinstance(W, nn.Parameter):
        raise TypeError(
            f"pissa_init_ needs a base whose weight is stored ({type(layer.base).__name__} computes it, "
            "e.g. an NF4 base): dequantise the base first (layer.base = layer.base.dequantize())"
        )
    U, S, Vh = torch.linalg.svd(W.detach().double().cpu(), full_matrices=False)  # float64 on CPU: exact, any device
    r, root_s = layer.r, math.sqrt(layer.scaling)
    root = S[: layer.r].sqrt()
    principal = (U[:, :r] * S[:r]) @ Vh[:r]
    layer.lora_B.copy_((U[:, :r] * root) / root_s)
    layer.lora_A.copy_((root[:, None] * Vh[:r]) / root_s)
    W.copy_(W.double().cpu() - principal)
    layer.pissa = True
    return layer


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


def apply_lora(
    model: nn.Module,
    target_modules: str | Iterable[str],
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
) -> list[str]:
    """Replace every ``nn.Linear`` whose name ends with a target by a ``LoRALinear``, in place.

    ``target_modules`` is a name or a list of names matched on a dot boundary
    (``"q_lin"`` matches ``...attention.q_lin`` but not ``...attention.xq_lin``).
    Everything is checked before anything changes. Returns the wrapped names.

    A layer shared under several names (``model.b = model.a``, tied weights) is one
    layer: a target matching any of its names wraps it once, and the same
    ``LoRALinear`` is put under every name, so that no call bypasses it. It is listed
    under its first name (as ``named_modules()`` and ``lora_layers`` list it).
    """
    targets = _name_list(target_modules, "target_modules")
    if not targets:
        raise ValueError("target_modules is empty: name at least one nn.Linear, e.g. ['q_lin', 'v_lin']")
    linears = linear_names(model)
    modules = dict(model.named_modules())
    first_name = {id(m): n for n, m in modules.items()}
    every_name = list(model.named_modules(remove_duplicate=False))  # a shared module once per name
    wrapped = set(lora_layers(model))
    chosen = []
    for t in targets:
        hits = list(dict.fromkeys(first_name[id(m)] for n, m in every_name if n and _matches(n, [t])))
        if any(n in wrapped for n in hits):
            raise ValueError(
                f"target {t!r} is already LoRA-wrapped ({[n for n in hits if n in wrapped][:3]}); "
                "use a fresh model, or merge_and_unload(model) first"
            )
        lin_hits = [n for n in hits if n in linears]
        if not lin_hits:
            if hits:
                kinds = sorted({type(modules[n]).__name__ for n in hits})
                raise TypeError(
                    f"target {t!r} matches {kinds} modules, not nn.Linear; LoRALinear only "
                    f"wraps nn.Linear. Linear layers here: {_summarise(linears + sorted(wrapped))}"
                )
            raise ValueError(
                f"target {t!r} matches no nn.Linear in {type(model).__name__}. "
                f"Linear layers here: {_summarise(linears + sorted(wrapped))}"
            )
        chosen += [n for n in lin_hits if n not in chosen]
    return wrap_layers(model, chosen, r, lora_alpha, lora_dropout, use_rslora)


def wrap_layers(
    model: nn.Module,
    names: str | Iterable[str],
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
) -> list[str]:
    """Wrap the ``nn.Linear`` layers at exactly these qualified names (no suffix matching), all or none.

    ``apply_lora`` resolves its targets to names, then calls this; loading an adapter calls it
    with the names the adapter lists, so that ``"0"`` wraps ``0`` and never ``1.0``.
    """
    names = _name_list(names, "names")
    modules = dict(model.named_modules())
    for n in names:  # validate every layer before changing any
        if isinstance(modules.get(n), LoRALinear):
            raise ValueError(f"{n!r} is already LoRA-wrapped")
        if not isinstance(modules.get(n), nn.Linear):
            found = "nothing" if n not in modules else type(modules[n]).__name__
            raise ValueError(f"{n!r} is not an nn.Linear of {type(model).__name__} (found {found})")
        _check_lora_args(modules[n], r, lora_alpha, lora_dropout)
    every_name = list(model.named_modules(remove_duplicate=False))  # a shared module once per name
    for n in names:
        layer = LoRALinear(modules[n], r, lora_alpha, lora_dropout, use_rslora)
        for alias in [a for a, m in every_name if m is modules[n]]:
            _replace(model, alias, layer)
    return list(names)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _name_list(names, what: str) -> list[str]:
    """A module name or a list of names, as a list of str; anything else (None, a number) is a clear TypeError."""
    if isinstance(names, str):
        return [names]
    try:
        names = list(names)
    except TypeError:
        raise TypeError(
            f"{what} must be a module name or a list of names (e.g. ['q_lin', 'v_lin']), got {names!r}"
        ) from None
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"{what} must hold module names (str), got {bad[:3]!r}")
    return names


def _summarise(names: list[str], limit: int = 12) -> str:
    """The distinct last parts of the names (what a target usually is), then a few full names."""
    leaves = sorted({n.rpartition(".")[2] for n in names})
    return f"leaf names {leaves}; e.g. {names[:limit]}" + (" ..." if len(names) > limit else "")


def freeze_all_except(model: nn.Module, module_names: Iterable[str] = ()) -> list[str]:
    """Freeze every parameter, then unfreeze the modules whose names end with one of ``module_names``.

    Returns the names of the modules left trainable. An entry that matches no
    module raises (a silently frozen classifier head trains nothing).
    """
    module_names = _name_list(module_names, "module_names")
    found = []
    for t in module_names:  # resolve every name before freezing anything
        hits = [(n, m) for n, m in model.named_modules() if n and _matches(n, [t])]
        if not hits:
            top = [n for n, _ in model.named_children()]
            raise ValueError(
                f"no module named {t!r} in {type(model).__name__}; top-level modules: {top}, "
                f"Linear layers: {_summarise(linear_names(model))}"
            )
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
    for t in _name_list(extra_trainable, "extra_trainable"):
        for name, module in model.named_modules():
            if (
                name
                and _matches(name, [t])
                and (isinstance(module, LoRALinear) or any(name.startswith(f"{n}.") for n in layers))
            ):
                raise ValueError(
                    f"extra_trainable {t!r} is the LoRA layer {name} (or inside one): training it fully would "
                    "unfreeze its W0. List only the modules to train fully, e.g. the new head"
                )
    freeze_all_except(model, extra_trainable)
    for layer in layers.values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)


def _check_mergeable(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA layer of ``model``, once each layer has been checked: one that cannot merge stops all."""
    layers = lora_layers(model)
    problems = [f"{name}: {p}" for name, layer in layers.items() if (p := layer.merge_problem())]
    if problems:
        raise ValueError("cannot merge, nothing was changed:\n  - " + "\n  - ".join(problems[:10]))
    return layers


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA layer (``W0 += scaling * B A``); returns how many. Merging twice is a no-op.

    Every layer is checked first (``LoRALinear.merge_problem``): if one cannot merge, none is.
    """
    layers = _check_mergeable(model).values()
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
    """Merge, then put the plain ``nn.Linear`` back in each LoRA layer's place: same outputs, no LoRA.

    Every layer is checked before any is merged. The layers' copies of ``W0`` are dropped.
    """
    for layer in _check_mergeable(model).values():
        layer.merge()
        layer._w0 = None
    for name, layer in [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, LoRALinear)]:
        _replace(model, name, layer.base)  # every name of a shared layer
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
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable: {self.percent:.2f}%"


def count_parameters(model: nn.Module) -> ParamCount:
    """Count trainable and total parameters (``parameters()`` yields a shared tensor once)."""
    params = list(model.parameters())
    return ParamCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
