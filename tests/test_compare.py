"""Tests of lora_helpers.compare: a tiny comparison of two methods, the table, and the low-rank analysis."""
import json

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lora_helpers import get_profile  # noqa: E402
from lora_helpers.compare import (compare_methods, low_rank_report, plot_comparison, plot_low_rank_report,  # noqa: E402
                                  plot_training_curves, plot_update_spectra, results_json, results_table,
                                  single_thread)

ROW_FIELDS = {"method", "trainable_params", "total_params", "trainable_percent", "test_accuracy", "train_time_s",
              "steps", "s_per_step", "peak_memory_mib", "memory_before_mib", "train_memory_mib", "memory_kind",
              "checkpoint_bytes", "checkpoint_what", "latency_ms", "latency_min_ms", "latency_max_ms",
              "latency_batch"}


@pytest.fixture(scope="module")
def tiny():
    """Full fine-tuning and LoRA on 32 reviews of 32 tokens: 4 steps each."""
    profile = get_profile("smoke", n_train=32, n_test=32, max_length=32, batch_size=8, eval_batch_size=16)
    return compare_methods(profile, methods=("full", "lora"), verbose=False, device="cpu", latency_repeats=1)


def test_rows_have_every_field(tiny):
    rows = {row["method"]: row for row in tiny["rows"]}
    assert list(rows) == ["full", "lora"]
    for row in rows.values():
        assert set(row) == ROW_FIELDS
        assert row["steps"] == 4 and row["train_time_s"] > 0 and row["s_per_step"] > 0
        assert 0 <= row["test_accuracy"] <= 1
        assert row["latency_ms"] > 0 and row["latency_batch"] == [8, 32]
        assert row["train_memory_mib"] >= 0 and row["peak_memory_mib"] >= row["train_memory_mib"]
    assert rows["full"]["trainable_percent"] == 100.0
    assert rows["lora"]["trainable_percent"] < 2
    assert rows["full"]["total_params"] == rows["full"]["trainable_params"]
    assert [len(c) for c in tiny["curves"].values()] == [4, 4]


def test_checkpoint_sizes_are_ordered(tiny):
    size = {row["method"]: row["checkpoint_bytes"] for row in tiny["rows"]}
    assert size["full"] > size["lora"] > 0
    assert size["full"] > 4 * tiny["rows"][0]["total_params"]  # float32 weights, plus the header
    assert size["full"] / size["lora"] > 50


def test_table_and_json(tiny):
    table = results_table(tiny["rows"]).splitlines()
    assert len(table) == 2 + len(tiny["rows"])
    assert table[2].startswith("| full |") and table[3].startswith("| lora |")
    saved = json.loads(json.dumps(results_json(tiny)))
    assert saved["profile"]["n_train"] == 32 and [r["method"] for r in saved["rows"]] == ["full", "lora"]


def test_updates_kept_for_the_analysis(tiny):
    full, lora = tiny["full_updates"], tiny["lora_updates"]
    assert set(full) == set(lora) == set(tiny["pretrained"]) and len(full) == 12  # q_lin, v_lin x 6 layers
    name = next(iter(full))
    assert full[name].norm() > 0
    with single_thread():
        assert torch.linalg.matrix_rank(lora[name]) <= 8  # B A has rank <= r
    layer = tiny["lora_model"].get_submodule(name.removesuffix(".weight"))
    assert torch.allclose(lora[name], layer.delta_weight().detach(), atol=1e-6)


def test_plots_return_figures(tiny):
    report = low_rank_report(tiny["full_updates"], tiny["lora_updates"])
    for fig in (plot_comparison(tiny["rows"]), plot_training_curves(tiny), plot_update_spectra(tiny["full_updates"]),
                plot_low_rank_report(report)):
        assert fig.axes
        plt.close(fig)


def _synthetic(d=64, rank=4, seed=0):
    """A rank-4 "full" update and LoRA updates inside / orthogonal to its column space."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    dW = Q[:, :rank] @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ V.T
    same = Q[:, :rank] @ torch.randn(rank, d, generator=g, dtype=torch.float64)          # B in the same span
    orthogonal = Q[:, rank:2 * rank] @ torch.randn(rank, d, generator=g, dtype=torch.float64)
    return dW, same, orthogonal


def test_low_rank_report_on_a_known_case():
    name = "distilbert.transformer.layer.0.attention.q_lin.weight"
    dW, same, orthogonal = _synthetic()
    [row] = low_rank_report({name: dW}, {name: same}, k=4, r=4)
    assert row["matrix"] == "L0 q_lin"
    assert row["energy_top_k"] == pytest.approx(1.0)                 # exactly rank 4
    assert row["energy_top_k_random"] < 0.3                          # a random 64 x 64 matrix spreads its energy
    assert row["phi"] == pytest.approx(1.0)                          # the same column space
    assert row["phi_expected_random"] == pytest.approx(4 / 64)
    assert row["phi_random"] < 0.3
    [row] = low_rank_report({name: dW}, {name: orthogonal}, k=4, r=4)
    assert row["phi"] == pytest.approx(0.0, abs=1e-12)               # orthogonal column spaces
    [row] = low_rank_report({name: dW}, k=2)                          # without LoRA: energy only
    assert row["energy_top_k"] == pytest.approx((16 + 9) / 30) and "phi" not in row


def test_cli_has_a_compare_subcommand():
    from lora_helpers.__main__ import build_parser

    args = build_parser().parse_args(["compare", "--profile", "smoke", "--methods", "full", "lora", "--out", "x.json"])
    assert args.func.__name__ == "_cmd_compare" and args.methods == ["full", "lora"] and args.out == "x.json"
    assert build_parser().parse_args(["compare"]).methods == ["full", "lora", "head", "lora-all"]
