"""NF4 quantisation (notebook 07) against published constants and independent references."""

import pytest
import torch
import torch.nn as nn

from lora_helpers.lora import LoRALinear, apply_lora, mark_only_lora_trainable
from lora_helpers.quant import (
    NF4Linear,
    bits_per_weight,
    dequantize_blockwise,
    double_dequantize,
    double_quantize,
    int4_code_book,
    nf4_code_book,
    pack_4bit,
    quantize_blockwise,
    quantize_model,
    unpack_4bit,
)

# The NF4 data type as published: QLoRA (Dettmers et al. 2023, arXiv 2305.14314), Appendix E, and
# bitsandbytes' functional.py (get_4bit_type("nf4")), typed in by hand.
PUBLISHED_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def test_code_book_matches_the_published_nf4_values():
    torch.testing.assert_close(nf4_code_book(), torch.tensor(PUBLISHED_NF4), rtol=0, atol=1e-6)


def test_nearest_code_agrees_with_brute_force_argmin():
    torch.manual_seed(0)
    x = torch.randn(1000) * 3
    codes, absmax = quantize_blockwise(x, block_size=50)
    blocks = x.view(-1, 50) / x.view(-1, 50).abs().amax(1, keepdim=True)
    brute = (blocks[..., None] - torch.tensor(PUBLISHED_NF4)).abs().argmin(-1).reshape(-1)
    assert torch.equal(codes.long(), brute)
    torch.testing.assert_close(absmax, x.view(-1, 50).abs().amax(1))


def test_round_trip_error_is_within_half_the_widest_gap_of_each_block():
    torch.manual_seed(1)
    W = torch.randn(96, 80) * 0.05
    codes, absmax = quantize_blockwise(W)
    back = dequantize_blockwise(codes, absmax, W.shape)
    half_gap = float((torch.tensor(PUBLISHED_NF4).diff().max()) / 2)
    bound = (absmax[:, None].expand(-1, 64).reshape(-1)[: W.numel()] * half_gap).view_as(W)
    assert ((back - W).abs() <= bound + 1e-7).all()
    # each block's largest magnitude is a code (+-1 x absmax), so it comes back exactly
    blocks_in, blocks_out = W.reshape(-1, 64), back.reshape(-1, 64)
    idx = blocks_in.abs().argmax(1)
    torch.testing.assert_close(blocks_out.gather(1, idx[:, None]), blocks_in.gather(1, idx[:, None]), rtol=1e-6, atol=0)


def test_values_on_the_grid_come_back_exactly_and_zero_is_a_code():
    book = torch.tensor(PUBLISHED_NF4)
    x = torch.cat([book, book]) * 0.3  # two blocks of 16, absmax 0.3 each
    codes, absmax = quantize_blockwise(x, block_size=16)
    assert torch.equal(codes.long(), torch.arange(16).repeat(2))
    torch.testing.assert_close(dequantize_blockwise(codes, absmax, x.shape), x)
    zeros_codes, zeros_absmax = quantize_blockwise(torch.zeros(64))
    assert dequantize_blockwise(zeros_codes, zeros_absmax, (64,)).abs().max() == 0


def test_nf4_beats_int4_on_normal_weights():
    torch.manual_seed(2)
    W = torch.randn(256, 256)
    err = {}
    for name, book in (("nf4", nf4_code_book()), ("int4", int4_code_book())):
        codes, absmax = quantize_blockwise(W, book)
        err[name] = float((dequantize_blockwise(codes, absmax, W.shape, book) - W).square().mean())
    assert err["nf4"] < 0.9 * err["int4"], err


