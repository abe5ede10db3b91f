"""A plain PyTorch training loop for sequence classification, and its evaluation.

Nothing hidden: tokenize once, batch with dynamic padding, AdamW over the
trainable parameters only, linear warm-up then linear decay, gradient
clipping, mixed precision on a GPU, a progress bar, and evaluation after every
epoch. ``prepare_method`` turns a fresh backbone into one of the fine-tuning
methods the series compares; ``run_experiment`` does all of it in one call.

Introduced in notebook 03 (``03_lora_distilbert_imdb.ipynb``); notebooks 04-06
and ``python -m lora_helpers`` reuse it.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .lora import apply_lora, count_parameters, freeze_all_except, mark_only_lora_trainable
from .profiles import Profile
from .utils import get_device, set_seed

# ------------------------------------------------------------------ batching

def encode(texts, tokenizer, max_length: int) -> list[list[int]]:
    """Token ids of each text, truncated to ``max_length`` (no padding yet)."""
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def make_batches(input_ids, labels, batch_size: int, pad_id: int, shuffle: bool = False, seed: int = 0):
    """A list of batches, each padded only to its own longest review (dynamic padding)."""
    order = torch.randperm(len(input_ids), generator=torch.Generator().manual_seed(seed)).tolist() \
        if shuffle else list(range(len(input_ids)))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(input_ids[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for j, i in enumerate(rows):
            ids[j, :len(input_ids[i])] = torch.tensor(input_ids[i])
        batches.append({"input_ids": ids, "attention_mask": (ids != pad_id).long(),
                        "labels": torch.tensor([labels[i] for i in rows])})
    return batches


# ------------------------------------------------------------------ memory

class PeakMemory:
    """Peak memory while the ``with`` block runs, in MiB.

    On CUDA: ``torch.cuda.max_memory_allocated`` (tensors only). On CPU: the
    process's resident set size, sampled every 5 ms by a background thread
    (it includes everything the process holds, not only tensors).
    """

    def __init__(self, device):
        self.device, self.peak_mib, self._stop = torch.device(device), 0.0, threading.Event()
        self.kind = "cuda max allocated" if self.device.type == "cuda" else "process RSS"

    @staticmethod
    def rss_mib() -> float:
        with open("/proc/self/statm") as f:  # Linux; elsewhere we report 0
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak_mib = max(self.peak_mib, self.rss_mib())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/statm"):
            self.peak_mib = self.rss_mib()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
        return False


# ------------------------------------------------------------------ train / evaluate

@dataclass
class TrainResult:
    """What a training run leaves behind: curves, evaluations and its cost."""
    losses: list = field(default_factory=list)    # training loss of every step
    evals: list = field(default_factory=list)     # evaluate(...) after every epoch
    wall_time_s: float = 0.0                       # training steps only, evaluation excluded
    steps: int = 0
    peak_memory_mib: float = 0.0
    memory_kind: str = ""

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.wall_time_s if self.wall_time_s else 0.0


def _bars_disabled() -> bool:
    """``TQDM_DISABLE`` set? tqdm's notebook bar ignores the variable (it passes ``disable=False``), so we pass it on."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


