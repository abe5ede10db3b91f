"""What training holds in memory: weights, gradients, optimizer state and activations.

Four parts make up the memory of a training step:

* **weights** - every parameter, trained or frozen;
* **gradients** - one per *trainable* parameter;
* **optimizer state** - AdamW keeps two running averages (``exp_avg``,
  ``exp_avg_sq``) per *trainable* parameter (plus a step counter per tensor);
* **activations** - what the forward pass saves for the backward pass. They
  grow with batch size x sequence length and depend on which parameters
  train, so they are **measured** (``measure_training_memory``); only the
  on-paper table of notebook 07 estimates them (``activation_bytes``).

LoRA shrinks the second and third parts to almost nothing (only ``A``, ``B``
and the head train); the weights stay. This module gives

* ``training_memory_formula(n_params_total, n_trainable, ...)`` - the first
  three parts by arithmetic, in bytes;
* ``measure_training_memory(model, batch, ...)`` - all four, measured on a real
  training step in PyTorch;
* ``PAPER_MODELS`` (with ``PaperModel.lora_params``) and ``paper_scaling_table(...)``
  - the same arithmetic for DistilBERT (66M) and a 7B model, on paper, with
  the precision assumptions spelled out in ``PRECISIONS``;

Notebook 07 adds ``weight_bytes`` (parameters *and* buffers: an NF4 layer keeps its
codes in buffers), ``enable_activation_checkpointing`` and, on paper, ``activation_bytes``
and ``fits_table`` (1B-70B models on 16/24/80 GB GPUs).

Introduced in notebook 06 (``06_adapters_in_practice.ipynb``); the process's peak memory during
training is ``utils.PeakMemory`` (notebook 03).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .lora import lora_parameters
from .quant import bits_per_weight
from .utils import check_choice, check_int, check_real

if TYPE_CHECKING:
    from transformers import DistilBertConfig, LlamaConfig

MiB, GiB = 2**20, 2**30

# running averages an optimizer keeps per trainable parameter
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd-momentum": 1, "sgd": 0}

ACTIVATIONS_NOTE = (
    "activations are not in the formula: they scale with batch size x sequence length x layers "
    "(and shrink with gradient checkpointing), so they are measured"
)


def _states(optimizer: str) -> int:
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}: choose one of {sorted(OPTIMIZER_STATES)}")
    return OPTIMIZER_STATES[optimizer]


def training_memory_formula(
    n_params_total: int,
    n_trainable: int,
    bytes_per_param: int = 4,
    optimizer: str = "adamw",
    *,
    grad_bytes: int | None = None,
    state_bytes: int | None = None,
    master_weights: bool = False,
) -> dict:
    """Bytes of weights, gradients and optimizer state for one model, by arithmetic.

    Args:
        n_params_total: every parameter (frozen and trainable).
        n_trainable: parameters that get a gradient (all for full fine-tuning; A, B and the head for LoRA).
        bytes_per_param: storage of the weights (4 fp32, 2 fp16/bf16).
        optimizer: ``"adamw"``/``"adam"`` (2 states), ``"sgd-momentum"`` (1), ``"sgd"`` (0).
        grad_bytes: bytes per gradient entry; default ``bytes_per_param`` (PyTorch stores a
            gradient in its parameter's dtype).
        state_bytes: bytes per optimizer-state entry; default ``bytes_per_param`` (what
            ``torch.optim.AdamW`` does); mixed-precision recipes keep them in fp32 (4).
        master_weights: mixed precision keeps an fp32 copy of each trainable weight for the
            update; counted in the optimizer state (4 bytes per trainable parameter), as in ZeRO.

    Returns ``{"weights", "gradients", "optimizer_state", "total"}`` in bytes. PyTorch's
    AdamW also keeps one step counter per parameter tensor (4 bytes each), left out
    here. Activations are not included: see ``ACTIVATIONS_NOTE``.
    """
    n_params_total = check_int("n_params_total", n_params_total, 0)
    check_int("n_trainable", n_trainable, 0, n_params_total, hint="at most n_params_total")
    check_int("bytes_per_param", bytes_per_param, 1)
    grad_bytes = bytes_per_param if grad_bytes is None else check_int("grad_bytes", grad_bytes, 1)
    state_bytes = bytes_per_param if state_bytes is None else check_int("state_bytes", state_bytes, 1)
    out = {
        "weights": n_params_total * bytes_per_param,
        "gradients": n_trainable * grad_bytes,
        "optimizer_state": n_trainable * (_states(optimizer) * state_bytes + (4 if master_weights else 0)),
    }
    out["total"] = sum(out.values())
    return out


# ------------------------------------------------------------------ measurement


def _storage_key(t: torch.Tensor) -> tuple:
    s = t.untyped_storage()
    return (t.device.type, t.device.index, s.data_ptr())


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a tensor shared or viewed twice counts once)."""
    seen = {}
    for t in tensors:
        seen.setdefault(_storage_key(t), t.untyped_storage().nbytes())
    return sum(seen.values())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (distinct storages): what its weights occupy."""
    return _storage_bytes(list(model.parameters()) + list(model.buffers()))


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer layer's activations in the backward pass instead of keeping them.

    A Hugging Face model's own switch (``activation_checkpointing_enable`` in transformers 5,
    ``gradient_checkpointing_enable`` before), with PyTorch's non-reentrant checkpoint, which
    also works when the inputs need no gradient (a frozen embedding under LoRA).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TypeError(
            f"{type(model).__name__} has no checkpointing switch: wrap its blocks with "
            "torch.utils.checkpoint.checkpoint yourself"
        )


def _default_loss(model: nn.Module, batch) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out.loss if hasattr(out, "loss") else out


def measure_training_memory(
    model: nn.Module,
    batch: dict[str, torch.Tensor] | torch.Tensor,
    optimizer: str = "adamw",
    lr: float = 1e-4,
    loss_fn: Callable | None = None,
) -> dict:
    """Measure, in bytes, what PyTorch holds for one training step of ``model`` on ``batch``.

    * ``weights``: the distinct storages of all parameters;
    * ``activations``: the tensors autograd saves during the forward pass for the
      backward pass (caught with ``torch.autograd.graph.saved_tensors_hooks``),
      counted once per storage, leaving out parameters and the batch's own
      tensors. This is what the forward pass adds and keeps alive until
      ``backward``; temporaries freed during the forward and the backward
      pass's own buffers are not in it;
    * ``gradients``: ``p.grad`` of every parameter after ``backward``;
    * ``optimizer_state``: every tensor in the optimizer's state after one
      ``step`` (AdamW: ``exp_avg``, ``exp_avg_sq`` and a 4-byte ``step`` per tensor).

    ``batch`` is a dict of tensors for a Hugging Face model (with ``labels``) or
    one tensor, on the model's device; ``loss_fn(model, batch)`` overrides how the loss is computed
    (default: ``model(**batch).loss``, or the output itself). The model runs in
    training mode (dropout on, as in training) and is left as it was: weights
    restored after the step, gradients cleared, mode reset.
    """
    n_states = _states(optimizer)
    params = [p for p in model.parameters()]
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters: nothing to measure (mark some with requires_grad)")
    if any(p.grad is not None for p in params):
        raise ValueError("some parameters already hold gradients: call model.zero_grad(set_to_none=True) first")
    batch_tensors = list(batch.values()) if isinstance(batch, dict) else [batch]
    model_devices = {p.device for p in params}
    stray = sorted({str(t.device) for t in batch_tensors if torch.is_tensor(t) and t.device not in model_devices})
    if stray:
        raise ValueError(
            f"the batch is on {', '.join(stray)} but the model is on "
            f"{', '.join(sorted(map(str, model_devices)))}: move the batch first, "
            "e.g. {k: v.to(device) for k, v in batch.items()}"
        )
    excluded = {_storage_key(t) for t in params + [t for t in batch_tensors if torch.is_tensor(t)]}

    saved: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in excluded:
            saved.setdefault(key, t.untyped_storage().nbytes())
        return t

    was_training = model.training
    snapshot = [p.detach().clone() for p in trainable]
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = (loss_fn or _default_loss)(model, batch)
        loss.backward()
        gradients = _storage_bytes(p.grad for p in params if p.grad is not None)
        if n_states == 2:
            opt = torch.optim.AdamW(trainable, lr=lr)
        else:
            opt = torch.optim.SGD(trainable, lr=lr, momentum=0.9 if n_states == 1 else 0.0)
        opt.step()
        state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        optimizer_state = _storage_bytes(state)
    finally:
        with torch.no_grad():
            for p, old in zip(trainable, snapshot):
                p.copy_(old)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    out = {
        "weights": _storage_bytes(params),
        "gradients": gradients,
        "optimizer_state": optimizer_state,
        "activations": sum(saved.values()),
    }
    out["total"] = sum(out.values())
    return out


# ------------------------------------------------------------------ on paper


@dataclass(frozen=True)
class PaperModel:
    """The sizes the arithmetic needs, from each model's published configuration.

    ``mlp``: ``"gelu"`` (two matrices, d -> d_ff -> d: BERT, GPT) or ``"swiglu"`` (three: gate
    and up d -> d_ff, down d_ff -> d: LLaMA). ``norm``: ``"layernorm"`` or ``"rmsnorm"``.
    ``language_model``: a decoder with an output layer over the vocabulary (no new head).
    """

    name: str
    n_params: int  # all parameters, head included
    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    vocab_size: int
    n_kv_heads: int | None = None  # grouped-query attention: fewer K, V heads (None: as many as n_heads)
    mlp: str = "swiglu"
    norm: str = "rmsnorm"
    language_model: bool = True
    head_params: int = 0  # a new task head trained alongside LoRA (0 for a language model)
    tied_embeddings: bool = False  # the output layer shares the input embedding's weights

    @property
    def embedding_params(self) -> int:
        """The input embedding's parameters and, if not tied to it, the output layer's."""
        return self.vocab_size * self.d_model * (2 if self.language_model and not self.tied_embeddings else 1)

    @property
    def d_kv(self) -> int:
        """Width of K and V: ``d_model`` times the share of key-value heads."""
        return self.d_model * (self.n_kv_heads or self.n_heads) // self.n_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``{name: (d_in, d_out)}`` of one block's linear layers (LLaMA's names for a SwiGLU block)."""
        d, kv, f = self.d_model, self.d_kv, self.d_ff
        attention = {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d)}
        mlp = {"gate": (d, f), "up": (d, f), "down": (f, d)} if self.mlp == "swiglu" else {"up": (d, f), "down": (f, d)}
        return {**attention, **mlp}

    def lora_params(self, r: int, matrices: str | Iterable[str] = ("q", "v")) -> int:
        """LoRA's trainable parameters at rank ``r`` on ``matrices`` of every block (``"all"``: every linear layer),
        plus the model's new head if it has one."""
        shapes = self.linear_shapes()
        names = list(shapes) if matrices == "all" else [matrices] if isinstance(matrices, str) else list(matrices)
        unknown = sorted(set(names) - set(shapes))
        if unknown:
            raise ValueError(f"{self.name} has no {unknown} in its blocks: choose from {list(shapes)} or 'all'")
        return self.n_layers * lora_parameters((shapes[n] for n in names), r) + self.head_params


