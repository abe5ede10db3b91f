"""Tests of lora_helpers.compare: exact costs, plots, the low-rank analysis (the comparison: test_runner.py)."""

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lora_helpers import get_profile  # noqa: E402
from lora_helpers.compare import (  # noqa: E402
    low_rank_report,
    method_costs,
    plot_accuracy,
    plot_sweep,
    plot_update_spectra,
    plot_val_curves,
)


def test_method_costs_from_the_shapes():
    costs = method_costs(get_profile("quick"), ("full", "lora", "head"))
    n = {m: c["trainable_params"] for m, c in costs.items()}
    head = 384 * 384 + 384 + 384 * 2 + 2
    assert n["head"] == head and n["lora"] == 12 * 8 * (384 + 384) + head
    assert costs["full"]["trainable_percent"] == 100.0 and costs["full"]["total_params"] == n["full"]
    assert costs["lora"]["optimizer_bytes"] == 12 * n["lora"]  # grad + 2 AdamW states, float32
    size = {m: c["checkpoint_bytes"] for m, c in costs.items()}
    assert size["full"] > 4 * n["full"] and size["full"] / size["lora"] > 50  # float32 weights + header
    assert 4 * n["lora"] < size["lora"] < 4 * n["lora"] + 20_000  # the adapter: A, B, head + JSON
    assert 4 * head < size["head"] < 4 * head + 10_000


def test_plots_from_a_saved_comparison():
    saved = {
        "sweep": {
            "lora": [
                {"lr": 1e-3, "val_accuracy": 0.6, "val_loss": 0.6},
                {"lr": 3e-3, "val_accuracy": 0.7, "val_loss": 0.5},
            ]
        },
        "runs": {
            "lora": [
                {"val_curve": [{"step": 1, "accuracy": 0.5}, {"step": 2, "accuracy": 0.7}]},
                {"val_curve": [{"step": 1, "accuracy": 0.6}, {"step": 2, "accuracy": 0.8}]},
            ]
        },
    }
    rows = [{"method": "lora", "test_mean": 0.7, "test_sd": 0.1, "test_accuracy": [0.6, 0.8], "trainable_percent": 1}]
    for ax in (plot_sweep(saved), plot_val_curves(saved), plot_accuracy(rows)):
        assert ax.lines
        plt.close(ax.figure)
    name = "distilbert.transformer.layer.0.attention.q_lin.weight"
    dW, same, _ = _synthetic()
    fig = plot_update_spectra({name: dW, name.replace("q_lin", "v_lin"): same})
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["q_lin, one line per block", "v_lin, one line per block", "random, same shape and norm"]
    plt.close(fig)


