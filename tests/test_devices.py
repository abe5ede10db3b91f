"""Helpers take tensors from any device and compute on the CPU (no CUDA tensor meets a CPU one).

There is no GPU here, so PyTorch's ``meta`` device stands in for "another device":
a meta tensor has a shape and a dtype but no data. That makes it a strict probe:

* moving it to the CPU (``.cpu()``) raises ``NotImplementedError: Cannot copy out of
  meta tensor``, so a helper that moves its inputs before computing fails with exactly
  that error, before any arithmetic;
* *mixing* it with a CPU tensor does not always raise: ``cpu_tensor @ meta_tensor``
  returns a CPU tensor of garbage. A helper that mixes devices can therefore return a
  wrong number silently here, where on a GPU it would crash with "Expected all tensors
  to be on the same device".

So each test below feeds a meta tensor (often next to a CPU one) and demands the
"cannot copy out of meta" error: proof that the input is brought to the CPU first.
"""

import pytest
import torch
import torch.nn as nn

from lora_helpers import LoRALinear, apply_lora
from lora_helpers.analysis import (
    amplification,
    energy_in_top,
    random_like,
    subspace_similarity,
    subspace_similarity_grid,
    top_directions,
    weight_updates,
)
from lora_helpers.compare import low_rank_report, plot_update_spectra
from lora_helpers.lora import pissa_init_
from lora_helpers.memory import measure_training_memory
from lora_helpers.runner import lora_factors
from lora_helpers.svd import energy_captured, low_rank_approx, truncated_svd

MOVED_TO_CPU = pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor")
NAME = "distilbert.transformer.layer.0.attention.q_lin.weight"


def cpu(d=12, k=4, seed=0):
    return torch.randn(d, k, generator=torch.Generator().manual_seed(seed))


def meta(d=12, k=4):
    return torch.empty(d, k, device="meta")


def test_the_probe_itself_mixing_meta_and_cpu_can_be_silent():
    """Why a plain 'it raised' is not enough: this mix returns numbers (garbage) instead of failing."""
    out = cpu().T @ meta()
    assert out.device.type == "cpu"


@pytest.mark.parametrize(
    "call",
    [
        lambda: subspace_similarity(cpu(), meta(), 2, 2),  # notebook 04's phi: dW on CPU, B A on the GPU
        lambda: subspace_similarity(meta(), cpu(), 2, 2),
        lambda: subspace_similarity_grid(cpu(), meta()),
        lambda: amplification(meta(12, 12), cpu(12, 12), r=2),  # W from the model, dW on the CPU
        lambda: amplification(cpu(12, 12), meta(12, 12), r=2),
        lambda: energy_in_top(meta(), 2),
        lambda: top_directions(meta(), 2),
        lambda: random_like(meta()),
        lambda: energy_captured(torch.empty(5, device="meta")),
        lambda: truncated_svd(meta(), 2),
        lambda: low_rank_approx(meta(), 2),
    ],
    ids=[
        "phi cpu,dev",
        "phi dev,cpu",
        "phi grid",
        "amplification W",
        "amplification dW",
        "energy_in_top",
        "top_directions",
        "random_like",
        "energy_captured",
        "truncated_svd",
        "low_rank_approx",
    ],
)
def test_analysis_and_svd_helpers_move_their_inputs_to_the_cpu(call):
    with MOVED_TO_CPU:
        call()


def test_low_rank_report_and_spectra_plot_move_updates_to_the_cpu():
    with MOVED_TO_CPU:
        low_rank_report({NAME: cpu(12, 12)}, {NAME: meta(12, 12)}, k=2, r=2)  # LoRA's update still on the device
    with MOVED_TO_CPU:
        plot_update_spectra({NAME: meta(12, 12)}, k=2)


def test_weight_updates_move_both_sides_to_the_cpu():
    model = nn.Sequential(nn.Linear(4, 4)).to("meta")
    with MOVED_TO_CPU:  # the weights on the device, the pretrained copy on the CPU
        weight_updates({"0.weight": torch.zeros(4, 4)}, model, suffixes=("weight",))


def test_lora_factors_and_pissa_init_compute_on_the_cpu():
    layer = LoRALinear(nn.Linear(6, 5), r=2).to("meta")
    with MOVED_TO_CPU:
        pissa_init_(layer)
    model = nn.Sequential(nn.Linear(6, 5))
    apply_lora(model, ["0"], r=2)
    with MOVED_TO_CPU:
        lora_factors(model.to("meta"))


def test_results_come_back_where_documented():
    """Analysis results on the CPU; ``low_rank_approx`` on (and in the dtype of) its input."""
    M = cpu(12, 6)
    U = top_directions(M, 4, side="left")
    assert U.device.type == "cpu" and torch.allclose(U.T @ U, torch.eye(4, dtype=U.dtype), atol=1e-12)
    assert subspace_similarity(U, U.float(), 4, 4) == pytest.approx(1.0)  # float32 meets float64: both made float64
    approx = low_rank_approx(M, 2)
    assert approx.device == M.device and approx.dtype == M.dtype
    assert torch.linalg.matrix_rank(approx) == 2


def test_measure_training_memory_refuses_a_batch_on_another_device():
    net = nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 1))
    loss = lambda model, batch: model(batch).sum()  # noqa: E731
    with pytest.raises(ValueError, match=r"the batch is on cpu but the model is on meta: move the batch first"):
        measure_training_memory(net.to("meta"), torch.randn(2, 10), loss_fn=loss)
    net = nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 1))
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=r"the batch is on meta but the model is on cpu"):
        measure_training_memory(net, {"x": torch.empty(2, 10, device="meta")}, loss_fn=lambda m, b: m(b["x"]).sum())
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert all(p.grad is None for p in net.parameters())  # nothing ran
