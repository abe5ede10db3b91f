"""lora_helpers.memory: the formula against hand arithmetic, the measurement against hand-counted tensors."""

import pytest
import torch
import torch.nn as nn

from lora_helpers import apply_lora, count_parameters, mark_only_lora_trainable
from lora_helpers.memory import PAPER_MODELS, GiB, measure_training_memory, paper_scaling_table, training_memory_formula


def test_formula_fp32_adamw_by_hand():
    # 1,000 parameters, 10 trainable, fp32: weights 4,000 B; gradients 40 B; AdamW m and v 2 x 40 B
    assert training_memory_formula(1000, 10) == {"weights": 4000, "gradients": 40, "optimizer_state": 80, "total": 4120}


def test_formula_optimizers_and_precisions():
    assert training_memory_formula(100, 100, optimizer="sgd")["optimizer_state"] == 0
    assert training_memory_formula(100, 100, optimizer="sgd-momentum")["optimizer_state"] == 400
    # mixed precision: 2 B weights and gradients, fp32 m, v and master copy: 2 + 2 + 12 = 16 B per parameter
    mixed = training_memory_formula(100, 100, bytes_per_param=2, grad_bytes=2, state_bytes=4, master_weights=True)
    assert mixed == {"weights": 200, "gradients": 200, "optimizer_state": 1200, "total": 1600}
    with pytest.raises(ValueError, match="unknown optimizer"):
        training_memory_formula(10, 1, optimizer="lion")
    with pytest.raises(ValueError, match="n_trainable"):
        training_memory_formula(10, 11)


def test_lora_parameter_counts_of_the_paper_models():
    # PEFT's well-known print for LLaMA-2-7B with r=8 on q_proj, v_proj: 4,194,304 trainable
    assert PAPER_MODELS["7b"].lora_params(8) == 4_194_304
    # DistilBERT, r=8 on q_lin, v_lin: 6 layers x 2 x 8 x (768 + 768), plus the 592,130-parameter head
    assert PAPER_MODELS["distilbert"].lora_params(8) == 147_456 + 592_130


def test_paper_table_7b():
    rows = {(r["model"].split()[0], r["method"], r["precision"]): r for r in paper_scaling_table()}
    full = rows[("7B", "full", "mixed")]
    assert full["total"] == 16 * 6_738_415_616  # 2 + 2 + 4 + 4 + 4 bytes per parameter
    lora = rows[("7B", "LoRA r=8", "mixed")]
    assert lora["n_params"] == 6_742_609_920 and lora["n_trainable"] == 4_194_304
    assert lora["weights"] == 2 * 6_742_609_920 and lora["gradients"] == 2 * 4_194_304
    assert 12 < lora["total"] / GiB < 13 < 100 < full["total"] / GiB < 101
    dist = rows[("DistilBERT-base,", "full", "fp32")]
    assert dist["total"] == 16 * 66_955_010  # 4 + 4 + 2 x 4


def _tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 2))


def test_measurement_by_hand():
    net, x = _tiny_net(), torch.randn(8, 10)
    before = [p.detach().clone() for p in net.parameters()]
    m = measure_training_memory(net, x, loss_fn=lambda model, batch: model(batch).sum())
    n = 10 * 6 + 6 + 6 * 2 + 2  # 80 parameters in 4 tensors
    assert m["weights"] == 4 * n
    assert m["gradients"] == 4 * n
    assert m["optimizer_state"] == 2 * 4 * n + 4 * 4  # exp_avg, exp_avg_sq, and a 4-byte step per tensor
    # saved for backward: the ReLU output (8 x 6 floats), which the second Linear also saves (same storage,
    # counted once). The input x and the weights are saved too, but are not activations.
    assert m["activations"] == 8 * 6 * 4
    assert m["total"] == m["weights"] + m["gradients"] + m["optimizer_state"] + m["activations"]
    # the model is left as it was
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert all(p.grad is None for p in net.parameters())


def test_measurement_frozen_first_layer():
    net, x = _tiny_net(), torch.randn(8, 10)
    for p in net[0].parameters():
        p.requires_grad_(False)
    m = measure_training_memory(net, x, optimizer="sgd", loss_fn=lambda model, batch: model(batch).sum())
    assert m["weights"] == 4 * 80
    assert m["gradients"] == 4 * (6 * 2 + 2)
    assert m["optimizer_state"] == 0  # plain SGD keeps no state
    # the frozen layer's output needs no gradient, so ReLU saves nothing; the second Linear saves its input
    assert m["activations"] == 8 * 6 * 4


