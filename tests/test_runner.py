"""Tests of lora_helpers.runner (splits, one run, sweeps, McNemar) and of compare_methods on a tiny DistilBERT.

The runs use a 2-layer, 16-wide DistilBERT with random weights on a synthetic task
(the label is whether token 7 occurs), so that each takes a fraction of a second.
"""

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from lora_helpers import get_profile, method_spec
from lora_helpers.compare import (
    compare_methods,
    control_comparison,
    next_rate,
    paired_tests,
    results_json,
    results_table,
    summary_rows,
)
from lora_helpers.experiments import lora_variant
from lora_helpers.loop import make_batches
from lora_helpers.runner import TokenizedData, best_run, mcnemar, mean_sd, split_validation
from lora_helpers.stats import VERDICTS


def tiny_backbone(name, seed=0, verbose=False, num_labels=2):
    """A load_backbone-style callable: a 2-layer, 16-wide DistilBERT with random weights, head from ``seed``."""
    config = DistilBertConfig(
        vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=32, num_labels=num_labels
    )
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
    return TokenizedData(
        train_ids,
        train_labels,
        make_batches(val_ids, val_labels, 8, 0),
        make_batches(test_ids, test_labels, 8, 0),
        test_labels,
        batch_size=8,
        pad_id=0,
        max_length=length,
    )


@pytest.fixture
def profile():
    return get_profile("quick", epochs=2, eval_every=3)


# ------------------------------------------------------------------ splits


def test_split_validation_is_balanced_disjoint_and_seeded():
    texts = [f"review {i}" for i in range(40)]
    data = DatasetDict(
        train=Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(40)]}),
        test=Dataset.from_dict({"text": ["t"], "label": [0]}),
    )
    out = split_validation(data, 10, seed=0)
    assert (len(out["train"]), len(out["validation"]), len(out["test"])) == (30, 10, 1)
    assert sum(out["validation"]["label"]) == 5  # balanced
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


def test_mean_sd():
    assert mean_sd([0.7, 0.8, 0.9]) == pytest.approx((0.8, 0.1))
    assert mean_sd([0.5]) == (0.5, 0.0)


def test_next_rate_walks_the_half_decade_grid():
    assert next_rate(3e-3, up=True) == pytest.approx(1e-2) and next_rate(1e-3, up=True) == pytest.approx(3e-3)
    assert next_rate(1e-3, up=False) == pytest.approx(3e-4) and next_rate(3e-4, up=False) == pytest.approx(1e-4)
    assert next_rate(1e-4, up=True) == pytest.approx(3e-4)


# ------------------------------------------------------------------ the comparison


def test_compare_methods_tunes_seeds_and_tests_once(profile):
    data = tiny_data()
    results = compare_methods(
        profile,
        methods=("full", "lora", "head"),
        seeds=(0, 1),
        lrs={"head": [1e-3, 2e-2], "lora": [1e-3, 1e-2]},
        data=data,
        backbone=tiny_backbone,
        device="cpu",
        verbose=False,
    )
    runs = results["runs"]
    assert list(runs) == ["full", "lora", "head"] and all(len(rs) == 2 for rs in runs.values())
    best_head = best_run(results["sweep"]["head"]).lr
    assert results["head_lr"] == best_head
    assert all(r.head_lr == best_head for rs in runs.values() for r in rs)  # every head trained alike
    assert runs["lora"][0].lr == best_run(results["sweep"]["lora"]).lr == runs["lora"][1].lr
    assert runs["full"][0].lr == method_spec("full", profile).lr == 1e-4  # not swept: the rate tuned for quick
    assert all(r.test is not None for rs in runs.values() for r in rs)
    assert all(r.test is None for r in results["sweep"]["lora"] if r is not runs["lora"][0])
    tests = paired_tests(results)
    assert set(tests) == {"lora", "head"} and [t["seed"] for t in tests["lora"]] == [0, 1]
    for t, a, b in zip(tests["lora"], runs["lora"], runs["full"]):
        assert t["accuracy_difference"] == pytest.approx(a.test_accuracy - b.test_accuracy)
    rows = summary_rows(results)
    assert rows[1]["test_mean"] == pytest.approx(np.mean([r.test_accuracy for r in runs["lora"]]))
    assert rows[0].get("verdict") is None and rows[1]["verdict"] in VERDICTS
    assert rows[1]["difference"] == pytest.approx(np.mean([t["accuracy_difference"] for t in tests["lora"]]))
    table = results_table(rows).splitlines()
    assert len(table) == 5 and table[2].startswith("| full |")
    saved = results_json(results)
    assert saved["summary"][1]["method"] == "lora" and len(saved["runs"]["lora"][0]["test_predictions"]) == 16
    with pytest.raises(ValueError, match="unknown methods"):
        compare_methods(profile, methods=("qlora",), data=data, backbone=tiny_backbone)


