"""4-bit NormalFloat (NF4) quantisation and a frozen NF4 layer for QLoRA, from scratch.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314) fine-tunes a model whose frozen
base weights are stored in 4 bits, with LoRA's ``A``, ``B`` in full precision:

* **the NF4 code book**: 16 values, quantiles of N(0, 1) scaled to [-1, 1] with an
  exact zero (``nf4_code_book``), so that normally distributed weights use every
  code about equally often;
* **block-wise absmax quantisation** (``quantize_blockwise``): the flattened weight
  is cut into blocks of 64; each block is divided by its largest magnitude
  (``absmax``, kept in fp32) and every value is replaced by the index of the
  nearest code (4 bits);
* **packing** (``pack_4bit`` / ``unpack_4bit``): two 4-bit indices per byte;
* **double quantisation** (``double_quantize``): the fp32 ``absmax`` constants
  themselves quantised to 8 bits in blocks of 256 (0.5 -> 0.127 bits per weight);
* ``NF4Linear``: a frozen ``nn.Linear`` whose weight lives as packed codes and is
  dequantised in ``forward``; its backward pass re-dequantises instead of keeping an
  fp32 copy alive. It keeps one fp32 absmax per block (4.5 bits per weight): double
  quantisation is shown and counted, not used by the layer. It subclasses ``nn.Linear`` so that ``LoRALinear`` and
  ``apply_lora`` wrap it without a change: LoRA never needs the base weight's gradient.

Merging ``B A`` into an NF4 base is **refused** (``NF4Linear.weight`` cannot be
assigned): the sum would have to be re-quantised, adding new rounding error to the
trained update. Call ``layer.base = layer.base.dequantize()`` first to merge in fp32,
explicitly (the result holds the NF4 rounding of ``W0``).

Introduced in notebook 07 (``07_bigger_models.ipynb``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NoReturn

import torch
import torch.nn as nn
import torch.nn.functional as F

from .utils import ArgumentError, check_int

BLOCK_SIZE = 64  # weights per absmax constant (QLoRA's first quantisation)
DQ_BLOCK_SIZE = 256  # absmax constants per second-level constant (double quantisation)
# Where the outermost quantile sits: bitsandbytes' create_normal_map(offset=0.9677083), which QLoRA's code book
# comes from (the paper's Appendix E prints the 16 values, not the offset); this expression equals it to 7 digits.
NF4_OFFSET = 1 - (1 / (2 * 15) + 1 / (2 * 16)) / 2


def nf4_code_book() -> torch.Tensor:
    """The 16 NF4 values, ascending, in [-1, 1] with an exact 0 (float32).

    8 positive quantiles of N(0, 1) (probabilities from ``NF4_OFFSET`` down to 1/2) and
    7 negative ones, so that zero is a code of its own; then scaled so that the
    largest magnitude is 1. Written out in notebook 07, section 1.
    """
    positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values
    negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (values / values.abs().max()).float()


def int4_code_book() -> torch.Tensor:
    """The 15 levels of symmetric int4 absmax quantisation, ``k / 7`` for ``k = -7 .. 7`` (float32)."""
    return torch.arange(-7, 8, dtype=torch.float32) / 7


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x`` flattened into rows of ``block_size`` (the last block padded with zeros)."""
    block_size = check_int("block_size", block_size, 1)
    if x.numel() == 0:
        raise ArgumentError(f"nothing to quantise: the tensor is empty (shape {tuple(x.shape)})")
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % block_size
    return F.pad(flat, (0, pad)).view(-1, block_size)


def quantize_blockwise(
    x: torch.Tensor, code_book: torch.Tensor | None = None, block_size: int = BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, absmax)``: every value of ``x`` as the index of its nearest code, per block of ``block_size``.

    ``codes`` is uint8 (one index per value, unpacked), of length ``x.numel()`` rounded up
    to whole blocks; ``absmax`` (float32) holds one scale per block. A block of zeros gets
    absmax 1 (any scale reproduces it). ``code_book`` defaults to NF4's.
    """
    if not x.is_floating_point():
        raise TypeError(f"quantize_blockwise needs a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantise a tensor with inf or nan: check the weights first")
    book = (nf4_code_book() if code_book is None else code_book).to(x.device, torch.float32)
    blocks = _blocks(x, block_size)  # (n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normalised = blocks / absmax[:, None]  # in [-1, 1]
    midpoints = (book[1:] + book[:-1]) / 2  # decision boundaries between neighbouring codes
    codes = torch.bucketize(normalised, midpoints)  # index of the nearest code
    return codes.reshape(-1).to(torch.uint8), absmax


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    shape: Sequence[int],
    code_book: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The values that ``codes`` and ``absmax`` stand for, reshaped to ``shape``: ``code_book[code] * absmax``."""
    book = (nf4_code_book() if code_book is None else code_book).to(absmax.device, torch.float32)
    if absmax.numel() == 0 or codes.numel() % absmax.numel():
        raise ArgumentError(
            f"codes ({codes.numel()}) must be a whole number of blocks, one absmax each ({absmax.numel()} given)"
        )
    if codes.numel() and not 0 <= int(codes.min()) <= int(codes.max()) < len(book):
        raise ArgumentError(
            f"codes index a code book of {len(book)} values: 0..{len(book) - 1}, got a {int(codes.max())}"
        )
    if math.prod(shape) > codes.numel():
        raise ArgumentError(f"shape {tuple(shape)} needs {math.prod(shape)} values, the codes hold {codes.numel()}")
    return _lookup(codes, absmax, shape, book, dtype)


