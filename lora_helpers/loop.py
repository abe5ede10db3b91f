"""A plain PyTorch training loop for sequence classification, and its evaluation.

Nothing hidden: tokenize once, batch with dynamic padding, AdamW over the
trainable parameters only (one learning rate, or one per parameter group),
linear warm-up then linear decay, gradient clipping, mixed precision on a GPU,
a plain-text progress bar, and evaluation every few steps on a held-out split.

Notebook 03 (``03_lora_distilbert_imdb.ipynb``) writes the bare loop out
(forward, loss, backward, step, zero_grad) and then introduces this one: the same
loop plus schedule, clipping, mixed precision and a bar. ``runner.run`` (one
training run of any method) and ``python -m lora_helpers`` use it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from tqdm.std import tqdm

from .utils import ArgumentError, PeakMemory, check_int, check_real, get_device

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# ------------------------------------------------------------------ batching


def check_max_length(tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
    """``max_length`` must leave room for one token of text after the special tokens ([CLS], [SEP]).

    Below that the tokenizer cannot truncate and returns the whole review (hundreds of tokens).
    """
    special = tokenizer.num_special_tokens_to_add(pair=False) if hasattr(tokenizer, "num_special_tokens_to_add") else 0
    try:
        check_int("max_length", max_length, special + 1)
    except ArgumentError as err:
        raise ArgumentError(
            f"{err}: the tokenizer adds {special} special tokens to each text and needs room for one token "
            "of the text (e.g. 128)"
        ) from None


def check_positions(model: nn.Module, length: int, what: str = "max_length") -> None:
    """A sequence of ``length`` tokens must fit the model's position embeddings (DistilBERT: 512)."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if positions is not None and length > positions:
        raise ArgumentError(
            f"{what} is {length} tokens, but {type(model).__name__} has position embeddings for {positions}: "
            f"use a max_length of at most {positions}"
        )


def check_texts(texts: str | Iterable[str]) -> list[str]:
    """``texts`` as a list of non-empty strings: an empty review would train or score on nothing but [CLS] [SEP]."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ArgumentError(f"texts must be strings; item {i} is a {type(t).__name__}")
        if not t.strip():
            raise ArgumentError(f"text {i} is empty: every review needs some text (drop the empty ones first)")
    return texts


def encode(texts: str | Iterable[str], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[list[int]]:
    """Token ids of each text, truncated to ``max_length`` (no padding yet)."""
    check_max_length(tokenizer, max_length)
    return tokenizer(check_texts(texts), truncation=True, max_length=max_length)["input_ids"]


def make_batches(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[int],
    batch_size: int,
    pad_id: int,
    shuffle: bool = False,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """A list of batches, each padded only to its own longest review (dynamic padding)."""
    check_int("batch_size", batch_size, 1)
    if len(input_ids) != len(labels):
        raise ValueError(f"{len(input_ids)} token lists but {len(labels)} labels: one label per review")
    order = (
        torch.randperm(len(input_ids), generator=torch.Generator().manual_seed(seed)).tolist()
        if shuffle
        else list(range(len(input_ids)))
    )
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(input_ids[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for j, i in enumerate(rows):
            ids[j, : len(input_ids[i])] = torch.tensor(input_ids[i])
        batches.append(
            {
                "input_ids": ids,
                "attention_mask": (ids != pad_id).long(),
                "labels": torch.tensor([labels[i] for i in rows]),
            }
        )
    return batches


# ------------------------------------------------------------------ train / evaluate


@dataclass
class TrainResult:
    """What a training run leaves behind: curves, evaluations and its cost."""

    losses: list = field(default_factory=list)  # training loss of every step
    evals: list = field(default_factory=list)  # evaluate(...) on eval_batches, each with its "step"
    wall_time_s: float = 0.0  # training steps only, evaluation excluded
    steps: int = 0
    peak_memory_mib: float = 0.0
    memory_kind: str = ""
    precision: str = ""  # choose_precision(device): "bf16", "fp16" or "fp32"

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.wall_time_s if self.wall_time_s else 0.0


def _bars_disabled() -> bool:
    """``TQDM_DISABLE`` set? Then no progress bar (``disable=None`` would also hide it off a terminal)."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


