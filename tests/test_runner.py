"""Tests of lora_helpers.runner (splits, one run, sweeps, McNemar) and of compare_methods on a tiny DistilBERT.

The runs use a 2-layer, 16-wide DistilBERT with random weights on a synthetic task
(the label is whether token 7 occurs), so that each takes a fraction of a second.
"""
import math

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from lora_helpers import get_profile, lora_layers
from lora_helpers.compare import compare_methods, paired_tests, results_json, results_table, summary_rows, verdict
from lora_helpers.experiments import TARGET_SETS, lora_param_count, lora_variant
from lora_helpers.loop import make_batches
from lora_helpers.methods import method_spec
from lora_helpers.runner import TokenizedData, best_run, mcnemar, mean_sd, run, split_validation, sweep


def tiny_backbone(name, seed=0, verbose=False, num_labels=2):
    """A load_backbone-style callable: a 2-layer, 16-wide DistilBERT with random weights, head from ``seed``."""
    config = DistilBertConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                              max_position_embeddings=32, num_labels=num_labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DistilBertForSequenceClassification(config)
        torch.manual_seed(seed)
        model.pre_classifier.reset_parameters()
        model.classifier.reset_parameters()
    return model.eval(), None, "tiny"


def tiny_data(n_train=32, n_val=16, n_test=16, length=10, seed=0) -> TokenizedData:
    """Token ids whose label is whether token 7 occurs: a task a tiny model can start to learn."""
    g = torch.Generator().manual_seed(seed)

    def reviews(n):
        ids = torch.randint(8, 50, (n, length), generator=g)
        labels = torch.arange(n) % 2
        ids[labels == 1, 1] = 7
        return ids.tolist(), labels.tolist()

    (train_ids, train_labels), (val_ids, val_labels), (test_ids, test_labels) = map(reviews, (n_train, n_val, n_test))
    return TokenizedData(train_ids, train_labels, make_batches(val_ids, val_labels, 8, 0),
                         make_batches(test_ids, test_labels, 8, 0), test_labels, batch_size=8, pad_id=0, max_length=length)


@pytest.fixture
def profile():
    return get_profile("quick", lr_lora=5e-3, lr_full=1e-3, lr_head=5e-3, epochs=2, eval_every=3)


# ------------------------------------------------------------------ splits

def test_split_validation_is_balanced_disjoint_and_seeded():
    texts = [f"review {i}" for i in range(40)]
    data = DatasetDict(train=Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(40)]}),
                       test=Dataset.from_dict({"text": ["t"], "label": [0]}))
    out = split_validation(data, 10, seed=0)
    assert (len(out["train"]), len(out["validation"]), len(out["test"])) == (30, 10, 1)
    assert sum(out["validation"]["label"]) == 5                          # balanced
    assert not set(out["train"]["text"]) & set(out["validation"]["text"])  # disjoint
    assert set(out["train"]["text"]) | set(out["validation"]["text"]) == set(texts)
    assert split_validation(data, 10, seed=0)["validation"]["text"] == out["validation"]["text"]
    assert split_validation(data, 10, seed=1)["validation"]["text"] != out["validation"]["text"]
    with pytest.raises(ValueError, match="n_val=40"):
        split_validation(data, 40)


# ------------------------------------------------------------------ McNemar against hand-computed cases

def test_mcnemar_known_answers():
    labels = [1] * 10
    # A right on all 10, B wrong on 5 of them: b = 5, c = 0, p = 2 * (1/2)^5 = 0.0625
    out = mcnemar([1] * 10, [1] * 5 + [0] * 5, labels)
    assert (out["a_only"], out["b_only"]) == (5, 0) and out["p_value"] == pytest.approx(0.0625)
    assert out["accuracy_difference"] == pytest.approx(0.5)
    # b = 1, c = 9: p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024
    a = [1] + [0] * 9 + [1] * 5
    b = [0] + [1] * 9 + [1] * 5
    assert mcnemar(a, b, [1] * 15)["p_value"] == pytest.approx(22 / 1024)
    # identical predictions: no disagreement, p = 1; symmetric disagreement: p = 1 (capped)
    assert mcnemar([0, 1], [0, 1], [0, 1])["p_value"] == 1.0
    assert mcnemar([1, 0], [0, 1], [1, 1])["p_value"] == 1.0
    with pytest.raises(ValueError, match="one length"):
        mcnemar([1], [1, 0], [1])


def test_mean_sd_and_verdicts():
    assert mean_sd([0.7, 0.8, 0.9]) == pytest.approx((0.8, 0.1))
    assert mean_sd([0.5]) == (0.5, 0.0)
    sig_up = {"p_value": 0.01, "accuracy_difference": 0.05}
    sig_down = {"p_value": 0.01, "accuracy_difference": -0.05}
    noise = {"p_value": 0.3, "accuracy_difference": 0.05}
    assert verdict([sig_up, sig_up]) == "better" and verdict([sig_down] * 3) == "worse"
    assert verdict([sig_up, noise]) == "within noise" and verdict([sig_up, sig_down]) == "within noise"


# ------------------------------------------------------------------ one run

