"""Tests of lora_helpers.banner (what a notebook runs, its time here) and compare.committed_run.

The run's shape is checked against what ``loop.train`` really does, the estimate against a sum
written out by hand, and the calibration for what could go wrong: it must leave the model and
the random number generators as they were.
"""

import math

import pytest
import torch
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from lora_helpers import PROFILES, committed_run, get_profile, print_banner
from lora_helpers.banner import estimate_seconds, time_steps
from lora_helpers.compare import committed_runs
from lora_helpers.loop import train
from lora_helpers.methods import head_learning_rate, method_spec

TINY = DistilBertConfig(
    dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=1200, max_position_embeddings=64, num_labels=2
)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return DistilBertForSequenceClassification(TINY)


def test_default_profile_on_a_cpu_is_quick(monkeypatch):
    monkeypatch.delenv("LORA_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_profile().name == "quick"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_profile().name == "gpu"


def test_run_shape_matches_what_train_does():
    """Steps and validation passes as loop.train counts them, on a run small enough to train here."""
    profile = PROFILES["quick"].replace(
        n_train=40, n_val=10, n_test=7, batch_size=4, eval_every=3, eval_batch_size=4, max_length=8
    )
    shape = profile.run_shape()
    model = tiny_model()
    batch = {
        "input_ids": torch.randint(1000, 1200, (4, 8)),
        "attention_mask": torch.ones(4, 8, dtype=torch.long),
        "labels": torch.randint(0, 2, (4,)),
    }
    result = train(model, [batch] * math.ceil(40 / 4), [batch], lr=1e-3, eval_every=3, device="cpu")
    assert shape["steps"] == result.steps == 10
    assert shape["val_passes"] == len(result.evals) == 4  # after steps 3, 6, 9 and the last
    # validation: 4 passes x ceil(10 / 4) batches; test: ceil(7 / 4) batches
    assert shape["eval_batches"] == 4 * 3 + 2


def test_run_shape_of_the_whole_split():
    gpu = PROFILES["gpu"]
    shape = gpu.run_shape()
    assert shape["n_train"] == 25_000 - gpu.n_val and shape["n_test"] == 25_000
    assert shape["steps"] == math.ceil((25_000 - gpu.n_val) / gpu.batch_size)


def test_estimate_is_the_plan_times_the_timed_steps():
    profile = PROFILES["quick"]  # 63 steps; 4 validation passes of 4 batches, the test split in 8
    seconds = {"full": 0.5, "lora": 0.25, "eval_batch": 0.1}
    by_hand = 3 * (63 * 0.5 + 24 * 0.1) + 2 * (63 * 0.25 + 24 * 0.1)
    assert estimate_seconds(profile, {"full": 3, "lora": 2}, seconds) == pytest.approx(by_hand)


def test_calibration_leaves_the_model_and_the_generators_alone():
    profile = PROFILES["quick"].replace(max_length=8, batch_size=2, eval_batch_size=2)
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    seconds = time_steps(model, profile, ["full", "lora", "head"], "cpu", steps=1)
    assert torch.equal(torch.rand(3), expected_next)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(type(m).__name__ == "LoRALinear" for m in model.modules())
    assert set(seconds) == {"full", "lora", "head", "eval_batch"} and all(s > 0 for s in seconds.values())


def test_banner_prints_profile_data_backbone_device_and_time(capsys):
    profile = PROFILES["quick"].replace(max_length=8, batch_size=2, eval_batch_size=2)
    out = print_banner(profile, tiny_model(), "a tiny random DistilBERT", "cpu", plan={"lora": 2})
    text = capsys.readouterr().out
    for word in (
        "profile : 'quick'",
        "1,000 train / 200 validation / 500 test reviews",
        "tiny random DistilBERT",
        "device  : cpu",
        "runs    : 2 (lora x2)",
        "time    : about",
    ):
        assert word in text, (word, text)
    assert max(len(line) for line in text.splitlines()) <= 100  # no wrapping in a notebook
    assert out["estimate_s"] == pytest.approx(estimate_seconds(profile, {"lora": 2}, out["seconds"]))
    with pytest.raises(ValueError, match="number of runs"):
        print_banner(profile, tiny_model(), "x", "cpu", plan={"lora": 0})


def test_committed_runs_ship_with_the_package():
    assert {"compare-cpu", "compare-quick"} <= set(committed_runs())
    run = committed_run("compare-quick")
    assert run["profile"]["name"] == "quick" and set(run["runs"]) == {"full", "lora", "lora-all", "head"}
    assert all(len(runs) == 3 for runs in run["runs"].values())
    with pytest.raises(FileNotFoundError, match="compare-cpu"):
        committed_run("compare-nothing")


@pytest.mark.parametrize("name", ["quick", "cpu"])
def test_the_profiles_rates_are_their_committed_runs_choices(name):
    """Each method trains at the rate its profile's committed comparison chose on validation (and the cpu run's
    dropout): the registry's tuned settings are those runs' choices."""
    run = committed_run(f"compare-{name}")
    for method in ("full", "lora", "lora-all"):
        assert run["lrs"][method] == method_spec(method, name).lr, method
    assert run["head_lr"] == method_spec("head", name).lr == head_learning_rate(name)
    if "lora-nodrop" in run["lrs"]:  # the run that decided the dropout: no dropout unless it was worse on validation
        val = {m: sum(r["val_accuracy"] for r in run["runs"][m]) for m in ("lora", "lora-nodrop")}
        assert method_spec("lora", name).lora_dropout == (0.0 if val["lora-nodrop"] >= val["lora"] else 0.1)
        assert run["lrs"]["lora-nodrop"] == method_spec("lora-nodrop", name).lr == method_spec("lora", name).lr
