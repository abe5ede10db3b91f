"""Tests of lora_helpers.experiments: parameter budgets, and the PiSSA-like init (notebook 05; runs: test_runner.py)."""

import pytest
import torch
import torch.nn as nn

from lora_helpers import LoRALinear, apply_lora, get_profile, lora_layers
from lora_helpers.experiments import (
    TARGET_SETS,
    lora_param_count,
    lora_variant,
    max_rank,
    rank_for_budget,
    study_profile,
)
from lora_helpers.lora import pissa_init_
from lora_helpers.methods import method_spec


class Block(nn.Module):
    """DistilBERT's names at a small size: attention.{q,k,v,out}_lin (d x d), ffn.lin1 (d -> h), ffn.lin2 (h -> d)."""

    def __init__(self, d=8, h=32):
        super().__init__()
        self.attention = nn.ModuleDict({n: nn.Linear(d, d) for n in ("q_lin", "k_lin", "v_lin", "out_lin")})
        self.ffn = nn.ModuleDict({"lin1": nn.Linear(d, h), "lin2": nn.Linear(h, d)})


class Tiny(nn.Module):
    def __init__(self, n_layers=2, d=8, h=32):
        super().__init__()
        self.layer = nn.ModuleList([Block(d, h) for _ in range(n_layers)])
        self.classifier = nn.Linear(d, 2)


# ------------------------------------------------------------------ parameter budgets


def test_lora_param_count_by_hand():
    model = Tiny()  # 2 layers, d = 8, h = 32
    assert lora_param_count(model, ["q_lin"], 1) == 2 * (8 + 8)
    assert lora_param_count(model, ["q_lin", "v_lin"], 4) == 2 * 2 * 4 * (8 + 8)
    # lin1 (8 -> 32) and lin2 (32 -> 8) cost 40 per rank each, the attention matrices 16
    assert lora_param_count(model, TARGET_SETS["q,k,v,o,ffn"], 1) == 2 * (4 * 16 + 2 * 40)
    # the count is what apply_lora then creates
    apply_lora(model, TARGET_SETS["q,k,v,o,ffn"], r=3)
    created = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in lora_layers(model).values())
    assert created == lora_param_count(model, TARGET_SETS["q,k,v,o,ffn"], 3) == 3 * 2 * 144
    assert max_rank(model, TARGET_SETS["q,k,v,o,ffn"]) == 8


def test_rank_for_budget_exact_counts():
    model = Tiny()
    budget = lora_param_count(model, ["q_lin", "v_lin"], 4)  # 256: the q,v r=4 budget
    assert rank_for_budget(model, ["q_lin", "v_lin"], budget) == 4
    assert rank_for_budget(model, ["q_lin"], budget) == 8  # half the matrices, twice the rank
    assert rank_for_budget(model, TARGET_SETS["q,k,v,o"], budget) == 2
    # 288 per rank with the FFN: 256 / 288 = 0.89 -> r = 1 (288 params, one step of 288 away at most)
    r = rank_for_budget(model, TARGET_SETS["q,k,v,o,ffn"], budget)
    assert r == 1 and abs(lora_param_count(model, TARGET_SETS["q,k,v,o,ffn"], r) - budget) <= 288 / 2
    # nearest, halves rounded up: q alone costs 2 x 16 = 32 per rank; 48 / 32 = 1.5 -> 2, 47 / 32 -> 1
    assert rank_for_budget(model, ["q_lin"], 48) == 2 and rank_for_budget(model, ["q_lin"], 47) == 1
    assert rank_for_budget(model, ["q_lin"], 1) == 1  # never below 1
    assert rank_for_budget(model, ["q_lin"], 10**6) == 8  # never above min(d_in, d_out)
    with pytest.raises(ValueError):
        rank_for_budget(model, ["q_lin"], 0)
    with pytest.raises(ValueError):
        rank_for_budget(model, ["nothing"], 100)


def test_a_target_that_matches_nothing_is_an_error_naming_the_layers():
    # one typo among good targets must not silently shrink the count
    with pytest.raises(ValueError, match=r"\['v_lni'\] match no nn.Linear.*q_lin"):
        lora_param_count(Tiny(), ["q_lin", "v_lni"], 4)


def test_study_profile_scales_from_the_profile():
    smoke, gpu = get_profile("quick"), get_profile("gpu")
    assert study_profile(smoke).max_length == 64 and study_profile(smoke).n_train == 640 < smoke.n_train
    study_gpu = study_profile(gpu)  # twenty runs on a T4: fewer reviews, at most 256 tokens, one pass
    assert (study_gpu.n_train, study_gpu.n_test) == (12_000, 10_000)
    assert (study_gpu.max_length, study_gpu.epochs) == (256, 1)
    # nothing else changed but the setting every study shares: one validation pass
    assert (
        study_gpu.replace(
            n_train=gpu.n_train,
            n_test=gpu.n_test,
            max_length=gpu.max_length,
            epochs=gpu.epochs,
            eval_every=gpu.eval_every,
        )
        == gpu
    )
    assert (study_gpu.eval_every, study_profile(smoke).eval_every, study_profile(smoke).name) == (None, None, "quick")
    assert method_spec("lora", study_profile(smoke)).lr == method_spec("lora", smoke).lr  # tuned in notebook 04
    assert lora_variant(("q_lin", "v_lin"), 8).lora_dropout == 0.0  # the studies' LoRA: no dropout (PiSSA)
    assert study_profile(smoke, n_train=10).n_train == 10


# ------------------------------------------------------------------ PiSSA-like init


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_init_keeps_outputs_and_puts_the_principal_part_in_B_A(use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(12, 10, dtype=torch.float64)
    W = base.weight.detach().clone()
    x = torch.randn(5, 12, dtype=torch.float64)
    layer = LoRALinear(base, r=3, lora_alpha=6, use_rslora=use_rslora).eval()
    before = layer(x)
    assert pissa_init_(layer) is layer
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-12)  # the model is unchanged
    # independent reference: numpy's SVD
    U, S, Vh = (torch.from_numpy(a) for a in __import__("numpy").linalg.svd(W.numpy(), full_matrices=False))
    principal = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    torch.testing.assert_close(layer.scaling * layer.lora_B @ layer.lora_A, principal, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.base.weight, W - principal, rtol=0, atol=1e-12)
    # the residual keeps the rest of the spectrum: its top singular value is sigma_4
    assert torch.linalg.svdvals(layer.base.weight.detach())[0].item() == pytest.approx(S[3].item())
    # A and B share the singular values evenly: the norms of A's rows equal those of B's columns
    torch.testing.assert_close(layer.lora_A.norm(dim=1), layer.lora_B.norm(dim=0))


def test_pissa_init_refuses_merged_layers_and_plain_linears():
    layer = LoRALinear(nn.Linear(4, 4), r=2)
    layer.merge()
    with pytest.raises(RuntimeError):
        pissa_init_(layer)
    with pytest.raises(TypeError):
        pissa_init_(nn.Linear(4, 4))


def test_pissa_init_marks_the_layer_and_refuses_a_second_call():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 6), r=2)
    W = layer.base.weight.detach().clone()
    pissa_init_(layer)
    assert layer.pissa and layer.state_dict()["lora_pissa"].item() is True
    residual = layer.base.weight.detach().clone()
    with pytest.raises(RuntimeError, match="already PiSSA-initialised"):
        pissa_init_(layer)
    assert torch.equal(layer.base.weight, residual)  # unchanged by the refused call
    assert not torch.equal(residual, W)
