"""A task with a known answer for the paper's Section 7 questions: a planted update dW*.

On IMDb nobody knows the "true" update, so a short run cannot tell a finding from noise.
Here we choose the answer first and check that LoRA finds it:

* ``plant_update``: dW* = sum_i factor * s_i u_i v_i^T over chosen singular directions
  (u_i, s_i, v_i) of a real pretrained W, from the middle of its spectrum (W uses them far
  less than its top directions, more than random ones). So
  dW* has rank k = len(directions), its column space is known, and it *amplifies* those
  directions by exactly ``factor`` (the paper's Table 7 measure, ``||dW||_F / ||U^T W V||_F``);
* ``regression_data``: inputs x (Gaussian, every direction seen equally) and targets
  y = (W + dW*) x + noise, so the loss floor is the noise variance;
* ``fit_lora``: a ``LoRALinear`` on the frozen W, trained with Adam on that regression;
  its ``delta_weight()`` is what LoRA learned.

Then the rank where the loss stops falling is k, the learned update's top directions span
the planted ones (the paper's phi, ``analysis.subspace_similarity``), and its amplification
is the planted factor. Introduced in notebook 05 (``05_rank_and_what_lora_learns.ipynb``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .lora import LoRALinear


@dataclass
class PlantedUpdate:
    """dW* and what was planted: its left / right directions (columns), their singular values in W, the factor."""

    dW: torch.Tensor  # d_out x d_in, float64
    U: torch.Tensor  # d_out x k: the planted output directions
    V: torch.Tensor  # d_in x k: the planted input directions
    s_in_W: torch.Tensor  # k: how much W itself uses each (its singular values there)
    factor: float  # dW* = factor * (W's part along these directions): the amplification

    @property
    def rank(self) -> int:
        return self.U.shape[1]


def default_directions(d: int, k: int = 4) -> tuple[int, ...]:
    """``k`` singular directions from the middle of a width-``d`` spectrum, ``d // 40`` apart (192, 201, ... at 384).

    The paper found that dW amplifies directions W does not emphasise, yet more than random ones do. In a
    384-wide matrix random directions already catch a share ``k / d`` of W, so the planted directions come
    from the middle of the spectrum: well below W's top directions and well above random ones.
    """
    step = max(1, d // 40)
    return tuple(d // 2 + step * i for i in range(k))


def plant_update(W: torch.Tensor, directions: Iterable[int] | None = None, factor: float = 20.0) -> PlantedUpdate:
    """dW* = ``factor`` * U_k S_k V_k^T over W's singular ``directions`` (0 = W's strongest; default
    ``default_directions``).

    ``||U_k^T W V_k||_F = ||S_k||``, so the amplification of dW*, measured with its own k directions,
    is ``||dW*||_F / ||S_k|| = factor`` exactly.
    """
    W64 = W.detach().double().cpu()
    U, S, Vh = torch.linalg.svd(W64, full_matrices=False)
    idx = list(default_directions(min(W64.shape)) if directions is None else directions)
    if not idx or len(set(idx)) != len(idx) or not all(0 <= i < len(S) for i in idx):
        raise ValueError(f"directions must be distinct indices in [0, {len(S) - 1}], got {idx!r}")
    if not factor > 0:
        raise ValueError(f"factor must be positive, got {factor!r}")
    U_k, S_k, V_k = U[:, idx], S[idx], Vh[idx].T
    dW = factor * (U_k * S_k) @ V_k.T  # d_out x d_in, rank k
    return PlantedUpdate(dW=dW, U=U_k, V=V_k, s_in_W=S_k, factor=float(factor))


def regression_data(
    W: torch.Tensor, dW: torch.Tensor, n: int = 4096, noise: float = 0.1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, Y)``: ``n`` Gaussian inputs (n x d_in) and targets ``Y = X (W + dW)^T + noise`` (float32).

    The best possible mean squared error is ``noise ** 2``: the floor a good fit reaches.
    """
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, W.shape[1], generator=g, dtype=torch.float64)
    Y = X @ (W.detach().double().cpu() + dW.double()).T + noise * torch.randn(
        n, W.shape[0], generator=g, dtype=torch.float64
    )
    return X.float(), Y.float()


def fit_lora(
    W: torch.Tensor,
    X: torch.Tensor,
    Y: torch.Tensor,
    r: int,
    seed: int = 0,
    steps: int = 300,
    lr: float = 1e-2,
    batch_size: int = 256,
) -> tuple[torch.Tensor, float]:
    """Train LoRA of rank ``r`` (scale alpha / r = 1) on the frozen ``W`` to map X to Y; ``(dW learned, MSE)``.

    ``seed`` sets A's init and the minibatches. Returns the learned ``scaling * B A`` (float64, CPU) and the
    mean squared error on all of X after training.
    """
    torch.manual_seed(seed)
    base = nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        base.weight.copy_(W.detach().float().cpu())
    layer = LoRALinear(base, r=r, lora_alpha=r, lora_dropout=0.0)
    optimizer = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(X), (batch_size,), generator=g)
        loss = (layer(X[i]) - Y[i]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        mse = float((layer(X) - Y).square().mean())
    return layer.delta_weight().detach().double().cpu(), mse
