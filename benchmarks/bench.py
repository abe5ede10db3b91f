"""Benchmark LoRA's costs on this machine: training step, memory, inference latency, ours vs PEFT.

    python benchmarks/bench.py                  # the real run: batch 16 x 256 tokens (several minutes on 2 cores)
    python benchmarks/bench.py --quick          # tiny sizes, 2 repeats: checks that everything runs
    python benchmarks/bench.py --backbone distilbert-base-uncased --out benchmarks/results/bench-distilbert.json
    python benchmarks/bench.py --report results/bench-cpu.json   # the tables of a saved run (the README's)

What is measured, and how, is in ``benchmarks/README.md``. Everything runs in one
process on the same batch, after warm-up, with the repeats of the compared variants
interleaved (drift hits them alike); peak memory is measured per method in a fresh
``spawn`` subprocess. The script prints a markdown table, PASS/MISS per goal (it
never fails on a goal) and writes JSON. It is a script, not a test.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import functools
import gc
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from lora_helpers import apply_lora, get_profile, lora_layers, mark_only_lora_trainable, merge_and_unload  # noqa: E402
from lora_helpers.backbone import load_backbone  # noqa: E402
from lora_helpers.loop import train_step  # noqa: E402
from lora_helpers.methods import (  # noqa: E402
    HEAD_MODULES,
    head_learning_rate,
    learning_rate,
    method_spec,
    prepare_method,
)
from lora_helpers.utils import PeakMemory, cpu_name, versions  # noqa: E402

THREADS = 2
TRAIN_METHODS = ("full", "lora", "head")
# the phase split (forward / backward / optimizer), at both widths; "floor": every weight frozen except the head, but
# the gradient still flows to the embeddings' output, so backward computes every activation gradient and no weight
# gradient of the blocks: the least any method that trains inside the blocks (LoRA) can cost
SPLIT_VARIANTS = ("full", "lora", "lora, dropout 0", "floor", "head")
SETTINGS = {  # batch x tokens, warm-up and repeats of training steps / forward passes, steps per memory run
    "full": dict(
        batch_size=16, seq_len=256, warmup=2, train_repeats=10, infer_repeats=15, memory_steps=3, split_repeats=6
    ),
    "quick": dict(
        batch_size=2, seq_len=16, warmup=1, train_repeats=2, infer_repeats=2, memory_steps=1, split_repeats=2
    ),
}
GOALS = {"merged_vs_base_latency": 0.03, "ours_vs_peft_step": 1.05, "lora_vs_floor_768": 1.10}


# ------------------------------------------------------------------ helpers


def machine() -> dict:
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        **versions(("torch", "transformers", "peft")),
    }


def make_batch(tokenizer, batch_size: int, seq_len: int) -> dict:
    """``batch_size`` IMDb reviews cut or padded to exactly ``seq_len`` tokens (random ids if no IMDb here)."""
    try:
        from lora_helpers.data import load_imdb

        ds = load_imdb(n_train=max(2, batch_size + batch_size % 2), n_test=2, verbose=False)["train"]
        enc = tokenizer(
            ds["text"][:batch_size], truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt"
        )
        ids, mask, labels, source = (
            enc["input_ids"],
            enc["attention_mask"],
            torch.tensor(ds["label"][:batch_size]),
            "IMDb",
        )
    except (FileNotFoundError, OSError, ValueError):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, tokenizer.vocab_size, (batch_size, seq_len), generator=g)
        mask, labels, source = torch.ones_like(ids), torch.arange(batch_size) % 2, "random token ids"
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "source": source}


def trainer(model, lr: float):
    """One training step of the series' loop as a function (``loop.train_step``: forward, backward,
    gradient clipping, AdamW step on the trainable parameters), on the CPU in float32."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    scaler = torch.amp.GradScaler("cuda", enabled=False)  # float32 on the CPU: a pass-through
    model.train()

    def step(batch):
        train_step(model, batch, optimizer, scaler, params, 1.0, "cpu")

    return step


