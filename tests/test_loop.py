"""Tests of lora_helpers.loop (batching, the loop, evaluate, predict), lora_helpers.methods, and get_profile.

Small on purpose: the offline stand-in backbone, a few dozen IMDb reviews of at
most 32 tokens, a handful of optimiser steps.
"""

import math
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_helpers import PROFILES, count_parameters, get_profile, load_adapter, lora_layers, save_adapter, set_seed
from lora_helpers.backbone import load_backbone
from lora_helpers.data import load_imdb
from lora_helpers.loop import encode, evaluate, make_batches, predict, train
from lora_helpers.methods import (
    ALL_BLOCK_LINEARS,
    HEAD_MODULES,
    METHODS,
    MethodSpec,
    method_spec,
    param_groups,
    prepare_method,
)

SMOKE = PROFILES["quick"]
MAX_LENGTH = 32


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny batches: one thread is as fast, and does not fight other processes for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_NUM_THREADS", "1")  # what set_seed pins
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def imdb():
    return load_imdb(32, 32, seed=0, verbose=False)


def backbone(seed=0):
    """A fresh stand-in DistilBERT classifier (new head from ``seed``) and its tokenizer."""
    model, tokenizer, _ = load_backbone("minilm-standin", seed=seed, verbose=False)
    return model, tokenizer


def head_params(model):
    return sum(p.numel() for name in HEAD_MODULES for p in model.get_submodule(name).parameters())


# ------------------------------------------------------------------ batching