def choose_precision(device: str | torch.device) -> str:
    """The precision a training step runs in on ``device``: ``"bf16"``, ``"fp16"`` or ``"fp32"``.

    * ``"bf16"`` on a GPU with bfloat16 units (CUDA compute capability 8.0 or
      newer: A100, L4, H100, RTX 30xx/40xx). bf16 has fp32's exponent range, so
      no loss scaling is needed.
    * ``"fp16"`` on an older GPU (Colab's T4 is 7.5, a V100 7.0): float16
      autocast plus a ``GradScaler``, because small fp16 gradients underflow to
      zero. ``torch.cuda.is_bf16_supported()`` is no guide: it answers True on
      a T4 as well, where bf16 is only emulated (slowly). The compute
      capability tells what the hardware has; newer torch also offers it as
      ``torch.cuda.is_bf16_supported(including_emulation=False)``.
    * ``"fp32"`` everywhere else (CPU, Apple's MPS): no autocast at all.

    ``_autocast`` and the ``GradScaler`` in ``train`` both follow this choice.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32"
    major, _minor = torch.cuda.get_device_capability(device)
    return "bf16" if major >= 8 else "fp16"


def _autocast(device):
    """Autocast in ``choose_precision(device)``'s dtype; disabled (plain fp32) off CUDA."""
    precision = choose_precision(device)
    if precision == "fp32":
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _grad_scaler(precision: str) -> torch.amp.GradScaler:
    """A loss scaler, active only for fp16 (bf16 and fp32 gradients do not underflow)."""
    return torch.amp.GradScaler("cuda", enabled=precision == "fp16")


