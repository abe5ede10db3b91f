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

    def crash_before_the_tensors(src, dst):
        if str(dst).endswith(WEIGHTS_NAME):
            raise KeyboardInterrupt  # the process dies after renaming the config, before the tensors
        real_replace(src, dst)

    newer = trained_two()
    with torch.no_grad():
        lora_layers(newer)["0"].lora_B.mul_(3)
    monkeypatch.setattr(os, "replace", crash_before_the_tensors)
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


def test_a_save_between_reading_the_config_and_the_tensors_is_noticed(tmp_path, monkeypatch):
    """The interleaving of the test above, forced: another save lands right after the config was read."""
    from lora_helpers import adapters

    folder = tmp_path / "a"
    first, second = trained_two(), trained_two()
    with torch.no_grad():
        lora_layers(second)["0"].lora_B.mul_(-2)
    save_adapter(first, folder, base_model="first")
    real_read = adapters.read_json_file
    calls = []

    def read_then_someone_saves(*args, **kwargs):
        config = real_read(*args, **kwargs)
        if not calls:
            save_adapter(second, folder, base_model="second")
        calls.append(config.get("base_model"))
        return config

    monkeypatch.setattr(adapters, "read_json_file", read_then_someone_saves)
    config, tensors = read_adapter(folder)
    want = {"first": first, "second": second}[config["base_model"]]
    assert torch.equal(tensors["0.lora_B"], lora_layers(want)["0"].lora_B)


def test_temporary_files_of_a_killed_writer_are_removed_by_the_next_save(tmp_path):
    folder = tmp_path / "a"
    save_adapter(trained_two(), folder)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = folder / f".{WEIGHTS_NAME}.{dead.stdout.strip()}.0123abcd.tmp"  # as left by kill -9 mid-save
    orphan.write_bytes(b"half a file")
    recent = folder / f".{CONFIG_NAME}.{dead.stdout.strip()}.4567abcd.tmp"  # maybe a writer on another machine
    recent.write_bytes(b"being written elsewhere")
    alive = folder / f".{WEIGHTS_NAME}.{os.getppid()}.89abcdef.tmp"  # a writer that still runs
    alive.write_bytes(b"being written")
    notes = folder / f".{WEIGHTS_NAME}.{dead.stdout.strip()}.my-notes.tmp"  # not our pattern
    notes.write_bytes(b"mine")
    old = os.path.getmtime(orphan) - 3600
    for f in (orphan, alive, notes):
        os.utime(f, (old, old))
    save_adapter(trained_two(), folder)
    assert not orphan.exists() and recent.exists() and alive.exists() and notes.exists()


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


# ====================================================================== PEFT import


def peft_folder(tmp_path):
    """A small model's LoRA adapter in PEFT's format (our export), and a fresh copy of that model."""
    from lora_helpers.peft_interop import export_to_peft

    model = trained_two()
    export_to_peft(model, tmp_path / "peft", head_modules=["2"], task_type=None)
    return tmp_path / "peft"