def test_make_batches_pads_each_batch_to_its_longest_row():
    ids, labels = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14], [15]], [0, 1, 0, 1, 1]
    batches = make_batches(ids, labels, batch_size=2, pad_id=0)
    assert [b["input_ids"].shape[1] for b in batches] == [3, 4, 1]  # dynamic: not one global width
    first = batches[0]
    assert first["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert first["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batches[1]["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert [b["labels"].tolist() for b in batches] == [[0, 1], [0, 1], [1]]
    assert all(b["input_ids"].dtype == b["attention_mask"].dtype == torch.long for b in batches)


def test_make_batches_shuffle_is_a_seeded_permutation():
    ids = [[100 + i] * (1 + i % 3) for i in range(20)]
    labels = [i % 2 for i in range(20)]

    def order(**kw):
        return [row[0] - 100 for b in make_batches(ids, labels, 4, pad_id=0, **kw) for row in b["input_ids"].tolist()]

    assert order() == list(range(20))
    shuffled = order(shuffle=True, seed=1)
    assert sorted(shuffled) == list(range(20)) and shuffled != list(range(20))
    assert order(shuffle=True, seed=1) == shuffled  # same seed, same order
    assert order(shuffle=True, seed=2) != shuffled
    # every label still travels with its review
    for b in make_batches(ids, labels, 4, pad_id=0, shuffle=True, seed=1):
        assert [(row[0] - 100) % 2 for row in b["input_ids"].tolist()] == b["labels"].tolist()


def test_encode_truncates(imdb):
    _, tokenizer = backbone()
    ids = encode(imdb["train"]["text"][:4], tokenizer, MAX_LENGTH)
    assert len(ids) == 4 and all(2 < len(row) <= MAX_LENGTH for row in ids)
    assert all(row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id for row in ids)


# ------------------------------------------------------------------ evaluate


class Stub(nn.Module):
    """Predicts ``input_ids[:, 0] % 2`` with logit margin 2: a model whose accuracy we can work out by hand."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(num_labels=2)

    def forward(self, input_ids, attention_mask, labels):
        logits = 2.0 * F.one_hot(input_ids[:, 0] % 2, 2).float()
        return types.SimpleNamespace(logits=logits, loss=F.cross_entropy(logits, labels))


def test_evaluate_against_a_hand_computed_case():
    # predictions 0, 1, 1, 0, 1 against labels 0, 1, 0, 1, 1: right, right, wrong, wrong, right
    ids, labels = [[2], [3], [5], [4], [7]], [0, 1, 0, 1, 1]
    out = evaluate(Stub(), make_batches(ids, labels, batch_size=2, pad_id=0), device="cpu")
    assert out["n"] == 5
    assert out["accuracy"] == pytest.approx(3 / 5)
    # rows: true label, columns: prediction
    assert out["confusion"] == [[1, 1], [1, 2]]
    right, wrong = math.log(1 + math.exp(-2)), math.log(1 + math.exp(2))  # cross-entropy with margin 2
    assert out["loss"] == pytest.approx((3 * right + 2 * wrong) / 5, rel=1e-6)  # per review, not per batch


# ------------------------------------------------------------------ the training loop


def test_train_lowers_the_loss_and_moves_only_trainable_weights(imdb):
    set_seed(0, num_threads=None)
    model, tokenizer = backbone()
    prepare_method(model, method_spec("lora", SMOKE))
    ids = encode(imdb["train"]["text"][:8], tokenizer, MAX_LENGTH)
    batch = make_batches(ids, imdb["train"]["label"][:8], 8, tokenizer.pad_token_id)[0]
    frozen = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    trainable = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}

    result = train(model, [batch] * 12, lr=1e-3, warmup_ratio=0.1, device="cpu")  # overfit one batch

    assert result.steps == len(result.losses) == 12 and result.evals == []
    assert result.wall_time_s > 0 and result.steps_per_s > 0
    assert all(math.isfinite(x) for x in result.losses)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 0.1, result.losses
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in frozen.items())  # W0 and embeddings untouched
    assert all(not torch.equal(params[k], v) for k, v in trainable.items())  # every A, B and the head moved


def test_train_evaluates_every_few_steps_and_at_the_end():
    ids, labels = [[2], [3], [5], [4]], [0, 1, 0, 1]
    model = Linear1()
    batches = make_batches(ids, labels, batch_size=1, pad_id=0)  # 4 steps an epoch
    result = train(model, batches, batches[:2], lr=1e-2, epochs=2, eval_every=3, device="cpu")
    assert [e["step"] for e in result.evals] == [3, 6, 8]  # every 3 steps, and after the last (8)
    result = train(model, batches, batches[:2], lr=1e-2, epochs=2, device="cpu")
    assert [e["step"] for e in result.evals] == [4, 8]  # without eval_every: after each epoch
    assert result.evals[-1]["predictions"] and len(result.evals[-1]["predictions"]) == 2


class Linear1(nn.Module):
    """A classifier whose logits are ``w * onehot(first token % 2)``: something AdamW can train."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.config = types.SimpleNamespace(num_labels=2)

    def forward(self, input_ids, attention_mask, labels):
        logits = self.w * F.one_hot(input_ids[:, 0] % 2, 2).float()
        return types.SimpleNamespace(logits=logits, loss=F.cross_entropy(logits, labels))


def test_param_groups_train_the_head_and_the_method_at_their_own_rates():
    # AdamW's first step moves every weight by about lr (its update is lr * m / sqrt(v) = lr * sign(g)),
    # so after one step the head moves by ~head_lr and LoRA's B by ~lr: the rates reached the right groups.
    set_seed(0, num_threads=None)
    model, tokenizer = backbone()
    prepare_method(model, method_spec("lora", SMOKE))
    groups = param_groups(model, lr=1e-4, head_lr=1e-2)
    assert [g["name"] for g in groups] == ["method", "head"]
    ids = encode(["A fine film.", "Awful."], tokenizer, MAX_LENGTH)
    batch = make_batches(ids, [1, 0], 2, tokenizer.pad_token_id)[0]
    head_before = model.classifier.weight.detach().clone()
    train(model, [batch], param_groups=groups, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1e9, device="cpu")
    head_step = (model.classifier.weight - head_before).abs().max().item()
    b_step = max(layer.lora_B.abs().max().item() for layer in lora_layers(model).values())  # B started at 0
    assert head_step == pytest.approx(1e-2, rel=0.05)
    assert b_step == pytest.approx(1e-4, rel=0.05)
    with pytest.raises(ValueError, match="exactly one of lr"):
        train(model, [batch], device="cpu")


def test_train_refuses_a_model_with_nothing_trainable():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, [], lr=1e-3, device="cpu")


# ------------------------------------------------------------------ methods


def test_prepare_method_trainable_counts():
    for method in METHODS:
        set_seed(0, num_threads=None)
        model, _ = backbone()
        total = count_parameters(model).total
        names = prepare_method(model, method_spec(method, SMOKE))
        count, head = count_parameters(model), head_params(model)
        layers = lora_layers(model)
        lora = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in layers.values())
        assert count.total == total + lora, method  # LoRA adds A and B, nothing else
        if method == "full":
            assert count.trainable == count.total and names == []
        elif method == "head":
            assert count.trainable == head == 384 * 384 + 384 + 384 * 2 + 2 and names == []
        elif method in ("lora", "lora-nodrop"):  # the same layers; lora-nodrop without dropout on the branch
            assert len(names) == 12 and all(n.rsplit(".", 1)[1] in ("q_lin", "v_lin") for n in names)
            dropout = {type(layer.lora_dropout).__name__ for layer in layers.values()}
            assert dropout == ({"Identity"} if method == "lora-nodrop" else {"Dropout"}), (method, dropout)
            assert {layer.r for layer in layers.values()} == {8}
            assert lora == 12 * 8 * (384 + 384)
            assert count.trainable == lora + head
            assert count.percent < 2
        else:  # lora-all: every Linear of the 6 blocks at the same r and alpha
            assert len(names) == 36 and {n.rsplit(".", 1)[1] for n in names} == set(ALL_BLOCK_LINEARS)
            assert {layer.r for layer in layers.values()} == {8}
            assert {layer.scaling for layer in layers.values()} == {16 / 8}
            assert lora == 6 * 8 * (4 * 768 + 2 * (384 + 1536))
            assert count.trainable == lora + head


