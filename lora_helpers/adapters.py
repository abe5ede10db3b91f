"""Save and load LoRA adapters: a few hundred KB instead of a whole model.

An adapter on disk is a folder with two files:

* ``lora_adapter.safetensors`` - the ``lora_A`` / ``lora_B`` tensors (and the
  weights of any fully trained extra modules, such as a classifier head);
* ``lora_adapter.json`` - what is needed to rebuild the LoRA layers: ``r``,
  ``lora_alpha``, dropout, the wrapped layer names, the extra modules and the
  base model's name.

Introduced in notebook 02 (``02_lora_linear_from_scratch.ipynb``); notebook 06
converts these adapters to and from PEFT's format.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .lora import LoRALinear, _matches, apply_lora, lora_layers

WEIGHTS_NAME = "lora_adapter.safetensors"
CONFIG_NAME = "lora_adapter.json"
FORMAT = "lora_helpers-adapter/1"


def _extra_module_names(model: nn.Module, extra: Iterable[str]) -> list[str]:
    extra = [extra] if isinstance(extra, str) else list(extra)
    names = []
    for t in extra:
        hits = [n for n, _ in model.named_modules() if n and _matches(n, [t])]
        if not hits:
            raise ValueError(f"extra module {t!r} matches nothing in {type(model).__name__}; "
                             f"top-level modules: {[n for n, _ in model.named_children()]}")
        names += hits
    return names


def lora_state_dict(model: nn.Module, extra: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The adapter's tensors: every ``lora_A``/``lora_B`` plus the full state of the ``extra`` modules."""
    prefixes = tuple(f"{n}." for n in _extra_module_names(model, extra))
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if k.endswith((".lora_A", ".lora_B")) or k.startswith(prefixes)}


def save_adapter(model: nn.Module, path, extra: Iterable[str] = (), base_model: str | None = None) -> Path:
    """Write the adapter (tensors + JSON config) into the folder ``path``; returns the folder."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRALinear layers: nothing to save (call apply_lora first)")
    settings = {(m.r, m.lora_alpha, _dropout_p(m), m.use_rslora) for m in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"save_adapter stores one (r, lora_alpha, dropout, rslora) per model, found {settings}")
    r, alpha, dropout, rslora = settings.pop()
    if base_model is None:
        base_model = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    config = {"format": FORMAT, "base_model": base_model, "r": r, "lora_alpha": alpha,
              "lora_dropout": dropout, "use_rslora": rslora, "target_modules": sorted(layers),
              "extra_modules": _extra_module_names(model, extra)}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(model, extra), str(path / WEIGHTS_NAME))
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return path


def _dropout_p(layer: LoRALinear) -> float:
    return layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a saved adapter, with a clear error if the folder is not one."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else "no such folder"
        raise FileNotFoundError(f"{path} is not a lora_helpers adapter: expected {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME} (written by save_adapter), found {found}")
    config = json.loads((path / CONFIG_NAME).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_NAME} has format {config.get('format')!r}, expected {FORMAT!r}")
    return config, load_file(str(path / WEIGHTS_NAME))


def _misfits(model: nn.Module, config: dict, tensors: dict) -> list[str]:
    """Every way the adapter does not fit the model, checked before anything changes."""
    modules, problems = dict(model.named_modules()), []
    wrapped = set(lora_layers(model))
    if wrapped and wrapped != set(config["target_modules"]):
        problems.append(f"the model already has LoRA on {sorted(wrapped - set(config['target_modules']))[:4]} "
                        f"which the adapter does not, or lacks {sorted(set(config['target_modules']) - wrapped)[:4]}")
    for name in config["target_modules"]:
        layer = modules.get(name)
        base = layer.base if isinstance(layer, LoRALinear) else layer
        if not isinstance(base, nn.Linear):
            problems.append(f"{name}: the adapter targets it, but the model has "
                            f"{'no such layer' if layer is None else type(layer).__name__}")
            continue
        if isinstance(layer, LoRALinear):
            if layer.merged:
                problems.append(f"{name} is merged: unmerge_lora(model) before loading another adapter")
            # an already-wrapped layer keeps its own r and scaling: they must be the adapter's
            ours = (layer.r, layer.lora_alpha, layer.use_rslora)
            theirs = (config["r"], config["lora_alpha"], config.get("use_rslora", False))
            if ours != theirs:
                problems.append(f"{name} is wrapped with (r, lora_alpha, use_rslora) = {ours}, the adapter has "
                                f"{theirs}: load into a model without LoRA (apply_lora is then done for you)")
        expected = {"lora_A": (config["r"], base.in_features), "lora_B": (base.out_features, config["r"])}
        for part, shape in expected.items():
            t = tensors.get(f"{name}.{part}")
            got = None if t is None else tuple(t.shape)
            if got != shape:
                problems.append(f"{name}.{part}: adapter has " + ("no such tensor" if t is None else f"shape {got}")
                                + f", this model needs {shape}")
    state = model.state_dict()
    for key, t in tensors.items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        if key not in state:
            problems.append(f"{key}: in the adapter, not in the model")
        elif tuple(state[key].shape) != tuple(t.shape):
            problems.append(f"{key}: adapter has shape {tuple(t.shape)}, the model {tuple(state[key].shape)}")
    return problems


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Put a saved adapter into ``model``: wrap the layers it targets (if not yet), then load its tensors.

    Raises ``ValueError`` naming each layer or tensor that does not fit, before
    changing anything.
    """
    config, tensors = read_adapter(path)
    problems = _misfits(model, config, tensors)
    if problems:
        raise ValueError(f"the adapter at {path} (base model {config['base_model']!r}, r={config['r']}) does not "
                         f"fit this {type(model).__name__}:\n  - " + "\n  - ".join(problems[:10]))
    own = getattr(getattr(model, "config", None), "_name_or_path", None)
    if own and own != config["base_model"]:
        warnings.warn(f"adapter was trained on {config['base_model']!r}, loading into {own!r}", stacklevel=2)
    if not lora_layers(model):
        apply_lora(model, config["target_modules"], config["r"], config["lora_alpha"],
                   config["lora_dropout"], config["use_rslora"])
    with torch.no_grad():
        state = model.state_dict()
        for key, t in tensors.items():
            state[key].copy_(t)
    return model