def test_peft_import_refuses_an_undeclared_tensor_that_would_overwrite_a_base_weight(tmp_path):
    from lora_helpers.peft_interop import import_from_peft

    folder = peft_folder(tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.1.0.weight"] = torch.zeros(6, 6)  # e.g. an embedding PEFT saved on its own
    save_file(tensors, folder / "adapter_model.safetensors")
    target = fresh_two()
    before = state(target)
    with pytest.raises(ValueError, match=r"1.0.weight: not a LoRA tensor, and its module is not in the config's"):
        import_from_peft(target, folder)
    assert same_state(before, target) and all(p.requires_grad for p in target.parameters())


@pytest.mark.parametrize("value", ["false", 1, None])
def test_peft_import_refuses_a_use_rslora_that_is_not_a_boolean(tmp_path, value):
    from lora_helpers.peft_interop import import_from_peft

    folder = peft_folder(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["use_rslora"] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    target = fresh_two()
    with pytest.raises(ValueError, match="use_rslora must be true or false"):
        import_from_peft(target, folder)
    assert not lora_layers(target)


def test_peft_import_wraps_exactly_the_layers_its_tensors_name(tmp_path):
    from lora_helpers.peft_interop import export_to_peft, import_from_peft

    model = fresh_two()
    model.add_module("0", LoRALinear(getattr(model, "0"), r=2, lora_alpha=4))
    export_to_peft(model, tmp_path / "peft", head_modules=[], task_type=None)
    assert sorted(lora_layers(import_from_peft(fresh_two(), tmp_path / "peft"))) == ["0"]


# ====================================================================== quantisation


def test_quantising_an_empty_tensor_is_a_clear_error():
    from lora_helpers.quant import quantize_blockwise

    with pytest.raises(ValueError, match="nothing to quantise: the tensor is empty"):
        quantize_blockwise(torch.zeros(0, 4))


@pytest.mark.parametrize("block_size", [0, -64, 2.5])
def test_quantising_with_a_bad_block_size_names_it(block_size):
    from lora_helpers.quant import bits_per_weight, quantize_blockwise

    with pytest.raises(ValueError, match="block_size must be a whole number >= 1"):
        quantize_blockwise(torch.randn(128), block_size=block_size)
    with pytest.raises(ValueError, match="block_size must be a whole number >= 1"):
        bits_per_weight(block_size)


def test_dequantising_codes_outside_the_code_book_is_a_clear_error():
    from lora_helpers.quant import dequantize_blockwise, quantize_blockwise

    codes, absmax = quantize_blockwise(torch.randn(128))
    codes[3] = 16
    with pytest.raises(ValueError, match="codes index a code book of 16 values: 0..15, got a 16"):
        dequantize_blockwise(codes, absmax, (128,))


def test_quantize_model_refuses_a_merged_lora_layer_before_it_loses_w0():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2))
    apply_lora(model, ["0"], r=2)
    with torch.no_grad():
        model[0].lora_B.normal_()
    merge_lora(model)
    before = state(model)
    with pytest.raises(ValueError, match="0 is merged"):
        quantize_model(model, targets=["0"])
    assert same_state(before, model)


# ====================================================================== training guards (loop)


class TinyClassifier(nn.Module):
    """A model with ``loss`` and ``logits`` like a Hugging Face classifier, and DistilBERT's position limit."""

    def __init__(self, positions=16):
        super().__init__()
        torch.manual_seed(0)
        self.config = type("Config", (), {"num_labels": 2, "max_position_embeddings": positions})()
        self.embed = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask, labels=None):
        logits = self.head(self.embed(input_ids).mean(1))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return type("Out", (), {"loss": loss, "logits": logits})()


def tiny_batches(width=8, n=4):
    g = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(0, 50, (4, width), generator=g),
            "attention_mask": torch.ones(4, width, dtype=torch.long),
            "labels": torch.randint(0, 2, (4,), generator=g),
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize("lr", [-1.0, 0.0, float("nan"), float("inf"), "1e-3"])
def test_train_refuses_a_learning_rate_that_is_not_positive_and_finite(lr):
    from lora_helpers.loop import train

    model = TinyClassifier()
    before = state(model)
    with pytest.raises(ValueError, match="learning rate .* must be a (finite )?number > 0"):
        train(model, tiny_batches(), lr=lr, device="cpu")
    assert same_state(before, model)
    groups = [{"params": list(model.parameters()), "lr": lr, "name": "method"}]
    with pytest.raises(ValueError, match="the learning rate of group 'method' must be"):
        train(model, tiny_batches(), param_groups=groups, device="cpu")


def test_a_diverging_run_stops_at_its_first_non_finite_loss():
    from lora_helpers.loop import train

    model = TinyClassifier()
    with pytest.raises(FloatingPointError, match="the training loss is (nan|inf).*Try a smaller learning rate"):
        train(model, tiny_batches(n=20), lr=1e6, warmup_ratio=0.0, device="cpu")


@pytest.mark.parametrize("eval_every", [-1, 0, 2.5])
def test_train_refuses_an_eval_every_below_one(eval_every):
    from lora_helpers.loop import train

    with pytest.raises(ValueError, match="eval_every must be a whole number >= 1"):
        train(TinyClassifier(), tiny_batches(), tiny_batches(n=1), lr=1e-3, eval_every=eval_every, device="cpu")


def test_batches_longer_than_the_models_positions_are_refused_before_training():
    from lora_helpers.loop import train

    model = TinyClassifier(positions=16)
    before = state(model)
    with pytest.raises(ValueError, match="a training batch is 40 tokens, but TinyClassifier has position embeddings"):
        train(model, tiny_batches(width=40), lr=1e-3, device="cpu")
    assert same_state(before, model)


