"""Tests of lora_helpers.adapters: save/load round trips, and misfits that must fail before changing anything."""

import json
import types

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from lora_helpers import (
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    read_adapter,
    save_adapter,
)
from lora_helpers.adapters import CONFIG_NAME, WEIGHTS_NAME


class Attention(nn.Module):
    def __init__(self, d, with_v=True):
        super().__init__()
        self.q = nn.Linear(d, d)
        if with_v:
            self.v = nn.Linear(d, d)


class Net(nn.Module):
    """attn.q, attn.v, a feed-forward layer and a head: the head plays a new classifier."""

    def __init__(self, d=8, with_v=True):
        super().__init__()
        self.attn = Attention(d, with_v)
        self.ffn = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.attn.q(x) + (self.attn.v(x) if hasattr(self.attn, "v") else 0)
        return self.head(torch.relu(self.ffn(h)))


def base_net(d=8, with_v=True):
    """The "pretrained" model: always the same weights for the same shape."""
    torch.manual_seed(0)
    return Net(d, with_v)


def trained_net(r=2, lora_alpha=4, use_rslora=False, lora_dropout=0.0):
    """The pretrained model with LoRA on q and v, and a retrained head, as after fine-tuning."""
    net = base_net()
    apply_lora(net, ["q", "v"], r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)
    mark_only_lora_trainable(net, ["head"])
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(net).values():
            layer.lora_B.normal_()
        net.head.weight.normal_()
        net.head.bias.normal_()
    return net.eval()


def snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()}, {k: v.clone() for k, v in model.state_dict().items()})


def assert_same(before, after):
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys()
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])


X = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def saved(tmp_path):
    """A trained model and the folder its adapter (with the head) was saved to."""
    model = trained_net()
    path = save_adapter(model, tmp_path / "adapter", extra=["head"], base_model="tiny-net-v1")
    return model, path


# ------------------------------------------------------------------ round trips


def test_save_writes_both_files_and_the_config(saved):
    _, path = saved
    assert (path / WEIGHTS_NAME).is_file() and (path / CONFIG_NAME).is_file()
    config = json.loads((path / CONFIG_NAME).read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 4
    assert config["target_modules"] == ["attn.q", "attn.v"]
    assert config["base_model"] == "tiny-net-v1"
    assert config["extra_modules"] == ["head"]
    assert config["lora_dropout"] == 0.0 and config["use_rslora"] is False


def test_saved_tensors_are_only_lora_and_extra(saved):
    model, path = saved
    tensors = load_file(str(path / WEIGHTS_NAME))
    assert set(tensors) == {
        "attn.q.lora_A",
        "attn.q.lora_B",
        "attn.v.lora_A",
        "attn.v.lora_B",
        "head.weight",
        "head.bias",
    }
    assert torch.equal(tensors["attn.q.lora_B"], model.attn.q.lora_B.detach())
    assert set(lora_state_dict(model)) == {"attn.q.lora_A", "attn.q.lora_B", "attn.v.lora_A", "attn.v.lora_B"}


def test_round_trip_into_a_fresh_base_model(saved):
    model, path = saved
    fresh = base_net()
    assert not torch.equal(fresh.head.weight, model.head.weight)
    assert load_adapter(fresh, path) is fresh
    assert set(lora_layers(fresh)) == {"attn.q", "attn.v"}
    assert fresh.attn.q.r == 2 and fresh.attn.q.scaling == 2.0
    assert torch.equal(fresh.head.weight, model.head.weight)  # the extra module came back
    with torch.no_grad():
        assert torch.equal(fresh.eval()(X), model(X))


def test_without_extra_the_head_is_not_saved(tmp_path):
    model = trained_net()
    path = save_adapter(model, tmp_path / "a")
    config, tensors = read_adapter(path)
    assert config["extra_modules"] == [] and config["base_model"] == "Net"  # default name: the class
    assert not any(k.startswith("head.") for k in tensors)
    fresh = load_adapter(base_net(), path)
    assert torch.equal(fresh.head.weight, base_net().head.weight)


def test_rslora_round_trip(tmp_path):
    model = trained_net(r=4, lora_alpha=8, use_rslora=True)
    path = save_adapter(model, tmp_path / "a", extra=["head"])
    assert read_adapter(path)[0]["use_rslora"] is True
    fresh = load_adapter(base_net(), path).eval()
    assert fresh.attn.q.scaling == pytest.approx(8 / 2)
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))


