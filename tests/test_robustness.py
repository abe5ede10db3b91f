"""Robustness, round two: bad or unusual inputs that once lost data, went silently wrong or ended in a traceback.

Each test is one case of the sweep (issue 24), grouped by module. Every one of them failed on 96726f8; the
expected behaviour is either the right answer or one clear error that names the problem, with nothing changed.
"""

import json
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lora_helpers import (
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    mark_only_lora_trainable,
    merge_and_unload,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from lora_helpers.adapters import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from lora_helpers.quant import NF4Linear, quantize_model


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(before, model):
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def trained_layer(d=12, r=4, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(d, d), r=r, lora_alpha=8).to(dtype)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


class Two(nn.Module):
    """Two blocks named like nn.Sequential's: ``0`` and ``1``, with ``1.0`` inside the second."""

    def __init__(self):
        super().__init__()
        self.add_module("0", nn.Linear(6, 6))
        self.add_module("1", nn.Sequential(nn.Linear(6, 6), nn.ReLU()))
        self.add_module("2", nn.Linear(6, 2))

    def forward(self, x):
        return getattr(self, "2")(getattr(self, "1")(getattr(self, "0")(x)))


def fresh_two():
    torch.manual_seed(0)
    return Two()


def trained_two():
    model = fresh_two()
    apply_lora(model, ["0"], r=2, lora_alpha=4)  # "0" matches the top-level layer and 1.0 alike
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_()
    return model


# ====================================================================== lora: merge is safe or refused


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_merge_of_a_non_finite_update_is_refused_and_w0_survives(bad):
    layer = trained_layer()
    w0 = layer.base.weight.clone()
    with torch.no_grad():
        layer.lora_B[0, 0] = bad  # a diverged run
    with pytest.raises(ValueError, match="inf or nan"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base.weight, w0)
    layer.unmerge()
    assert torch.equal(layer.base.weight, w0)


def test_merge_that_overflows_half_precision_is_refused():
    layer = trained_layer().half()
    with torch.no_grad():
        layer.base.weight.fill_(6e4)  # a large W0, still a float16
        layer.lora_A.fill_(0.5)
        layer.lora_B.fill_(2500.0)  # scaling * B A = 2 * 4 * 0.5 * 2500 = 1e4: finite, the sum is not
    w0 = layer.base.weight.clone()
    with pytest.raises(ValueError, match="overflows torch.float16"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base.weight, w0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_merge_unmerge_cycles_give_w0_back_bit_for_bit(dtype):
    layer = trained_layer(dtype=dtype)
    w0 = layer.base.weight.clone()
    for _ in range(10):
        layer.merge()
        assert not torch.equal(layer.base.weight, w0)  # the update is in
        layer.unmerge()
    assert torch.equal(layer.base.weight, w0)


def test_an_optimizer_step_while_merged_does_not_corrupt_w0():
    layer = trained_layer()
    w0 = layer.base.weight.clone()
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=10.0)
    layer(torch.randn(5, 12)).pow(2).sum().backward()
    layer.merge()
    opt.step()  # A and B change under a merged weight
    layer.unmerge()
    assert torch.equal(layer.base.weight, w0)
    x = torch.randn(3, 12)  # and the layer is W0 plus the new update
    torch.testing.assert_close(layer(x), x @ (w0 + layer.delta_weight()).T + layer.base.bias)


def test_merge_lora_with_one_nf4_base_merges_no_layer():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    apply_lora(model, ["0", "1"], r=2)
    model[1].base = NF4Linear.from_linear(model[1].base)
    before = state(model)
    for merge in (merge_lora, merge_and_unload):
        with pytest.raises(ValueError, match="1: its base \\(NF4Linear\\) computes its weight"):
            merge(model)
        assert not model[0].merged and isinstance(model[0], LoRALinear) and same_state(before, model)


def test_mark_only_lora_trainable_refuses_to_unfreeze_a_lora_layers_w0():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    apply_lora(model, ["0"], r=2)
    with pytest.raises(ValueError, match="would unfreeze its W0"):
        mark_only_lora_trainable(model, ["0"])
    assert not model[0].base.weight.requires_grad
    mark_only_lora_trainable(model, ["1"])
    assert not model[0].base.weight.requires_grad and model[1].weight.requires_grad


# ====================================================================== adapters: validated before the model changes


def test_an_adapter_for_top_level_0_wraps_exactly_0(tmp_path):
    model = fresh_two()
    apply_lora(model, ["0"], r=2, lora_alpha=4)
    assert sorted(lora_layers(model)) == ["0", "1.0"]  # suffix match, as asked
    del model  # now save an adapter on the top-level layer only
    model = fresh_two()
    model.add_module("0", LoRALinear(getattr(model, "0"), r=2, lora_alpha=4))
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(fresh_two(), tmp_path / "a")
    assert sorted(lora_layers(loaded)) == ["0"]


def test_a_declared_extra_module_without_its_tensors_is_refused(tmp_path):
    model = trained_two()
    save_adapter(model, tmp_path / "a")  # no extra module saved
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    config["extra_modules"] = ["2"]  # claims a head it does not hold
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(config))
    target = fresh_two()
    before = state(target)
    with pytest.raises(ValueError, match=r"2: declared in extra_modules, but the adapter lacks \['2.weight'"):
        load_adapter(target, tmp_path / "a")
    assert same_state(before, target)