def train_step(
    model: nn.Module,
    batch: dict,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: Iterable[torch.Tensor],
    max_grad_norm: float,
    device: str | torch.device,
) -> float:
    """One step: forward, loss, backward (scaled for fp16), clip the gradient norm, optimizer step, zero_grad."""
    device = torch.device(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    with _autocast(device):
        loss = model(**batch).loss
    if not torch.isfinite(loss):  # before the step: the weights are still those that gave a finite loss before
        raise FloatingPointError(
            f"the training loss is {loss.item()} (not finite): the run diverged. Try a smaller learning rate "
            "(notebook 04's sweep), and check the data; the model may already hold inf or nan, start from a fresh one"
        )
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train(
    model: nn.Module,
    train_batches: Sequence[dict[str, torch.Tensor]],
    eval_batches: Sequence[dict[str, torch.Tensor]] | None = None,
    *,
    lr: float | None = None,
    param_groups: Sequence[dict] | None = None,
    epochs: int = 1,
    eval_every: int | None = None,
    warmup_ratio: float = 0.06,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    device: str | torch.device | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train the parameters that have ``requires_grad``; evaluate on ``eval_batches`` as it goes.

    ``lr`` trains every trainable parameter at one rate; ``param_groups`` (a list of
    ``{"params": [...], "lr": ...}``, e.g. ``methods.param_groups``) gives each group its
    own. Evaluation runs every ``eval_every`` steps and after the last step (or, without
    ``eval_every``, after every epoch); each entry of ``result.evals`` records its ``step``.
    """
    if (lr is None) == (param_groups is None):
        raise ValueError("give exactly one of lr= (one rate for every trainable parameter) or param_groups=")
    if param_groups is None:
        param_groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    for g in param_groups:  # a negative rate would climb the loss, nan would poison every weight
        check_real(f"the learning rate of group {g.get('name', '')!r}".replace(" ''", ""), g.get("lr"), 0, None, True)
    check_int("epochs", epochs, 1)
    if eval_every is not None:
        check_int("eval_every", eval_every, 1, hint="steps between evaluations; None: once per epoch")
    check_real("warmup_ratio", warmup_ratio, 0, 1, False, True)
    check_real("weight_decay", weight_decay, 0)
    check_real("max_grad_norm", max_grad_norm, 0, None, True)
    for batch in train_batches:
        check_positions(model, batch["input_ids"].shape[-1], "a training batch")
    device = get_device() if device is None else torch.device(device)
    model.to(device)
    params = [p for g in param_groups for p in g["params"]]
    if not params:
        raise ValueError("no trainable parameters: use mark_only_lora_trainable / freeze_all_except first")
    if len(train_batches) == 0:
        raise ValueError(
            "train_batches is empty: nothing to train on (no training reviews? a batch list built from an empty split?)"
        )
    optimizer = torch.optim.AdamW(param_groups, weight_decay=weight_decay)
    total = epochs * len(train_batches)
    warmup = max(1, int(warmup_ratio * total))
    # Linear warm-up to each group's lr over `warmup` steps, then linear decay to 0 at the last step.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    precision = choose_precision(device)
    scaler = _grad_scaler(precision)
    result = TrainResult(precision=precision)
    if device.type == "cuda":  # on CPU it is always fp32: no line, so CPU outputs stay as they were
        print(
            f"{desc}: {precision} on {torch.cuda.get_device_name(device)}"
            + (" (fp16 autocast + GradScaler)" if precision == "fp16" else "")
        )

    def evaluate_now(step):
        if eval_batches is not None:
            result.evals.append({"step": step, **evaluate(model, eval_batches, device)})
            model.train()

    step = 0
    with PeakMemory(device) as memory:
        for epoch in range(epochs):
            model.train()
            # a plain-text bar on stdout: in a notebook it updates in place and leaves its last line as a
            # record (a widget bar shows "model not found" once the notebook is saved and reopened)
            bar = tqdm(
                train_batches,
                desc=f"{desc} epoch {epoch + 1}/{epochs}",
                file=sys.stdout,
                ncols=100,
                disable=_bars_disabled(),
            )
            for batch in bar:
                start = time.perf_counter()  # wall time counts training steps, not evaluation
                loss = train_step(model, batch, optimizer, scaler, params, max_grad_norm, device)
                schedule.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                result.wall_time_s += time.perf_counter() - start
                result.losses.append(loss)
                bar.set_postfix(loss=f"{loss:.3f}")
                step += 1
                if eval_every and step % eval_every == 0 and step < total:
                    evaluate_now(step)
            if not eval_every or epoch == epochs - 1:
                evaluate_now(step)
    result.steps, result.peak_memory_mib, result.memory_kind = total, memory.peak_mib, memory.kind
    return result


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: str | torch.device | None = None
) -> dict:
    """Accuracy, mean loss, the confusion matrix (rows: true label, columns: predicted) and each prediction."""
    if hasattr(batches, "__len__") and len(batches) == 0:
        raise ValueError("no batches to evaluate: accuracy and loss are undefined on an empty test set")
    device = get_device() if device is None else torch.device(device)
    model.to(device).eval()
    n_labels = model.config.num_labels
    confusion = torch.zeros(n_labels, n_labels, dtype=torch.long)
    loss_sum, n, predictions = 0.0, 0, []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with _autocast(device):
            out = model(**batch)
        loss_sum += out.loss.item() * len(batch["labels"])
        n += len(batch["labels"])
        pred = out.logits.argmax(-1).cpu()
        predictions += pred.tolist()
        for t, p in zip(batch["labels"].cpu().tolist(), pred.tolist()):
            confusion[t, p] += 1
    if n == 0:
        raise ValueError("the batches hold no examples: accuracy and loss are undefined on an empty test set")
    return {
        "accuracy": confusion.diag().sum().item() / n,
        "loss": loss_sum / n,
        "n": n,
        "confusion": confusion.tolist(),
        "predictions": predictions,
    }


@torch.no_grad()
def predict(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: str | Iterable[str],
    max_length: int = 256,
    device: str | torch.device | None = None,
) -> list[dict]:
    """Label and class probabilities for each text (IMDb: 0 = negative, 1 = positive).

    ``texts``: a list of strings, or one string (one review, one prediction); an empty
    list gives an empty list.
    """
    texts = check_texts(texts)
    check_max_length(tokenizer, max_length)
    check_positions(model, max_length)
    if not texts:
        return []
    device = get_device() if device is None else torch.device(device)
    model.to(device).eval()
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    probs = model(**{k: v.to(device) for k, v in enc.items()}).logits.float().softmax(-1).cpu()
    names = {0: "negative", 1: "positive"}
    return [
        {
            "label": int(p.argmax()),
            "sentiment": names.get(int(p.argmax()), str(int(p.argmax()))),
            "p_positive": float(p[-1]),
        }
        for p in probs
    ]
