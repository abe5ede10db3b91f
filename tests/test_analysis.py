"""Tests of lora_helpers.analysis against hand-computed cases (paper Section 7: Eq. 4 and Table 7)."""

import math

import pytest
import torch
import torch.nn as nn

from lora_helpers import apply_lora, lora_layers, merge_lora
from lora_helpers.analysis import (
    amplification,
    energy_in_top,
    expected_random_similarity,
    random_like,
    subspace_similarity,
    subspace_similarity_grid,
    top_directions,
    weight_updates,
)
from lora_helpers.experiments import PAPER_TABLE7


def orthonormal(d, k, seed=0):
    """A d x k matrix with orthonormal columns (QR of a seeded Gaussian)."""
    Q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return Q


# ------------------------------------------------------------------ subspace similarity (Eq. 4)


def test_identical_subspaces_give_one():
    U = orthonormal(20, 6)
    for i in range(1, 7):
        assert subspace_similarity(U, U, i, i) == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(subspace_similarity_grid(U, U).diagonal(), torch.ones(6, dtype=torch.float64))


def test_same_subspace_in_another_basis_gives_one():
    U = orthonormal(20, 4)
    R = orthonormal(4, 4, seed=1)  # a rotation inside the subspace: phi compares subspaces, not bases
    assert subspace_similarity(U, U @ R, 4, 4) == pytest.approx(1.0, abs=1e-12)


def test_orthogonal_subspaces_give_zero():
    eye = torch.eye(8, dtype=torch.float64)
    U1, U2 = eye[:, :3], eye[:, 3:7]
    grid = subspace_similarity_grid(U1, U2)
    assert grid.shape == (3, 4)
    assert grid.abs().max().item() == 0.0


@pytest.mark.parametrize("theta", [0.0, 0.3, math.pi / 4, 1.2, math.pi / 2])
def test_rotation_by_theta_in_2d_gives_cos_squared(theta):
    u1 = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    u2 = torch.tensor([[math.cos(theta)], [math.sin(theta)]], dtype=torch.float64)
    assert subspace_similarity(u1, u2, 1, 1) == pytest.approx(math.cos(theta) ** 2, abs=1e-12)


def test_nested_subspaces_give_one_and_partial_overlap_is_a_fraction():
    Q = orthonormal(30, 8)
    small, big = Q[:, :3], Q[:, :8]
    grid = subspace_similarity_grid(small, big)
    # every i-dim prefix of `small` lies inside the j-dim prefix of `big` when i <= j
    for i in range(1, 4):
        for j in range(i, 9):
            assert grid[i - 1, j - 1].item() == pytest.approx(1.0, abs=1e-12)
    # span(e1, e2) against span(e1, e3): one shared direction out of two -> 1/2
    assert subspace_similarity(Q[:, [0, 1]], Q[:, [0, 2]], 2, 2) == pytest.approx(0.5, abs=1e-12)


def test_grid_equals_pointwise_similarity_and_lies_in_unit_interval():
    U1, U2 = orthonormal(25, 5, seed=2), orthonormal(25, 7, seed=3)
    grid = subspace_similarity_grid(U1, U2)
    assert grid.shape == (5, 7)
    for i in range(1, 6):
        for j in range(1, 8):
            assert grid[i - 1, j - 1].item() == pytest.approx(subspace_similarity(U1, U2, i, j), abs=1e-12)
    assert grid.min().item() >= 0.0 and grid.max().item() <= 1.0 + 1e-12
    assert subspace_similarity_grid(U1, U2, 3, 4).shape == (3, 4)


def test_subspace_similarity_rejects_out_of_range_dims():
    U = orthonormal(10, 3)
    with pytest.raises(ValueError):
        subspace_similarity(U, U, 0, 1)
    with pytest.raises(ValueError):
        subspace_similarity(U, U, 1, 4)