def test_packing_is_exact_and_two_codes_share_a_byte():
    codes = torch.randint(0, 16, (1000,), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    packed = pack_4bit(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 500
    assert int(packed[0]) == int(codes[0]) * 16 + int(codes[1])
    assert torch.equal(unpack_4bit(packed), codes)
    with pytest.raises(ValueError, match="even"):
        pack_4bit(codes[:3])
    with pytest.raises(ValueError, match="0..15"):
        pack_4bit(torch.tensor([16, 0], dtype=torch.uint8))


def test_bits_per_weight_match_the_qlora_paper():
    assert bits_per_weight() == 4.5  # 32/64 = 0.5 bits of constants
    assert bits_per_weight(double_quant=True) == pytest.approx(4.127, abs=5e-4)  # the paper's 0.127


def test_double_quantisation_keeps_the_constants_close():
    torch.manual_seed(4)
    absmax = torch.rand(1000) * 0.1 + 0.05
    dq = double_quantize(absmax)
    assert dq["codes"].dtype == torch.int8 and dq["absmax2"].numel() == 4
    back = double_dequantize(dq)
    spread = float((absmax - absmax.mean()).abs().max())
    assert float((back - absmax).abs().max()) <= spread / 127 / 2 + 1e-6


def _nf4_layer(seed=5, d_in=48, d_out=32):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out)


def _brute_force_nf4(W, block_size=64):
    """NF4 by hand: pad, nearest published value by argmin per block, times the block's absmax."""
    flat = torch.nn.functional.pad(W.detach().reshape(-1), (0, (-W.numel()) % block_size)).view(-1, block_size)
    absmax = flat.abs().amax(1, keepdim=True)
    nearest = (flat[..., None] / absmax[..., None] - torch.tensor(PUBLISHED_NF4)).abs().argmin(-1)
    return (torch.tensor(PUBLISHED_NF4)[nearest] * absmax).reshape(-1)[: W.numel()].view_as(W)


def test_nf4_linear_computes_with_the_dequantised_weight_and_stores_half_a_byte_per_weight():
    lin = _nf4_layer()
    q = NF4Linear.from_linear(lin)
    x = torch.randn(4, 48)
    W_hat = _brute_force_nf4(lin.weight)
    torch.testing.assert_close(q(x), x @ W_hat.T + lin.bias)
    assert q.packed.numel() == 48 * 32 // 2 and q.absmax.numel() == 48 * 32 // 64
    assert not any(p.requires_grad for p in q.parameters())


def test_gradient_through_the_nf4_base_is_the_input_gradient_only():
    lin = _nf4_layer()
    q = NF4Linear.from_linear(lin)
    W_hat = q.dequantized_weight().clone()
    x = torch.randn(4, 48, requires_grad=True)
    q(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (x_ref @ W_hat.T + lin.bias.detach()).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_lora_on_an_nf4_base_is_a_no_op_at_init_and_trains_only_a_and_b():
    q = NF4Linear.from_linear(_nf4_layer())
    layer = LoRALinear(q, r=4, lora_alpha=8)
    x = torch.randn(4, 48)
    torch.testing.assert_close(layer(x), q(x), rtol=0, atol=0)
    layer(x).sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_merge_into_an_nf4_base_is_refused_and_changes_nothing():
    q = NF4Linear.from_linear(_nf4_layer())
    layer = LoRALinear(q, r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    before = q.packed.clone()
    x = torch.randn(3, 48)
    out = layer(x)
    with pytest.raises(ValueError, match="dequantize"):
        layer.merge()
    assert not layer.merged and torch.equal(q.packed, before)
    torch.testing.assert_close(layer(x), out)
    # the explicit way: dequantise to fp32, then merge; same function
    layer.base = layer.base.dequantize()
    layer.merge()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), out, rtol=1e-5, atol=1e-5)


def test_quantize_model_then_apply_lora_and_state_dict_round_trip():
    torch.manual_seed(6)
    model = nn.Sequential()
    model.add_module("q_lin", nn.Linear(64, 64))
    model.add_module("act", nn.ReLU())
    model.add_module("classifier", nn.Linear(64, 2))
    names = quantize_model(model)
    assert names == ["q_lin"] and type(model.classifier) is nn.Linear
    apply_lora(model, ["q_lin"], r=2)
    mark_only_lora_trainable(model, extra_trainable=["classifier"])
    x = torch.randn(5, 64)
    out = model(x)
    copy = nn.Sequential()
    copy.add_module("q_lin", NF4Linear(64, 64))
    copy.add_module("act", nn.ReLU())
    copy.add_module("classifier", nn.Linear(64, 2))
    apply_lora(copy, ["q_lin"], r=2)
    copy.load_state_dict(model.state_dict())
    torch.testing.assert_close(copy(x), out)
    with pytest.raises(TypeError, match="before apply_lora"):
        NF4Linear.from_linear(model.q_lin)


def test_a_shape_that_does_not_fill_whole_blocks_round_trips_and_reloads():
    torch.manual_seed(7)
    lin = nn.Linear(37, 5)  # 185 weights: 3 blocks of 64, the last one padded
    q = NF4Linear.from_linear(lin)
    assert q.absmax.numel() == 3 and q.packed.numel() == 96
    torch.testing.assert_close(q.dequantized_weight(), _brute_force_nf4(lin.weight))
    copy = NF4Linear(37, 5)
    copy.load_state_dict(q.state_dict())
    x = torch.randn(2, 37)
    torch.testing.assert_close(copy(x), q(x), rtol=0, atol=0)
    plain = q.dequantize()
    assert type(plain) is nn.Linear and not plain.weight.requires_grad
    torch.testing.assert_close(plain(x), q(x))


def test_dtype_casts_keep_codes_and_scales_exact_and_bad_block_sizes_are_refused():
    q = NF4Linear.from_linear(_nf4_layer())
    absmax, packed = q.absmax.clone(), q.packed.clone()
    q.half()
    assert q.absmax.dtype == torch.float32 and q.code_book.dtype == torch.float32 and q.packed.dtype == torch.uint8
    assert torch.equal(q.absmax, absmax) and torch.equal(q.packed, packed) and q.bias.dtype == torch.float16
    bias = q.float().bias.clone()
    q.reset_parameters()  # a quantised pretrained layer is never re-initialised
    assert torch.equal(q.bias, bias)
    for bad in (0, 63):
        with pytest.raises(ValueError, match="even"):
            NF4Linear(8, 8, block_size=bad)


def test_quantize_model_after_lora_swaps_only_the_frozen_base():
    """Quantising a trained LoRA model: the output is the NF4 base plus the same full-precision update."""
    torch.manual_seed(7)
    model = nn.Sequential()
    model.add_module("q_lin", nn.Linear(64, 64))
    model.add_module("k_lin", nn.Linear(64, 64))
    model.add_module("classifier", nn.Linear(64, 2))
    apply_lora(model, ["q_lin"], r=2)
    with torch.no_grad():
        model.q_lin.lora_B.normal_()
    x = torch.randn(5, 64)
    update = model.q_lin.delta_weight().detach().clone()
    names = quantize_model(model, targets=("q_lin",))
    assert names == ["q_lin.base"] and isinstance(model.q_lin.base, NF4Linear)
    assert type(model.k_lin) is nn.Linear and type(model.classifier) is nn.Linear
    torch.testing.assert_close(model.q_lin(x), model.q_lin.base(x) + x @ update.T)
    assert quantize_model(model) == ["k_lin"]  # everything but the head and what is already NF4


def test_quantize_model_refuses_a_merged_lora_layer_and_changes_nothing():
    torch.manual_seed(8)
    model = nn.Sequential()
    model.add_module("q_lin", nn.Linear(64, 64))
    model.add_module("k_lin", nn.Linear(64, 64))
    apply_lora(model, ["q_lin"], r=2)
    model.q_lin.merge()
    with pytest.raises(ValueError, match="unmerge_lora"):
        quantize_model(model)
    assert type(model.q_lin.base) is nn.Linear and type(model.k_lin) is nn.Linear
