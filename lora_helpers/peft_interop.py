"""Our LoRA adapters to and from Hugging Face PEFT's on-disk format.

PEFT (https://huggingface.co/docs/peft) saves a LoRA adapter as a folder with

* ``adapter_config.json`` - a ``LoraConfig``: ``r``, ``lora_alpha``,
  ``target_modules``, ``modules_to_save`` (here: the classifier head), ...;
* ``adapter_model.safetensors`` - the tensors, named after the module they
  belong to in the base model, behind the prefix ``base_model.model.``:

  - ``base_model.model.<layer>.lora_A.weight`` (r x d_in)  <->  our ``<layer>.lora_A``
  - ``base_model.model.<layer>.lora_B.weight`` (d_out x r) <->  our ``<layer>.lora_B``
  - ``base_model.model.<head>.weight`` / ``.bias``         <->  our ``<head>.weight`` / ``.bias``

  The adapter's name (``default``) is not in the keys: PEFT inserts it on
  loading (``lora_A.default.weight``, ``<head>.modules_to_save.default.weight``).

``export_to_peft`` writes that folder from a model wrapped with
``apply_lora`` so that ``PeftModel.from_pretrained(fresh_backbone, folder)``
computes the same logits; ``import_from_peft`` does the reverse, from a folder
or a live ``PeftModel``. Only plain LoRA on ``nn.Linear`` layers is converted:
anything else (DoRA, per-layer ranks, trained biases, ...) raises a
``ValueError`` that says what is supported.

Introduced in notebook 06 (``06_adapters_in_practice.ipynb``).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch
import torch
import torch.nn as nn

from .adapters import _problem, read_json_file, read_safetensors_file, tensor_problems
from .lora import _matches, _name_list, linear_names, lora_layers, mark_only_lora_trainable, wrap_layers
from .utils import check_bool, check_can_write, check_int, check_real, write_files_atomically

if TYPE_CHECKING:
    from peft import PeftModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"  # PEFT's older (pickle) format: removed when we write the safetensors
PREFIX = "base_model.model."
# PeftModelForSequenceClassification always adds these to modules_to_save
SEQ_CLS_HEADS = ("classifier", "score")

SUPPORTED = (
    "plain LoRA (peft_type 'LORA') on nn.Linear layers with one r and one lora_alpha for every layer, "
    "bias='none', fan_in_fan_out=False, no DoRA, optionally rsLoRA scaling and fully trained "
    "modules_to_save (e.g. the classifier head)"
)


# ------------------------------------------------------------------ export


def _peft_wrapped_modules(model: nn.Module, names: Iterable[str]) -> list[str]:
    """The modules PEFT wraps for ``modules_to_save=names``: its rule is a plain ``name.endswith(entry)``.

    (No dot boundary: PEFT's ``"classifier"`` also catches ``pre_classifier``.)
    """
    names = tuple(names)
    found = [n for n, _ in model.named_modules() if n and n.endswith(names)]
    # keep the outermost match only: a wrapped module's children travel with it
    return [n for n in found if not any(n.startswith(f"{m}.") for m in found)]


def _target_list(model: nn.Module, wrapped: list[str]) -> list[str]:
    """Short target names (``["q_lin", "v_lin"]``) when they select exactly the wrapped layers, else full names."""
    leaves = sorted({n.rpartition(".")[2] for n in wrapped})
    candidates = set(linear_names(model)) | set(wrapped)
    selected = {n for n in candidates if _matches(n, leaves)}
    return leaves if selected == set(wrapped) else sorted(wrapped)


def export_to_peft(
    model: nn.Module,
    path: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    head_modules: Iterable[str] = ("pre_classifier", "classifier"),
    task_type: str | None = "SEQ_CLS",
) -> Path:
    """Write ``model``'s LoRA adapter (and head) in PEFT's format into the folder ``path``.

    Args:
        model: a model wrapped with ``apply_lora`` (one ``r``/``lora_alpha`` for all layers).
        path: the folder to write ``adapter_config.json`` and ``adapter_model.safetensors`` to.
        base_model_name_or_path: recorded in the config (PEFT uses it only when it has to load
            the base model itself); default: the model's ``config.name_or_path``.
        head_modules: fully trained modules stored whole (PEFT's ``modules_to_save``).
        task_type: PEFT's task type; ``"SEQ_CLS"`` makes ``AutoPeftModel...`` pick a
            sequence classifier, ``None`` for a plain model.

    Returns the folder. Load it with ``PeftModel.from_pretrained(fresh_backbone, path)``.
    Everything is checked and serialised first, then both files are written atomically
    (temporary files renamed into place), so a failure leaves an older adapter in the
    folder as it was. A stale ``adapter_model.bin`` (PEFT's older format, which PEFT
    would otherwise find beside ours) is removed; other files are left alone.
    PiSSA-initialised layers are refused: their adapter fits only the residual base weight.
    """
    from peft import LoraConfig  # imported here: only this module needs PEFT

    path = Path(path)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRALinear layers: nothing to export (call apply_lora first)")
    pissa = sorted(n for n, m in layers.items() if m.pissa)
    if pissa:
        raise ValueError(
            f"{pissa[:3]} are PiSSA-initialised: their base weight is a residual, so a plain PEFT LoRA "
            "adapter would not reproduce the model on the original backbone. Keep it with save_adapter "
            "(which records the PiSSA init)"
        )
    settings = {(m.r, m.lora_alpha, m.use_rslora) for m in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"export_to_peft writes one (r, lora_alpha, use_rslora) for all layers, found {settings}")
    r, alpha, rslora = settings.pop()
    dropouts = {m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0 for m in layers.values()}
    dropout = max(dropouts)  # only matters for training; one value per config in PEFT

    head_modules = _name_list(head_modules, "head_modules")
    for h in head_modules:  # our own (dot-boundary) match must find each head module
        if not any(_matches(n, [h]) for n, _ in model.named_modules() if n):
            raise ValueError(
                f"head module {h!r} matches nothing in {type(model).__name__}; "
                f"top-level modules: {[n for n, _ in model.named_children()]}"
            )
    peft_heads = head_modules + ([h for h in SEQ_CLS_HEADS if h not in head_modules] if task_type == "SEQ_CLS" else [])
    saved_heads = _peft_wrapped_modules(model, peft_heads)
    clash = [
        n for n in saved_heads if n in layers or any(n.startswith(f"{w}.") or w.startswith(f"{n}.") for w in layers)
    ]
    if clash:
        raise ValueError(f"{clash} would be both a LoRA layer and a fully saved head module; PEFT forbids that")

    if base_model_name_or_path is None:
        cfg = getattr(model, "config", None)
        base_model_name_or_path = getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None) or None

    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach()
    for head in saved_heads:
        for key, t in model.get_submodule(head).state_dict().items():
            tensors[f"{PREFIX}{head}.{key}"] = t.detach()
    tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_rslora=rslora,
        target_modules=_target_list(model, sorted(layers)),
        bias="none",
        modules_to_save=head_modules or None,
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
    check_can_write(path, "folder")
    with tempfile.TemporaryDirectory() as tmp:  # PEFT writes its own JSON; we take the bytes
        config.save_pretrained(tmp)
        config_bytes = (Path(tmp) / CONFIG_NAME).read_bytes()
    weights = safetensors.torch.save(tensors, metadata={"format": "pt"})
    return write_files_atomically(
        path, {WEIGHTS_NAME: weights, CONFIG_NAME: config_bytes}, remove=(PICKLE_WEIGHTS_NAME,)
    )


# ------------------------------------------------------------------ import


def _config_dict(config) -> dict:
    """A PEFT config (object or dict) as a plain dict with string enums."""
    if not isinstance(config, dict):
        config = config.to_dict()
    return {k: (v.value if hasattr(v, "value") else v) for k, v in config.items()}


def _unsupported(config: dict) -> list[str]:
    """Every setting of a PEFT config that ``import_from_peft`` cannot reproduce with ``LoRALinear``."""
    problems = []
    if str(config.get("peft_type")).upper() != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}: only 'LORA' adapters are supported")
        return problems  # the other keys belong to another method
    if config.get("use_dora"):
        problems.append("use_dora=True: DoRA adds a learned magnitude vector per layer, which LoRALinear has not")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            problems.append(
                f"{key}={config[key]!r}: per-layer ranks/alphas are not supported "
                "(LoRALinear layers here share one r and one lora_alpha)"
            )
    if config.get("bias", "none") != "none":
        problems.append(
            f"bias={config['bias']!r}: the adapter trains biases of the base model; only 'none' is supported"
        )
    if config.get("lora_bias"):
        problems.append("lora_bias=True: lora_B has a bias, LoRALinear's has not")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out=True: weights stored transposed (GPT-2's Conv1D); only nn.Linear is supported")
    others = {
        "target_parameters": "LoRA on raw parameters",
        "trainable_token_indices": "trainable tokens",
        "layer_replication": "layer replication",
        "alora_invocation_tokens": "activated LoRA (aLoRA)",
        "use_qalora": "QA-LoRA",
        "use_bdlora": "block-diagonal LoRA",
        "arrow_config": "Arrow routing",
        "kasa_config": "KaSA",
        "velora_config": "VeLoRA",
        "monteclora_config": "MonteCLoRA",
    }
    for key, what in others.items():
        if config.get(key):
            problems.append(f"{key}={config[key]!r}: {what} is not supported")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().split("_")[0] in ("pissa", "olora", "corda", "loftq", "eva", "lora-ga"):
        problems.append(
            f"init_lora_weights={init!r}: this initialisation changes the base weights too, so the "
            "adapter only fits a modified base model"
        )
    return problems


def _check_targets(model: nn.Module, config: dict) -> list[str]:
    """Target names of the config that match no module of ``model`` (PEFT's matching rules)."""
    targets = config.get("target_modules")
    names = [n for n, _ in model.named_modules() if n]
    if targets is None or targets == "all-linear":
        return []
    if isinstance(targets, str):  # a regular expression on the full name
        return (
            []
            if any(re.fullmatch(targets, n) for n in names)
            else [f"target_modules={targets!r} (a regular expression) matches no module of {type(model).__name__}"]
        )
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    return (
        [
            f"target_modules {missing} match no module of {type(model).__name__} "
            f"(its Linear layers: {sorted({n.rpartition('.')[2] for n in linear_names(model)})})"
        ]
        if missing
        else []
    )


def read_peft_adapter(
    source: str | os.PathLike | PeftModel, adapter_name: str = "default"
) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config dict, tensors with PEFT's file keys)`` from a PEFT adapter folder or a live ``PeftModel``."""
    if hasattr(source, "peft_config"):  # a PeftModel in memory
        from peft import get_peft_model_state_dict

        if adapter_name not in source.peft_config:
            raise ValueError(f"the PeftModel has no adapter {adapter_name!r}; it has {sorted(source.peft_config)}")
        config = _config_dict(source.peft_config[adapter_name])
        if str(config.get("peft_type")).upper() != "LORA":
            return config, {}
        # save_embedding_layers=False: PEFT would otherwise look the base model up on the Hub
        tensors = get_peft_model_state_dict(source, adapter_name=adapter_name, save_embedding_layers=False)
        return config, {k: v.detach() for k, v in tensors.items()}
    path = Path(source)
    if path.is_file():
        hint = (
            f"pass the folder that holds it, {path.parent}"
            if path.name in (WEIGHTS_NAME, CONFIG_NAME, PICKLE_WEIGHTS_NAME)
            else "pass the folder written by PEFT's save_pretrained"
        )
        raise NotADirectoryError(
            f"{path} is a file; a PEFT adapter is a folder with {CONFIG_NAME} and {WEIGHTS_NAME}: {hint}"
        )
    if not (path / CONFIG_NAME).is_file():
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else "no such folder"
        raise FileNotFoundError(
            f"{path} is not a PEFT adapter folder: expected {CONFIG_NAME} and {WEIGHTS_NAME}, found {found}"
        )
    config = read_json_file(path / CONFIG_NAME, "PEFT adapter config")
    if not (path / WEIGHTS_NAME).is_file():
        if str(config.get("peft_type")).upper() != "LORA":
            return config, {}
        raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME} (only safetensors adapters are read)")
    return config, read_safetensors_file(path / WEIGHTS_NAME, "PEFT adapter's tensor file")


def _lora_numbers(config: dict) -> list[str]:
    """Problems with ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora`` of a LoRA config (missing or ill-typed)."""
    problems = [f"{key} is missing" for key in ("r", "lora_alpha") if key not in config]
    problems += [
        _problem(check_int, "r", config.get("r", 1), 1),
        _problem(check_real, "lora_alpha", config.get("lora_alpha", 1), 0, None, True),
        _problem(check_real, "lora_dropout", config.get("lora_dropout", 0.0), 0, 1, False, True),
        _problem(check_bool, "use_rslora", config.get("use_rslora", False)),
    ]
    return [p for p in problems if p]


def import_from_peft(
    model: nn.Module, source: str | os.PathLike | PeftModel, adapter_name: str = "default"
) -> nn.Module:
    """Load a PEFT LoRA adapter into ``model`` as ``LoRALinear`` layers (and its head); returns ``model``.

    Args:
        model: the plain base model (no LoRA yet), e.g. a fresh ``load_backbone(...)``.
        source: a folder written by PEFT's ``save_pretrained`` (or ``export_to_peft``), or a ``PeftModel``.
        adapter_name: which adapter of a ``PeftModel`` to take.

    The layers to wrap are read from the tensors (``<layer>.lora_A.weight``);
    ``r``, ``lora_alpha``, dropout and rsLoRA from the config. Saved
    ``modules_to_save`` (the head) are copied in. Afterwards only the LoRA
    factors and those modules are trainable, as in PEFT. Raises ``ValueError``
    for settings LoRALinear cannot reproduce (see ``SUPPORTED``) and for
    layers or tensors that do not fit the model, before changing anything.
    """
    config, tensors = read_peft_adapter(source, adapter_name)
    problems = _unsupported(config)
    if not problems:
        numbers = _lora_numbers(config)
        if numbers:
            where = f"{Path(source) / CONFIG_NAME}" if not hasattr(source, "peft_config") else "the PeftModel's config"
            raise ValueError(f"{where} is not a valid LoRA config: " + "; ".join(numbers))
    if problems:
        raise ValueError(
            "cannot import this PEFT adapter into LoRALinear:\n  - "
            + "\n  - ".join(problems)
            + f"\nSupported: {SUPPORTED}."
        )
    if lora_layers(model):
        raise ValueError(
            f"the model already has LoRA layers ({sorted(lora_layers(model))[:3]} ...): import into a plain base model"
        )
    r, alpha = int(config["r"]), config["lora_alpha"]
    problems = _check_targets(model, config)

    lora, heads, modules = {}, {}, dict(model.named_modules())
    state = model.state_dict()
    pattern = re.compile(r"(.+)\.(lora_A|lora_B)\.weight")
    saved = config.get("modules_to_save") or []
    saved = [saved] if isinstance(saved, str) else list(saved)
    for key, t in tensors.items():
        short = key.removeprefix(PREFIX)
        m = pattern.fullmatch(short)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = t
        elif ".lora_" in short:
            problems.append(f"{key}: a LoRA tensor of a kind LoRALinear has not (only lora_A/lora_B on nn.Linear)")
        elif not _matches(short.rpartition(".")[0], saved):
            problems.append(
                f"{key}: not a LoRA tensor, and its module is not in the config's modules_to_save {sorted(saved)} "
                "(an undeclared tensor would overwrite a base weight)"
            )
        elif short not in state:
            problems.append(f"{key}: its module is not in {type(model).__name__} (no parameter {short!r})")
        elif tuple(state[short].shape) != tuple(t.shape):
            problems.append(f"{key}: shape {tuple(t.shape)} in the adapter, {tuple(state[short].shape)} in the model")
        else:
            heads[short] = t
    problems += tensor_problems(tensors, {PREFIX + k: v for k, v in state.items()})
    if not lora:
        problems.append("the adapter holds no lora_A/lora_B tensors")
    absent = sorted(n for n in lora if n not in modules)
    if absent:
        problems.append(
            f"the adapter has LoRA weights for layers that do not exist in {type(model).__name__}: "
            f"{absent[:6]}{' ...' if len(absent) > 6 else ''}"
        )
    for name, parts in sorted(lora.items()):
        layer = modules.get(name)
        if layer is None:
            continue
        if not isinstance(layer, nn.Linear):
            problems.append(f"{name} is a {type(layer).__name__}; LoRALinear only wraps nn.Linear")
            continue
        want = {"lora_A": (r, layer.in_features), "lora_B": (layer.out_features, r)}
        for part, shape in want.items():
            got = parts.get(part)
            if got is None or tuple(got.shape) != shape:
                problems.append(
                    f"{name}.{part}: adapter has {'no tensor' if got is None else tuple(got.shape)}, "
                    f"r={r} on this layer needs {shape}"
                )
    if problems:
        raise ValueError("this PEFT adapter does not fit the model:\n  - " + "\n  - ".join(problems[:10]))

    wrap_layers(  # the exact layers the tensors name
        model,
        sorted(lora),
        r=r,
        lora_alpha=alpha,
        lora_dropout=float(config.get("lora_dropout", 0.0)),
        use_rslora=bool(config.get("use_rslora", False)),
    )
    with torch.no_grad():
        for name, parts in lora.items():
            layer = model.get_submodule(name)
            layer.lora_A.copy_(parts["lora_A"])
            layer.lora_B.copy_(parts["lora_B"])
        state = model.state_dict()
        for key, t in heads.items():
            state[key].copy_(t)
    head_modules = sorted({k.rpartition(".")[0] for k in heads})
    mark_only_lora_trainable(model, extra_trainable=head_modules)
    return model


__all__ = ["export_to_peft", "import_from_peft", "read_peft_adapter", "SUPPORTED"]