def test_dropout_is_saved_and_restored(tmp_path):
    path = save_adapter(trained_net(lora_dropout=0.1), tmp_path / "a")
    assert read_adapter(path)[0]["lora_dropout"] == pytest.approx(0.1)
    assert load_adapter(base_net(), path).attn.q.lora_dropout.p == pytest.approx(0.1)


def test_load_into_a_model_that_already_has_matching_lora_layers(saved):
    model, path = saved
    target = base_net()
    apply_lora(target, ["q", "v"], r=2, lora_alpha=4)
    load_adapter(target, path)
    with torch.no_grad():
        assert torch.equal(target.eval()(X), model(X))


def test_loading_warns_when_the_base_model_name_differs(saved):
    _, path = saved
    target = base_net()
    target.config = types.SimpleNamespace(_name_or_path="another-model")
    with pytest.warns(UserWarning, match="tiny-net-v1.*another-model"):
        load_adapter(target, path)


# ------------------------------------------------------------------ misfits


def check_refused(model, path, error, match):
    before = snapshot(model)
    with pytest.raises(error, match=match):
        load_adapter(model, path)
    assert_same(before, snapshot(model))


def test_wrong_r_against_already_wrapped_layers(saved):
    _, path = saved
    model = base_net()
    apply_lora(model, ["q", "v"], r=4, lora_alpha=4)
    check_refused(model, path, ValueError, r"attn.q is wrapped with \(r, lora_alpha, use_rslora\) = \(4, 4, False\)")


def test_wrong_alpha_against_already_wrapped_layers(saved):
    _, path = saved
    model = base_net()
    apply_lora(model, ["q", "v"], r=2, lora_alpha=16)  # same shapes, but another scaling
    check_refused(model, path, ValueError, r"\(2, 16, False\), the adapter has \(2, 4, False\)")


def test_lora_on_other_layers(saved):
    _, path = saved
    model = base_net()
    apply_lora(model, ["q", "ffn"], r=2, lora_alpha=4)
    check_refused(model, path, ValueError, r"already has LoRA on \['ffn'\]")


def test_wrong_shapes(saved):
    _, path = saved
    check_refused(
        base_net(d=16), path, ValueError, r"attn.q.lora_A: adapter has shape \(2, 8\), this model needs \(2, 16\)"
    )


def test_missing_target_layer(saved):
    _, path = saved
    check_refused(
        base_net(with_v=False), path, ValueError, r"attn.v: the adapter targets it, but the model has no such layer"
    )


def test_merged_model(saved):
    _, path = saved
    model = base_net()
    apply_lora(model, ["q", "v"], r=2, lora_alpha=4)
    merge_lora(model)
    check_refused(model, path, ValueError, r"attn.q is merged: unmerge_lora\(model\)")


def test_extra_module_missing_from_the_model(tmp_path):
    model = trained_net()
    model.classifier = nn.Linear(3, 2)
    path = save_adapter(model, tmp_path / "a", extra=["classifier"])
    check_refused(base_net(), path, ValueError, r"classifier.weight: in the adapter, not in the model")