def rewrite_tensors(folder, change):
    """Edit the tensor file (and record its new hash, as a forger would): the checks must not rest on the hash."""
    tensors = load_file(folder / WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, folder / WEIGHTS_NAME)
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.pop("tensors_sha256", None)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: t.__setitem__("2.weight", torch.zeros(2, 6)), "2.weight: a tensor of no module the config declares"),
        (lambda t: t.__setitem__("2.lora_A", torch.zeros(2, 6)), "2.lora_A: LoRA factors of a layer the config does"),
        (lambda t: t["0.lora_B"].__setitem__((0, 0), float("nan")), "0.lora_B: holds inf or nan"),
        (lambda t: t.__setitem__("0.lora_A", t["0.lora_A"].long()), "0.lora_A: a torch.int64 tensor"),
    ],
    ids=["undeclared-base-weight", "undeclared-lora-layer", "nan", "int64"],
)
def test_tensors_that_do_not_belong_or_are_not_weights_are_refused(tmp_path, change, match):
    save_adapter(trained_two(), tmp_path / "a")
    rewrite_tensors(tmp_path / "a", change)
    target = fresh_two()
    before = state(target)
    with pytest.raises(ValueError, match=match):
        load_adapter(target, tmp_path / "a")
    assert same_state(before, target) and not lora_layers(target)


