"""Unit tests of lora_helpers.svd against independent references (numpy, direct formulas)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lora_helpers.svd import energy_captured, low_rank_approx, plot_singular_values, truncated_svd  # noqa: E402


def random_matrix(m=30, n=20, seed=0, dtype=torch.float64):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rank_k_matrix(m=30, n=20, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(k, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("r", [1, 2, 5, 19, 20])
def test_low_rank_approx_error_is_eckart_young(r):
    W = random_matrix()
    S_ref = np.linalg.svd(W.numpy(), compute_uv=False)  # independent reference: numpy
    Wr = low_rank_approx(W, r)
    assert Wr.shape == W.shape
    assert np.linalg.matrix_rank(Wr.numpy()) == r
    expected = np.sqrt(np.sum(S_ref[r:] ** 2))
    np.testing.assert_allclose((W - Wr).norm().item(), expected, rtol=1e-9, atol=1e-9)


def test_low_rank_approx_beats_other_rank_r_matrices():
    W, r = random_matrix(), 4
    best = (W - low_rank_approx(W, r)).norm().item()
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        Q, _ = torch.linalg.qr(torch.randn(W.shape[0], r, generator=g, dtype=W.dtype))
        assert (W - Q @ (Q.T @ W)).norm().item() >= best


def test_rank_k_matrix_is_reconstructed_exactly_at_r_equal_k():
    W = rank_k_matrix(k=3)
    torch.testing.assert_close(low_rank_approx(W, 3), W, rtol=0, atol=1e-10)
    # ...and below its rank it is not
    assert (low_rank_approx(W, 2) - W).norm() > 1e-3 * W.norm()


def test_truncated_svd_shapes_orthonormal_and_sorted():
    W, r = random_matrix(30, 20), 6
    U, S, Vh = truncated_svd(W, r)
    assert U.shape == (30, r) and S.shape == (r,) and Vh.shape == (r, 20)
    eye = torch.eye(r, dtype=W.dtype)
    torch.testing.assert_close(U.T @ U, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(Vh @ Vh.T, eye, rtol=0, atol=1e-10)
    assert torch.all(S[:-1] >= S[1:]) and torch.all(S > 0)
    np.testing.assert_allclose(S.numpy(), np.linalg.svd(W.numpy(), compute_uv=False)[:r], rtol=1e-10)
    torch.testing.assert_close((U * S) @ Vh, low_rank_approx(W, r))


def test_truncated_svd_wide_matrix():
    W = random_matrix(8, 25)
    U, S, Vh = truncated_svd(W, 8)
    torch.testing.assert_close((U * S) @ Vh, W, rtol=0, atol=1e-10)


def test_energy_captured_matches_direct_ratio_and_ends_at_one():
    W = random_matrix()
    S = torch.linalg.svdvals(W)
    E = energy_captured(S)
    assert E.dtype == torch.float64 and E.shape == S.shape
    for k in range(1, len(S) + 1):
        direct = low_rank_approx(W, k).norm() ** 2 / W.norm() ** 2
        np.testing.assert_allclose(E[k - 1].item(), direct.item(), rtol=1e-9)
    assert E[-1].item() == pytest.approx(1.0, abs=1e-12)
    assert torch.all(E[1:] >= E[:-1])


def test_energy_captured_accepts_lists_and_float32():
    np.testing.assert_allclose(energy_captured([3.0, 4.0]).numpy(), [9 / 25, 1.0])
    E = energy_captured(torch.tensor([2.0, 1.0], dtype=torch.float32))
    np.testing.assert_allclose(E.numpy(), [0.8, 1.0])


def test_energy_captured_of_a_trainable_spectrum():
    p = torch.nn.Parameter(random_matrix(6, 4))
    E = energy_captured(torch.linalg.svdvals(p))  # S requires grad here
    assert not E.requires_grad and E[-1].item() == pytest.approx(1.0)


def test_numpy_input():
    W_np = random_matrix().numpy()
    U, S, Vh = truncated_svd(W_np, 3)
    assert isinstance(S, torch.Tensor) and S.dtype == torch.float64
    torch.testing.assert_close(low_rank_approx(W_np, 3), low_rank_approx(torch.from_numpy(W_np), 3))
    np.testing.assert_allclose(energy_captured(np.linalg.svd(W_np, compute_uv=False)).numpy()[-1], 1.0)
    # float32 and integer arrays work too, as float32
    assert low_rank_approx(W_np.astype(np.float32), 2).dtype == torch.float32
    assert low_rank_approx(np.arange(12).reshape(3, 4), 1).dtype == torch.float32


def test_numpy_integer_rank_is_accepted():
    W = random_matrix()
    torch.testing.assert_close(low_rank_approx(W, np.int64(3)), low_rank_approx(W, 3))


def test_trainable_input_is_detached():
    p = torch.nn.Parameter(random_matrix(6, 4, dtype=torch.float32))
    assert not low_rank_approx(p, 2).requires_grad


@pytest.mark.parametrize("r", [0, -1, 21, 2.0, "3", None, True])
def test_bad_rank_raises_helpful_value_error(r):
    W = random_matrix(30, 20)
    with pytest.raises(ValueError, match=r"rank r must be a whole number in \[1, 20\] \(for a \(30, 20\) matrix\)"):
        truncated_svd(W, r)
    with pytest.raises(ValueError, match=r"rank r must be a whole number"):
        low_rank_approx(W, r)


@pytest.mark.parametrize("shape", [(2, 3, 4), (5,), ()])
def test_non_matrix_input_raises_helpful_value_error(shape):
    with pytest.raises(ValueError, match=r"expected a 2-D matrix, got shape"):
        low_rank_approx(torch.zeros(shape), 1)


def test_plot_singular_values_returns_labelled_axes():
    S1 = torch.linalg.svdvals(random_matrix())
    S2 = np.linalg.svd(random_matrix(seed=1).numpy(), compute_uv=False)
    ax = plot_singular_values({"a": S1, "b": S2}, title="two spectra")
    try:
        assert isinstance(ax, matplotlib.axes.Axes)
        assert ax.get_title() == "two spectra"
        assert ax.get_xlabel() and ax.get_ylabel() == "singular value σ_k"
        assert ax.get_yscale() == "log"
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
        np.testing.assert_allclose(ax.lines[0].get_ydata(), S1.numpy())
    finally:
        plt.close(ax.figure)


def test_plot_singular_values_normalize_max_k_and_given_axes():
    fig, ax = plt.subplots()
    try:
        S = torch.linalg.svdvals(torch.nn.Parameter(random_matrix()))  # requires grad: must still plot
        out = plot_singular_values(S, ax=ax, normalize=True, log=False, max_k=5)
        assert out is ax and ax.get_yscale() == "linear"
        assert ax.get_ylabel() == "σ_k / σ_1" and ax.get_legend() is None
        y = ax.lines[0].get_ydata()
        assert len(y) == 5 and y[0] == pytest.approx(1.0)
        np.testing.assert_allclose(ax.lines[0].get_xdata(), np.arange(1, 6))
    finally:
        plt.close(fig)
