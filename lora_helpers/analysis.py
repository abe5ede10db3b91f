"""What does a weight update look like? Tools for the paper's Section 7.

* ``weight_updates``: dW = W_finetuned - W_pretrained for chosen matrices;
* ``random_like``: a Gaussian matrix with the same shape and Frobenius norm (a baseline);
* ``top_directions`` / ``subspace_similarity``: the paper's Eq. 4,
  phi(i, j) = ||U_i^T U_j||_F^2 / min(i, j), in [0, 1];
* ``expected_random_similarity``: phi between random subspaces, the baseline for Eq. 4;
* ``amplification``: how much dW amplifies directions that W already has (Table 7),
  with scale-free ratios (alignment against chance, size of dW against W).

Every function takes tensors from any device (a CUDA model's weights, a CPU
copy taken before training, a NumPy array) and computes on the CPU in
float64; the matrices it returns are CPU tensors.

Introduced in notebook 04 (``04_lora_vs_full_finetuning.ipynb``: is the full
fine-tuning update low rank?) and used at length in notebook 05
(``05_rank_and_what_lora_learns.ipynb``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .svd import energy_captured
from .utils import ArgumentError, check_choice, check_int


def _check_count(k, name: str, most: int, shape) -> int:
    """``k`` directions of a matrix of ``shape``: a whole number in [1, min(shape)] (no silent clipping)."""
    return check_int(name, k, 1, most, hint=f"singular directions of a {tuple(shape)} matrix")


def _cpu64(M) -> torch.Tensor:
    """``M`` as a detached float64 CPU tensor, whatever its device (moved first: MPS has no float64)."""
    return torch.as_tensor(M).detach().cpu().double()


def weight_updates(
    pretrained_state: dict, model: torch.nn.Module, suffixes: Sequence[str] = ("q_lin.weight", "v_lin.weight")
) -> dict:
    """``{name: W_now - W_pretrained}`` for every weight whose name ends with a suffix.

    ``pretrained_state`` is a copy of the state dict taken before training, e.g.
    ``{k: v.clone() for k, v in model.state_dict().items()}``. LoRA layers count
    with their effective weight ``W0 + scaling * B A`` (their ``base.`` prefix is
    dropped from the name).
    """
    from .lora import lora_layers

    layers = lora_layers(model)
    current = {k: v for k, v in model.state_dict().items() if not any(k.startswith(f"{name}.") for name in layers)}
    for name, layer in layers.items():  # a LoRA layer counts with its effective weight
        current[f"{name}.weight"] = layer.effective_weight()
    updates = {}
    for key, value in current.items():
        if key.endswith(tuple(suffixes)) and key in pretrained_state and value.ndim == 2:
            updates[key] = value.detach().float().cpu() - pretrained_state[key].detach().float().cpu()
    if not updates:
        raise ValueError(f"no weight ends with {list(suffixes)}; examples of names: {list(pretrained_state)[:5]}")
    return updates


def random_like(M: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A Gaussian random matrix with the shape, Frobenius norm and dtype of ``M`` (on the CPU)."""
    R = torch.randn(M.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (R * (_cpu64(M).norm() / R.norm())).to(M.dtype)


def energy_in_top(M: torch.Tensor, k: int) -> float:
    """Share of ``||M||_F^2`` held by the top ``k`` singular directions, ``1 <= k <= min(M.shape)``."""
    k = _check_count(k, "k", min(M.shape), M.shape)
    S = torch.linalg.svdvals(_cpu64(M))
    return float(energy_captured(S)[k - 1])


def top_directions(M: torch.Tensor, k: int | None = None, side: str = "right") -> torch.Tensor:
    """Orthonormal columns spanning the top-``k`` singular directions of ``M``.

    ``side="right"``: the row space (for LoRA's ``A``, r x d_in, this is what the
    paper compares); ``side="left"``: the column space (for ``B`` or a dW).
    """
    side = check_choice("side", side, ("right", "left"))
    if k is not None:
        k = _check_count(k, "k", min(M.shape), M.shape)
    U, _, Vh = torch.linalg.svd(_cpu64(M), full_matrices=False)
    cols = Vh.T if side == "right" else U
    return cols if k is None else cols[:, :k]


def subspace_similarity(U1: torch.Tensor, U2: torch.Tensor, i: int, j: int) -> float:
    """phi(i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j): 1 if one subspace contains the other, 0 if orthogonal."""
    if not (1 <= i <= U1.shape[1] and 1 <= j <= U2.shape[1]):
        raise ValueError(f"need 1 <= i <= {U1.shape[1]} and 1 <= j <= {U2.shape[1]}, got i={i}, j={j}")
    overlap = _cpu64(U1[:, :i]).T @ _cpu64(U2[:, :j])
    return float(overlap.square().sum() / min(i, j))


def subspace_similarity_grid(
    U1: torch.Tensor, U2: torch.Tensor, max_i: int | None = None, max_j: int | None = None
) -> torch.Tensor:
    """phi(i, j) for all i <= max_i, j <= max_j, as a matrix (rows i-1, columns j-1) for a heatmap."""
    max_i = U1.shape[1] if max_i is None else check_int("max_i", max_i, 1, U1.shape[1])
    max_j = U2.shape[1] if max_j is None else check_int("max_j", max_j, 1, U2.shape[1])
    overlap2 = (_cpu64(U1[:, :max_i]).T @ _cpu64(U2[:, :max_j])).square()
    cumulative = overlap2.cumsum(0).cumsum(1)  # entry (i-1, j-1) = ||U1_i^T U2_j||_F^2
    i = torch.arange(1, max_i + 1).unsqueeze(1)
    j = torch.arange(1, max_j + 1).unsqueeze(0)
    return cumulative / torch.minimum(i, j)


def expected_random_similarity(d: int, i: int, j: int) -> float:
    """The mean of phi(i, j) between two *random* subspaces of R^d (dims i and j): ``max(i, j) / d``.

    For uniformly random orthonormal U_i and U_j, E ||U_i^T U_j||_F^2 = i j / d,
    so phi = i j / (d min(i, j)) = max(i, j) / d. This is the level a measured
    phi must clear to mean anything: near 0 in GPT-3's d = 12,288, but
    64 / 384 = 0.17 for j = 64 in a 384-wide model.
    """
    if not (1 <= i <= d and 1 <= j <= d):
        raise ValueError(f"need 1 <= i, j <= d, got d={d}, i={i}, j={j}")
    return max(i, j) / d


def amplification(W: torch.Tensor, dW: torch.Tensor, r: int, seed: int = 0, n_random: int = 20) -> dict:
    """The paper's Table 7: how strongly ``dW`` amplifies directions of ``W``.

    Projects W onto the top-r singular directions of dW (``proj_on_dW`` =
    ``||U^T W V||_F``) and, for comparison, onto W's own top-r directions
    (``proj_on_W``) and onto ``n_random`` random pairs of r-dim subspaces
    (``proj_on_random``: their mean, ``proj_on_random_sd``: their spread).
    The paper's amplification factor is ``||dW||_F / ||U^T W V||_F``.

    Two scale-free numbers make runs of different lengths and widths comparable:

    * ``alignment`` = ``proj_on_dW / random_expected``, where ``random_expected`` =
      ``||W||_F r / sqrt(d_out d_in)`` is what a random pair of r-dim subspaces catches
      on average (``E ||U^T W V||_F^2 = ||W||_F^2 r^2 / (d_out d_in)``): 1 means "no more
      aligned with W than chance";
    * ``relative_update`` = ``||dW||_F / ||W||_F``: how large the update is.

    ``W`` and ``dW`` must have the same shape, and ``1 <= r <= min(W.shape)``.
    """
    if tuple(W.shape) != tuple(dW.shape) or W.ndim != 2:
        raise ValueError(f"W and dW must be matrices of the same shape, got {tuple(W.shape)} and {tuple(dW.shape)}")
    r = _check_count(r, "r", min(W.shape), W.shape)
    check_int("n_random", n_random, 1, hint="random subspace pairs to average")
    W, dW = _cpu64(W), _cpu64(dW)
    if not (torch.isfinite(W).all() and torch.isfinite(dW).all()):
        raise ArgumentError("W and dW must be finite (inf or nan in a weight: a diverged run?)")
    if not float(W.norm()) > 0:
        raise ArgumentError("W is zero: the amplification of W's directions is undefined (pass the pretrained weight)")
    d_out, d_in = W.shape

    def projected(U, V):
        return float((U.T @ W @ V).norm())

    U_d, _, Vh_d = torch.linalg.svd(dW, full_matrices=False)
    U_w, _, Vh_w = torch.linalg.svd(W, full_matrices=False)
    g = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(n_random):
        U_r, _ = torch.linalg.qr(torch.randn(d_out, r, generator=g, dtype=torch.float64))  # d_out x r, orthonormal
        V_r, _ = torch.linalg.qr(torch.randn(d_in, r, generator=g, dtype=torch.float64))  # d_in x r
        draws.append(projected(U_r, V_r))
    draws = torch.tensor(draws, dtype=torch.float64)
    along_dW = projected(U_d[:, :r], Vh_d[:r].T)
    norm_W, norm_dW = float(W.norm()), float(dW.norm())
    random_expected = norm_W * r / (d_out * d_in) ** 0.5
    return {
        "r": r,
        "norm_dW": norm_dW,
        "norm_W": norm_W,
        "proj_on_dW": along_dW,
        "proj_on_W": projected(U_w[:, :r], Vh_w[:r].T),
        "proj_on_random": float(draws.mean()),
        "proj_on_random_sd": float(draws.std()) if n_random > 1 else 0.0,
        "random_expected": random_expected,
        "alignment": along_dW / random_expected,
        "relative_update": norm_dW / norm_W,
        "amplification": norm_dW / along_dW if along_dW > 0 else float("inf"),
    }
