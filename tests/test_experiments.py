"""Tests of lora_helpers.experiments: parameter budgets, the PiSSA-like init and the study runner (notebook 05)."""
import math

import pytest
import torch
import torch.nn as nn
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from lora_helpers import LoRALinear, apply_lora, get_profile, lora_layers
from lora_helpers.experiments import (TARGET_SETS, StudyData, VariantResult, lora_param_count, max_rank,
                                      pissa_init_, rank_for_budget, study_profile, train_lora_variant)


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
    created = sum(l.lora_A.numel() + l.lora_B.numel() for l in lora_layers(model).values())
    assert created == lora_param_count(model, TARGET_SETS["q,k,v,o,ffn"], 3) == 3 * 2 * 144
    assert max_rank(model, TARGET_SETS["q,k,v,o,ffn"]) == 8


def test_rank_for_budget_exact_counts():
    model = Tiny()
    budget = lora_param_count(model, ["q_lin", "v_lin"], 4)  # 256: the q,v r=4 budget
    assert rank_for_budget(model, ["q_lin", "v_lin"], budget) == 4
    assert rank_for_budget(model, ["q_lin"], budget) == 8          # half the matrices, twice the rank
    assert rank_for_budget(model, TARGET_SETS["q,k,v,o"], budget) == 2
    # 288 per rank with the FFN: 256 / 288 = 0.89 -> r = 1 (288 params, one step of 288 away at most)
    r = rank_for_budget(model, TARGET_SETS["q,k,v,o,ffn"], budget)
    assert r == 1 and abs(lora_param_count(model, TARGET_SETS["q,k,v,o,ffn"], r) - budget) <= 288 / 2
    # nearest, halves rounded up: q alone costs 2 x 16 = 32 per rank; 48 / 32 = 1.5 -> 2, 47 / 32 -> 1
    assert rank_for_budget(model, ["q_lin"], 48) == 2 and rank_for_budget(model, ["q_lin"], 47) == 1
    assert rank_for_budget(model, ["q_lin"], 1) == 1                # never below 1
    assert rank_for_budget(model, ["q_lin"], 10**6) == 8             # never above min(d_in, d_out)
    with pytest.raises(ValueError):
        rank_for_budget(model, ["q_lin"], 0)
    with pytest.raises(ValueError):
        rank_for_budget(model, ["nothing"], 100)


def test_a_target_that_matches_nothing_is_an_error_naming_the_layers():
    # one typo among good targets must not silently shrink the count
    with pytest.raises(ValueError, match=r"\['v_lni'\] match no nn.Linear.*q_lin"):
        lora_param_count(Tiny(), ["q_lin", "v_lni"], 4)


def test_study_profile_scales_from_the_profile():
    smoke, gpu = get_profile("smoke"), get_profile("gpu")
    assert study_profile(smoke).max_length == 64 and study_profile(smoke).n_train == smoke.n_train
    study_gpu = study_profile(gpu)  # all the reviews, shorter and fewer passes
    assert (study_gpu.n_train, study_gpu.n_test) == (gpu.n_train, gpu.n_test) and study_gpu.n_train is None
    assert (study_gpu.max_length, study_gpu.epochs) == (256, 1)
    assert study_gpu.replace(max_length=gpu.max_length, epochs=gpu.epochs) == gpu  # nothing else changed
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
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-12)         # the model is unchanged
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


# ------------------------------------------------------------------ the runner, on a tiny DistilBERT

def tiny_backbone(name, seed=0, verbose=False, num_labels=2):
    """A load_backbone-style callable: a 2-layer, 16-wide DistilBERT with random weights."""
    config = DistilBertConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                              max_position_embeddings=32, num_labels=num_labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DistilBertForSequenceClassification(config)
    return model.eval(), None, "tiny"


def tiny_data(n_train=32, n_test=16, length=10, seed=0):
    """Token ids whose label is whether token 7 occurs: a task a tiny model can start to learn."""
    g = torch.Generator().manual_seed(seed)

    def reviews(n):
        ids = torch.randint(8, 50, (n, length), generator=g)
        labels = torch.arange(n) % 2
        ids[labels == 1, 1] = 7
        return ids.tolist(), labels.tolist()

    train_ids, train_labels = reviews(n_train)
    test_ids, test_labels = reviews(n_test)
    from lora_helpers.loop import make_batches
    return StudyData(train_ids, train_labels, make_batches(test_ids, test_labels, 8, 0), batch_size=8, pad_id=0)


@pytest.fixture
def tiny_profile():
    return get_profile("smoke", lr_lora=5e-3, epochs=2)


def test_runner_on_a_tiny_setting(tiny_profile, capsys):
    data = tiny_data()
    model, res = train_lora_variant(tiny_profile, data, TARGET_SETS["q,v"], r=2, seed=0, name="tiny q,v",
                                    backbone=tiny_backbone, device="cpu")
    assert isinstance(res, VariantResult)
    assert res.steps == len(res.losses) == 2 * 4 and all(math.isfinite(x) for x in res.losses)
    assert res.lora_params == lora_param_count(model, ["q_lin", "v_lin"], 2) == 2 * 2 * 2 * 32
    assert res.trainable_params == res.lora_params + 16 * 16 + 16 + 16 * 2 + 2  # + pre_classifier, classifier
    assert res.scaling == tiny_profile.lora_alpha / 2 and 0.0 <= res.accuracy <= 1.0
    assert len(lora_layers(model)) == 4
    assert "tiny q,v" in capsys.readouterr().out
    # the saved factors are the model's; B started at zero (the standard init)
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(res.delta_weight(name), layer.delta_weight().detach())
        assert res.initial_factors[name]["B"].abs().max() == 0 and res.factors[name]["B"].abs().max() > 0
    total = sum(layer.delta_weight().detach().square().sum() for layer in lora_layers(model).values())
    assert res.update_norm() == pytest.approx(math.sqrt(total), rel=1e-5) and res.update_norm(initial=True) == 0
    # only LoRA factors and the head trained
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "classifier" in n for n in trained)
    # the same seed repeats exactly; another seed does not
    _, again = train_lora_variant(tiny_profile, data, TARGET_SETS["q,v"], r=2, seed=0, backbone=tiny_backbone,
                                  device="cpu", verbose=False)
    assert again.losses == res.losses
    _, other = train_lora_variant(tiny_profile, data, TARGET_SETS["q,v"], r=2, seed=1, backbone=tiny_backbone,
                                  device="cpu", verbose=False)
    assert other.losses != res.losses


def test_runner_rslora_and_pissa(tiny_profile):
    data = tiny_data()
    _, rs = train_lora_variant(tiny_profile, data, ["q_lin"], r=4, alpha=8, rslora=True, backbone=tiny_backbone,
                               device="cpu", verbose=False)
    assert rs.scaling == pytest.approx(8 / math.sqrt(4)) and rs.rslora
    model, pissa = train_lora_variant(tiny_profile, data, ["q_lin"], r=4, init="pissa", backbone=tiny_backbone,
                                      device="cpu", verbose=False)
    assert pissa.init == "pissa" and all(math.isfinite(x) for x in pissa.losses)
    # before training, B A * scaling was W's principal part, so B is not zero (as it is with init="zero")
    assert all(layer.lora_B.abs().max() > 0 for layer in lora_layers(model).values())
    with pytest.raises(ValueError):
        train_lora_variant(tiny_profile, data, ["q_lin"], r=2, init="gaussian", backbone=tiny_backbone)
