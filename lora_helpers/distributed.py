"""LoRA under data-parallel training: the same model on several processes, only A, B and the head synchronised.

Data parallelism (PyTorch's ``DistributedDataParallel``, DDP) gives every process a
copy of the model and a slice of each batch. After ``backward`` the processes
average their gradients (an all-reduce) so that every copy takes the same step.
DDP all-reduces only parameters with ``requires_grad=True``: with LoRA that is
``A``, ``B`` and the new head, about 1% of the bytes full fine-tuning would send
every step here (mostly the head's). Besides, DDP broadcasts the model once when it
wraps it; its per-step buffer broadcast is switched off.

``run_data_parallel`` shows it on CPU with the ``gloo`` backend: it tokenises a
few global batches once, trains ``world_size`` processes on equal slices of them,
records every bucket DDP all-reduces (a communication hook), then trains one
process on the whole global batches from the same start and compares the trained
parameters. Both train with the series' one training loop (``loop.train``, notebook 03:
AdamW, warm-up and decay, gradient clipping); the DDP wrapper is just the model it is given.
Dropout is switched off, so the two runs differ only by the order of floating-point sums.

Command line (the script the notebook runs)::

    python -m lora_helpers.distributed --nproc 2 --steps 8

Introduced in notebook 07 (``07_bigger_models.ipynb``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from .loop import train
from .lora import apply_lora, count_parameters, mark_only_lora_trainable
from .methods import HEAD_MODULES
from .utils import ArgumentError, check_choice, check_int, check_real

MODELS = ("standin", "tiny")


def build_model(kind: str = "standin", seed: int = 0, r: int = 8, lora_alpha: float = 16) -> nn.Module:
    """A DistilBERT classifier with LoRA (rank ``r``) on ``q_lin``, ``v_lin`` and a trainable head; dropout off.

    ``kind="standin"``: the offline stand-in backbone (notebook 03); ``"tiny"``: a small
    randomly initialised DistilBERT (2 layers, 32 wide, 100-token vocabulary) for tests.
    The same ``seed`` gives the same weights in every process.
    """
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}: choose one of {MODELS}")
    torch.manual_seed(seed)
    if kind == "standin":
        from .backbone import load_backbone

        model, _, _ = load_backbone("minilm-standin", seed=seed, verbose=False)
    else:
        from transformers import DistilBertConfig, DistilBertForSequenceClassification

        config = DistilBertConfig(
            vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64, num_labels=2
        )
        model = DistilBertForSequenceClassification(config)
    for m in model.modules():  # per-process dropout masks would make the two runs differ by design
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    torch.manual_seed(seed)
    apply_lora(model, ("q_lin", "v_lin"), r=r, lora_alpha=lora_alpha)
    mark_only_lora_trainable(model, extra_trainable=HEAD_MODULES)
    return model


def global_batches(kind: str, steps: int, batch_size: int, max_length: int, seed: int = 0) -> list[dict]:
    """``steps`` global batches: IMDb training reviews for the stand-in, random tokens for ``tiny``."""
    if kind == "tiny":
        g = torch.Generator().manual_seed(seed)
        return [
            {
                "input_ids": torch.randint(1, 100, (batch_size, max_length), generator=g),
                "attention_mask": torch.ones(batch_size, max_length, dtype=torch.long),
                "labels": torch.randint(0, 2, (batch_size,), generator=g),
            }
            for _ in range(steps)
        ]
    from .backbone import load_backbone
    from .data import load_imdb

    _, tokenizer, _ = load_backbone("minilm-standin", verbose=False)
    data = load_imdb(steps * batch_size, 2, seed=seed, verbose=False)["train"]
    out = []
    for i in range(steps):
        rows = data[i * batch_size : (i + 1) * batch_size]
        enc = tokenizer(rows["text"], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        out.append(
            {
                "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"],
                "labels": torch.tensor(rows["label"]),
            }
        )
    return out


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _first_gradients(net: nn.Module, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """The gradients of one forward and backward pass on ``batch`` through ``net`` (the DDP wrapper when
    data-parallel: averaged over the processes), before any optimizer step; the model is left unchanged."""
    net(**batch).loss.backward()
    grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def _train(net: nn.Module, batches, lr: float, desc: str) -> list[float]:
    """The training loop of notebook 03 (``loop.train``), on the CPU; ``net`` may be the DDP wrapper."""
    return train(net, batches, lr=lr, device="cpu", desc=desc).losses


def _no_forward_buffer_sync() -> dict:
    """DDP's switch for the per-step buffer broadcast (``forward_sync_buffers``; ``broadcast_buffers`` before)."""
    parameters = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}