def prepared(model, method: str, profile) -> float:
    """Prepare ``model`` for ``method`` (methods.prepare_method); returns the method's learning rate."""
    spec = method_spec(method, profile)
    prepare_method(model, spec)
    return learning_rate(spec, profile)


def interleaved(fns: dict, repeats: int, warmup: int) -> dict:
    """Seconds per call of each function: warm-up, then repeats in rotating order (drift hits all alike)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for rep in range(repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: summary(t) for name, t in times.items()}


def summary(times: list) -> dict:
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
    return {
        "median": statistics.median(times),
        "q1": q1,
        "q3": q3,
        "min": min(times),
        "max": max(times),
        "n": len(times),
    }


def rss_now_mib() -> float:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed blocks back, for an honest baseline
    except (OSError, AttributeError):
        pass
    return PeakMemory.rss_mib()


def memory_child(backbone: str, method: str, batch: dict, steps: int) -> dict:
    """In a fresh process: load, prepare ``method``, then peak RSS over ``steps`` training steps minus before."""
    torch.set_num_threads(THREADS)
    torch.nn.Linear(8, 8)(torch.randn(2, 8)).sum().backward()  # one-time autograd set-up, not billed to the method
    model, _, _ = load_backbone(backbone, seed=0, verbose=False)
    lr = prepared(model, method, get_profile("quick", backbone=backbone))
    step, batch = trainer(model, lr), {k: torch.tensor(v) for k, v in batch.items()}
    before = rss_now_mib()
    with PeakMemory("cpu") as peak:
        for _ in range(steps):
            step(batch)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "rss_before_mib": before,
        "peak_rss_mib": peak.peak_mib,
        "peak_increase_mib": peak.peak_mib - before,
        "trainable_params": trainable,
        "grad_adam_state_mib": 3 * 4 * trainable / 2**20,
        "steps": steps,
    }


# ------------------------------------------------------------------ the three benchmarks


def bench_training(base, batch, cfg, backbone) -> tuple[dict, dict]:
    """Step time of full / LoRA / head in this process; peak memory of each in a fresh subprocess."""
    profile = get_profile("quick", backbone=backbone)
    steps = {}
    for method in TRAIN_METHODS:
        model = copy.deepcopy(base)
        lr = prepared(model, method, profile)
        steps[method] = functools.partial(trainer(model, lr), batch)
    times = interleaved(steps, cfg["train_repeats"], cfg["warmup"])
    del steps
    plain = {k: v.tolist() for k, v in batch.items()}
    memory = {}
    for method in TRAIN_METHODS:  # one fresh process each, one after the other
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            memory[method] = pool.submit(memory_child, backbone, method, plain, cfg["memory_steps"]).result()
    return times, memory


@torch.no_grad()
def bench_inference(base, batch, cfg) -> tuple[dict, float]:
    """Forward latency: base model, LoRA (r=8 on q, v) unmerged, the same LoRA merged into plain Linears."""
    unmerged = copy.deepcopy(base)
    apply_lora(unmerged, ["q_lin", "v_lin"], r=8, lora_alpha=16)
    g = torch.Generator().manual_seed(0)
    for layer in lora_layers(unmerged).values():  # a trained-looking adapter, not B = 0
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)
    merged = merge_and_unload(copy.deepcopy(unmerged))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    models = {"base": base, "lora unmerged": unmerged, "lora merged": merged}
    for m in models.values():
        m.eval()
    diff = (merged(**inputs).logits - unmerged(**inputs).logits).abs().max().item()
    assert diff < 1e-4, f"merged and unmerged LoRA disagree: max |diff| = {diff}"
    times = interleaved(
        {k: functools.partial(m, **inputs) for k, m in models.items()}, cfg["infer_repeats"], cfg["warmup"] + 1
    )
    return times, diff


def bench_peft(base, batch, cfg) -> dict:
    """Our LoRALinear vs PEFT's LoRA on the same model and weights: same logits, step time ratio."""
    from peft import LoraConfig, get_peft_model

    head = ("pre_classifier", "classifier")
    ours = copy.deepcopy(base)
    apply_lora(ours, ["q_lin", "v_lin"], r=8, lora_alpha=16, lora_dropout=0.0)
    mark_only_lora_trainable(ours, extra_trainable=head)
    with warnings.catch_warnings():  # transformers' FutureWarnings about PEFT's calls are not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        theirs = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_lin", "v_lin"])
        )
    for name, p in theirs.base_model.model.named_parameters():  # same trainable set as ours: LoRA + head
        if name.startswith(head):
            p.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        ours.eval()
        theirs.eval()
        diff = (ours(**inputs).logits - theirs(**inputs).logits).abs().max().item()
    assert diff < 1e-5, f"our LoRA and PEFT's disagree: max |logit diff| = {diff}"
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert n_ours == n_theirs, (n_ours, n_theirs)
    lr = method_spec("lora", "quick").lr
    steps = {"ours (LoRALinear)": trainer(ours, lr), "PEFT": trainer(theirs, lr)}
    times = interleaved({k: functools.partial(s, batch) for k, s in steps.items()}, cfg["train_repeats"], cfg["warmup"])
    return {
        "max_abs_logit_diff": diff,
        "trainable_params": n_ours,
        "times": times,
        "ratio_ours_over_peft": times["ours (LoRALinear)"]["median"] / times["PEFT"]["median"],
    }


