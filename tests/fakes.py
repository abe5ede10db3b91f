"""Shared test helpers (not a test module): a LoRA model that looks trained, for round-trip tests."""

import torch

from lora_helpers import apply_lora, lora_layers, mark_only_lora_trainable

HEAD = ("pre_classifier", "classifier")


def trained_looking(model, targets=("q_lin", "v_lin"), r=4, alpha=8, rslora=False, seed=1):
    """``model`` with LoRA on ``targets``, a non-zero B and a changed head, as if trained."""
    apply_lora(model, list(targets), r=r, lora_alpha=alpha, use_rslora=rslora)
    mark_only_lora_trainable(model, extra_trainable=HEAD)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.05, generator=g)
        model.classifier.weight.normal_(0, 0.5, generator=g)
        model.pre_classifier.bias.normal_(0, 0.1, generator=g)
    return model