PAPER_MODELS = {
    # DistilBertForSequenceClassification with 2 labels: 66,362,880 backbone + 592,130 head
    "distilbert": PaperModel(
        "DistilBERT-base, 2-label head",
        66_955_010,
        6,
        768,
        n_heads=12,
        d_ff=3072,
        vocab_size=30522,
        mlp="gelu",
        norm="layernorm",
        language_model=False,
        head_params=768 * 768 + 768 + 768 * 2 + 2,
    ),
    # the published parameter counts and configurations of LLaMA-3.2-1B and LLaMA-2-7B, -13B, -70B
    "1b": PaperModel(
        "1B decoder (LLaMA-3.2-1B shape)",
        1_235_814_400,
        16,
        2048,
        n_heads=32,
        n_kv_heads=8,
        d_ff=8192,
        vocab_size=128_256,
        tied_embeddings=True,
    ),
    "7b": PaperModel(
        "7B decoder (LLaMA-2-7B shape)", 6_738_415_616, 32, 4096, n_heads=32, d_ff=11008, vocab_size=32_000
    ),
    "13b": PaperModel(
        "13B decoder (LLaMA-2-13B shape)", 13_015_864_320, 40, 5120, n_heads=40, d_ff=13824, vocab_size=32_000
    ),
    "70b": PaperModel(
        "70B decoder (LLaMA-2-70B shape)",
        68_976_648_192,
        80,
        8192,
        n_heads=64,
        n_kv_heads=8,
        d_ff=28672,
        vocab_size=32_000,
    ),
}