def test_a_diverged_adapter_is_not_saved(tmp_path):
    model = trained_two()
    with torch.no_grad():
        lora_layers(model)["0"].lora_A[0, 0] = float("inf")
    with pytest.raises(ValueError, match="nothing was saved: 0.lora_A: holds inf or nan"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_tensors_from_another_save_are_refused_not_paired_with_this_config(tmp_path):
    save_adapter(trained_two(), tmp_path / "a", base_model="first")
    other = trained_two()
    with torch.no_grad():
        lora_layers(other)["0"].lora_B.mul_(2)
    save_adapter(other, tmp_path / "b", base_model="second")
    (tmp_path / "a" / WEIGHTS_NAME).write_bytes((tmp_path / "b" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match="is not the tensor file .* was saved with"):
        read_adapter(tmp_path / "a")


def test_a_crash_between_the_two_renames_is_detected(tmp_path, monkeypatch):
    save_adapter(trained_two(), tmp_path / "a", base_model="old")
    real_replace = os.replace

    def crash_on_the_config(src, dst):
        if str(dst).endswith(CONFIG_NAME):
            raise KeyboardInterrupt  # the process dies after renaming the tensors
        real_replace(src, dst)

    newer = trained_two()
    with torch.no_grad():
        lora_layers(newer)["0"].lora_B.mul_(3)
    monkeypatch.setattr(os, "replace", crash_on_the_config)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(newer, tmp_path / "a", base_model="new")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="a save was interrupted between its two files"):
        load_adapter(fresh_two(), tmp_path / "a")


def test_readers_never_see_a_config_and_tensors_from_different_saves(tmp_path):
    """One thread saves two different adapters in turn; another loads: each load is one adapter, whole."""
    folder = tmp_path / "a"
    models = {}
    for name, factor in (("one", 1.0), ("two", -2.0)):
        models[name] = trained_two()
        with torch.no_grad():
            lora_layers(models[name])["0"].lora_B.mul_(factor)
    save_adapter(models["one"], folder, base_model="one")
    stop, errors = threading.Event(), []

    def writer():
        while not stop.is_set():
            for name, model in models.items():
                save_adapter(model, folder, base_model=name)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(300):
            config, tensors = read_adapter(folder)
            want = lora_layers(models[config["base_model"]])["0"].lora_B
            if not torch.equal(tensors["0.lora_B"], want):
                errors.append(config["base_model"])
    finally:
        stop.set()
        thread.join()
    assert errors == []


def test_temporary_files_of_a_killed_writer_are_removed_by_the_next_save(tmp_path):
    folder = tmp_path / "a"
    save_adapter(trained_two(), folder)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = folder / f".{WEIGHTS_NAME}.{dead.stdout.strip()}.0123abcd.tmp"  # as left by kill -9 mid-save
    orphan.write_bytes(b"half a file")
    mine = folder / f".{WEIGHTS_NAME}.{os.getppid()}.0123abcd.tmp"  # a writer that still runs: left alone
    mine.write_bytes(b"being written")
    save_adapter(trained_two(), folder)
    assert not orphan.exists() and mine.exists()


def test_a_folder_whose_name_is_not_utf8_loads(tmp_path):
    folder = tmp_path / os.fsdecode(b"adapter-\xe9t\xe9")  # latin-1 bytes in the name
    model = trained_two()
    save_adapter(model, folder)
    loaded = load_adapter(fresh_two(), folder)
    x = torch.randn(3, 6)
    torch.testing.assert_close(loaded(x), model(x))


def test_a_deeply_nested_config_is_a_clear_error(tmp_path):
    save_adapter(trained_two(), tmp_path / "a")
    (tmp_path / "a" / CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        load_adapter(fresh_two(), tmp_path / "a")


def test_a_pissa_adapter_is_refused_by_an_nf4_model_before_it_changes(tmp_path):
    from lora_helpers.lora import pissa_init_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, ["0"], r=2)
    pissa_init_(model[0])
    save_adapter(model, tmp_path / "a")
    target = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2))
    target.load_state_dict(fresh)
    quantize_model(target, targets=["0"])
    before = state(target)
    with pytest.raises(ValueError, match="PiSSA-initialised, but this base \\(NF4Linear\\) computes its weight"):
        load_adapter(target, tmp_path / "a")
    assert same_state(before, target) and not lora_layers(target)


def test_pissa_init_on_an_nf4_base_is_refused():
    from lora_helpers.lora import pissa_init_

    layer = LoRALinear(NF4Linear.from_linear(nn.Linear(64, 64)), r=2)
    with pytest.raises(TypeError, match="computes it"):
        pissa_init_(layer)
    assert not layer.pissa and torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))


def test_unmerge_after_save_and_load_of_a_merged_state_still_recovers_w0():
    """A merged state loaded from a file carries no copy of W0: unmerge subtracts (float32: within rounding)."""
    layer = trained_layer()
    w0 = layer.base.weight.clone()
    layer.merge()
    other = trained_layer(seed=3)
    other.load_state_dict(layer.state_dict())
    assert other.merged
    other.unmerge()
    torch.testing.assert_close(other.base.weight, w0, rtol=0, atol=1e-6)
    layer.unmerge()
    assert torch.equal(layer.base.weight, w0)


def test_argument_errors_are_value_and_type_errors():
    from lora_helpers.utils import ArgumentError

    assert issubclass(ArgumentError, ValueError) and issubclass(ArgumentError, TypeError)
    unmerge_lora(nn.Sequential())  # nothing to do is not an error
