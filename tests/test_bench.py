"""Smoke test of benchmarks/bench.py --quick: it runs, prints every row and writes every JSON key (no timing checks)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = [
    "train step: full",
    "train step: lora",
    "train step: head",
    "inference: base",
    "inference: lora unmerged",
    "inference: lora merged",
    "train step: ours (LoRALinear)",
    "train step: PEFT",
]


def test_bench_quick(tmp_path):
    out = tmp_path / "bench.json"
    # PASSIVE: idle OpenMP threads sleep instead of spinning, so a busy machine does not slow the run tenfold
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench.py", "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ROWS:
        assert f"| {row} |" in proc.stdout, row
    for method in ("full", "lora", "head"):
        assert f"| {method} | " in proc.stdout
    assert proc.stdout.count("PASS") + proc.stdout.count("MISS") == 3
    res = json.loads(out.read_text())
    assert set(res) == {
        "machine",
        "settings",
        "train_step",
        "memory",
        "inference",
        "merged_vs_unmerged_max_diff",
        "peft",
        "goals",
        "split",
        "load_average",
    }
    assert {"cpu", "cores", "torch_threads", "torch", "peft"} <= set(res["machine"])
    assert res["settings"]["quick"] is True and res["machine"]["torch_threads"] == 2
    assert set(res["train_step"]) == set(res["memory"]) == {"full", "lora", "head"}
    assert set(res["inference"]) == {"base", "lora unmerged", "lora merged"}
    for stats in [*res["train_step"].values(), *res["inference"].values(), *res["peft"]["times"].values()]:
        assert {"median", "q1", "q3", "min", "max", "n"} <= set(stats)
    assert res["memory"]["full"]["trainable_params"] > 100 * res["memory"]["lora"]["trainable_params"]
    assert res["peft"]["max_abs_logit_diff"] < 1e-5
    assert set(res["goals"]) == {"merged_vs_base_latency", "ours_vs_peft_step", "lora_vs_floor_768"}
    # the phase split at both widths; the floor trains no weight inside the blocks, so its optimizer step is the head's
    assert set(res["split"]) == {"384", "768"}
    for block in res["split"].values():
        phases = block["phases"]
        assert set(phases) == {"full", "lora", "lora, dropout 0", "floor", "head"}
        for v in phases.values():
            assert set(v) == {"forward", "backward", "optimizer", "step"}
    assert "768 wide" in proc.stdout and "/ floor" in proc.stdout
    assert all(isinstance(goal["pass"], bool) for goal in res["goals"].values())