# name -> (description, formula keyword arguments)
PRECISIONS = {
    "fp32": (
        "fp32 weights, gradients and AdamW states (4 bytes each); what torch does on a CPU",
        dict(bytes_per_param=4),
    ),
    "mixed": (
        "bf16/fp16 weights and gradients (2 bytes), fp32 AdamW states and an fp32 master copy of each "
        "trained weight (4 + 4 + 4 bytes): the usual mixed-precision recipe, 16 bytes per trained parameter",
        dict(bytes_per_param=2, grad_bytes=2, state_bytes=4, master_weights=True),
    ),
}


def paper_scaling_table(
    models: Iterable[str] = ("distilbert", "7b"), r: int = 8, precisions: Iterable[str] = ("fp32", "mixed")
) -> list[dict]:
    """Rows ``{model, method, precision, n_params, n_trainable, weights, gradients, optimizer_state, total}``.

    Full fine-tuning vs LoRA (rank ``r`` on ``W_q``, ``W_v`` of every layer, the paper's GLUE
    setting, plus the model's head), computed with ``training_memory_formula`` under each
    assumption of ``PRECISIONS`` (bytes). LoRA's few trainable parameters are counted at the
    same precision as the rest; activations are not included (``ACTIVATIONS_NOTE``).
    """
    rows = []
    for key in models:
        m = PAPER_MODELS[key]
        lora = m.lora_params(r)
        for precision in precisions:
            kwargs = PRECISIONS[precision][1]
            for method, n_total, n_trainable in (
                ("full", m.n_params, m.n_params),
                (f"LoRA r={r}", m.n_params + lora - m.head_params, lora),
            ):
                rows.append(
                    {
                        "model": m.name,
                        "method": method,
                        "precision": precision,
                        "n_params": n_total,
                        "n_trainable": n_trainable,
                        **training_memory_formula(n_total, n_trainable, **kwargs),
                    }
                )
    return rows


