"""Save and load LoRA adapters: a few hundred KB instead of a whole model.

An adapter on disk is a folder with two files:

* ``lora_adapter.safetensors`` - the ``lora_A`` / ``lora_B`` tensors (and the
  weights of any fully trained extra modules, such as a classifier head);
* ``lora_adapter.json`` - what is needed to rebuild the LoRA layers: ``r``,
  ``lora_alpha``, dropout, the wrapped layer names, the extra modules and the
  base model's name.

The config records the SHA-256 of the tensor file (``tensors_sha256``), so that the
two files are one unit: a reader never pairs new tensors with an old config (a save
interrupted between its two renames, or one running in another process) without
noticing; it reads again, and refuses if they still do not belong together.

Introduced in notebook 03 (``03_lora_distilbert_imdb.ipynb``); notebook 06
converts these adapters to and from PEFT's format.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
from safetensors import SafetensorError

from .lora import MERGED_KEY, PISSA_KEY, LoRALinear, _matches, _name_list, lora_layers, pissa_init_, wrap_layers
from .utils import ArgumentError, check_bool, check_can_write, check_int, check_real, write_files_atomically

WEIGHTS_NAME = "lora_adapter.safetensors"
CONFIG_NAME = "lora_adapter.json"
FORMAT = "lora_helpers-adapter/1"


def _extra_module_names(model: nn.Module, extra: Iterable[str]) -> list[str]:
    extra = _name_list(extra, "extra")
    names = []
    for t in extra:
        hits = [n for n, _ in model.named_modules() if n and _matches(n, [t])]
        if not hits:
            raise ValueError(
                f"extra module {t!r} matches nothing in {type(model).__name__}; "
                f"top-level modules: {[n for n, _ in model.named_children()]}"
            )
        names += hits
    return names


def lora_state_dict(model: nn.Module, extra: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The adapter's tensors: every ``lora_A``/``lora_B`` plus the full state of the ``extra`` modules.

    A layer shared under several names is stored once, under its first name.
    """
    layers = lora_layers(model)
    prefixes = tuple(f"{n}." for n in _extra_module_names(model, extra))
    return {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if (k.endswith((".lora_A", ".lora_B")) and k.rpartition(".")[0] in layers)
        or (k.startswith(prefixes) and not k.endswith((f".{MERGED_KEY}", f".{PISSA_KEY}")))
    }


def save_adapter(
    model: nn.Module, path: str | os.PathLike, extra: Iterable[str] = (), base_model: str | None = None
) -> Path:
    """Write the adapter (tensors + JSON config) into the folder ``path``; returns the folder.

    Everything is checked and serialised before anything is written; both files are
    then written as temporary files in the folder and renamed over the old ones, so a
    failure leaves an adapter already in the folder as it was. The tensor file carries
    SHA-256 in the config, so a crash between the two renames cannot pair new tensors
    with an old config unnoticed. Temporary files left by a writer that was killed are
    removed by the next save. Other files in the folder are left alone.

    ``base_model``: the name recorded in the config (a ``str``, or a path, stored as
    text); default: the model's ``config._name_or_path``, else its class name.
    Layers initialised with ``lora.pissa_init_`` (their ``W0`` replaced by a
    residual) are listed in the config as ``pissa_layers``; ``load_adapter`` makes the
    same residual from the fresh base model, so the loaded model is the trained one.
    """
    path = Path(path)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRALinear layers: nothing to save (call apply_lora first)")
    settings = {(m.r, m.lora_alpha, _dropout_p(m), m.use_rslora) for m in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"save_adapter stores one (r, lora_alpha, dropout, rslora) per model, found {settings}")
    r, alpha, dropout, rslora = settings.pop()
    if base_model is None:
        base_model = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    if isinstance(base_model, os.PathLike):
        base_model = os.fspath(base_model)
    if not isinstance(base_model, str):
        raise TypeError(
            f"base_model must be a str (the base model's name or folder), got "
            f"{type(base_model).__name__} {base_model!r}"
        )
    config = {
        "format": FORMAT,
        "base_model": base_model,
        "r": int(r),
        "lora_alpha": _plain_number(alpha),
        "lora_dropout": float(dropout),
        "use_rslora": bool(rslora),
        "target_modules": sorted(layers),
        "extra_modules": _extra_module_names(model, extra),
    }
    pissa = sorted(n for n, m in layers.items() if m.pissa)
    if pissa:
        config["pissa_layers"] = pissa
    check_can_write(path, "folder")
    tensors = lora_state_dict(model, extra)
    problems = tensor_problems(tensors, model.state_dict())
    if problems:
        raise ValueError("nothing was saved: " + "; ".join(problems[:5]))
    weights = safetensors.torch.save(tensors)
    config["tensors_sha256"] = hashlib.sha256(weights).hexdigest()  # ties this config to these tensors
    text = json.dumps(config, indent=2, allow_nan=False) + "\n"  # both serialised before either is written
    # the config is renamed into place first: a crash before the tensors follow leaves a hash that does not match
    # them (detected on load), also over a folder written before configs carried the hash
    write_files_atomically(path, {CONFIG_NAME: text.encode(), WEIGHTS_NAME: weights})
    return path


