"""The planted-update task (lora_helpers.planted): the answer is known, so LoRA must find it."""

import pytest
import torch

from lora_helpers.analysis import amplification, subspace_similarity, top_directions
from lora_helpers.planted import fit_lora, plant_update, regression_data


@pytest.fixture(scope="module")
def W():
    g = torch.Generator().manual_seed(0)
    return torch.randn(48, 40, generator=g, dtype=torch.float64) / 40**0.5


def test_the_planted_update_has_the_rank_directions_and_amplification_asked_for(W):
    p = plant_update(W, directions=(20, 25, 30), factor=15.0)
    assert torch.linalg.matrix_rank(p.dW).item() == 3 == p.rank
    # Table 7's measure computed independently (analysis.amplification) gives the planted factor
    assert amplification(W, p.dW, 3)["amplification"] == pytest.approx(15.0, rel=1e-9)
    # the directions are W's own: U^T W V is diagonal with W's singular values there
    assert torch.allclose(p.U.T @ W @ p.V, torch.diag(p.s_in_W), atol=1e-10)
    assert torch.allclose(torch.linalg.svdvals(W)[[20, 25, 30]], p.s_in_W)


@pytest.mark.parametrize(
    "bad", [dict(directions=()), dict(directions=(1, 1)), dict(directions=(40,)), dict(factor=0.0)]
)
def test_bad_plants_are_refused(W, bad):
    with pytest.raises(ValueError):
        plant_update(W, **bad)


def test_lora_recovers_the_planted_rank_subspace_and_factor(W):
    p = plant_update(W, directions=(20, 25, 30), factor=15.0)
    X, Y = regression_data(W, p.dW, n=2048, noise=0.05, seed=0)
    floor = 0.05**2
    mse = {}
    for r in (1, 2, 3, 6):
        dW, mse[r] = fit_lora(W, X, Y, r, seed=0, steps=400, lr=1e-2)
        if r >= 3:
            assert subspace_similarity(top_directions(dW, 3, "left"), p.U, 3, 3) > 0.95
            assert amplification(W, dW, 3)["amplification"] == pytest.approx(15.0, rel=0.05)
            assert (dW - p.dW).norm() / p.dW.norm() < 0.1
    # the loss falls until r reaches the planted rank, then sits at the noise floor
    assert mse[1] > mse[2] > 2 * mse[3]
    assert mse[3] == pytest.approx(floor, rel=0.2) and mse[6] == pytest.approx(floor, rel=0.2)


def test_without_a_planted_update_lora_learns_nothing_to_speak_of(W):
    """The ablation: with dW* = 0 the learned update stays small (the recovery above is not an artefact)."""
    X, Y = regression_data(W, torch.zeros_like(W), n=2048, noise=0.05, seed=0)
    dW, mse = fit_lora(W, X, Y, 3, seed=0, steps=400, lr=1e-2)
    assert dW.norm() < 0.05 * plant_update(W, directions=(20, 25, 30), factor=15.0).dW.norm()


def test_default_directions_sit_between_random_and_w_top_directions():
    """The default plant: W uses these directions far less than its top ones, and more than random ones."""
    from lora_helpers.planted import default_directions

    assert default_directions(384) == (192, 201, 210, 219) and default_directions(768)[0] == 384
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(96, 96, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(96, 96, generator=g, dtype=torch.float64))
    W = (U * torch.linspace(3, 0.01, 96, dtype=torch.float64)) @ V.T  # a decaying spectrum, like a trained weight
    a = amplification(W, plant_update(W).dW, 4, n_random=50)
    assert a["proj_on_random"] + 3 * a["proj_on_random_sd"] < a["proj_on_dW"] < a["proj_on_W"] / 2
    assert a["amplification"] == pytest.approx(20.0)