# ------------------------------------------------------------------ activations, estimated (notebook 07)


def paper_model_from_config(config: DistilBertConfig | LlamaConfig, name: str = "") -> PaperModel:
    """A ``PaperModel`` with the shapes of a Hugging Face DistilBERT or LLaMA configuration (``n_params`` 0)."""
    kind = type(config).__name__
    if kind == "DistilBertConfig":
        return PaperModel(
            name or "DistilBERT layout",
            0,
            config.n_layers,
            config.dim,
            n_heads=config.n_heads,
            d_ff=config.hidden_dim,
            vocab_size=config.vocab_size,
            mlp="gelu",
            norm="layernorm",
            language_model=False,
        )
    if kind == "LlamaConfig":
        return PaperModel(
            name or "LLaMA layout",
            0,
            config.num_hidden_layers,
            config.hidden_size,
            n_heads=config.num_attention_heads,
            n_kv_heads=config.num_key_value_heads,
            d_ff=config.intermediate_size,
            vocab_size=config.vocab_size,
        )
    raise TypeError(f"no activation layout for {kind}: describe the model with PaperModel(...) yourself")


def activation_bytes(
    model: PaperModel,
    seq_len: int,
    batch: int = 1,
    *,
    bytes_per_value: int = 2,
    attention: str = "fused",
    dropout: bool = False,
    mask_bytes: int = 1,
    checkpointing: bool = False,
) -> dict:
    """What the forward pass keeps for backward, estimated tensor by tensor, in bytes.

    The count follows Korthikanti et al. 2022 (arXiv 2205.05198, Section 4.1), generalised:
    per block, with ``T = batch x seq_len`` tokens and ``p = bytes_per_value``, the block keeps

    * **attention** (``3 + 2 d_kv/d`` x ``T d`` values): the input of the Q/K/V projections,
      Q and K (for the scores), V, and the input of the output projection; with
      ``attention="eager"`` also the softmax output, ``n_heads x seq_len^2 x batch`` values (and,
      with ``dropout``, its mask and the dropped copy): the ``5as/h`` term of their Eq. 1. A fused
      kernel (``"fused"``: FlashAttention, PyTorch's SDPA) keeps one log-sum-exp per row instead;
    * **MLP**: its input and, per hidden unit, the GELU's input and output (``2 d_ff``), or for
      SwiGLU the gate, up, SiLU and product tensors (``4 d_ff``);
    * **norms**: each of the two keeps its input (``p`` bytes per value); Hugging Face's RMSNorm
      (LLaMA) computes in fp32 and keeps an fp32 copy of its input and its normalised output
      (``4 + p`` bytes);
    * **dropout** (``dropout=True``): one mask of ``mask_bytes`` per value at every dropout site
      (two on the residual stream per GPT block, one after DistilBERT's MLP).

    Outside the blocks: BERT-style embeddings keep their norm's input (and dropout mask); the
    output layer's input; a language model's **logits**: the loss keeps the fp32 log-softmax,
    ``T x vocab x 4`` bytes, which at a 128k vocabulary rivals all the blocks (the 16-bit logits
    and their fp32 copy also exist briefly during the loss; not counted here).
    With ``checkpointing`` every block keeps only its input (``p T d``), and during backward one
    block's activations are rebuilt at a time: ``peak`` adds them. With ``p = 2``, one-byte masks,
    a 4d GELU MLP, LayerNorm, two residual dropouts and eager attention with dropout, one block is
    exactly Eq. 1's ``s b h (34 + 5 a s / h)`` (tested). A LoRA model keeps somewhat less (frozen
    layers need no input for a weight gradient): this is full fine-tuning's count, an upper bound
    for LoRA. Tested against ``measure_training_memory`` on both layouts.

    Returns ``{"blocks", "outside", "logits", "kept", "peak"}`` in bytes.
    """
    check_choice("attention", attention, ("fused", "eager"))
    check_int("seq_len", seq_len, 1)
    check_int("batch", batch, 1)
    check_int("bytes_per_value", bytes_per_value, 1)
    check_int("mask_bytes", mask_bytes, 0)
    p, d, T = bytes_per_value, model.d_model, seq_len * batch
    td = T * d
    n_mlp = 2 if model.mlp == "gelu" else 4
    norm = p if model.norm == "layernorm" else 4 + p  # bytes per value that one norm keeps
    values = (3 + 2 * model.d_kv / d) * td + (td + n_mlp * model.d_ff * T)
    scores = model.n_heads * seq_len * seq_len * batch
    block = p * values + 2 * norm * td
    if attention == "eager":
        block += (2 * p + mask_bytes) * scores if dropout else p * scores
    if dropout:
        block += (1 if not model.language_model else 2) * mask_bytes * td
    if model.language_model:
        outside = norm * td + p * td  # the final norm and the output layer's input
        logits = 4 * T * model.vocab_size
    else:
        outside = p * (td + td) + (mask_bytes * td if dropout else 0)  # embedding norm (+ mask), the head's input
        logits = 0
    blocks = p * td * model.n_layers if checkpointing else block * model.n_layers
    kept = int(blocks + outside + logits)
    return {
        "blocks": int(blocks),
        "outside": int(outside),
        "logits": int(logits),
        "kept": kept,
        "peak": kept + int(block if checkpointing else 0),
    }


