"""Tests of lora_helpers.adapters: save/load round trips, and misfits that must fail before changing anything."""
import json
import types

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from lora_helpers import (LoRALinear, apply_lora, load_adapter, lora_layers, lora_state_dict,
                          mark_only_lora_trainable, merge_lora, read_adapter, save_adapter)
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
    return ({n: type(m) for n, m in model.named_modules()},
            {k: v.clone() for k, v in model.state_dict().items()})


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
    assert set(tensors) == {"attn.q.lora_A", "attn.q.lora_B", "attn.v.lora_A", "attn.v.lora_B",
                            "head.weight", "head.bias"}
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
    check_refused(base_net(d=16), path, ValueError,
                  r"attn.q.lora_A: adapter has shape \(2, 8\), this model needs \(2, 16\)")


def test_missing_target_layer(saved):
    _, path = saved
    check_refused(base_net(with_v=False), path, ValueError, r"attn.v: the adapter targets it, but the model has no such layer")


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