def test_measurement_matches_formula_for_lora():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 3))
    apply_lora(net, ["0", "2"], r=2, lora_alpha=4)
    mark_only_lora_trainable(net, extra_trainable=["3"])
    was_training = net.training
    net.eval()
    c = count_parameters(net)
    m = measure_training_memory(net, torch.randn(4, 16), loss_fn=lambda model, batch: model(batch).square().mean())
    f = training_memory_formula(c.total, c.trainable)
    n_tensors = sum(1 for p in net.parameters() if p.requires_grad)
    assert (m["weights"], m["gradients"]) == (f["weights"], f["gradients"])
    assert m["optimizer_state"] == f["optimizer_state"] + 4 * n_tensors
    assert m["activations"] > 0
    assert not net.training and was_training  # mode restored (eval here)


def test_measurement_refuses_bad_input():
    net = _tiny_net()
    for p in net.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        measure_training_memory(net, torch.randn(2, 10), loss_fn=lambda model, batch: model(batch).sum())
    net = _tiny_net()
    net(torch.randn(2, 10)).sum().backward()
    with pytest.raises(ValueError, match="already hold gradients"):
        measure_training_memory(net, torch.randn(2, 10), loss_fn=lambda model, batch: model(batch).sum())


# ------------------------------------------------------------------ notebook 07: what fits


def test_activation_estimate_is_korthikanti_eq1_for_a_gpt_block():
    """With their assumptions (16-bit values, 1-byte masks, 4h GELU MLP, LayerNorm, dropout, eager attention) one
    block keeps s b h (34 + 5 a s / h) bytes: Korthikanti et al. 2022, Eq. 1."""
    from lora_helpers.memory import PaperModel, activation_bytes

    gpt = PaperModel("GPT block", 0, 1, 4096, n_heads=32, d_ff=4 * 4096, vocab_size=0, mlp="gelu", norm="layernorm")
    s, b, h, a = 2048, 1, 4096, 32
    got = activation_bytes(gpt, s, b, attention="eager", dropout=True)["blocks"]
    assert got == s * b * h * (34 + 5 * a * s / h)
    # a fused kernel drops exactly the score term
    assert activation_bytes(gpt, s, b, dropout=True)["blocks"] == 34 * s * b * h


def _saved_by_hand(model, batch):
    return measure_training_memory(model, batch)["activations"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_matches_the_measurement_on_distilbert(checkpointing):
    """The stand-in's layout (post-LN, GELU, dropout on, eager attention), fp32 on the CPU, whose dropout keeps
    fp32 masks: the estimate is within 2% of the tensors autograd saves (what it leaves out: norm statistics and
    the head's own few values)."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from lora_helpers.memory import activation_bytes, enable_activation_checkpointing, paper_model_from_config

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=500, dim=64, hidden_dim=256, n_layers=3, n_heads=4, max_position_embeddings=64)
    model = DistilBertForSequenceClassification(config)
    if checkpointing:
        enable_activation_checkpointing(model)
    batch = {
        "input_ids": torch.randint(0, 500, (4, 48)),
        "attention_mask": torch.ones(4, 48, dtype=torch.long),
        "labels": torch.tensor([0, 1, 0, 1]),
    }
    measured = _saved_by_hand(model, batch)
    est = activation_bytes(
        paper_model_from_config(config),
        48,
        4,
        bytes_per_value=4,
        attention="eager",
        dropout=True,
        mask_bytes=4,
        checkpointing=checkpointing,
    )
    assert abs(est["kept"] - measured) < 0.02 * measured, (est, measured)


def test_activation_estimate_matches_the_measurement_on_a_llama_with_its_logits():
    """A LLaMA layout (RMSNorm, SwiGLU, grouped-query attention through SDPA, no dropout) with a vocabulary large
    enough that the loss's log-softmax is a third of what is kept: within 2% with the logits, far off without."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_helpers.memory import activation_bytes, paper_model_from_config

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 4096, (2, 64))
    measured = _saved_by_hand(model, {"input_ids": ids, "labels": ids})
    est = activation_bytes(paper_model_from_config(config), 64, 2, bytes_per_value=4)
    # within 2% on current transformers; older versions (4.40, the lower bound) copy K and V to every head before
    # the attention kernel, 2 (1 - d_kv / d) T d more values per block: 4% here
    assert abs(est["kept"] - measured) < 0.05 * measured, (est, measured)
    assert est["logits"] > 0.3 * measured
    assert est["kept"] - est["logits"] < 0.7 * measured