QLORA_BITS = bits_per_weight(double_quant=True)  # NF4 with double quantisation: 4.127 bits per weight (quant.py)

# LoRA as the LoRA paper ran it on GPT-3 (W_q, W_v), and as QLoRA recommends (every linear layer of every block;
# its runs use r = 64, and it reports r hardly matters once all layers are adapted): (label, matrices, r)
LORA_RECIPES = {"paper": ("q,v", ("q", "v"), 8), "qlora": ("all linear", "all", 64)}


def fits_table(
    models: Iterable[str] = ("1b", "7b", "13b", "70b"),
    seq_len: int = 1024,
    batch: int = 1,
    gpus_gb: Iterable[int] = (16, 24, 80),
    recipes: Iterable[str] = ("paper", "qlora"),
    reserve_gib: float = 0.5,
) -> list[dict]:
    """Full fine-tuning, LoRA and QLoRA, with and without checkpointing: GiB needed and which GPUs they fit.

    Computed, not measured: ``training_memory_formula`` under ``PRECISIONS["mixed"]`` (16 bytes
    per trained parameter; 2 per frozen one), QLoRA's frozen block weights at ``QLORA_BITS``
    bits and its embeddings and output layer in 16 bits (as bitsandbytes keeps them), and
    ``activation_bytes`` (bf16, fused attention, no dropout) for ``batch`` x ``seq_len`` tokens;
    with checkpointing the ``peak`` (one block rebuilt on top). LoRA and QLoRA come in each of
    ``recipes`` (``LORA_RECIPES``); their activations are full fine-tuning's, an upper bound.
    A GPU sold as ``g`` GB holds ``g x 10^9`` bytes, less ``reserve_gib`` for the CUDA context
    and the allocator's slack; temporary buffers (the 16-bit logits during the loss among them)
    come on top of the table.
    """
    models = [models] if isinstance(models, str) else list(models)
    recipes = [recipes] if isinstance(recipes, str) else list(recipes)
    gpus_gb = [gpus_gb] if isinstance(gpus_gb, (int, float)) else list(gpus_gb)
    for key in models:
        check_choice("model", key, PAPER_MODELS)
    for recipe in recipes:
        check_choice("recipe", recipe, LORA_RECIPES)
    for g in gpus_gb:
        check_real("a GPU's memory", g, 0, None, True, hint="GB")
    check_int("seq_len", seq_len, 1)
    check_int("batch", batch, 1)
    check_real("reserve_gib", reserve_gib, 0)
    mixed = PRECISIONS["mixed"][1]
    rows = []
    for key in models:
        m = PAPER_MODELS[key]
        parts = {"full": (m.n_params, training_memory_formula(m.n_params, m.n_params, **mixed)["total"])}
        for recipe in recipes:
            label, matrices, r = LORA_RECIPES[recipe]
            n = m.lora_params(r, matrices)
            parts[f"LoRA {label} r={r}"] = (n, training_memory_formula(m.n_params + n, n, **mixed)["total"])
            frozen = (m.n_params - m.embedding_params) * QLORA_BITS / 8 + m.embedding_params * 2
            parts[f"QLoRA {label} r={r}"] = (n, frozen + training_memory_formula(n, n, **mixed)["total"])
        for method, (n_trainable, states) in parts.items():
            for ckpt in (False, True):
                est = activation_bytes(m, seq_len, batch, checkpointing=ckpt)
                act = est["peak"]
                total = (states + act) / GiB
                rows.append(
                    {
                        "model": m.name,
                        "method": method,
                        "checkpointing": ckpt,
                        "n_trainable": n_trainable,
                        "weights_grads_optimizer_gib": states / GiB,
                        "activations_gib": act / GiB,
                        "logits_gib": est["logits"] / GiB,
                        "total_gib": total,
                        **{f"fits_{g}gb": total <= g * 1e9 / GiB - reserve_gib for g in gpus_gb},
                    }
                )
    return rows


__all__ = [
    "weight_bytes",
    "enable_activation_checkpointing",
    "activation_bytes",
    "fits_table",
    "QLORA_BITS",
    "training_memory_formula",
    "measure_training_memory",
    "paper_scaling_table",
    "PAPER_MODELS",
    "PRECISIONS",
    "OPTIMIZER_STATES",
    "ACTIVATIONS_NOTE",
    "PaperModel",
    "MiB",
    "GiB",
    "paper_model_from_config",
    "LORA_RECIPES",
]