def _lookup(codes, absmax, shape, book, dtype) -> torch.Tensor:
    """``book[code] * absmax`` per block, unchecked: ``NF4Linear``'s every forward (its codes are 4-bit by
    construction; checking them would cost two GPU synchronisations a call)."""
    block_size = codes.numel() // absmax.numel()
    values = book.to(absmax.device, torch.float32)[codes.int()].view(-1, block_size) * absmax[:, None]
    return values.reshape(-1)[: math.prod(shape)].view(shape).to(dtype)


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: ``codes[2i]`` in the high nibble, ``codes[2i + 1]`` in the low one."""
    if codes.numel() % 2:
        raise ValueError(f"pack_4bit needs an even number of codes, got {codes.numel()}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"4-bit codes are 0..15, got a {int(codes.max())}")
    pairs = codes.reshape(-1, 2).to(torch.uint8)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_4bit``: one uint8 code per 4 bits."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)


def double_quantize(absmax: torch.Tensor, block_size: int = DQ_BLOCK_SIZE) -> dict:
    """QLoRA's double quantisation of the absmax constants: 8 bits each plus one fp32 scale per ``block_size``.

    The constants are all positive, so their mean is subtracted first (``offset``); the
    rest is quantised symmetrically to int8 (``round(127 c / absmax2)``) per block of
    ``block_size``. QLoRA uses an 8-bit *float* code here; the memory is the same (8 bits
    per constant). Returns ``{"codes" (int8), "absmax2" (fp32), "offset", "n"}``.
    """
    offset = float(absmax.float().mean())
    blocks = _blocks(absmax - offset, block_size)
    absmax2 = blocks.abs().amax(dim=1)
    absmax2 = torch.where(absmax2 > 0, absmax2, torch.ones_like(absmax2))
    codes = torch.round(blocks / absmax2[:, None] * 127).to(torch.int8)
    return {"codes": codes.reshape(-1), "absmax2": absmax2, "offset": offset, "n": absmax.numel()}


def double_dequantize(dq: dict) -> torch.Tensor:
    """The absmax constants back from ``double_quantize``'s output (float32)."""
    block_size = dq["codes"].numel() // dq["absmax2"].numel()
    blocks = dq["codes"].float().view(-1, block_size) / 127 * dq["absmax2"][:, None]
    return blocks.reshape(-1)[: dq["n"]] + dq["offset"]


def bits_per_weight(
    block_size: int = BLOCK_SIZE, double_quant: bool = False, dq_block_size: int = DQ_BLOCK_SIZE
) -> float:
    """Storage per weight in bits: 4 for the code, plus the share of the absmax constants.

    Without double quantisation one fp32 constant per ``block_size`` weights (32/64 = 0.5
    bits); with it one 8-bit constant per block and one fp32 constant per
    ``dq_block_size`` blocks (8/64 + 32/(64 * 256) = 0.127 bits). QLoRA, Section 3.
    """
    check_int("block_size", block_size, 1)
    check_int("dq_block_size", dq_block_size, 1)
    if double_quant:
        return 4 + 8 / block_size + 32 / (block_size * dq_block_size)
    return 4 + 32 / block_size


class _NF4Matmul(torch.autograd.Function):
    """``x @ W.T`` with ``W`` dequantised from packed NF4 codes; backward re-dequantises.

    Autograd would otherwise keep the dequantised fp32 ``W`` alive from forward to
    backward (one full-precision copy of every layer: the memory QLoRA saves). No gradient
    for the codes: the base is frozen.
    """

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        W = ctx.layer.dequantized_weight(grad_out.dtype)  # (out, in)
        return grad_out @ W, None  # dL/dx only