def test_run_lora_trains_only_lora_and_head_and_repeats_exactly(profile):
    data = tiny_data()
    spec = lora_variant(TARGET_SETS["q,v"], r=2, profile=profile)
    res = run(spec, data, profile, seed=0, backbone=tiny_backbone, device="cpu", keep_model=True, test=True)
    model = res.model
    assert res.train_steps == len(res.losses) == 2 * 4 and all(math.isfinite(x) for x in res.losses)
    assert [p["step"] for p in res.val_curve] == [3, 6, 8]
    assert res.trainable_params == lora_param_count(model, ["q_lin", "v_lin"], 2) + 16 * 16 + 16 + 16 * 2 + 2
    assert res.lr == profile.lr_lora and res.head_lr == profile.lr_head and res.test is not None
    assert len(res.test["predictions"]) == data.n_test
    for name, layer in lora_layers(model).items():  # the saved factors are the model's; B started at zero
        torch.testing.assert_close(res.delta_weight(name), layer.delta_weight().detach())
        assert res.initial_factors[name]["B"].abs().max() == 0 and res.factors[name]["B"].abs().max() > 0
        torch.testing.assert_close(res.updates[f"{name}.weight"], layer.delta_weight().detach())
    total = sum(layer.delta_weight().detach().square().sum() for layer in lora_layers(model).values())
    assert res.update_norm() == pytest.approx(math.sqrt(total), rel=1e-5) and res.update_norm(initial=True) == 0
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "classifier" in n for n in trained)
    again = run(spec, data, profile, seed=0, backbone=tiny_backbone, device="cpu")
    assert again.losses == res.losses and again.test is None  # same seed: the same run; no test unless asked
    other = run(spec, data, profile, seed=1, backbone=tiny_backbone, device="cpu")
    assert other.losses != res.losses


def test_run_full_keeps_the_update_and_rslora_pissa_variants(profile):
    data = tiny_data()
    full = run(method_spec("full", profile), data, profile, backbone=tiny_backbone, device="cpu")
    assert full.lr == profile.lr_full and full.trainable_percent == 100.0
    assert len(full.updates) == 4 and all(dW.norm() > 0 for dW in full.updates.values())  # q, v of 2 layers
    rs = run(lora_variant(["q_lin"], r=4, alpha=8, rslora=True), data, profile, backbone=tiny_backbone,
             device="cpu", keep_model=True)
    assert all(layer.scaling == pytest.approx(8 / math.sqrt(4)) for layer in lora_layers(rs.model).values())
    pissa = run(lora_variant(["q_lin"], r=4, init="pissa", lora_dropout=0.0), data, profile, backbone=tiny_backbone,
                device="cpu")
    assert all(f["B"].abs().max() > 0 for f in pissa.initial_factors.values())  # B A starts at W's principal part


def test_sweep_picks_the_best_validation_run(profile):
    data = tiny_data()
    results = sweep(method_spec("head", profile), data, profile, [1e-4, 5e-2], backbone=tiny_backbone,
                    device="cpu", verbose=False)
    assert [r.lr for r in results] == [1e-4, 5e-2] and all(r.test is None for r in results)
    assert [r.head_lr for r in results] == [1e-4, 5e-2]  # head only: the head is the method
    best = best_run(results)
    assert best.val_accuracy == max(r.val_accuracy for r in results)


# ------------------------------------------------------------------ the comparison

def test_compare_methods_tunes_seeds_and_tests_once(profile):
    data = tiny_data()
    results = compare_methods(profile, methods=("full", "lora", "head"), seeds=(0, 1),
                              lrs={"head": [1e-3, 2e-2], "lora": [1e-3, 1e-2]}, data=data,
                              backbone=tiny_backbone, device="cpu", verbose=False)
    runs = results["runs"]
    assert list(runs) == ["full", "lora", "head"] and all(len(rs) == 2 for rs in runs.values())
    best_head = best_run(results["sweep"]["head"]).lr
    assert results["head_lr"] == best_head
    assert all(r.head_lr == best_head for rs in runs.values() for r in rs)  # every head trained alike
    assert runs["lora"][0].lr == best_run(results["sweep"]["lora"]).lr == runs["lora"][1].lr
    assert runs["full"][0].lr == profile.lr_full                       # not swept: the profile's rate
    assert all(r.test is not None for rs in runs.values() for r in rs)
    assert all(r.test is None for r in results["sweep"]["lora"] if r is not runs["lora"][0])
    tests = paired_tests(results)
    assert set(tests) == {"lora", "head"} and [t["seed"] for t in tests["lora"]] == [0, 1]
    for t, a, b in zip(tests["lora"], runs["lora"], runs["full"]):
        assert t["accuracy_difference"] == pytest.approx(a.test_accuracy - b.test_accuracy)
    rows = summary_rows(results)
    assert rows[1]["test_mean"] == pytest.approx(np.mean([r.test_accuracy for r in runs["lora"]]))
    assert rows[0].get("verdict") is None and rows[1]["verdict"] in ("better", "worse", "within noise")
    table = results_table(rows).splitlines()
    assert len(table) == 5 and table[2].startswith("| full |")
    saved = results_json(results)
    assert saved["summary"][1]["method"] == "lora" and len(saved["runs"]["lora"][0]["test_predictions"]) == 16
    with pytest.raises(ValueError, match="unknown methods"):
        compare_methods(profile, methods=("qlora",), data=data, backbone=tiny_backbone)