def test_predict_refuses_a_max_length_beyond_the_models_positions():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from lora_helpers.loop import predict

    tokenizer = _tokenizer()
    model = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    )
    with pytest.raises(ValueError, match="max_length is 1000 tokens, but .* position embeddings for 512"):
        predict(model, tokenizer, ["a fine film"], max_length=1000)


def _tokenizer():
    from lora_helpers.backbone import load_backbone

    return load_backbone("minilm-standin", verbose=False)[1]


@pytest.mark.parametrize("texts", [["a film", ""], ["   ", "\n"]])
def test_empty_texts_are_refused(texts):
    from lora_helpers.loop import encode

    with pytest.raises(ValueError, match="text \\d is empty"):
        encode(texts, _tokenizer(), 32)


# ====================================================== analysis helpers: degenerate input refused by name


def test_energy_captured_of_a_zero_matrix_is_an_error_not_nan():
    from lora_helpers.svd import energy_captured

    with pytest.raises(ValueError, match="not all zero"):
        energy_captured(torch.zeros(5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=-1), r"k must be a whole number in \[1, 6\]"),
        (dict(k=99), r"k must be a whole number in \[1, 6\]"),
        (dict(side="rigth"), r"side must be one of \['right', 'left'\], got str 'rigth'"),
    ],
)
def test_top_directions_refuses_a_bad_k_or_side(kwargs, match):
    from lora_helpers.analysis import top_directions

    with pytest.raises(ValueError, match=match):
        top_directions(torch.randn(8, 6), **kwargs)


def test_subspace_similarity_grid_refuses_max_i_zero():
    from lora_helpers.analysis import subspace_similarity_grid, top_directions

    U = top_directions(torch.randn(8, 6))
    with pytest.raises(ValueError, match=r"max_i must be a whole number in \[1, 6\], got 0"):
        subspace_similarity_grid(U, U, max_i=0)


def test_amplification_of_a_zero_weight_is_a_clear_error():
    from lora_helpers.analysis import amplification

    with pytest.raises(ValueError, match="W is zero"):
        amplification(torch.zeros(6, 4), torch.randn(6, 4), r=2)


# ====================================================================== memory, FLOP and parameter formulas


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m.training_memory_formula(-100, 0), "n_params_total must be a whole number >= 0, got -100"),
        (lambda m: m.training_memory_formula(100, 10, bytes_per_param=-4), "bytes_per_param must be"),
        (lambda m: m.activation_bytes(m.PAPER_MODELS["7b"], -512), "seq_len must be a whole number >= 1"),
        (lambda m: m.activation_bytes(m.PAPER_MODELS["7b"], 512, batch=0), "batch must be a whole number >= 1"),
        (lambda m: m.PAPER_MODELS["7b"].lora_params(-8), "r must be a whole number >= 1, got -8"),
        (lambda m: m.fits_table("bogus"), r"model must be one of \['distilbert', '1b'"),
        (lambda m: m.fits_table(["7b"], recipes=["qlroa"]), "recipe must be one of"),
        (lambda m: m.fits_table(["7b"], gpus_gb=[-16]), "a GPU's memory must be a finite number > 0"),
    ],
    ids=["total", "bytes", "seq_len", "batch", "lora-r", "fits-model", "fits-recipe", "fits-gpu"],
)
def test_memory_formulas_refuse_impossible_sizes(call, match):
    from lora_helpers import memory

    with pytest.raises(ValueError, match=match):
        call(memory)


def test_parameter_and_flop_counts_refuse_negative_sizes():
    from transformers import DistilBertConfig

    from lora_helpers.estimate import forward_flops
    from lora_helpers.lora import lora_parameters

    with pytest.raises(ValueError, match="r must be a whole number >= 1, got -8"):
        lora_parameters([(768, 768)], -8)
    with pytest.raises(ValueError, match="d_in must be a whole number >= 1, got -768"):
        lora_parameters([(-768, 768)], 8)
    with pytest.raises(ValueError, match=r"seq_len \(max_length\) must be a whole number in \[1, 512\], got -5"):
        forward_flops(DistilBertConfig(), -5)
    with pytest.raises(ValueError, match=r"seq_len \(max_length\) must be a whole number in \[1, 512\], got 100000"):
        forward_flops(DistilBertConfig(), 100_000)