def test_an_edge_optimum_grows_the_grid_and_the_control_reruns_the_configuration(profile):
    """A grid whose best rate sits at its edge grows past it; the control is the same method with new seeds."""
    data = tiny_data()
    results = compare_methods(
        profile,
        methods=("lora", "head"),
        seeds=(0, 1),
        lrs={"lora": [1e-6, 3e-6]},
        data=data,
        backbone=tiny_backbone,
        device="cpu",
        verbose=False,
        extend_grid=True,
        control="lora",
    )
    tried = sorted(r.lr for r in results["sweep"]["lora"])
    chosen = results["lrs"]["lora"]
    # a rate that tiny learns nothing, so the best is the largest until the grid has grown past it
    assert len(tried) > 2 and tried[:2] == pytest.approx([1e-6, 3e-6])
    assert chosen != tried[0] and (chosen != tried[-1] or len(tried) == 2 + 4)  # inside, or the growth limit reached
    control = results["control"]
    assert control["method"] == "lora" and [r.seed for r in control["runs"]] == [2, 3]
    assert all(r.lr == chosen and r.test is not None for r in control["runs"])
    c = control_comparison(results)
    assert c["seeds_a"] == [2, 3] and c["seeds_b"] == [0, 1] and c["verdict"] in VERDICTS
    assert all(v == float(f"{v:.0e}") for v in tried)  # rates on the grid, no 2.9999999999999997e-05
    saved = results_json(results)
    assert saved["control"]["method"] == "lora" and len(saved["control"]["runs"]) == 2
    assert control_comparison(saved)["mean"] == pytest.approx(c["mean"])  # the saved JSON gives the same answer
    with pytest.raises(ValueError, match="control"):
        compare_methods(profile, methods=("lora",), control="full", data=data, backbone=tiny_backbone)


def test_variants_race_under_their_own_names(profile):

    spec = lora_variant(("q_lin",), 2, name="q r=2")
    results = compare_methods(
        profile,
        methods=("head", spec),
        seeds=(0,),
        data=tiny_data(),
        backbone=tiny_backbone,
        device="cpu",
        verbose=False,
    )
    assert list(results["runs"]) == ["head", "q r=2"] and results["runs"]["q r=2"][0].lora_layers > 0
    rows = summary_rows(results, reference="q r=2")
    assert rows[0]["verdict"] == "no verdict"  # one seed


def test_a_sweep_seed_is_never_tested_and_every_tested_seed_trains_afresh(profile):
    data = tiny_data()
    results = compare_methods(
        profile,
        methods=("lora",),
        seeds=(0, 1),
        lrs={"lora": [1e-3, 1e-2]},
        data=data,
        backbone=tiny_backbone,
        device="cpu",
        verbose=False,
        sweep_seed=7,
    )
    assert {r.seed for r in results["sweep"]["lora"]} == {7} and results["sweep_seed"] == 7
    assert [r.seed for r in results["runs"]["lora"]] == [0, 1]
    assert all(r.model is None for r in results["sweep"]["lora"])
    with pytest.raises(ValueError, match="never tested"):
        compare_methods(
            profile,
            methods=("lora",),
            seeds=(0, 1),
            lrs={"lora": [1e-3]},
            data=data,
            backbone=tiny_backbone,
            sweep_seed=1,
        )