# ------------------------------------------------------------------ phase split at both widths


def width_models(standin, description: str) -> dict:
    """``{width: (model, description)}``: the stand-in (384, pretrained) and a random ``DistilBertConfig()`` (768).

    Timing needs no pretrained weights: the 768-wide model has distilbert-base-uncased's shapes exactly.
    """
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        wide = DistilBertForSequenceClassification(DistilBertConfig(num_labels=2))
    return {
        384: (standin, description),
        768: (wide, "DistilBertConfig() (distilbert-base-uncased's shapes: 768 wide, 66M), random weights"),
    }


def split_variant(base, variant: str, profile):
    """A copy of ``base`` prepared for ``variant``, and its optimizer (None: nothing to step)."""
    model = copy.deepcopy(base)
    if variant == "floor":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(HEAD_MODULES))
        # the embeddings' output requires a gradient: backward runs through every block (activation gradients only)
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
        lr = head_learning_rate(profile)
    else:
        spec = method_spec("lora" if variant.startswith("lora") else variant, profile)
        if variant == "lora, dropout 0":
            spec = spec.replace(lora_dropout=0.0)
        prepare_method(model, spec)
        lr = learning_rate(spec, profile)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    return model, torch.optim.AdamW(params, lr=lr), params


def split_step(model, optimizer, params, batch) -> tuple[float, float, float]:
    """One training step in three timed phases: forward (with the loss), backward, optimizer (clip, step, zero)."""
    t0 = time.perf_counter()
    loss = model(**batch).loss
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def bench_split(base, batch, cfg, profile) -> dict:
    """Forward / backward / optimizer medians of every ``SPLIT_VARIANTS`` entry, repeats interleaved."""
    runs = {v: split_variant(base, v, profile) for v in SPLIT_VARIANTS}
    for _ in range(cfg["warmup"]):
        for model, opt, params in runs.values():
            split_step(model, opt, params, batch)
    phases = {v: {"forward": [], "backward": [], "optimizer": [], "step": []} for v in SPLIT_VARIANTS}
    names = list(SPLIT_VARIANTS)
    for rep in range(cfg["split_repeats"]):
        for v in names[rep % len(names) :] + names[: rep % len(names)]:
            f, b, o = split_step(*runs[v], batch)
            for key, value in (("forward", f), ("backward", b), ("optimizer", o), ("step", f + b + o)):
                phases[v][key].append(value)
    return {v: {k: summary(t) for k, t in ph.items()} for v, ph in phases.items()}