class NF4Linear(nn.Linear):
    """A frozen ``nn.Linear`` stored in NF4: packed 4-bit codes + one fp32 absmax per 64 weights.

    Build it with ``NF4Linear.from_linear(linear)``. ``forward`` dequantises the weight
    (``compute dtype`` of the input) and multiplies; the bias stays in full precision and
    frozen. ``weight`` reads the dequantised weight (so ``LoRALinear`` sees its shape,
    dtype and device) and refuses assignment: LoRA's ``merge`` into this layer raises.
    ``dequantize()`` gives back a plain ``nn.Linear`` (with NF4's rounding error in it).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: str | torch.device | None = None,
        block_size: int = BLOCK_SIZE,
    ):
        nn.Module.__init__(self)  # not nn.Linear.__init__: there is no fp32 weight to create
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2 or block_size % 2:
            raise ValueError(f"block_size must be an even number >= 2 (two 4-bit codes per byte), got {block_size}")
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        n_blocks = math.ceil(in_features * out_features / block_size)
        self.register_buffer("packed", torch.zeros(n_blocks * block_size // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.ones(n_blocks, dtype=torch.float32, device=device))
        self.register_buffer("code_book", nf4_code_book().to(device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = BLOCK_SIZE) -> NF4Linear:
        """Quantise ``linear``'s weight to NF4 (its bias is copied as it is, frozen)."""
        if type(linear) is not nn.Linear:
            raise TypeError(
                f"NF4Linear.from_linear takes a plain nn.Linear, got {type(linear).__name__}"
                " (a LoRALinear: quantise the model before apply_lora)"
            )
        W = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, W.device, block_size)
        codes, absmax = quantize_blockwise(W, layer.code_book, block_size)
        layer.packed.copy_(pack_4bit(codes))
        layer.absmax.copy_(absmax)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().float())
        return layer

    def reset_parameters(self) -> None:
        """Nothing to do: the weight is a quantised pretrained one, never re-initialised (nn.Linear would
        re-draw the bias through a temporary weight)."""

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves everything; a dtype cast (``.half()``) reaches only the bias: the codes stay
        uint8 and the scales and code book fp32, or NF4 would lose precision silently."""
        kept = {name: self._buffers[name] for name in ("packed", "absmax", "code_book")}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:  # undo the cast, keep the move
                self._buffers[name] = old.to(new.device)
        return self

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the codes stand for, ``(out_features, in_features)``."""
        return _lookup(
            unpack_4bit(self.packed), self.absmax, (self.out_features, self.in_features), self.code_book, dtype
        )

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized_weight()

    @weight.setter
    def weight(self, value: object) -> NoReturn:
        raise RuntimeError(
            "an NF4Linear's weight is stored as 4-bit codes and cannot be assigned: merging "
            "LoRA into it would re-quantise W0 + scaling * B A and round the trained update away. "
            "Keep the adapter unmerged, or merge in full precision explicitly: "
            "layer.base = layer.base.dequantize(); layer.merge()"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _NF4Matmul.apply(x, self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def dequantize(self) -> nn.Linear:
        """A plain, frozen ``nn.Linear`` holding the dequantised weight (NF4's rounding included)."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.packed.device)
        with torch.no_grad():
            linear.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, block_size={self.block_size}"


def quantize_model(
    model: nn.Module,
    targets: Sequence[str] | None = None,
    skip: Sequence[str] = ("pre_classifier", "classifier"),
) -> list[str]:
    """Replace every plain ``nn.Linear`` (those whose name ends with a ``targets`` entry, if given) by an NF4Linear.

    The new task head (``skip``) stays in full precision: it trains. Returns the names
    replaced. Call it before ``apply_lora`` (the LoRA factors then wrap the NF4 layers), or on
    a model that already has LoRA: a ``LoRALinear``'s frozen base is quantised under the
    ``LoRALinear``'s name and its ``A``, ``B`` stay in full precision (notebook 07 swaps a
    trained model's base this way, to see what quantisation alone does to it).
    """

    def matched(name):
        return not any(name == s or name.endswith("." + s) for s in skip) and (
            targets is None or any(name == t or name.endswith("." + t) for t in targets)
        )

    names = []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        is_lora_base = child == "base" and hasattr(parent, "lora_A") and hasattr(parent, "lora_B")
        if matched(parent_name if is_lora_base else name):
            if is_lora_base and getattr(parent, "merged", False):
                raise ValueError(
                    f"{parent_name} is merged: its base holds W0 + scaling * B A, and quantising it "
                    "would lose W0. Call unmerge_lora(model) first; nothing was quantised"
                )
            names.append(name)
    if not names:
        raise ValueError(f"no nn.Linear to quantise in {type(model).__name__} (targets={targets}, skip={skip})")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NF4Linear.from_linear(getattr(parent, child)))
    return names


__all__ = [
    "BLOCK_SIZE",
    "DQ_BLOCK_SIZE",
    "NF4_OFFSET",
    "nf4_code_book",
    "int4_code_book",
    "quantize_blockwise",
    "dequantize_blockwise",
    "pack_4bit",
    "unpack_4bit",
    "double_quantize",
    "double_dequantize",
    "bits_per_weight",
    "NF4Linear",
    "quantize_model",
]