def _synthetic(d=64, rank=4, seed=0):
    """A rank-4 "full" update and LoRA updates inside / orthogonal to its column space."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    dW = Q[:, :rank] @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ V.T
    same = Q[:, :rank] @ torch.randn(rank, d, generator=g, dtype=torch.float64)  # B in the same span
    orthogonal = Q[:, rank : 2 * rank] @ torch.randn(rank, d, generator=g, dtype=torch.float64)
    return dW, same, orthogonal


def test_low_rank_report_on_a_known_case():
    name = "distilbert.transformer.layer.0.attention.q_lin.weight"
    dW, same, orthogonal = _synthetic()
    [row] = low_rank_report({name: dW}, {name: same}, k=4, r=4)
    assert row["matrix"] == "L0 q_lin"
    assert row["energy_top_k"] == pytest.approx(1.0)  # exactly rank 4
    assert row["energy_top_k_random"] < 0.3  # a random 64 x 64 matrix spreads its energy
    assert row["phi"] == pytest.approx(1.0)  # the same column space
    assert row["phi_expected_random"] == pytest.approx(4 / 64)
    assert row["phi_random"] < 0.3
    [row] = low_rank_report({name: dW}, {name: orthogonal}, k=4, r=4)
    assert row["phi"] == pytest.approx(0.0, abs=1e-12)  # orthogonal column spaces
    [row] = low_rank_report({name: dW}, k=2)  # without LoRA: energy only
    assert row["energy_top_k"] == pytest.approx((16 + 9) / 30) and "phi" not in row
    # the nulls: W0's own top-k energy, and LoRA from another seed
    W0 = torch.diag(torch.tensor([3.0, 1.0] + [0.0] * 62, dtype=torch.float64))
    [row] = low_rank_report(
        {name: dW}, {name: same}, k=1, r=4, pretrained={name: W0}, lora_updates_other_seed={name: orthogonal}
    )
    assert row["energy_top_k_W0"] == pytest.approx(9 / 10) and row["phi_other_seed"] == pytest.approx(0.0, abs=1e-12)


def test_cli_has_a_compare_subcommand():
    from lora_helpers.__main__ import build_parser

    args = build_parser().parse_args(["compare", "--profile", "quick", "--methods", "full", "lora", "--out", "x.json"])
    assert args.func.__name__ == "_cmd_compare" and args.methods == ["full", "lora"] and args.out == "x.json"
    args = build_parser().parse_args(["compare"])
    assert args.methods == ["full", "lora", "lora-all", "head"] and args.seeds == 3 and not args.sweep


def test_paired_pairs_runs_by_seed_and_counts_disagreements_by_hand():
    from types import SimpleNamespace

    from lora_helpers.compare import paired

    labels = [1, 0, 1, 1, 0, 0, 1, 0]

    def runs(*predictions_by_seed):
        return [SimpleNamespace(seed=s, test={"predictions": p}) for s, p in predictions_by_seed]

    a = runs((0, [1, 0, 1, 1, 0, 0, 1, 0]), (1, [1, 0, 1, 1, 0, 0, 0, 1]))  # seed 0 all right; seed 1 two wrong
    b = runs((1, [1, 0, 1, 1, 0, 0, 1, 0]), (0, [0, 1, 0, 1, 0, 0, 1, 0]))  # listed in the other order
    tests = paired(a, b, labels)
    assert [t["seed"] for t in tests] == [0, 1]
    # seed 0: a right where b is wrong on 3 reviews, never the reverse; seed 1: the reverse on 2
    assert (tests[0]["a_only"], tests[0]["b_only"]) == (3, 0)
    assert (tests[1]["a_only"], tests[1]["b_only"]) == (0, 2)
    assert tests[0]["p_value"] == pytest.approx(2 * 0.5**3)  # exact two-sided binomial, b + c = 3
    assert tests[0]["accuracy_difference"] == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match="no seed in common"):
        paired(a, runs((5, labels)), labels)


def test_grid_extend_and_control_options_are_checked_before_anything_trains(capsys):
    from lora_helpers.__main__ import build_parser, main

    args = build_parser().parse_args(
        ["compare", "--sweep", "--extend-grid", "--grid", "full=1e-4,3e-4", "--grid", "lora=1e-3", "--control", "lora"]
    )
    assert dict(args.grid) == {"full": (1e-4, 3e-4), "lora": (1e-3,)} and args.extend_grid and args.control == "lora"
    for bad, message in (
        (["--grid", "full=1e-4"], "add --sweep"),
        (["--sweep", "--grid", "full=1e-4", "--methods", "lora"], "does not compare"),
        (["--control", "full", "--methods", "lora"], "must be one of --methods"),
    ):
        with pytest.raises(SystemExit):
            main(["compare", *bad, "--out", "/nonexistent-dir/x.json"])
        assert message in capsys.readouterr().err
    for bad in (["--grid", "qlora=1e-3"], ["--grid", "full="], ["--grid", "full=-1"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["compare", "--sweep", *bad])


def test_study_command_parses():
    from lora_helpers.__main__ import build_parser

    args = build_parser().parse_args(["study", "--profile", "quick", "--n-train", "1000", "--seeds", "3"])
    assert args.func.__name__ == "_cmd_study" and args.grid == [1e-3, 3e-3, 1e-2] and args.n_train == 1000
    with pytest.raises(SystemExit):
        build_parser().parse_args(["study", "--seeds", "1"])  # one seed gives no verdict


def test_the_study_command_runs_end_to_end_and_saves_its_run(tmp_path, monkeypatch, capsys):
    """``python -m lora_helpers study`` on a tiny random model and tiny data: every variant, the control, the JSON."""
    import json

    from test_runner import tiny_data
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    import lora_helpers.backbone
    import lora_helpers.compare
    from lora_helpers.__main__ import main

    def tiny_backbone(name, seed=0, verbose=False, num_labels=2):  # 64 wide: room for r = 64
        config = DistilBertConfig(
            vocab_size=50,
            dim=64,
            n_layers=1,
            n_heads=2,
            hidden_dim=64,
            max_position_embeddings=32,
            num_labels=num_labels,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return DistilBertForSequenceClassification(config), None, "tiny: 1 layer, 64 wide"

    real = lora_helpers.compare.compare_methods

    def tiny(profile, **kwargs):
        return real(profile, **{**kwargs, "data": tiny_data(), "backbone": tiny_backbone, "verbose": False})

    monkeypatch.setattr(lora_helpers.compare, "compare_methods", tiny)
    monkeypatch.setattr(lora_helpers.backbone, "load_backbone", tiny_backbone)
    out = tmp_path / "study.json"
    assert main(["study", "--profile", "quick", "--seeds", "2", "--grid", "1e-3", "1e-2", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["reference"] == "q,v r=8" and saved["sweep_seed"] == 100 and saved["control"]["method"] == "q,v r=8"
    assert set(saved["runs"]) == {"head", *saved["specs"]} and saved["versions"]["torch"]
    assert "| q r=16 |" in capsys.readouterr().out
