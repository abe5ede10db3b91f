"""Tests of lora_helpers.utils.set_seed: seeding repeats, and thread pinning only when asked."""

import random

import numpy as np
import pytest
import torch

from lora_helpers.utils import set_seed


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_set_seed_repeats_every_generator(monkeypatch):
    monkeypatch.delenv("LORA_NUM_THREADS", raising=False)
    set_seed(7)
    first = draws()
    set_seed(7)
    assert draws() == first
    set_seed(8)
    assert draws() != first


def test_set_seed_leaves_the_thread_count_alone_without_the_variable(monkeypatch):
    monkeypatch.delenv("LORA_NUM_THREADS", raising=False)
    torch.set_num_threads(3)  # what a learner's machine happens to use; 3 is neither 1 nor the old pin, 2
    set_seed(0)
    assert torch.get_num_threads() == 3
    monkeypatch.setenv("LORA_NUM_THREADS", "")  # empty counts as unset
    set_seed(0)
    assert torch.get_num_threads() == 3


def test_set_seed_pins_threads_from_the_variable(monkeypatch):
    torch.set_num_threads(3)
    monkeypatch.setenv("LORA_NUM_THREADS", "1")
    set_seed(0)
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("LORA_NUM_THREADS", "2")
    set_seed(0)
    assert torch.get_num_threads() == 2


def test_an_explicit_num_threads_beats_the_variable(monkeypatch):
    monkeypatch.setenv("LORA_NUM_THREADS", "2")
    set_seed(0, num_threads=1)
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_variable_is_a_clear_error_that_changes_nothing(monkeypatch, value):
    monkeypatch.setenv("LORA_NUM_THREADS", value)
    torch.set_num_threads(3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match="LORA_NUM_THREADS must be a positive whole number"):
        set_seed(0)
    assert torch.get_num_threads() == 3 and torch.equal(torch.get_rng_state(), state)


def test_the_suite_and_the_notebook_script_pin_the_same_count_as_before():
    """conftest.py (pytest, nbval's kernels) and tools/execute_notebooks.sh (which makes the committed
    outputs) must agree, on 2: the count set_seed pinned on every machine without CUDA before."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    conftest = re.search(r'setdefault\("LORA_NUM_THREADS", "(\d+)"\)', (root / "conftest.py").read_text())
    script = re.search(r"LORA_NUM_THREADS=(\d+)", (root / "tools" / "execute_notebooks.sh").read_text())
    assert conftest and script and conftest.group(1) == script.group(1) == "2"