# ------------------------------------------------------------------ report


def fmt_row(label: str, t: dict, scale: float, unit: str, reference: float | None = None) -> str:
    rel = f"{t['median'] / reference:.3f}x" if reference else ""
    return (
        f"| {label} | {t['median'] * scale:.1f} {unit} | {t['q1'] * scale:.1f} - {t['q3'] * scale:.1f} "
        f"| {t['min'] * scale:.1f} - {t['max'] * scale:.1f} | {t['n']} | {rel} |"
    )


def report(res: dict) -> str:
    m, s, tr, inf, pf = res["machine"], res["settings"], res["train_step"], res["inference"], res["peft"]
    lines = [
        f"## LoRA benchmark ({'quick' if s['quick'] else 'full'})",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}; torch {m['torch']}, "
        f"transformers {m['transformers']}, peft {m['peft']}",
        f"- backbone: {s['backbone_description']}"
        + (
            ""
            if s["backbone"] == "distilbert-base-uncased"
            else " (DistilBERT itself: run with --backbone distilbert-base-uncased where it can be downloaded)"
        ),
        f"- batch {s['batch_size']} x {s['seq_len']} tokens ({s['data']}); training: {s['train_repeats']} "
        f"repeats after {s['warmup']} warm-up; inference: {s['infer_repeats']} repeats after {s['warmup'] + 1} "
        "warm-up; repeats interleaved; spread = IQR (q1 - q3) and min - max",
        "",
        "| measurement | median | IQR | min - max | repeats | relative |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method in TRAIN_METHODS:
        lines.append(fmt_row(f"train step: {method}", tr[method], 1000, "ms", tr["full"]["median"]))
    for name in ("base", "lora unmerged", "lora merged"):
        lines.append(fmt_row(f"inference: {name}", inf[name], 1000, "ms", inf["base"]["median"]))
    for name in ("ours (LoRALinear)", "PEFT"):
        lines.append(fmt_row(f"train step: {name}", pf["times"][name], 1000, "ms", pf["times"]["PEFT"]["median"]))
    lines += [
        "",
        "Peak memory of training (each method in a fresh spawn process; RSS = whole process, "
        "so it includes activations and allocator slack; the last column is exact tensor bytes):",
        "",
        "| method | trainable params | peak RSS increase over the loaded model | grads + AdamW states |",
        "|---|---:|---:|---:|",
    ]
    for method, mem in res["memory"].items():
        lines.append(
            f"| {method} | {mem['trainable_params']:,} | {mem['peak_increase_mib']:.0f} MiB "
            f"| {mem['grad_adam_state_mib']:.1f} MiB |"
        )
    lines += [
        "",
        "Where a training step goes, at both widths (same batch; medians in ms; the floor: only activation "
        "gradients flow through the blocks, no weight gradient; LoRA cannot go much below it):",
        "",
    ]
    for width, block in res["split"].items():
        sp, full, floor = (
            block["phases"],
            block["phases"]["full"]["step"]["median"],
            block["phases"]["floor"]["step"]["median"],
        )
        lines += [
            f"{width} wide: {block['description']}",
            "",
            "| variant | forward | backward | optimizer | step (IQR) | / full | / floor |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for v in SPLIT_VARIANTS:
            ph = sp[v]
            lines.append(
                f"| {v} | {ph['forward']['median'] * 1000:.0f} | {ph['backward']['median'] * 1000:.0f} "
                f"| {ph['optimizer']['median'] * 1000:.0f} | {ph['step']['median'] * 1000:.0f} "
                f"({ph['step']['q1'] * 1000:.0f} - {ph['step']['q3'] * 1000:.0f}) "
                f"| {ph['step']['median'] / full:.3f}x | {ph['step']['median'] / floor:.3f}x |"
            )
        lines.append("")
    la = res["load_average"]
    lines.append(
        f"Load average (1 min) before / after the run: {la['before']:.2f} / {la['after']:.2f} "
        f"on {res['machine']['cores']} cores"
    )
    lines += [
        "",
        f"Ours vs PEFT: max |logit difference| = {pf['max_abs_logit_diff']:.2e} (asserted < 1e-5); "
        f"merged vs unmerged LoRA: {res['merged_vs_unmerged_max_diff']:.2e}",
        "",
        "Goals:",
    ]
    for goal in res["goals"].values():
        lines.append(f"- {'PASS' if goal['pass'] else 'MISS'} {goal['text']}: {goal['value']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny batch and 2 repeats (for the test)")
    parser.add_argument("--backbone", default="minilm-standin", choices=["minilm-standin", "distilbert-base-uncased"])
    parser.add_argument("--out", default="benchmarks/results/bench.json", help="JSON results file")
    parser.add_argument("--report", metavar="JSON", help="print the tables of an earlier run's JSON (measures nothing)")
    args = parser.parse_args(argv)
    if args.report:
        try:
            print(report(json.loads(Path(args.report).read_text())))
        except (OSError, ValueError, KeyError) as err:
            print(f"cannot report {args.report}: {err!r} (give a JSON file written by this script)", file=sys.stderr)
            return 2
        return 0
    torch.set_num_threads(THREADS)
    cfg = SETTINGS["quick" if args.quick else "full"]
    try:
        base, tokenizer, description = load_backbone(args.backbone, seed=0, verbose=False)
    except OSError as err:
        print(f"{args.backbone} is not available on this machine, nothing measured:\n  {err}", file=sys.stderr)
        return 2
    batch = make_batch(tokenizer, cfg["batch_size"], cfg["seq_len"])
    data = batch.pop("source")
    load_before = os.getloadavg()[0]
    res = {
        "machine": machine(),
        "settings": {
            **cfg,
            "quick": args.quick,
            "backbone": args.backbone,
            "backbone_description": description,
            "data": data,
        },
    }
    print(f"benchmarking on {description} ...", flush=True)
    res["train_step"], res["memory"] = bench_training(base, batch, cfg, args.backbone)
    res["inference"], res["merged_vs_unmerged_max_diff"] = bench_inference(base, batch, cfg)
    res["peft"] = bench_peft(base, batch, cfg)
    profile = get_profile("quick")
    res["split"] = {}
    for width, (model, about) in width_models(base, description).items():
        print(f"phase split at {width} wide ...", flush=True)
        res["split"][str(width)] = {"description": about, "phases": bench_split(model, batch, cfg, profile)}
    res["load_average"] = {"before": load_before, "after": os.getloadavg()[0]}
    wide = res["split"]["768"]["phases"]
    floor_ratio = wide["lora, dropout 0"]["step"]["median"] / wide["floor"]["step"]["median"]
    latency_gap = abs(res["inference"]["lora merged"]["median"] / res["inference"]["base"]["median"] - 1)
    res["goals"] = {
        "merged_vs_base_latency": {
            "text": f"merged LoRA latency within {GOALS['merged_vs_base_latency']:.0%} "
            "of the base model's (|ratio - 1|)",
            "value": latency_gap,
            "pass": latency_gap <= GOALS["merged_vs_base_latency"],
        },
        "ours_vs_peft_step": {
            "text": f"our LoRA step time <= {GOALS['ours_vs_peft_step']}x PEFT's",
            "value": res["peft"]["ratio_ours_over_peft"],
            "pass": res["peft"]["ratio_ours_over_peft"] <= GOALS["ours_vs_peft_step"],
        },
        "lora_vs_floor_768": {
            "text": f"LoRA step (dropout 0) <= {GOALS['lora_vs_floor_768']}x the floor at 768 wide",
            "value": floor_ratio,
            "pass": floor_ratio <= GOALS["lora_vs_floor_768"],
        },
    }
    print(report(res))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