def test_method_specs_refuse_what_cannot_run():
    with pytest.raises(ValueError, match="unknown method 'qlora'"):
        method_spec("qlora", SMOKE)
    with pytest.raises(ValueError, match="kind must be"):
        MethodSpec("x", "adapter")
    with pytest.raises(ValueError, match="needs target modules"):
        MethodSpec("x", "lora")
    with pytest.raises(ValueError, match="init must be"):
        MethodSpec("x", "lora", targets=("q_lin",), init="gaussian")


# ------------------------------------------------------------------ predict


def test_predict_output_format():
    model, tokenizer = backbone()
    out = predict(
        model,
        tokenizer,
        ["A wonderful film.", "Dull and far too long, I left early."],
        max_length=MAX_LENGTH,
        device="cpu",
    )
    assert len(out) == 2
    for row in out:
        assert set(row) == {"label", "sentiment", "p_positive"}
        assert 0.0 <= row["p_positive"] <= 1.0
        assert row["label"] == int(row["p_positive"] > 0.5)
        assert row["sentiment"] == ("positive" if row["label"] == 1 else "negative")


# ------------------------------------------------------------------ adapters on the real classifier


def test_adapter_round_trip_on_the_distilbert_classifier(tmp_path, imdb):
    set_seed(0, num_threads=None)
    model, tokenizer = backbone(seed=0)
    prepare_method(model, method_spec("lora", SMOKE))
    with torch.no_grad():  # stands in for training: B non-zero, the head changed
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.05)
        model.classifier.weight.add_(0.1)
    save_adapter(model, tmp_path / "adapter", extra=HEAD_MODULES)

    fresh, _ = backbone(seed=1)  # another head: it must come from the adapter
    load_adapter(fresh, tmp_path / "adapter")
    batch = make_batches(
        encode(imdb["test"]["text"][:4], tokenizer, MAX_LENGTH), [0, 1, 0, 1], 4, tokenizer.pad_token_id
    )[0]
    batch = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected, got = model.eval()(**batch).logits, fresh.eval()(**batch).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert set(lora_layers(fresh)) == set(lora_layers(model))


# ------------------------------------------------------------------ profiles