def test_activation_estimate_matches_a_bf16_llama():
    """In bf16 Hugging Face's RMSNorm keeps an fp32 copy of its input: the estimate counts 4 + 2 bytes per value for
    each norm, and stays within 3% of the measurement."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_helpers.memory import activation_bytes, paper_model_from_config

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    ids = torch.randint(0, 1024, (2, 64))
    measured = _saved_by_hand(model, {"input_ids": ids, "labels": ids})
    layout = paper_model_from_config(config)
    est = activation_bytes(layout, 64, 2, bytes_per_value=2)
    assert abs(est["kept"] - measured) < 0.03 * measured, (est, measured)


def test_fits_table_reproduces_the_qlora_headline():
    """QLoRA's abstract: a 65B model fine-tuned on one 48 GB GPU; 16-bit fine-tuning of it needs > 780 GB."""
    from lora_helpers.memory import PAPER_MODELS, QLORA_BITS, fits_table

    # the paper's 780 GB: 16-bit weights and gradients, fp32 Adam moments, no master copy = 12 bytes per parameter
    sixteen_bit = training_memory_formula(
        65_000_000_000, 65_000_000_000, bytes_per_param=2, grad_bytes=2, state_bytes=4
    )
    assert sixteen_bit["total"] == 780_000_000_000
    # a 65B base at QLoRA's 4.127 bits fits 48 GB with room for LoRA's states and activations
    assert 65e9 * QLORA_BITS / 8 < 0.75 * 48e9
    table = fits_table(seq_len=512)
    rows = {(r["model"].split()[0], r["method"], r["checkpointing"]): r for r in table}
    assert rows[("70B", "QLoRA q,v r=8", True)]["total_gib"] < 48 * 1e9 / GiB
    assert rows[("70B", "QLoRA all linear r=64", True)]["fits_80gb"]
    assert not rows[("70B", "LoRA all linear r=64", True)]["fits_80gb"]
    # a 7B QLoRA (the paper's Guanaco-7B) fits a 16 GB T4 with checkpointing; full fine-tuning does not fit 80 GB
    assert rows[("7B", "QLoRA all linear r=64", True)]["fits_16gb"] and not rows[("7B", "full", True)]["fits_80gb"]
    # LLaMA-2-7B, r = 64 on every linear layer: the 159,907,840 trainable parameters PEFT reports for it
    assert PAPER_MODELS["7b"].lora_params(64, "all") == 159_907_840
    assert rows[("7B", "QLoRA all linear r=64", True)]["n_trainable"] == 159_907_840


def test_weight_bytes_counts_buffers_too():
    from lora_helpers.memory import weight_bytes
    from lora_helpers.quant import NF4Linear

    lin = nn.Linear(128, 64)
    assert weight_bytes(lin) == (128 * 64 + 64) * 4
    q = NF4Linear.from_linear(lin)
    # 4 bits per weight + one fp32 absmax per 64 weights + the fp32 bias + the 16-value code book
    assert weight_bytes(q) == 128 * 64 // 2 + 128 * 64 // 64 * 4 + 64 * 4 + 16 * 4


def test_activation_checkpointing_keeps_fewer_activations_and_lora_still_trains():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from lora_helpers.memory import enable_activation_checkpointing

    def lora_model(checkpointing):
        torch.manual_seed(0)
        model = DistilBertForSequenceClassification(
            DistilBertConfig(
                vocab_size=100,
                dim=32,
                n_layers=3,
                n_heads=2,
                hidden_dim=64,
                max_position_embeddings=64,
                dropout=0.0,
                attention_dropout=0.0,
                seq_classif_dropout=0.0,
            )
        )
        apply_lora(model, ["q_lin", "v_lin"], r=4)
        mark_only_lora_trainable(model, extra_trainable=["pre_classifier", "classifier"])
        if checkpointing:
            enable_activation_checkpointing(model)
        return model

    batch = {
        "input_ids": torch.randint(1, 100, (4, 48), generator=torch.Generator().manual_seed(1)),
        "labels": torch.tensor([0, 1, 0, 1]),
    }
    plain, ckpt = lora_model(False), lora_model(True)
    a_plain = measure_training_memory(plain, batch)["activations"]
    a_ckpt = measure_training_memory(ckpt, batch)["activations"]
    assert a_ckpt < a_plain / 2
    # the frozen embeddings need no gradient, yet B of the first layer gets one through the checkpointed block
    ckpt.train()
    with torch.no_grad():
        for m in ckpt.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_()
    ckpt(**batch).loss.backward()
    first_b = ckpt.distilbert.transformer.layer[0].attention.q_lin.lora_B.grad
    assert first_b is not None and first_b.abs().sum() > 0
    # same gradients as without checkpointing (it recomputes, it does not approximate)
    plain.load_state_dict(ckpt.state_dict())
    plain.train()
    plain.zero_grad(set_to_none=True)
    plain(**batch).loss.backward()
    torch.testing.assert_close(first_b, plain.distilbert.transformer.layer[0].attention.q_lin.lora_B.grad)
    with pytest.raises(TypeError, match="checkpoint"):
        enable_activation_checkpointing(nn.Linear(2, 2))
