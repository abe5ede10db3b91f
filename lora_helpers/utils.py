"""Small utilities used by every notebook: seeding, device choice, versions.

Introduced in notebook 01 (``set_seed``, ``print_versions``); ``get_device`` in
notebook 03.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import random

import numpy as np
import torch


def set_seed(seed: int = 0, deterministic: bool = True, num_threads: int | None = 2) -> None:
    """Seed Python, NumPy and torch so that a CPU run repeats exactly.

    ``num_threads`` fixes torch's intra-op thread count: reductions split over a
    different number of threads add floats in a different order, and the last
    digits of a training run then change from machine to machine.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA
    if num_threads is not None and not torch.cuda.is_available():
        torch.set_num_threads(num_threads)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def get_device(prefer: str | None = None) -> torch.device:
    """``cuda`` if available, then Apple's ``mps``, else ``cpu`` (or ``prefer``)."""
    if prefer:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def versions(packages=("torch", "transformers", "datasets", "peft", "numpy", "matplotlib")) -> dict:
    """Installed versions of the libraries the series uses (and Python's)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def print_versions(packages=("torch", "transformers", "datasets", "peft", "numpy", "matplotlib")) -> None:
    """Print one line per library: the first cell of every notebook."""
    for name, version in versions(packages).items():
        print(f"{name:>12}: {version}")