def test_top_directions_right_spans_the_rows_of_A():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 12, generator=g, dtype=torch.float64)  # a LoRA-like A: r x d_in
    V = top_directions(A, side="right")
    assert V.shape == (12, 4)
    torch.testing.assert_close(V.T @ V, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(A @ V @ V.T, A)  # projecting the rows onto span(V) changes nothing
    assert top_directions(A, 2, side="right").shape == (12, 2)
    U = top_directions(A.T, side="left")  # the same subspace, seen from A^T
    assert subspace_similarity(U, V, 4, 4) == pytest.approx(1.0, abs=1e-12)
    # the top direction is the top right singular vector: diag(3, 1) stretches e1 most
    D = torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert top_directions(D, 1, side="right")[:, 0].abs().tolist() == pytest.approx([0.0, 1.0])


def test_expected_random_similarity_matches_monte_carlo():
    d, i, j = 40, 2, 6
    assert expected_random_similarity(d, i, j) == pytest.approx(max(i, j) / d)
    assert expected_random_similarity(d, d, 3) == pytest.approx(1.0)
    phis = [subspace_similarity(orthonormal(d, i, seed=s), orthonormal(d, j, seed=1000 + s), i, j) for s in range(300)]
    assert sum(phis) / len(phis) == pytest.approx(max(i, j) / d, rel=0.1)


# ------------------------------------------------------------------ baselines and energy


def test_random_like_has_the_shape_and_norm_of_its_model():
    M = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    R = random_like(M, seed=0)
    assert R.shape == M.shape and R.dtype == M.dtype
    assert R.norm().item() == pytest.approx(M.norm().item(), rel=1e-6)
    torch.testing.assert_close(R, random_like(M, seed=0))  # seeded
    assert not torch.allclose(R, random_like(M, seed=1))


def test_energy_in_top():
    M = torch.diag(torch.tensor([4.0, 3.0], dtype=torch.float64))
    assert energy_in_top(M, 1) == pytest.approx(16 / 25)
    assert energy_in_top(M, 2) == pytest.approx(1.0)


# ------------------------------------------------------------------ amplification (Table 7)


def test_amplification_on_a_constructed_update():
    # W = diag(10, 5, 1, 0.5, 0.1, 0.1); dW = 2 e3 e3^T amplifies W's 3rd direction (W there: 1).
    W = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.5, 0.1, 0.1], dtype=torch.float64))
    e3 = torch.zeros(6, 1, dtype=torch.float64)
    e3[2] = 1.0
    dW = 2.0 * e3 @ e3.T
    out = amplification(W, dW, r=1)
    assert out["norm_dW"] == pytest.approx(2.0)
    assert out["norm_W"] == pytest.approx(W.norm().item())
    assert out["proj_on_dW"] == pytest.approx(1.0)  # |u^T W v| with u = v = e3
    assert out["proj_on_W"] == pytest.approx(10.0)  # W's own top direction
    assert out["amplification"] == pytest.approx(2.0)  # ||dW||_F / ||U^T W V||_F = 2 / 1
    assert 0.0 <= out["proj_on_random"] <= 10.0 + 1e-9  # bounded by ||W||_2


def test_amplification_rank_two_with_signs():
    # dW = -3 e1 e2^T + 4 e4 e5^T: top-2 directions of dW pick W[0,1] and W[3,4].
    W = torch.zeros(5, 5, dtype=torch.float64)
    W[0, 1], W[3, 4], W[2, 2] = 0.5, 2.0, 7.0
    dW = torch.zeros(5, 5, dtype=torch.float64)
    dW[0, 1], dW[3, 4] = -3.0, 4.0
    out = amplification(W, dW, r=2)
    assert out["norm_dW"] == pytest.approx(5.0)
    assert out["proj_on_dW"] == pytest.approx(math.sqrt(0.5**2 + 2.0**2))
    assert out["amplification"] == pytest.approx(5.0 / math.sqrt(4.25))