# ====================================================================== the command line and the launcher


@pytest.fixture
def no_training(monkeypatch, tmp_path):
    from test_cli import _no_work

    monkeypatch.setenv("LORA_PROFILE", "quick")
    monkeypatch.chdir(tmp_path)
    for target in ("lora_helpers.loop.train", "lora_helpers.runner.run", "lora_helpers.compare.compare_methods"):
        monkeypatch.setattr(target, _no_work, raising=False)
    return tmp_path


def refused(argv, message, capsys):
    from test_cli import assert_one_clear_error, run_main

    assert_one_clear_error(*run_main(argv, capsys), message)


def test_metrics_and_adapter_that_would_overwrite_each_other_are_refused(no_training, capsys):
    folder = no_training / "D"
    refused(
        ["train", "--out", str(folder / CONFIG_NAME), "--save-adapter", str(folder)],
        "would overwrite each other",
        capsys,
    )
    assert not folder.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--max-length", "1000"], "1000 is longer than DistilBERT reads: it has 512 position embeddings"),
        (["estimate", "--max-length", "100000"], "100000 is longer than DistilBERT reads"),
        (["train", "--seed", str(2**64)], "expected an integer in 0 .. 4294967295"),
        (["estimate", "--notebook", "04", "--seeds", "5"], "--notebook 04 estimates that notebook's own runs; --seeds"),
    ],
    ids=["train-max-length", "estimate-max-length", "seed", "notebook-and-seeds"],
)
def test_bad_arguments_are_one_line_naming_the_argument(argv, message, no_training, capsys):
    refused(argv, message, capsys)


def test_n_val_larger_than_the_split_names_n_val(no_training, capsys):
    from test_cli import TINY

    refused(["train", *TINY, "--n-val", "1000000"], "n_train (32) + n_val (1,000,000)", capsys)


def test_a_backbone_folder_that_is_not_distilbert_is_one_error_line(no_training, capsys):
    gpt2 = no_training / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    refused(["train", "--backbone", str(gpt2)], "holds a 'gpt2' model; the series' backbones are DistilBERT", capsys)


def test_a_review_that_is_not_utf8_is_named(tmp_path, monkeypatch, no_training, capsys):
    root = tmp_path / "aclImdb"
    for split in ("train", "test"):
        for label in ("pos", "neg"):
            (root / split / label).mkdir(parents=True)
            for i in range(4):
                (root / split / label / f"{i}_7.txt").write_text(f"review {i} of {split} {label}, fine")
    (root / "train" / "pos" / "2_7.txt").write_bytes("caf\xe9 au lait, a lovely film".encode("latin-1"))
    monkeypatch.setenv("LORA_IMDB_DIR", str(root))
    refused(["train", "--n-train", "4", "--n-val", "2", "--n-test", "4"], "2_7.txt is not UTF-8 text", capsys)


def test_a_thread_count_that_is_not_ascii_digits_is_a_clear_error(monkeypatch):
    from lora_helpers.utils import set_seed

    monkeypatch.setenv("LORA_NUM_THREADS", "\u00b2")  # '²'.isdigit() is True, int('²') fails
    with pytest.raises(ValueError, match="LORA_NUM_THREADS must be a positive whole number"):
        set_seed(0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nproc", "3"], "--batch-size 16 must split evenly over --nproc 3"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--model", "tiny", "--max-length", "100"], "--max-length must be in 3 .. 64 for --model tiny"),
    ],
)
def test_the_launcher_refuses_bad_arguments_in_one_line_before_starting_workers(argv, message, capsys, monkeypatch):
    from lora_helpers import distributed

    monkeypatch.setattr(distributed, "run_data_parallel", lambda *a, **k: pytest.fail("workers started"))
    with pytest.raises(SystemExit) as exit_:
        distributed.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err


def test_the_launcher_checks_its_arguments_before_spawning():
    from lora_helpers.distributed import run_data_parallel

    with pytest.raises(ValueError, match=r"max_length must be a whole number in \[3, 64\]"):
        run_data_parallel(2, 1, 4, 100, kind="tiny")
    with pytest.raises(ValueError, match="batch_size 16 must split evenly over 3 processes"):
        run_data_parallel(3, 1, 16, 32, kind="tiny")