def _worker(rank: int, world_size: int, port: int, kind: str, batches, lr: float, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # one core per process
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = build_model(kind)
        # DDP broadcasts rank 0's parameters and buffers once, here; switching off the buffer sync stops it re-sending
        # every buffer before each forward pass (an NF4 base keeps its codes in buffers: the whole model each step)
        ddp = nn.parallel.DistributedDataParallel(model, **_no_forward_buffer_sync())
        sent = []  # (numel, bytes) of every bucket this process all-reduces

        def record_and_allreduce(state, bucket):
            buffer = bucket.buffer()
            sent.append((buffer.numel(), buffer.numel() * buffer.element_size()))
            work = dist.all_reduce(buffer, async_op=True)  # sum over processes, then / world_size
            return work.get_future().then(lambda fut: fut.value()[0] / world_size)

        ddp.register_comm_hook(None, record_and_allreduce)
        share = len(batches[0]["labels"]) // world_size
        local = [{k: v[rank * share : (rank + 1) * share] for k, v in b.items()} for b in batches]
        first_grads = _first_gradients(ddp, model, local[0])
        sent.clear()  # count what the training steps all-reduce
        start = time.perf_counter()
        losses = _train(ddp, local, lr, desc=f"rank {rank}")
        seconds = time.perf_counter() - start
        if rank == 0:
            torch.save({"state": _trainable_state(model), "first_grads": first_grads}, Path(out_dir) / "ddp_state.pt")
            (Path(out_dir) / "ddp.json").write_text(
                json.dumps({"sent": sent, "losses_rank0": losses, "seconds": seconds, "local_batch": share})
            )
        dist.barrier()
        del ddp  # release DDP's reducer while the process group still exists (else exit can hang)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_data_parallel(
    world_size: int = 2,
    steps: int = 8,
    batch_size: int = 16,
    max_length: int = 64,
    lr: float = 1e-3,
    kind: str = "standin",
    timeout_s: float = 300,
) -> dict:
    """Train LoRA data-parallel on ``world_size`` CPU processes, then on one; compare.

    Returns a dict: ``bytes_per_step`` all-reduced (measured by the hook) and what full
    fine-tuning would all-reduce (every parameter, fp32), ``trainable``/``total``
    parameters, the first step's averaged gradients against one process's on the whole batch
    (``grad_max_abs_diff``, with ``grad_max_abs`` for scale), ``max_abs_diff`` between the
    data-parallel and the single-process parameters after training, the largest parameter
    change (``max_update``) for scale, each process's share of a batch, the losses and seconds.
    """
    check_choice("kind", kind, MODELS)
    check_int("world_size", world_size, 1)
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1, hint="the global batch")
    check_real("lr", lr, 0, None, True)
    if batch_size % world_size:
        raise ArgumentError(
            f"batch_size {batch_size} must split evenly over {world_size} processes (e.g. {world_size * 8})"
        )
    model = build_model(kind)  # checked here, in this process: a worker's error would come back as a traceback
    check_int("max_length", max_length, 3, model.config.max_position_embeddings, hint=f"the {kind} model's positions")
    batches = global_batches(kind, steps, batch_size, max_length)
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        procs = mp.start_processes(
            _worker,
            args=(world_size, _free_port(), kind, batches, lr, out_dir),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        while not procs.join(timeout=5):  # raises if a process failed
            if time.perf_counter() - start > timeout_s:
                for p in procs.processes:
                    p.kill()
                raise TimeoutError(
                    f"the {world_size} processes did not finish in {timeout_s:.0f} s; they were "
                    "stopped. Run `python -m lora_helpers.distributed --model tiny` to check the setup"
                )
        wall = time.perf_counter() - start
        saved = torch.load(Path(out_dir) / "ddp_state.pt")
        ddp_state, ddp_grads = saved["state"], saved["first_grads"]
        log = json.loads((Path(out_dir) / "ddp.json").read_text())
    initial = _trainable_state(model)
    grads = _first_gradients(model, model, batches[0])
    start = time.perf_counter()
    losses = _train(model, batches, lr, desc="one process")
    single_seconds = time.perf_counter() - start
    single = _trainable_state(model)
    counts = count_parameters(model)
    sent_bytes = sum(b for _, b in log["sent"])
    return {
        "world_size": world_size,
        "steps": steps,
        "global_batch": batch_size,
        "max_length": max_length,
        "model": kind,
        "trainable": counts.trainable,
        "total": counts.total,
        "bytes_per_step": sent_bytes / steps,
        "values_per_step": sum(n for n, _ in log["sent"]) / steps,
        "full_ft_bytes_per_step": counts.total * 4,
        "local_batch": log["local_batch"],
        "grad_max_abs_diff": max(float((ddp_grads[k] - grads[k]).abs().max()) for k in grads),
        "grad_max_abs": max(float(grads[k].abs().max()) for k in grads),
        "max_abs_diff": max(float((ddp_state[k] - single[k]).abs().max()) for k in single),
        "max_update": max(float((single[k] - initial[k]).abs().max()) for k in single),
        "losses_ddp_rank0": log["losses_rank0"],
        "losses_single": losses,
        "ddp_train_seconds": log["seconds"],
        "ddp_wall_seconds": wall,
        "single_train_seconds": single_seconds,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lora_helpers.distributed",
        description="LoRA trained data-parallel on CPU processes (gloo), "
        "compared with one process on the same global batches.",
    )
    parser.add_argument("--nproc", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch, split evenly over the processes")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--model", choices=MODELS, default="standin")
    args = parser.parse_args(argv)
    for flag, value in (("--nproc", args.nproc), ("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.batch_size % args.nproc:
        parser.error(f"--batch-size {args.batch_size} must split evenly over --nproc {args.nproc} processes")
    positions = 64 if args.model == "tiny" else 512
    if not 3 <= args.max_length <= positions:
        parser.error(f"--max-length must be in 3 .. {positions} for --model {args.model}, got {args.max_length}")
    try:
        out = run_data_parallel(args.nproc, args.steps, args.batch_size, args.max_length, kind=args.model)
    except (ValueError, OSError, TimeoutError, mp.ProcessRaisedException, mp.ProcessExitedException) as err:
        last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        print(f"error: {last}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in out.items() if not k.startswith("losses")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