def _plain_number(x):
    return int(x) if isinstance(x, numbers.Integral) else float(x)


def _dropout_p(layer: LoRALinear) -> float:
    return layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0


def _read_bytes(file: Path) -> bytes:
    """The bytes of ``file`` (read as bytes: any file name works); an unreadable file is a ``ValueError``."""
    try:
        return file.read_bytes()
    except OSError as err:
        raise ValueError(f"{file} cannot be read ({err.strerror})") from None


def read_json_file(file: Path, what: str) -> dict:
    """A JSON object from ``file``; a damaged, non-UTF-8, absurdly nested or non-object file is a ``ValueError``."""
    try:
        config = json.loads(_read_bytes(file))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{file} is not valid JSON ({err.msg}, line {err.lineno} column {err.colno}): the {what} "
            "is damaged or incomplete; write it again"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not a text (UTF-8) file: the {what} is damaged; write it again") from None
    except RecursionError:
        raise ValueError(f"{file} is nested too deeply to be a {what}: it was not written by this library") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object ({{...}}), it holds a {type(config).__name__}")
    return config


def read_safetensors_file(file: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of ``file``; a damaged or truncated file is a ``ValueError`` naming it."""
    return parse_safetensors(_read_bytes(file), file, what)


def parse_safetensors(data: bytes, file: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors in ``data``, the bytes of ``file`` (read as bytes: any file name works)."""
    try:
        return safetensors.torch.load(data)
    except SafetensorError as err:
        raise ValueError(
            f"{file} cannot be read as safetensors ({err}): the {what} is damaged or incomplete "
            "(an interrupted copy?); write it again"
        ) from None


def _problem(check, *args) -> str | None:
    """The message of ``check(*args)`` (a ``utils.check_*``) if it refuses, else None: to collect every problem."""
    try:
        check(*args)
    except ArgumentError as err:
        return str(err)
    return None


def _config_problems(config: dict) -> list[str]:
    """Every missing or ill-typed entry of an adapter config (after the format check)."""
    problems = []
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if missing:
        problems.append(f"missing {missing}")
    problems += [
        _problem(check_int, "r", config.get("r", 1), 1),
        _problem(check_real, "lora_alpha", config.get("lora_alpha", 1), 0, None, True),
        _problem(check_real, "lora_dropout", config.get("lora_dropout", 0.0), 0, 1, False, True),
        _problem(check_bool, "use_rslora", config.get("use_rslora", False)),
    ]
    problems = [p for p in problems if p]
    for key in ("target_modules", "extra_modules", "pissa_layers"):
        names = config.get(key, ["x"] if key == "target_modules" else [])
        if (
            not isinstance(names, list)
            or not all(isinstance(n, str) for n in names)
            or (key == "target_modules" and not names)
        ):
            problems.append(
                f"{key} must be a{' non-empty' if key == 'target_modules' else ''} list of layer names, got {names!r}"
            )
    if not problems and not set(config.get("pissa_layers", [])) <= set(config["target_modules"]):
        problems.append("pissa_layers must be among target_modules")
    digest = config.get("tensors_sha256")
    if digest is not None and not isinstance(digest, str):
        problems.append(f"tensors_sha256 must be text (the tensor file's SHA-256), got {digest!r}")
    base = config.get("base_model")
    if base is not None and not isinstance(base, str):
        problems.append(f"base_model must be a name (text), got {base!r}")
    return problems


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a saved adapter, with a clear error if the folder is not one.

    The config is checked (every key present and of the right type) and completed with
    the defaults of optional keys; a damaged file is an error that names it.
    """
    path = Path(path)
    if path.is_file():
        hint = (
            f"pass the folder that holds it, {path.parent}"
            if path.name in (WEIGHTS_NAME, CONFIG_NAME)
            else "pass the folder written by save_adapter"
        )
        raise NotADirectoryError(
            f"{path} is a file; an adapter is a folder with {CONFIG_NAME} and {WEIGHTS_NAME}: {hint}"
        )
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else "no such folder"
        raise FileNotFoundError(
            f"{path} is not a lora_helpers adapter: expected {CONFIG_NAME} and "
            f"{WEIGHTS_NAME} (written by save_adapter), found {found}"
        )
    for attempt in range(_READ_ATTEMPTS):  # a save running elsewhere renames its two files a moment apart
        config = read_json_file(path / CONFIG_NAME, "adapter config")
        data = _read_bytes(path / WEIGHTS_NAME)
        wanted = config.get("tensors_sha256")
        if wanted is None or hashlib.sha256(data).hexdigest() == wanted:
            break
        time.sleep(0.01 * (attempt + 1))
    else:
        parse_safetensors(data, path / WEIGHTS_NAME, "adapter's tensor file")  # damaged: say so first
        raise ValueError(
            f"{path / WEIGHTS_NAME} is not the tensor file {path / CONFIG_NAME} was saved with (its SHA-256 "
            "differs): a save was interrupted between its two files, or the files were mixed by hand. "
            "Save the adapter again"
        )
    if config.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_NAME} has format {config.get('format')!r}, expected {FORMAT!r}")
    problems = _config_problems(config)
    if problems:
        raise ValueError(
            f"{path / CONFIG_NAME} is not a valid adapter config: "
            + "; ".join(problems)
            + ". Save the adapter again with save_adapter"
        )
    config = {
        "base_model": None,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "extra_modules": [],
        "pissa_layers": [],
        **config,
    }
    return config, parse_safetensors(data, path / WEIGHTS_NAME, "adapter's tensor file")


_READ_ATTEMPTS = 20


def _misfits(model: nn.Module, config: dict, tensors: dict) -> list[str]:
    """Every way the adapter does not fit the model, checked before anything changes."""
    modules, problems = dict(model.named_modules()), []
    wrapped = set(lora_layers(model))
    if wrapped and wrapped != set(config["target_modules"]):
        problems.append(
            f"the model already has LoRA on {sorted(wrapped - set(config['target_modules']))[:4]} "
            f"which the adapter does not, or lacks {sorted(set(config['target_modules']) - wrapped)[:4]}"
        )
    for name in config["target_modules"]:
        layer = modules.get(name)
        base = layer.base if isinstance(layer, LoRALinear) else layer
        if not isinstance(base, nn.Linear):
            problems.append(
                f"{name}: the adapter targets it, but the model has "
                f"{'no such layer' if layer is None else type(layer).__name__}"
            )
            continue
        if isinstance(layer, LoRALinear):
            if layer.pissa and name not in config["pissa_layers"]:
                problems.append(
                    f"{name} is PiSSA-initialised (its base weight is a residual), the adapter was "
                    "trained on the plain base weight: load it into a fresh base model"
                )
            if layer.merged:
                problems.append(f"{name} is merged: unmerge_lora(model) before loading another adapter")
            # an already-wrapped layer keeps its own r and scaling: they must be the adapter's
            ours = (layer.r, layer.lora_alpha, layer.use_rslora)
            theirs = (config["r"], config["lora_alpha"], config.get("use_rslora", False))
            if ours != theirs:
                problems.append(
                    f"{name} is wrapped with (r, lora_alpha, use_rslora) = {ours}, the adapter has "
                    f"{theirs}: load into a model without LoRA (apply_lora is then done for you)"
                )
        expected = {"lora_A": (config["r"], base.in_features), "lora_B": (base.out_features, config["r"])}
        for part, shape in expected.items():
            t = tensors.get(f"{name}.{part}")
            got = None if t is None else tuple(t.shape)
            if got != shape:
                problems.append(
                    f"{name}.{part}: adapter has "
                    + ("no such tensor" if t is None else f"shape {got}")
                    + f", this model needs {shape}"
                )
        if name in config["pissa_layers"] and not isinstance(base.weight, nn.Parameter):
            problems.append(
                f"{name}: the adapter is PiSSA-initialised, but this base ({type(base).__name__}) computes its "
                "weight (e.g. NF4): the residual cannot be made in it. Load into a full-precision base"
            )
    state = model.state_dict()
    problems += tensor_problems(tensors, state)
    targets = set(config["target_modules"])
    extra = tuple(f"{n}." for n in config["extra_modules"])
    for key, t in tensors.items():
        layer, _, part = key.rpartition(".")
        if part in ("lora_A", "lora_B"):
            if layer not in targets:
                problems.append(f"{key}: LoRA factors of a layer the config does not list in target_modules")
            continue
        if not key.startswith(extra):
            problems.append(f"{key}: a tensor of no module the config declares (target_modules, extra_modules)")
        elif key not in state:
            problems.append(f"{key}: in the adapter, not in the model")
        elif tuple(state[key].shape) != tuple(t.shape):
            problems.append(f"{key}: adapter has shape {tuple(t.shape)}, the model {tuple(state[key].shape)}")
    for module in config["extra_modules"]:
        needed = [k for k in state if k.startswith(f"{module}.") and not k.endswith((MERGED_KEY, PISSA_KEY))]
        absent = [k for k in needed if k not in tensors]
        if module not in dict(model.named_modules()):
            problems.append(f"{module}: an extra module of the adapter, not in the model")
        elif absent:
            problems.append(f"{module}: declared in extra_modules, but the adapter lacks {absent[:4]}")
    return problems


def tensor_problems(tensors: dict[str, torch.Tensor], model_state: dict | None = None) -> list[str]:
    """Tensors that cannot be what they stand for: holding inf or nan (a diverged run), or not floating point where
    the model's tensor is (LoRA factors always are; an integer buffer of an extra module, e.g. BatchNorm's count,
    stays an integer)."""
    problems = []
    for key, t in tensors.items():
        own = None if model_state is None else model_state.get(key)
        wants_float = (
            key.endswith((".lora_A", ".lora_B", ".lora_A.weight", ".lora_B.weight"))
            or own is None
            or (own.is_floating_point())
        )
        if not t.is_floating_point():
            if wants_float:
                problems.append(f"{key}: a {t.dtype} tensor; adapter weights are floating point")
        elif not torch.isfinite(t).all():
            problems.append(f"{key}: holds inf or nan (saved from a diverged run?)")
    return problems


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Put a saved adapter into ``model``: wrap the layers it targets (if not yet), then load its tensors.

    Raises ``ValueError`` naming each layer or tensor that does not fit, before
    changing anything. An adapter of PiSSA-initialised layers (``pissa_layers`` in its
    config) first gets the same residual base weight (``lora.pissa_init_``).
    """
    config, tensors = read_adapter(path)
    problems = _misfits(model, config, tensors)
    if problems:
        raise ValueError(
            f"the adapter at {path} (base model {config['base_model']!r}, r={config['r']}) does not "
            f"fit this {type(model).__name__}:\n  - " + "\n  - ".join(problems[:10])
        )
    own = getattr(getattr(model, "config", None), "_name_or_path", None)
    if own and config["base_model"] and own != config["base_model"]:
        warnings.warn(f"adapter was trained on {config['base_model']!r}, loading into {own!r}", stacklevel=2)
    if not lora_layers(model):  # the exact layers the adapter lists (no suffix matching: "0" is not "1.0")
        wrap_layers(
            model,
            config["target_modules"],
            config["r"],
            config["lora_alpha"],
            config["lora_dropout"],
            config["use_rslora"],
        )
    if config["pissa_layers"]:  # the adapter was trained on W0 minus its top-r part: make that residual here too
        layers = lora_layers(model)
        for name in config["pissa_layers"]:
            if not layers[name].pissa:
                pissa_init_(layers[name])
    with torch.no_grad():
        state = model.state_dict()
        for key, t in tensors.items():
            state[key].copy_(t)
    return model
