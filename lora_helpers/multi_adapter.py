"""Many adapters in one batch: each row of a batch runs through its own adapter, one forward pass.

Merging (notebook 06, section 1) makes a model serve *one* task at full speed; the paper names
the cost in Section 4.2: "it is not straightforward to batch inputs to different tasks with
different A and B in a single forward pass" once they are merged. Left unmerged, they can be:
the frozen ``W0 x`` is shared by every row, and only the thin update differs,

    h_i = W0 x_i + b + s_k B_k A_k x_i        with k = index[i], the adapter of row i

which is a gather of each row's ``A_k``, ``B_k`` and two batched matrix products. This is how
multi-adapter servers work (S-LoRA, Punica, vLLM's multi-LoRA), with fused kernels instead of
``torch.bmm``; PEFT does the same with ``model(..., adapter_names=[...])``.

* ``MultiLoRALinear`` - one frozen base layer and n adapters' factors (ranks may differ: the
  smaller ones are padded with zeros, which adds nothing; each ``B`` holds its own ``alpha / r``);
* ``MultiLinear`` - n full copies of a small layer (a task's own classification head);
* ``mixed_adapter_model(model, adapters, head_modules)`` - a copy of a LoRA-wrapped model in
  which every ``LoRALinear`` and head module serves all the saved ``adapters`` at once;
* ``set_adapter_rows(model, index)`` - which adapter each row of the next batch uses (``-1``:
  the base model alone, for a LoRA layer; a head has no base, so it needs an adapter).

Introduced in notebook 06 (``06_adapters_in_practice.ipynb``), section 4.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from .adapters import read_adapter
from .lora import lora_layers


def _rows(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """``x`` as (batch, tokens, features) (a classifier head sees (batch, features)), once an index fits it."""
    if index is None:
        raise RuntimeError("no adapter chosen for the rows: call set_adapter_rows(model, index) first")
    if index.shape[0] != x.shape[0]:
        raise ValueError(
            f"set_adapter_rows gave {index.shape[0]} adapter indices for a batch of {x.shape[0]} rows: give one per row"
        )
    return x.reshape(x.shape[0], -1, x.shape[-1])


class MultiLoRALinear(nn.Module):
    """A frozen ``base`` layer with ``n`` LoRA adapters; row i of the batch uses adapter ``index[i]``.

    ``A``: (n, r, d_in); ``B``: (n, d_out, r), each already multiplied by its adapter's
    ``alpha / r``. Call ``set_adapter_rows`` before each forward pass.
    """

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        n, r, d_in = A.shape
        if B.shape != (n, base.out_features, r) or d_in != base.in_features:
            raise ValueError(
                f"A {tuple(A.shape)} and B {tuple(B.shape)} do not fit a base layer "
                f"{base.in_features} -> {base.out_features}: need (n, r, d_in) and (n, d_out, r)"
            )
        self.base = base
        self.register_buffer("A", A)
        self.register_buffer("B", B)
        self.index: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x, self.index)  # (batch, tokens, d_in)
        h = self.base(x)
        k = self.index.clamp(min=0)  # (batch,)
        xa = torch.bmm(rows, self.A[k].transpose(1, 2))  # (batch, tokens, r)
        delta = torch.bmm(xa, self.B[k].transpose(1, 2))  # (batch, tokens, d_out)
        delta = delta * (self.index >= 0).to(delta.dtype)[:, None, None]  # -1: no adapter
        return h + delta.reshape(h.shape)

    def extra_repr(self) -> str:
        n, r, d_in = self.A.shape
        return f"adapters={n}, r={r}, in_features={d_in}, out_features={self.B.shape[1]}"


class MultiLinear(nn.Module):
    """``n`` versions of one ``Linear`` (a task's own head); row i uses version ``index[i]``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)  # (n, d_out, d_in)
        self.register_buffer("bias", bias)  # (n, d_out)
        self.index: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x, self.index)
        if (self.index < 0).any():
            raise ValueError("every row needs an adapter here: a task's own head has no base version to fall back on")
        out = torch.bmm(rows, self.weight[self.index].transpose(1, 2)) + self.bias[self.index][:, None, :]
        return out.reshape(*x.shape[:-1], self.weight.shape[1])

    def extra_repr(self) -> str:
        n, d_out, d_in = self.weight.shape
        return f"adapters={n}, in_features={d_in}, out_features={d_out}"


