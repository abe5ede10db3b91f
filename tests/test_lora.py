"""Tests of lora_helpers.lora against independent references: the formula written out by hand, and PEFT."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_helpers import (
    LoRALinear,
    apply_lora,
    count_parameters,
    freeze_all_except,
    lora_layers,
    mark_only_lora_trainable,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)


def make_layer(d_in=5, d_out=4, r=2, lora_alpha=4, dtype=torch.float64, seed=0, random_B=True, **kwargs):
    """A LoRALinear on a seeded base layer; B filled with random values (as if trained) unless ``random_B=False``."""
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(d_in, d_out, dtype=dtype), r=r, lora_alpha=lora_alpha, **kwargs)
    if random_B:
        with torch.no_grad():
            layer.lora_B.normal_()
    return layer


def by_hand(layer, x, scaling):
    """h = x W0^T + b + scaling * x A^T B^T, written out."""
    W0, b, A, B = layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B
    return x @ W0.T + b + scaling * (x @ A.T @ B.T)


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.xq = nn.Linear(d, d)  # "q" must not match it: names match on a dot boundary
        self.v = nn.Linear(d, d)


class Net(nn.Module):
    """A small model with transformer-like names: attn.{q, xq, v}, norm (not Linear), ffn and head (d -> 3)."""

    def __init__(self, d=8):
        super().__init__()
        self.attn = Attention(d)
        self.norm = nn.LayerNorm(d)
        self.ffn = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.norm(self.attn.q(x) + self.attn.xq(x) + self.attn.v(x))
        return self.head(torch.relu(self.ffn(h)))


def make_net(seed=0, d=8):
    torch.manual_seed(seed)
    return Net(d)


def snapshot(model):
    """Everything a failed call must leave as it was: module types, tensors and requires_grad flags."""
    return (
        {n: type(m) for n, m in model.named_modules()},
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_same(before, after):
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys()
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert before[2] == after[2]


# ------------------------------------------------------------------ LoRALinear forward


def test_forward_equals_formula_by_hand():
    layer = make_layer(r=2, lora_alpha=4)
    x = torch.randn(7, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), by_hand(layer, x, scaling=4 / 2), rtol=0, atol=1e-12)


def test_forward_with_leading_batch_dims():
    layer = make_layer(d_in=5, d_out=4)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (2, 3, 5, 4)
    flat = by_hand(layer, x.reshape(-1, 5), scaling=2.0).reshape(2, 3, 5, 4)
    torch.testing.assert_close(out, flat, rtol=0, atol=1e-12)


def test_init_is_the_base_layer_and_A_is_kaiming_uniform():
    layer = make_layer(d_in=50, d_out=4, r=3, dtype=torch.float32, random_B=False)
    x = torch.randn(6, 50)
    assert torch.equal(layer(x), layer.base(x))
    assert torch.all(layer.lora_B == 0)
    assert layer.lora_A.shape == (3, 50) and layer.lora_B.shape == (4, 3)
    bound = 1 / math.sqrt(50)  # kaiming_uniform_(a=sqrt(5)) draws from U(-1/sqrt(d_in), 1/sqrt(d_in))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > bound / 2


@pytest.mark.parametrize("r, alpha", [(1, 1), (4, 16), (8, 8)])
def test_scaling_alpha_over_r_and_rslora(r, alpha):
    plain = make_layer(d_in=8, d_out=8, r=r, lora_alpha=alpha)
    rs = make_layer(d_in=8, d_out=8, r=r, lora_alpha=alpha, use_rslora=True)
    assert plain.scaling == pytest.approx(alpha / r)
    assert rs.scaling == pytest.approx(alpha / math.sqrt(r))
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(rs(x), by_hand(rs, x, scaling=alpha / math.sqrt(r)), rtol=0, atol=1e-12)


def test_dropout_acts_on_the_lora_branch_only():
    layer = make_layer(d_in=6, d_out=4, lora_dropout=0.5).train()
    x = torch.randn(10, 6, dtype=torch.float64)
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)  # replay the same dropout mask on the LoRA input only
    expected = layer.base(x) + layer.scaling * (F.dropout(x, 0.5, training=True) @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert not torch.allclose(out, by_hand(layer, x, layer.scaling))  # dropout did act


def test_dropout_close_to_one_leaves_the_base_path_intact():
    layer = make_layer(d_in=5, d_out=4, lora_dropout=0.999999).train()  # B is non-zero
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.manual_seed(0)
    assert torch.equal(layer(x), layer.base(x))  # everything dropped on the LoRA branch, nothing on the base path


def test_dropout_off_in_eval_mode():
    layer = make_layer(d_in=6, d_out=4, lora_dropout=0.5).eval()
    x = torch.randn(10, 6, dtype=torch.float64)
    assert torch.equal(layer(x), layer(x))
    torch.testing.assert_close(layer(x), by_hand(layer, x, layer.scaling), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_params_follow_base_dtype_and_device(dtype):
    base = nn.Linear(6, 4, dtype=dtype)
    layer = LoRALinear(base, r=2)
    for p in (layer.lora_A, layer.lora_B):
        assert p.dtype == dtype and p.device == base.weight.device
    assert layer(torch.randn(3, 6, dtype=dtype)).dtype == dtype


# ------------------------------------------------------------------ merge / unmerge


def test_delta_weight_is_scaling_B_A():
    layer = make_layer(r=2, lora_alpha=6)
    torch.testing.assert_close(layer.delta_weight(), 3.0 * layer.lora_B @ layer.lora_A, rtol=0, atol=1e-12)


def test_merge_unmerge_round_trip_restores_W0():
    layer = make_layer(dtype=torch.float32)
    W0 = layer.base.weight.clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base.weight, W0 + layer.delta_weight().detach())
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight, W0, rtol=0, atol=1e-6)


def test_merging_twice_does_not_add_twice():
    layer = make_layer()
    layer.merge()
    once = layer.base.weight.clone()
    layer.merge()
    assert torch.equal(layer.base.weight, once)
    layer.unmerge()
    layer.unmerge()  # a second unmerge is a no-op too
    W = layer.base.weight.clone()
    assert torch.allclose(W + layer.delta_weight().detach(), once, atol=1e-12)


def test_merged_forward_equals_unmerged_in_eval_and_no_grad():
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(5, 5)
    expected = layer(x).detach()
    layer.merge()
    with torch.no_grad():  # train mode, but no grad: allowed
        torch.testing.assert_close(layer.train()(x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.eval()(x), expected, rtol=0, atol=1e-6)  # eval, grad enabled: allowed


def test_training_a_merged_layer_raises():
    layer = make_layer().train()
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(torch.randn(2, 5, dtype=torch.float64))


def test_merge_lora_and_unmerge_lora_on_a_model():
    net = make_net()
    apply_lora(net, ["q", "v"], r=2)
    for layer in lora_layers(net).values():
        with torch.no_grad():
            layer.lora_B.normal_()
    x = torch.randn(4, 8)
    expected = net(x).detach()
    weights = {n: m.base.weight.clone() for n, m in lora_layers(net).items()}
    assert merge_lora(net) == 2
    net.eval()
    torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-5)
    assert unmerge_lora(net) == 2
    for n, m in lora_layers(net).items():
        torch.testing.assert_close(m.base.weight, weights[n], rtol=0, atol=1e-6)


# ------------------------------------------------------------------ gradients


def test_only_lora_matrices_get_gradients():
    layer = make_layer()
    layer(torch.randn(3, 5, dtype=torch.float64)).sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_at_init_grad_A_is_zero_and_grad_B_is_s_g_Ax():
    layer = make_layer(random_B=False)
    x = torch.randn(3, 5, dtype=torch.float64)
    target = torch.randn(3, 4, dtype=torch.float64)
    ((layer(x) - target) ** 2).sum().backward()
    assert torch.all(layer.lora_A.grad == 0)
    assert layer.lora_B.grad.abs().max() > 0
    with torch.no_grad():
        g = 2 * (layer.base(x) - target)  # dL/dh (h = base output at init)
        torch.testing.assert_close(layer.lora_B.grad, layer.scaling * g.T @ (x @ layer.lora_A.T), rtol=0, atol=1e-12)


# ------------------------------------------------------------------ apply_lora


def test_apply_lora_matches_on_dot_boundary_and_returns_names():
    net = make_net()
    x = torch.randn(4, 8)
    before = net(x)
    assert apply_lora(net, "q", r=2) == ["attn.q"]
    assert isinstance(net.attn.q, LoRALinear)
    assert type(net.attn.xq) is nn.Linear  # "q" does not match "xq"
    assert torch.equal(net(x), before)  # B = 0: the model is unchanged


def test_apply_lora_several_targets_and_full_names():
    net = make_net()
    assert apply_lora(net, ["attn.v", "q", "head"], r=2) == ["attn.v", "attn.q", "head"]
    assert set(lora_layers(net)) == {"attn.q", "attn.v", "head"}


def test_apply_lora_checks_everything_before_changing_anything():
    for targets, r, error in [
        (["q", "nope"], 2, ValueError),  # second target matches nothing
        (["q", "norm"], 2, TypeError),  # second target is not a Linear
        (["q", "head"], 4, ValueError),
    ]:  # r=4 fits q (8x8) but not head (8->3)
        net = make_net()
        before = snapshot(net)
        with pytest.raises(error):
            apply_lora(net, targets, r=r)
        assert_same(before, snapshot(net))
        assert not lora_layers(net)


def test_apply_lora_target_matching_nothing_lists_the_linear_layers():
    net = make_net()
    with pytest.raises(ValueError, match="matches no nn.Linear") as info:
        apply_lora(net, "q_lin")
    for leaf in ["q", "xq", "v", "ffn", "head"]:
        assert f"'{leaf}'" in str(info.value)


def test_apply_lora_twice_raises():
    net = make_net()
    apply_lora(net, "q", r=2)
    before = snapshot(net)
    with pytest.raises(ValueError, match="already LoRA-wrapped"):
        apply_lora(net, ["v", "q"], r=2)
    assert_same(before, snapshot(net))


def test_apply_lora_non_linear_target_is_a_type_error():
    with pytest.raises(TypeError, match="LayerNorm.*nn.Linear"):
        apply_lora(make_net(), "norm")


def test_apply_lora_empty_targets():
    with pytest.raises(ValueError, match="target_modules is empty"):
        apply_lora(make_net(), [])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), r"r must be a whole number in \[1, 8\] \(at most min\(in_features, out_features\) for a"),
        (dict(r=9), r"r must be a whole number in \[1, 8\] .*, got 9"),
        (dict(r=2.0), r"r must be a whole number .* got float 2.0"),
        (dict(r=True), r"r must be a whole number .* got bool True"),
        (dict(lora_alpha=0), r"lora_alpha must be a finite number > 0 \(scaling = lora_alpha / r\)"),
        (dict(lora_alpha=-1.0), r"lora_alpha must be a finite number > 0"),
        (dict(lora_dropout=1.0), r"lora_dropout must be a finite number in \[0, 1\)"),
        (dict(lora_dropout=-0.1), r"lora_dropout must be a finite number in \[0, 1\)"),
    ],
)
def test_bad_arguments_say_what_is_valid(kwargs, match):
    net = make_net()
    before = snapshot(net)
    with pytest.raises(ValueError, match=match):
        apply_lora(net, ["q", "v"], **kwargs)
    assert_same(before, snapshot(net))
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(8, 8), **kwargs)


def test_lora_linear_wraps_only_linear():
    with pytest.raises(TypeError, match="nn.Linear, got Conv1d"):
        LoRALinear(nn.Conv1d(4, 4, 1))


# ------------------------------------------------------------------ freezing and counting


def test_mark_only_lora_trainable_with_extra_module():
    net = make_net()
    apply_lora(net, ["q", "v"], r=2)
    mark_only_lora_trainable(net, extra_trainable=["head"])
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"attn.q.lora_A", "attn.q.lora_B", "attn.v.lora_A", "attn.v.lora_B", "head.weight", "head.bias"}


def test_mark_only_lora_trainable_unknown_extra_leaves_model_unchanged():
    net = make_net()
    apply_lora(net, ["q", "v"], r=2)
    before = snapshot(net)
    with pytest.raises(ValueError, match="no module named 'classifier'"):
        mark_only_lora_trainable(net, extra_trainable=["classifier"])
    assert_same(before, snapshot(net))


def test_mark_only_lora_trainable_without_lora_layers():
    with pytest.raises(ValueError, match="call apply_lora"):
        mark_only_lora_trainable(make_net())


def test_freeze_all_except_returns_unfrozen_names():
    net = make_net()
    assert freeze_all_except(net, ["ffn", "norm"]) == ["ffn", "norm"]
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {
        "ffn.weight",
        "ffn.bias",
        "norm.weight",
        "norm.bias",
    }


def test_count_parameters_against_hand_count():
    net = make_net()
    d = 8
    total = 3 * (d * d + d) + (d * d + d) + 2 * d + (d * 3 + 3)  # attn q/xq/v, ffn, norm, head
    assert count_parameters(net).trainable == count_parameters(net).total == total == 331
    apply_lora(net, ["q", "v"], r=2)
    mark_only_lora_trainable(net, ["head"])
    lora = 2 * 2 * (d + d)
    count = count_parameters(net)
    assert (count.trainable, count.total) == (lora + d * 3 + 3, total + lora) == (91, 395)
    assert str(count) == "trainable params: 91 || all params: 395 || trainable: 23.04%"


def test_count_parameters_counts_shared_tensors_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, shared)
    assert count_parameters(model).total == 20


# ------------------------------------------------------------------ merge_and_unload


def test_merge_and_unload_gives_plain_linear_and_same_outputs():
    net = make_net()
    apply_lora(net, ["q", "v", "head"], r=2)
    for layer in lora_layers(net).values():
        with torch.no_grad():
            layer.lora_B.normal_()
    x = torch.randn(6, 8)
    expected = net(x).detach()
    merged = merge_and_unload(net)
    assert not lora_layers(merged)
    assert all(type(m) is nn.Linear for m in [merged.attn.q, merged.attn.v, merged.head])
    assert merged.state_dict().keys() == Net().state_dict().keys()  # loads into the plain architecture
    torch.testing.assert_close(merged.eval()(x), expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ PEFT as the reference


def peft_pair(use_rslora, r=4, lora_alpha=4, seed=0):
    """Our LoRA model and a PEFT LoRA model with the same base, the same settings and the same A, B."""
    from peft import LoraConfig, get_peft_model

    ours = make_net(seed)
    peft_model = get_peft_model(
        copy.deepcopy(ours),
        LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=["q", "v"], lora_dropout=0.0, use_rslora=use_rslora),
    )
    apply_lora(ours, ["q", "v"], r=r, lora_alpha=lora_alpha, use_rslora=use_rslora)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            layer.lora_B.normal_()
            theirs = peft_model.base_model.model.get_submodule(name)
            assert theirs.scaling["default"] == pytest.approx(layer.scaling)
            theirs.lora_A["default"].weight.copy_(layer.lora_A)
            theirs.lora_B["default"].weight.copy_(layer.lora_B)
    return ours.eval(), peft_model.eval()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_same_outputs_as_peft(use_rslora):
    ours, peft_model = peft_pair(use_rslora)
    wrapped_by_peft = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and hasattr(m, "base_layer")
    }
    assert wrapped_by_peft == set(lora_layers(ours)) == {"attn.q", "attn.v"}
    x = torch.randn(16, 8)
    with torch.no_grad():
        assert (ours(x) - make_net(0)(x)).abs().max() > 1e-3  # the adapters do change the output...
        assert (ours(x) - peft_model(x)).abs().max() < 1e-6  # ...in the same way in both libraries


@pytest.mark.parametrize("use_rslora", [False, True])
def test_same_merged_weights_as_peft(use_rslora):
    ours, peft_model = peft_pair(use_rslora)
    theirs = peft_model.merge_and_unload()
    merged = merge_and_unload(ours)
    for name in ["attn.q", "attn.v", "attn.xq", "ffn", "head"]:
        torch.testing.assert_close(
            merged.get_submodule(name).weight, theirs.get_submodule(name).weight, rtol=0, atol=1e-6
        )


# ------------------------------------------------------------------ robustness (issue 14)
# state_dict round trips with the merged flag, shared layers, meta tensors, argument types


def lora_net(seed=0, merged=False):
    """make_net(seed) with LoRA (r=2, alpha=4) on q and v, B random as if trained."""
    net = make_net(seed)
    apply_lora(net, ["q", "v"], r=2, lora_alpha=4)
    torch.manual_seed(seed + 10)
    with torch.no_grad():
        for layer in lora_layers(net).values():
            layer.lora_B.normal_()
    if merged:
        merge_lora(net)
    return net.eval()


def test_state_dict_of_a_merged_model_reproduces_it():
    source = lora_net(merged=True)
    x = torch.randn(6, 8)
    target = lora_net(seed=1)  # other weights, unmerged
    target.load_state_dict(source.state_dict())  # strict: the flags are part of the state
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)  # the update is not added twice
    assert all(layer.merged for layer in lora_layers(target).values())
    unmerge_lora(target)
    torch.testing.assert_close(target.attn.q.base.weight, lora_net().attn.q.base.weight, rtol=0, atol=1e-6)
    assert source.state_dict()["attn.q.lora_merged"].item() is True
    assert target.state_dict()["attn.q.lora_merged"].item() is False


def test_load_state_dict_into_a_merged_model_then_unmerge_keeps_W0():
    source = lora_net(seed=1)  # unmerged
    target = lora_net(seed=0, merged=True)
    x = torch.randn(6, 8)
    target.load_state_dict(source.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    unmerge_lora(target)  # nothing to take out: the loaded W0 is plain
    for name, layer in lora_layers(target).items():
        assert torch.equal(layer.base.weight, lora_layers(source)[name].base.weight)


def test_loading_only_A_and_B_into_a_merged_model_swaps_the_update_exactly():
    source, target = lora_net(seed=1), lora_net(seed=0, merged=True)
    W0 = {n: m.base.weight.clone() for n, m in lora_layers(lora_net(seed=0)).items()}
    factors = {k: v for k, v in source.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}
    target.load_state_dict(factors, strict=False)
    for name, layer in lora_layers(target).items():  # still merged, now with the new update
        assert layer.merged
        torch.testing.assert_close(
            layer.base.weight, W0[name] + lora_layers(source)[name].delta_weight().detach(), rtol=0, atol=1e-6
        )
    unmerge_lora(target)
    for name, layer in lora_layers(target).items():
        torch.testing.assert_close(layer.base.weight, W0[name], rtol=0, atol=1e-6)


def test_a_merged_base_weight_without_its_factors_is_refused():
    state = {
        k: v
        for k, v in lora_net(merged=True).state_dict().items()
        if k.startswith("attn.q.") and not k.endswith(".lora_B")
    }
    layer = lora_net().attn.q
    with pytest.raises(RuntimeError, match="merged base.weight .* without its lora_A and lora_B"):
        layer.load_state_dict({k.removeprefix("attn.q."): v for k, v in state.items()}, strict=False)


def test_a_state_dict_saved_without_the_flags_still_loads_strictly_as_unmerged():
    source = lora_net(seed=1)
    old = {k: v for k, v in source.state_dict().items() if not k.endswith((".lora_merged", ".lora_pissa"))}
    target = lora_net(seed=0)
    target.load_state_dict(old)  # strict=True: the missing flags are not an error
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


@pytest.mark.parametrize("alpha", [float("inf"), float("nan"), -float("inf")])
def test_non_finite_lora_alpha_is_refused(alpha):
    net = make_net()
    before = snapshot(net)
    with pytest.raises(ValueError, match="lora_alpha must be a finite number > 0"):
        apply_lora(net, "q", r=2, lora_alpha=alpha)
    assert_same(before, snapshot(net))
    with pytest.raises(ValueError, match="lora_alpha must be a finite number > 0"):
        LoRALinear(nn.Linear(8, 8), r=2, lora_alpha=alpha)


def test_numpy_numbers_are_accepted_as_plain_python_numbers():
    import numpy as np

    layer = LoRALinear(nn.Linear(8, 8), r=np.int64(4), lora_alpha=np.float32(8))
    assert type(layer.r) is int and type(layer.lora_alpha) is float
    assert (layer.r, layer.lora_alpha, layer.scaling) == (4, 8.0, 2.0)
    assert type(LoRALinear(nn.Linear(8, 8), r=2, lora_alpha=np.int64(16)).lora_alpha) is int


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(lora_alpha="16"), TypeError, "lora_alpha must be a number > 0 .* str '16': write it without quotes"),
        (dict(lora_alpha=None), TypeError, "lora_alpha must be a number > 0"),
        (dict(lora_dropout="0.1"), ValueError, r"lora_dropout must be a number in \[0, 1\), got str '0.1'"),
        (dict(target_modules=None), TypeError, r"target_modules must be a module name or a list of names .* got None"),
        (dict(target_modules=["q", 3]), TypeError, r"target_modules must hold module names \(str\), got \[3\]"),
    ],
)
def test_wrong_types_fail_early_and_clearly(kwargs, error, match):
    net = make_net()
    before = snapshot(net)
    with pytest.raises(error, match=match):
        apply_lora(net, **{"target_modules": ["q", "v"], "r": 2, **kwargs})
    assert_same(before, snapshot(net))


class Tied(nn.Module):
    """One nn.Linear reachable under two names (tied layers): ``shared`` is ``proj``."""

    def __init__(self, d=8):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.shared = self.proj
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        return self.head(torch.relu(self.proj(x)) + self.shared(x))


@pytest.mark.parametrize("target", ["proj", "shared"])
def test_a_layer_shared_under_two_names_is_wrapped_once_under_both(target):
    torch.manual_seed(0)
    net = Tied()
    assert apply_lora(net, target, r=2, lora_alpha=4) == ["proj"]  # listed under its first name
    assert isinstance(net.proj, LoRALinear) and net.shared is net.proj
    assert list(lora_layers(net)) == ["proj"]
    with torch.no_grad():
        net.proj.lora_B.normal_()
    x = torch.randn(5, 8)
    W0, b, A, B = net.proj.base.weight, net.proj.base.bias, net.proj.lora_A, net.proj.lora_B
    h = x @ W0.T + b + 2.0 * (x @ A.T @ B.T)  # both calls go through the update
    with torch.no_grad():
        torch.testing.assert_close(net(x), net.head(torch.relu(h) + h), rtol=0, atol=1e-6)
    assert count_parameters(net).total == 2 * (64 + 8) - (64 + 8) + 18 + 2 * 2 * 8  # shared tensors once
    expected = net(x).detach()
    merge_and_unload(net)
    assert type(net.proj) is nn.Linear and net.shared is net.proj  # both names back to the one plain layer
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-5)


def test_shared_layer_adapter_round_trip(tmp_path):
    from lora_helpers import load_adapter, save_adapter

    torch.manual_seed(0)
    net = Tied()
    apply_lora(net, "shared", r=2)
    with torch.no_grad():
        net.proj.lora_B.normal_()
    save_adapter(net, tmp_path / "a")
    torch.manual_seed(0)
    fresh = load_adapter(Tied(), tmp_path / "a")
    assert fresh.shared is fresh.proj and isinstance(fresh.shared, LoRALinear)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))


def test_meta_layer_after_to_empty_is_filled_by_a_complete_state_dict():
    reference = lora_net(merged=True).attn.q
    with torch.device("meta"):
        layer = LoRALinear(nn.Linear(8, 8), r=2, lora_alpha=4)
    assert layer.lora_A.is_meta and layer.base.weight.is_meta
    layer.to_empty(device="cpu")
    layer.load_state_dict(reference.state_dict())
    assert layer.merged
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(layer.eval()(x), reference(x))


def test_meta_layer_after_to_empty_and_reset_parameters_is_the_base_layer():
    torch.manual_seed(0)
    pretrained = nn.Linear(8, 8)
    with torch.device("meta"):
        layer = LoRALinear(nn.Linear(8, 8), r=2)
    layer.to_empty(device="cpu")
    layer.reset_parameters()  # A random, B zero; W0 is not touched...
    layer.base.load_state_dict(pretrained.state_dict())  # ...it is loaded
    assert torch.all(layer.lora_B == 0) and layer.lora_A.abs().max() > 0
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(layer(x), pretrained(x))