# ====================================================================== review follow-ups


def test_the_first_non_finite_loss_stops_the_run_before_its_step():
    from lora_helpers.loop import train

    class NanAtThird(TinyClassifier):
        calls = 0

        def forward(self, **batch):
            out = super().forward(**batch)
            NanAtThird.calls += 1
            if NanAtThird.calls == 3:
                out.loss = out.loss * float("nan")
            return out

    model = NanAtThird()
    with pytest.raises(FloatingPointError):
        train(model, tiny_batches(n=6), lr=1e-3, device="cpu")
    assert NanAtThird.calls == 3  # it stopped at the first non-finite loss
    assert all(torch.isfinite(p).all() for p in model.parameters())  # and that step updated nothing


def test_a_sweep_leaves_out_a_rate_that_diverges_and_fails_only_if_all_do(monkeypatch):
    from test_runner import tiny_backbone, tiny_data

    from lora_helpers import get_profile, method_spec
    from lora_helpers.runner import sweep

    profile = get_profile("quick", epochs=1, eval_every=None)
    real_train = __import__("lora_helpers.runner", fromlist=["train"]).train

    def diverge_at_large_rates(model, *args, param_groups, **kwargs):
        if max(g["lr"] for g in param_groups if g["name"] == "method") > 1e-2:
            raise FloatingPointError("the training loss is nan (not finite)")
        return real_train(model, *args, param_groups=param_groups, **kwargs)

    monkeypatch.setattr("lora_helpers.runner.train", diverge_at_large_rates)
    spec, data = method_spec("lora"), tiny_data()
    runs = sweep(spec, data, profile, [1e-3, 1e-1], backbone=tiny_backbone, device="cpu", verbose=False)
    assert [r.lr for r in runs] == [1e-3]
    with pytest.raises(FloatingPointError, match="every rate of the sweep"):
        sweep(spec, data, profile, [1e-1, 1.0], backbone=tiny_backbone, device="cpu", verbose=False)


def test_a_registered_method_without_its_own_lr_trains_at_its_own_tuned_rate():
    from lora_helpers.methods import REGISTRY, learning_rate, method_spec

    bare = REGISTRY["lora-all"]  # no profile applied: lr None
    assert learning_rate(bare, "quick") == method_spec("lora-all", "quick").lr == 1e-3  # not lora's 3e-3
    assert learning_rate(bare.replace(name="my variant"), "quick") == method_spec("lora", "quick").lr


def test_the_studies_keep_a_shorter_max_length_the_user_chose():
    from lora_helpers import get_profile
    from lora_helpers.experiments import study_profile

    assert study_profile(get_profile("gpu", max_length=128)).max_length == 128
    assert study_profile(get_profile("gpu")).max_length == 256


def test_lora_variant_takes_its_options_by_name():
    from lora_helpers.experiments import lora_variant

    with pytest.raises(TypeError):
        lora_variant(("q_lin",), 8, 16, object())  # e.g. an old call passing a profile fourth


def test_merge_problem_on_a_meta_layer_is_none():
    with torch.device("meta"):
        layer = LoRALinear(nn.Linear(8, 8), r=2)
    assert layer.merge_problem() is None


def test_an_adapter_saved_before_the_hash_still_loads(tmp_path):
    model = trained_two()
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    del config["tensors_sha256"]  # as written by an earlier version
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(config))
    x = torch.randn(3, 6)
    torch.testing.assert_close(load_adapter(fresh_two(), tmp_path / "a")(x), model(x))


def test_an_extra_modules_integer_buffer_is_not_refused(tmp_path):
    class WithNorm(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(6, 6)
            self.norm = nn.BatchNorm1d(6)  # its num_batches_tracked is an int64 buffer

        def forward(self, x):
            return self.norm(self.lin(x))

    model = WithNorm()
    apply_lora(model, ["lin"], r=2)
    with torch.no_grad():
        model.lin.lora_B.normal_()
    save_adapter(model, tmp_path / "a", extra=["norm"])
    loaded = load_adapter(WithNorm(), tmp_path / "a")
    assert torch.equal(loaded.norm.num_batches_tracked, model.norm.num_batches_tracked)