def test_amplification_random_expectation_matches_monte_carlo():
    # E ||U^T W V||_F^2 = ||W||_F^2 r^2 / (d_out d_in) for random orthonormal U (d_out x r), V (d_in x r):
    # check the closed form against a Monte-Carlo mean computed here, and that a random dW is not "aligned".
    g = torch.Generator().manual_seed(1)
    W = torch.randn(40, 30, generator=g, dtype=torch.float64) @ torch.diag(
        torch.linspace(3, 0.1, 30, dtype=torch.float64)
    )
    r = 3
    sq = []
    for _ in range(1000):
        U, _ = torch.linalg.qr(torch.randn(40, r, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(30, r, generator=g, dtype=torch.float64))
        sq.append(float((U.T @ W @ V).square().sum()))
    out = amplification(W, torch.randn(40, 30, generator=g, dtype=torch.float64), r=r, n_random=200)
    assert out["random_expected"] ** 2 == pytest.approx(sum(sq) / len(sq), rel=0.08)
    assert out["proj_on_random"] == pytest.approx(out["random_expected"], rel=0.1)  # mean of sqrt <= sqrt of mean
    assert 0.3 < out["alignment"] < 3.0  # chance level, not 10x
    assert out["relative_update"] == pytest.approx(out["norm_dW"] / W.norm().item())


def test_amplification_random_expectation_reproduces_the_papers_random_column():
    # The paper's Table 7 measured a random projection of W_q (12,288 x 12,288, ||W_q||_F = 61.95): 0.02 at r = 4,
    # 0.33 at r = 64 (one draw each, printed to two decimals). The closed form ||W||_F r / d gives 0.020 and 0.323.
    for r, row in PAPER_TABLE7.items():
        assert row["norm_W"] * r / row["d"] == pytest.approx(row["proj_on_random"], rel=0.05)
    # ... and the paper's amplification factors, 21.5 at r = 4 and about 1.9 at r = 64
    assert PAPER_TABLE7[4]["norm_dW"] / PAPER_TABLE7[4]["proj_on_dW"] == pytest.approx(21.5, abs=0.2)
    assert PAPER_TABLE7[64]["norm_dW"] / PAPER_TABLE7[64]["proj_on_dW"] == pytest.approx(1.9, abs=0.05)


def test_amplification_refuses_a_bad_number_of_random_draws():
    for n in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="n_random"):
            amplification(torch.eye(4), torch.eye(4), r=1, n_random=n)


# ------------------------------------------------------------------ weight updates of a LoRA model


class TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_lin = nn.Linear(8, 6)
        self.v_lin = nn.Linear(8, 6)
        self.out = nn.Linear(6, 3)


def test_weight_updates_of_a_lora_model_equal_scaling_B_A():
    torch.manual_seed(0)
    model = TinyAttention()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, ["q_lin", "v_lin"], r=2, lora_alpha=6)  # scaling 3
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_()
    updates = weight_updates(before, model)
    assert set(updates) == {"q_lin.weight", "v_lin.weight"}
    for name, layer in lora_layers(model).items():
        expected = 3.0 * layer.lora_B.detach() @ layer.lora_A.detach()
        torch.testing.assert_close(updates[f"{name}.weight"], expected)
    merge_lora(model)  # merged: the same update, now read from the base weight
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(
            weight_updates(before, model)[f"{name}.weight"],
            3.0 * layer.lora_B.detach() @ layer.lora_A.detach(),
            rtol=1e-5,
            atol=1e-6,
        )
    with pytest.raises(ValueError):
        weight_updates(before, model, suffixes=("nothing.weight",))


# ------------------------------------------------------------------ robustness (issue 14)


@pytest.mark.parametrize("k", [0, -1, 13, 2.0, True])
def test_energy_in_top_refuses_k_outside_the_spectrum(k):
    M = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"k must be a whole number in \[1, 12\] .* \(16, 12\) matrix"):
        energy_in_top(M, k)


def test_energy_in_top_at_the_ends_of_the_spectrum():
    M = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    assert energy_in_top(M, 1) == pytest.approx(9 / 14)
    assert energy_in_top(M, 3) == pytest.approx(1.0)


@pytest.mark.parametrize("r", [0, 13, 50])
def test_amplification_refuses_r_beyond_the_rank_instead_of_clipping(r):
    g = torch.Generator().manual_seed(0)
    W, dW = torch.randn(16, 12, generator=g), torch.randn(16, 12, generator=g)
    with pytest.raises(ValueError, match=r"r must be a whole number in \[1, 12\]"):
        amplification(W, dW, r=r)
    assert amplification(W, dW, r=12)["r"] == 12


def test_amplification_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"same shape, got \(16, 12\) and \(12, 16\)"):
        amplification(torch.randn(16, 12), torch.randn(12, 16), r=2)