def _autocast(device):
    """bf16 autocast where the GPU supports it, fp16 otherwise; nothing on CPU/MPS."""
    if device.type != "cuda":
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def train(model: nn.Module, train_batches, eval_batches=None, *, lr: float, epochs: int = 1,
          warmup_ratio: float = 0.06, weight_decay: float = 0.01, max_grad_norm: float = 1.0,
          device=None, desc: str = "train") -> TrainResult:
    """Train the parameters that have ``requires_grad`` and evaluate after each epoch."""
    device = get_device() if device is None else torch.device(device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: use mark_only_lora_trainable / freeze_all_except first")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = epochs * len(train_batches)
    warmup = max(1, int(warmup_ratio * total))
    # Linear warm-up to lr over `warmup` steps, then linear decay to 0 at the last step.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    result = TrainResult()
    with PeakMemory(device) as memory:
        for epoch in range(epochs):
            start = time.perf_counter()  # wall time counts training steps, not evaluation
            model.train()
            bar = tqdm(train_batches, desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False,
                       disable=_bars_disabled())
            for batch in bar:
                batch = {k: v.to(device) for k, v in batch.items()}
                with _autocast(device):
                    loss = model(**batch).loss
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                result.losses.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            result.wall_time_s += time.perf_counter() - start
            if eval_batches is not None:
                result.evals.append(evaluate(model, eval_batches, device))
    result.steps, result.peak_memory_mib, result.memory_kind = total, memory.peak_mib, memory.kind
    return result


@torch.no_grad()
def evaluate(model: nn.Module, batches, device=None) -> dict:
    """Accuracy, mean loss and the confusion matrix (rows: true label, columns: predicted)."""
    device = get_device() if device is None else torch.device(device)
    model.to(device).eval()
    n_labels = model.config.num_labels
    confusion = torch.zeros(n_labels, n_labels, dtype=torch.long)
    loss_sum, n = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with _autocast(device):
            out = model(**batch)
        loss_sum += out.loss.item() * len(batch["labels"])
        n += len(batch["labels"])
        pred = out.logits.argmax(-1).cpu()
        for t, p in zip(batch["labels"].cpu().tolist(), pred.tolist()):
            confusion[t, p] += 1
    return {"accuracy": confusion.diag().sum().item() / n, "loss": loss_sum / n, "n": n,
            "confusion": confusion.tolist()}


@torch.no_grad()
def predict(model: nn.Module, tokenizer, texts, max_length: int = 256, device=None) -> list[dict]:
    """Label and class probabilities for each text (IMDb: 0 = negative, 1 = positive)."""
    device = get_device() if device is None else torch.device(device)
    model.to(device).eval()
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    probs = model(**{k: v.to(device) for k, v in enc.items()}).logits.float().softmax(-1).cpu()
    names = {0: "negative", 1: "positive"}
    return [{"label": int(p.argmax()), "sentiment": names.get(int(p.argmax()), str(int(p.argmax()))),
             "p_positive": float(p[-1])} for p in probs]


# ------------------------------------------------------------------ methods

METHODS = {
    "full": "full fine-tuning: every weight trains",
    "lora": "LoRA on the profile's target modules (q_lin, v_lin) + the classifier head",
    "lora-all": "LoRA on every Linear of the transformer blocks at r/2 (the paper's 'more matrices, lower rank') + head",
    "head": "head only: the backbone frozen, pre_classifier + classifier trained",
}
ALL_BLOCK_LINEARS = ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2")


def prepare_method(model: nn.Module, method: str, profile: Profile) -> tuple[float, list[str]]:
    """Make ``model`` ready for ``method`` (wrap and freeze); returns ``(learning rate, LoRA layer names)``."""
    head = profile.head_modules
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return profile.lr_full, []
    if method == "head":
        freeze_all_except(model, head)
        return profile.lr_head, []
    if method in ("lora", "lora-all"):
        targets = profile.target_modules if method == "lora" else ALL_BLOCK_LINEARS
        r = profile.r if method == "lora" else max(1, profile.r // 2)
        alpha = profile.lora_alpha if method == "lora" else profile.lora_alpha / 2  # same alpha/r
        names = apply_lora(model, targets, r=r, lora_alpha=alpha, lora_dropout=profile.lora_dropout)
        mark_only_lora_trainable(model, extra_trainable=head)
        return profile.lr_lora, names
    raise ValueError(f"unknown method {method!r}: choose one of {sorted(METHODS)}")


def run_experiment(method: str, profile: Profile, data=None, backbone=None, device=None,
                   verbose: bool = True) -> dict:
    """Load (or reuse) data and a fresh backbone, prepare ``method``, train, evaluate.

    ``data`` is a ``DatasetDict`` from ``load_imdb``; ``backbone`` a
    ``load_backbone``-style callable returning ``(model, tokenizer, description)``.
    Returns the model, tokenizer and a flat dict of metrics.
    """
    from .backbone import load_backbone
    from .data import load_imdb

    device = get_device() if device is None else torch.device(device)
    if data is None:
        data = load_imdb(profile.n_train, profile.n_test, seed=profile.seed, verbose=verbose)
    set_seed(profile.seed)
    model, tokenizer, description = (backbone or load_backbone)(profile.backbone, seed=profile.seed,
                                                                verbose=verbose)
    lr, lora_names = prepare_method(model, method, profile)
    params = count_parameters(model)
    train_ids = encode(data["train"]["text"], tokenizer, profile.max_length)
    test_ids = encode(data["test"]["text"], tokenizer, profile.max_length)
    pad = tokenizer.pad_token_id
    train_batches = make_batches(train_ids, data["train"]["label"], profile.batch_size, pad, True, profile.seed)
    test_batches = make_batches(test_ids, data["test"]["label"], profile.eval_batch_size, pad)
    set_seed(profile.seed)  # same dropout masks whatever happened before
    result = train(model, train_batches, test_batches, lr=lr, epochs=profile.epochs,
                   warmup_ratio=profile.warmup_ratio, weight_decay=profile.weight_decay,
                   max_grad_norm=profile.max_grad_norm, device=device, desc=method)
    final = result.evals[-1]
    metrics = {"method": method, "profile": profile.name, "backbone": description, "device": str(device),
               "lr": lr, "lora_layers": len(lora_names), "trainable_params": params.trainable,
               "total_params": params.total, "trainable_percent": params.percent,
               "test_accuracy": final["accuracy"], "test_loss": final["loss"], "confusion": final["confusion"],
               "train_steps": result.steps, "train_time_s": result.wall_time_s,
               "s_per_step": result.wall_time_s / max(1, result.steps),
               "peak_memory_mib": result.peak_memory_mib, "memory_kind": result.memory_kind,
               "final_train_loss": sum(result.losses[-10:]) / len(result.losses[-10:])}
    return {"model": model, "tokenizer": tokenizer, "result": result, "metrics": metrics}