def test_get_profile_env_overrides_and_errors(monkeypatch):
    monkeypatch.setenv("LORA_PROFILE", "cpu")
    assert get_profile().name == "cpu"
    assert get_profile("quick").name == "quick"  # an argument beats the variable
    small = get_profile("quick", n_train=10, max_length=32)
    assert (small.n_train, small.max_length, small.n_test) == (10, 32, SMOKE.n_test)
    assert PROFILES["quick"].n_train == 1000  # the registry is untouched
    with pytest.raises(ValueError, match="unknown profile 'tiny'"):
        get_profile("tiny")
    monkeypatch.setenv("LORA_PROFILE", "nope")
    with pytest.raises(ValueError, match="LORA_PROFILE"):
        get_profile()
    monkeypatch.delenv("LORA_PROFILE")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_profile().name == "quick"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_profile().name == "gpu"
    with pytest.raises(TypeError):
        get_profile("quick", no_such_field=1)


# ------------------------------------------------------------------ robustness (issue 14)


def test_predict_takes_one_string_as_one_review():
    model, tokenizer = backbone()
    text = "A wonderful film."
    one = predict(model, tokenizer, text, max_length=MAX_LENGTH, device="cpu")
    assert len(one) == 1
    assert one == predict(model, tokenizer, [text], max_length=MAX_LENGTH, device="cpu")


def test_predict_of_no_texts_is_no_predictions_and_a_non_string_is_refused():
    model, tokenizer = backbone()
    assert predict(model, tokenizer, [], max_length=MAX_LENGTH, device="cpu") == []
    with pytest.raises(TypeError, match="texts must be strings; item 1 is a NoneType"):
        predict(model, tokenizer, ["fine", None], max_length=MAX_LENGTH, device="cpu")


@pytest.mark.parametrize("max_length", [0, 1, 2, 8.0])
def test_a_max_length_without_room_for_the_review_is_refused(max_length):
    model, tokenizer = backbone()
    with pytest.raises(
        ValueError, match=rf"max_length must be a whole number >= 3, got (float )?{max_length!r}: .*adds 2 special"
    ):
        encode(["a long review " * 50], tokenizer, max_length)
    with pytest.raises(ValueError, match=r"max_length must be a whole number >= 3"):
        predict(model, tokenizer, ["a long review " * 50], max_length=max_length, device="cpu")
    assert len(encode(["a long review " * 50], tokenizer, 3)[0]) == 3  # the smallest that truncates


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, None])
def test_make_batches_refuses_a_batch_size_below_one(batch_size):
    with pytest.raises(ValueError, match=rf"batch_size must be a whole number >= 1, got (float )?{batch_size!r}"):
        make_batches([[1, 2], [3]], [0, 1], batch_size=batch_size, pad_id=0)


def test_make_batches_refuses_mismatched_labels():
    with pytest.raises(ValueError, match="2 token lists but 3 labels"):
        make_batches([[1, 2], [3]], [0, 1, 1], batch_size=2, pad_id=0)


def test_train_on_no_batches_is_an_error():
    model = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="train_batches is empty"):
        train(model, [], lr=1e-3, device="cpu")
    with pytest.raises(ValueError, match="epochs must be a whole number >= 1, got 0"):
        train(model, [{}], lr=1e-3, epochs=0, device="cpu")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_evaluate_on_no_batches_is_an_error():
    with pytest.raises(ValueError, match="no batches to evaluate"):
        evaluate(Stub(), [], device="cpu")
    with pytest.raises(ValueError, match="hold no examples"):
        evaluate(Stub(), iter([]), device="cpu")


def test_progress_bar_in_a_notebook_is_plain_text(monkeypatch):
    """In a Jupyter kernel (ipywidgets installed) the bar is text on stdout, not a widget: a saved and reopened
    notebook shows its last line instead of "Error displaying widget: model not found"."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipywidgets")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # as on a learner's machine
    code = """
import torch
from transformers import DistilBertConfig, DistilBertForSequenceClassification
from lora_helpers.loop import train
torch.manual_seed(0)
config = DistilBertConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=4, vocab_size=100, max_position_embeddings=16)
model = DistilBertForSequenceClassification(config)
batch = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long),
         "labels": torch.tensor([0, 1])}
result = train(model, [batch] * 3, lr=1e-3, device="cpu", desc="demo")
"""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    outputs = nb.cells[0].outputs
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), outputs
    text = "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")
    assert "demo epoch 1/1" in text and "3/3" in text, outputs
    assert not any(o.get("name") == "stderr" for o in outputs), outputs
