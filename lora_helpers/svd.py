"""The linear algebra behind low rank: truncated SVD and how much it keeps.

Introduced in notebook 01 (``01_svd_low_rank_intuition.ipynb``), reused in
notebooks 04 and 05 to ask whether a weight update is low rank.

A matrix may live on any device: the SVD is computed on the CPU, and
``truncated_svd`` / ``low_rank_approx`` hand their results back on the
matrix's own device, so ``W - low_rank_approx(W, r)`` works for a GPU weight.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from .utils import ArgumentError, check_int


def _as_matrix(W) -> torch.Tensor:
    """``W`` as a detached CPU matrix (float64 if it is float64, else float32)."""
    W = torch.as_tensor(W)
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(W.shape)}")
    return W.detach().cpu().to(torch.float64 if W.dtype == torch.float64 else torch.float32)


def _cpu_float64(S) -> torch.Tensor:
    """A spectrum as a float64 CPU tensor, also from a trainable or GPU/MPS tensor (MPS has no float64)."""
    if isinstance(S, torch.Tensor):
        S = S.detach().cpu()
    return torch.as_tensor(S, dtype=torch.float64)


def _check_rank(r: int, W: torch.Tensor) -> None:
    # NumPy integers are ranks too (e.g. one found with np.searchsorted); bool and 2.0 are not.
    check_int("rank r", r, 1, min(W.shape), hint=f"for a {tuple(W.shape)} matrix")


def truncated_svd(W: torch.Tensor | np.ndarray, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``r`` singular triplets of ``W``: ``(U_r, S_r, Vh_r)``.

    ``U_r`` is (m, r), ``S_r`` is (r,) in decreasing order and ``Vh_r`` is (r, n),
    so that ``U_r @ diag(S_r) @ Vh_r`` is the best rank-r approximation of W.
    Computed on the CPU, returned on W's device.
    """
    device = W.device if isinstance(W, torch.Tensor) else torch.device("cpu")
    W = _as_matrix(W)
    _check_rank(r, W)
    r = int(r)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r].to(device), S[:r].to(device), Vh[:r, :].to(device)


def low_rank_approx(W: torch.Tensor | np.ndarray, r: int) -> torch.Tensor:
    """The best rank-``r`` approximation of ``W`` (Eckart-Young): ``U_r diag(S_r) Vh_r``, on W's device."""
    device = W.device if isinstance(W, torch.Tensor) else torch.device("cpu")
    U, S, Vh = truncated_svd(torch.as_tensor(W).detach().cpu(), r)
    return ((U * S) @ Vh).to(device)


def energy_captured(S: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Cumulative share of the squared singular values: entry k-1 is the energy of the top k.

    ``energy_captured(S)[k - 1] == ||low_rank_approx(W, k)||_F^2 / ||W||_F^2``.
    """
    S = _cpu_float64(S)
    if S.numel() == 0 or not torch.isfinite(S).all() or not float(S.abs().max()) > 0:
        raise ArgumentError(
            f"energy_captured needs finite singular values, not all zero (a zero matrix has no energy to share), "
            f"got {S.numel()} values" + (f" with largest {float(S.abs().max()):g}" if S.numel() else "")
        )
    energy = S.square().cumsum(0)
    return energy / energy[-1]


def plot_singular_values(
    spectra: torch.Tensor | np.ndarray | dict[str, torch.Tensor | np.ndarray],
    ax: plt.Axes | None = None,
    title: str = "Singular values",
    normalize: bool = False,
    log: bool = True,
    max_k: int | None = None,
) -> plt.Axes:
    """Plot one spectrum or a ``{label: S}`` dict of spectra against their index.

    ``normalize=True`` divides each by its largest value so that matrices of
    different scales can share one axis.
    """
    if not isinstance(spectra, dict):
        spectra = {"singular values": spectra}
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for label, S in spectra.items():
        S = np.asarray(_cpu_float64(S))[:max_k]
        if normalize:
            S = S / S[0]
        ax.plot(np.arange(1, len(S) + 1), S, marker="." if len(S) <= 64 else None, label=label)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("index k (singular values sorted, largest first)")
    ax.set_ylabel("σ_k / σ_1" if normalize else "singular value σ_k")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if len(spectra) > 1:
        ax.legend()
    return ax