def test_folder_that_is_not_an_adapter(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match=r"not a lora_helpers adapter.*notes.txt"):
        load_adapter(base_net(), tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_adapter(base_net(), tmp_path / "missing")


def test_config_of_another_format(saved):
    _, path = saved
    config = json.loads((path / CONFIG_NAME).read_text())
    config["format"] = "something-else/9"
    (path / CONFIG_NAME).write_text(json.dumps(config))
    check_refused(base_net(), path, ValueError, "has format 'something-else/9'")


def test_save_without_lora_layers(tmp_path):
    with pytest.raises(ValueError, match="call apply_lora first"):
        save_adapter(base_net(), tmp_path / "a")


def test_save_with_mixed_settings(tmp_path):
    model = base_net()
    apply_lora(model, "q", r=2)
    apply_lora(model, "v", r=4)
    with pytest.raises(ValueError, match="one \\(r, lora_alpha, dropout, rslora\\) per model"):
        save_adapter(model, tmp_path / "a")


def test_save_with_unknown_extra_module(tmp_path):
    with pytest.raises(ValueError, match="extra module 'classifier' matches nothing"):
        save_adapter(trained_net(), tmp_path / "a", extra=["classifier"])
    assert not (tmp_path / "a").exists()


def test_loaded_layers_are_lora_linear(saved):
    _, path = saved
    fresh = load_adapter(base_net(), path)
    assert all(isinstance(m, LoRALinear) for m in [fresh.attn.q, fresh.attn.v])
    assert type(fresh.ffn) is nn.Linear


# ------------------------------------------------------------------ robustness (issue 14)


def outputs_of_folder(path):
    """What the adapter in ``path`` computes on X, loaded into a fresh base model."""
    with torch.no_grad():
        return load_adapter(base_net(), path).eval()(X)


def test_a_save_that_fails_leaves_the_previous_adapter_as_it_was(saved, monkeypatch):
    model, path = saved
    files = {f.name: f.read_bytes() for f in path.iterdir()}
    other = trained_net(r=4, lora_alpha=8)  # different tensors and config

    def broken_dumps(*args, **kwargs):
        raise TypeError("cannot serialise this")

    monkeypatch.setattr("lora_helpers.adapters.json.dumps", broken_dumps)
    with pytest.raises(TypeError, match="cannot serialise"):
        save_adapter(other, path, extra=["head"])
    assert {f.name: f.read_bytes() for f in path.iterdir()} == files  # not one byte changed, no stray file
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(outputs_of_folder(path), model(X))


def test_a_write_that_fails_midway_leaves_the_previous_adapter_and_no_temporary_file(saved, monkeypatch):
    _, path = saved
    files = {f.name: f.read_bytes() for f in path.iterdir()}
    calls = []

    def fsync_then_disk_full(fd):
        calls.append(fd)
        if len(calls) == 2:  # the second file: as if the disk were full
            raise OSError(28, "No space left on device")

    monkeypatch.setattr("lora_helpers.utils.os.fsync", fsync_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(trained_net(r=4), path, extra=["head"])
    assert {f.name: f.read_bytes() for f in path.iterdir()} == files


def test_a_failed_save_into_a_new_folder_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("lora_helpers.utils.os.fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_adapter(trained_net(), tmp_path / "new" / "adapter")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("base_model, error", [(123, "base_model must be a str"), (["a"], "base_model must be a str")])
def test_a_base_model_that_is_not_a_name_is_refused_before_writing(saved, base_model, error):
    model, path = saved
    files = {f.name: f.read_bytes() for f in path.iterdir()}
    with pytest.raises(TypeError, match=error):
        save_adapter(trained_net(r=4), path, base_model=base_model)
    assert {f.name: f.read_bytes() for f in path.iterdir()} == files


def test_numpy_alpha_and_a_path_as_base_model_are_saved_as_plain_values(tmp_path):
    import numpy as np

    model = trained_net(r=np.int64(2), lora_alpha=np.float32(4))
    path = save_adapter(model, tmp_path / "a", extra=["head"], base_model=tmp_path / "backbone")
    config = json.loads((path / CONFIG_NAME).read_text())
    assert (config["r"], config["lora_alpha"], config["base_model"]) == (2, 4.0, str(tmp_path / "backbone"))
    with torch.no_grad():
        assert torch.equal(outputs_of_folder(path), model(X))


def test_saving_over_a_file_is_refused(tmp_path):
    target = tmp_path / "adapter"
    target.write_text("my notes")
    with pytest.raises(NotADirectoryError, match="is a file; a folder is needed"):
        save_adapter(trained_net(), target)
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        save_adapter(trained_net(), target / "inside")
    assert target.read_text() == "my notes"


def pissa_net(seed=1):
    """The pretrained model, LoRA on q and v initialised with pissa_init_, then "trained" (A, B, head changed)."""
    from lora_helpers.lora import pissa_init_

    net = base_net()
    apply_lora(net, ["q", "v"], r=2, lora_alpha=4)
    for layer in lora_layers(net).values():
        pissa_init_(layer)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(net).values():
            layer.lora_A.add_(0.1 * torch.randn_like(layer.lora_A))
            layer.lora_B.add_(0.1 * torch.randn_like(layer.lora_B))
        net.head.weight.normal_()
    return net.eval()


def test_a_pissa_adapter_loads_into_a_fresh_base_model_as_the_trained_model(tmp_path):
    model = pissa_net()
    path = save_adapter(model, tmp_path / "a", extra=["head"])
    config, _ = read_adapter(path)
    assert config["pissa_layers"] == ["attn.q", "attn.v"]
    fresh = load_adapter(base_net(), path).eval()
    assert all(layer.pissa for layer in lora_layers(fresh).values())
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), model(X), rtol=0, atol=1e-6)
    torch.testing.assert_close(fresh.attn.q.base.weight, model.attn.q.base.weight, rtol=0, atol=0)  # the residual


def test_a_pissa_state_dict_keeps_the_mark_for_a_later_save(tmp_path):
    source = pissa_net()
    target = base_net()
    apply_lora(target, ["q", "v"], r=2, lora_alpha=4)
    target.load_state_dict(source.state_dict())
    assert target.attn.q.pissa and target.attn.v.pissa
    path = save_adapter(target, tmp_path / "a", extra=["head"])
    assert read_adapter(path)[0]["pissa_layers"] == ["attn.q", "attn.v"]
    with torch.no_grad():
        torch.testing.assert_close(outputs_of_folder(path), source(X), rtol=0, atol=1e-6)


def test_a_plain_adapter_into_a_pissa_initialised_model_is_refused(saved):
    from lora_helpers.lora import pissa_init_

    _, path = saved
    model = base_net()
    apply_lora(model, ["q", "v"], r=2, lora_alpha=4)
    pissa_init_(model.attn.q)
    check_refused(model, path, ValueError, "attn.q is PiSSA-initialised")


def rewrite_config(path, **changes):
    config = json.loads((path / CONFIG_NAME).read_text())
    for key, value in changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    (path / CONFIG_NAME).write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(r=None), r"missing \['r'\]"),
        (dict(target_modules=None), r"missing \['target_modules'\]"),
        (dict(r="2"), "r must be a whole number >= 1, got str '2'"),
        (dict(lora_alpha=-1), "lora_alpha must be a finite number > 0"),
        (dict(target_modules="attn.q"), "target_modules must be a non-empty list"),
    ],
)
def test_a_config_with_missing_or_wrong_entries_names_the_file_and_the_entry(saved, changes, match):
    _, path = saved
    rewrite_config(path, **changes)
    check_refused(base_net(), path, ValueError, f"{CONFIG_NAME} is not a valid adapter config: .*{match}")


def test_invalid_json_names_the_file(saved):
    _, path = saved
    (path / CONFIG_NAME).write_text('{"format": "lora_helpers-adapter/1", "r": 2,')
    check_refused(base_net(), path, ValueError, rf"{CONFIG_NAME} is not valid JSON .*line 1")


def test_a_truncated_tensor_file_names_the_file(saved):
    _, path = saved
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    check_refused(
        base_net(), path, ValueError, rf"{WEIGHTS_NAME} cannot be read as safetensors .*damaged or incomplete"
    )


def test_the_tensor_file_instead_of_its_folder_says_so(saved):
    _, path = saved
    with pytest.raises(NotADirectoryError, match=rf"is a file; .*pass the folder that holds it, {path}"):
        load_adapter(base_net(), path / WEIGHTS_NAME)


def test_extra_must_be_names(tmp_path):
    with pytest.raises(TypeError, match="extra must be a module name or a list of names"):
        save_adapter(trained_net(), tmp_path / "a", extra=None)
    assert not (tmp_path / "a").exists()
