"""Which precision a training step runs in (lora_helpers.loop.choose_precision), with mocked GPUs.

There is no GPU here, so torch.cuda's answers are replaced by those of a real card:
a Colab T4 has compute capability (7, 5) and no bfloat16 units, yet
``torch.cuda.is_bf16_supported()`` answers True there (bf16 is emulated); an
A100 is (8, 0) and an H100 (9, 0), both with bf16 units.
"""

import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_helpers.loop import _autocast, _grad_scaler, choose_precision, train


@pytest.fixture
def gpu(monkeypatch):
    """``gpu((major, minor))`` makes torch.cuda report one CUDA device of that compute capability."""

    def fake(capability):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # what a T4 answers too

    return fake


@pytest.mark.parametrize(
    "capability, expected",
    [
        ((7, 5), "fp16"),  # T4 (Colab's free GPU)
        ((7, 0), "fp16"),  # V100
        ((8, 0), "bf16"),  # A100
        ((8, 9), "bf16"),  # L4
        ((9, 0), "bf16"),
    ],
)  # H100 / H200
def test_bf16_only_where_the_gpu_has_it(gpu, capability, expected):
    gpu(capability)
    assert choose_precision("cuda") == expected
    assert choose_precision(torch.device("cuda", 0)) == expected


def test_t4_gets_fp16_autocast_and_an_active_scaler(gpu):
    gpu((7, 5))
    precision = choose_precision("cuda")
    assert _autocast(torch.device("cuda")).fast_dtype == torch.float16
    assert _grad_scaler(precision).is_enabled()  # fp16 gradients underflow without loss scaling


def test_a100_gets_bf16_autocast_and_no_scaler(gpu):
    gpu((8, 0))
    precision = choose_precision("cuda")
    assert _autocast(torch.device("cuda")).fast_dtype == torch.bfloat16
    assert not _grad_scaler(precision).is_enabled()


def test_no_mixed_precision_off_cuda(gpu):
    gpu((9, 0))  # even with a GPU present, a CPU run stays in fp32
    for device in ("cpu", "mps", "meta"):
        assert choose_precision(device) == "fp32"
        assert not _autocast(torch.device(device))._enabled
    assert not _grad_scaler("fp32").is_enabled()
    assert not _grad_scaler("bf16").is_enabled()


class TinyClassifier(nn.Module):
    """Just enough of a Hugging Face classifier for ``train``: ``model(**batch).loss``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, input_ids, labels):
        logits = self.head(self.embed(input_ids).mean(1))
        return types.SimpleNamespace(loss=F.cross_entropy(logits, labels), logits=logits)


def test_train_records_the_precision_it_used():
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, 10, (4, 3)), "labels": torch.tensor([0, 1, 0, 1])}
    result = train(TinyClassifier(), [batch] * 2, lr=1e-2, device="cpu")
    assert result.precision == "fp32"
