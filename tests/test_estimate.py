"""estimate: FLOP counts against torch's own FLOP counter, step and evaluation counts against committed runs."""

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from lora_helpers import apply_lora, committed_run, get_profile, mark_only_lora_trainable
from lora_helpers.estimate import (
    DEVICES,
    SHAPES,
    compare_plan,
    forward_flops,
    lora_params,
    measured_rates,
    notebook_flops,
    plan_cost,
    run_flops,
    train_step_flops,
)
from lora_helpers.lora import freeze_all_except
from lora_helpers.methods import HEAD_MODULES, method_spec

RESULTS = Path(__file__).resolve().parents[1] / "lora_helpers" / "results"
TINY = DistilBertConfig(
    dim=32,
    hidden_dim=64,
    n_layers=2,
    n_heads=4,
    vocab_size=100,
    max_position_embeddings=64,
    num_labels=2,
    attn_implementation="eager",
)  # eager: torch counts its attention products


def counted(model, batch, backward: bool) -> int:
    """FLOPs that torch.utils.flop_counter counts for a forward (and backward) pass."""
    with FlopCounterMode(display=False) as counter:
        out = model(**batch)
        if backward:
            out.loss.backward()
    return counter.get_total_flops()


def tiny(seed=0):
    torch.manual_seed(seed)
    return DistilBertForSequenceClassification(TINY)


def batch(b=3, s=10):
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1, 100, (b, s), generator=g),
        "attention_mask": torch.ones(b, s, dtype=torch.long),
        "labels": torch.tensor([0, 1, 0][:b]),
    }


def test_forward_flops_equal_torch_flop_counter():
    model = tiny().eval()
    with torch.no_grad():
        assert counted(model, batch(3, 10), backward=False) == 3 * forward_flops(TINY, 10)


def test_full_training_step_is_three_forward_passes():
    model = tiny().train()
    assert counted(model, batch(3, 10), backward=True) == 3 * 3 * forward_flops(TINY, 10)


def test_lora_and_head_only_steps_close_to_the_estimate():
    profile = get_profile("quick", batch_size=3, max_length=10)
    lora = tiny()
    apply_lora(lora, ("q_lin", "v_lin"), r=4, lora_alpha=8)
    mark_only_lora_trainable(lora, extra_trainable=HEAD_MODULES)
    n_lora = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert n_lora == lora_params(TINY, ("q_lin", "v_lin"), 4)
    # 2x the weight products, 3x attention, + the branch; frozen layer-0 inputs need no gradient: a little less
    estimate = train_step_flops(TINY, method_spec("lora").replace(r=4), profile)
    measured = counted(lora, batch(3, 10), backward=True)
    assert 0.85 * estimate <= measured <= estimate
    head = tiny()
    freeze_all_except(head, HEAD_MODULES)
    measured = counted(head, batch(3, 10), backward=True)
    assert 3 * forward_flops(TINY, 10) <= measured <= 1.05 * train_step_flops(TINY, "head", profile)


def test_steps_and_evaluations_match_a_committed_run():
    profile = get_profile("quick")
    committed = json.loads((RESULTS / "compare-quick.json").read_text())
    one = committed["runs"]["lora"][0]
    cost = run_flops(profile, "lora")
    assert cost["steps"] == one["train_steps"]
    assert cost["evals"] == len(one["val_curve"])


def test_the_standin_shape_is_the_standin():
    from lora_helpers.backbone import load_backbone

    config = load_backbone("minilm-standin", verbose=False)[0].config
    shape = SHAPES["minilm-standin"]
    assert (config.dim, config.hidden_dim, config.n_layers) == (shape.dim, shape.hidden_dim, shape.n_layers)


def test_the_cpu_rates_are_the_committed_runs_rates():
    # the quiet cpu run the rates were measured on (AMD EPYC, nothing else running); the package's compare-cpu.json
    # is a later run whose timings were taken beside other work
    committed = committed_run("compare-cpu-timing-epyc")
    assert committed["backbone"].startswith("minilm-standin") and "2 cores" in committed["machine"]
    measured = measured_rates(committed)
    cpu = DEVICES["cpu"]
    for kind, rate in measured["per_kind"].items():
        assert cpu.train_tflops(kind) == pytest.approx(rate, rel=0.05), kind
    assert cpu.tflops == pytest.approx(measured["eval"], rel=0.05)
    # and the estimate then reproduces the run's own wall time (loading and bookkeeping excepted)
    profile = get_profile("cpu", backbone="minilm-standin")
    plan = compare_plan(list(committed["runs"]), len(committed["seeds"]), sweep=True)
    assert plan_cost(profile, plan, "cpu")[1] == pytest.approx(committed["wall_time_s"], rel=0.1)


def test_notebook_estimates_grow_with_the_profile_and_refuse_unknown_notebooks():
    smoke, gpu = get_profile("quick"), get_profile("gpu")
    assert notebook_flops("04", gpu) > 100 * notebook_flops("04", smoke)
    with pytest.raises(ValueError, match="no estimate for notebook"):
        notebook_flops("02", smoke)


def test_each_notebook_plan_is_what_the_notebook_trains():
    """notebook_plans.json against the notebooks: each banner's plan, and whether its runs use study_profile."""
    import ast
    import re

    from lora_helpers.estimate import NOTEBOOK_PLANS

    folder = Path(__file__).resolve().parent.parent / "notebooks"
    found = {}
    for path in sorted(folder.glob("[0-9][0-9]_*.ipynb")):
        code = "\n".join(
            "".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"
        )
        banner = re.search(r"print_banner\(.*?plan=(\{[^}]*\})", code, flags=re.S)
        if banner:
            found[path.name[:2]] = (ast.literal_eval(banner.group(1)), "study_profile(" in code)
    assert sorted(found) == sorted(NOTEBOOK_PLANS)
    for notebook, (runs, study) in found.items():
        assert NOTEBOOK_PLANS[notebook]["runs"] == runs, notebook
        assert NOTEBOOK_PLANS[notebook]["study"] == study, notebook