def mixed_adapter_model(
    model: nn.Module, adapters: Mapping[str, str | Path], head_modules: Iterable[str] = ()
) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` serving every adapter in ``adapters`` (name -> folder written by ``save_adapter``).

    ``model`` must carry ``LoRALinear`` layers on the adapters' layers (``apply_lora``, as for
    ``load_adapter``); their ``W0`` is shared and their own ``A``, ``B`` are not used. Each
    ``head_modules`` entry (a ``Linear`` saved with every adapter) becomes a ``MultiLinear``.
    Returns the new model (``model`` itself is not changed) and the adapter names in index order.
    """
    if not adapters:
        raise ValueError("no adapters given: pass {name: folder} for at least one adapter")
    names = list(adapters)
    saved = {name: read_adapter(path) for name, path in adapters.items()}
    layers = lora_layers(model)
    for name, (config, _) in saved.items():
        if config["pissa_layers"]:
            raise ValueError(
                f"adapter {name!r} is PiSSA-initialised: its layers use a residual W0 of their own, "
                "so it cannot share the base with other adapters"
            )
        missing = sorted(set(config["target_modules"]) - set(layers))
        if missing:
            raise ValueError(
                f"adapter {name!r} has LoRA layers the model lacks: {missing[:3]}; wrap the model "
                "with apply_lora on the same target modules first"
            )
    merged = sorted(name for name, layer in layers.items() if layer.merged)
    if merged:
        raise ValueError(
            f"{merged[:3]} are merged: their base holds W0 plus an update, which every row would get. "
            "Call unmerge_lora(model) first"
        )
    out = copy.deepcopy(model)
    for layer_name, layer in lora_layers(out).items():
        r = max(int(saved[n][0]["r"]) for n in names)
        device, dtype = layer.base.weight.device, layer.base.weight.dtype
        A = torch.zeros(len(names), r, layer.in_features, device=device, dtype=dtype)
        B = torch.zeros(len(names), layer.out_features, r, device=device, dtype=dtype)
        for i, n in enumerate(names):
            config, tensors = saved[n]
            if f"{layer_name}.lora_A" not in tensors:
                continue  # this adapter leaves the layer alone: zeros
            a, b = tensors[f"{layer_name}.lora_A"], tensors[f"{layer_name}.lora_B"]
            r_n, alpha = int(config["r"]), float(config["lora_alpha"])
            scaling = alpha / (math.sqrt(r_n) if config["use_rslora"] else r_n)  # as LoRALinear computes it
            A[i, : a.shape[0]] = a.to(device, dtype)
            B[i, :, : b.shape[1]] = scaling * b.to(device, dtype)
        _replace(out, layer_name, MultiLoRALinear(layer.base, A, B))
    for head in head_modules:
        module = out.get_submodule(head)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"head module {head!r} is a {type(module).__name__}; only nn.Linear heads are supported")
        weights, biases = [], []
        for n in names:
            tensors = saved[n][1]
            if f"{head}.weight" not in tensors:
                raise ValueError(f"adapter {n!r} has no {head!r}: save it with save_adapter(..., extra={head!r})")
            weights.append(tensors[f"{head}.weight"])
            biases.append(tensors.get(f"{head}.bias", torch.zeros(module.out_features)))
        device, dtype = module.weight.device, module.weight.dtype
        _replace(out, head, MultiLinear(torch.stack(weights).to(device, dtype), torch.stack(biases).to(device, dtype)))
    return out, names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def set_adapter_rows(model: nn.Module, index: Sequence[int] | torch.Tensor) -> None:
    """Row ``i`` of the next batch goes through adapter ``index[i]`` (positions in ``mixed_adapter_model``'s names)."""
    multi = [m for m in model.modules() if isinstance(m, (MultiLoRALinear, MultiLinear))]
    if not multi:
        raise ValueError("the model has no multi-adapter layers: build it with mixed_adapter_model first")
    n = multi[0].A.shape[0] if isinstance(multi[0], MultiLoRALinear) else multi[0].weight.shape[0]
    index = torch.as_tensor(index, dtype=torch.long)
    if index.dim() != 1 or index.numel() == 0 or int(index.max()) >= n or int(index.min()) < -1:
        raise ValueError(f"index must list one adapter per row, each in -1..{n - 1}; got {index.tolist()}")
    for m in multi:
        m.index = index.to(m.A.device if isinstance(m, MultiLoRALinear) else m.weight.device)


__all__ = ["MultiLoRALinear", "MultiLinear", "mixed_adapter_model", "set_adapter_rows"]
