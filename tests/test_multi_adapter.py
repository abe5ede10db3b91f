"""Many adapters in one batch: each row must get exactly what its adapter alone gives."""

import warnings

import pytest
import torch
from fakes import HEAD, trained_looking
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from lora_helpers import apply_lora, load_adapter, merge_lora, save_adapter
from lora_helpers.multi_adapter import MultiLinear, MultiLoRALinear, mixed_adapter_model, set_adapter_rows
from lora_helpers.peft_interop import export_to_peft

CONFIG = DistilBertConfig(vocab_size=100, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=32)


def base_model():
    torch.manual_seed(0)
    return DistilBertForSequenceClassification(CONFIG).eval()


@pytest.fixture
def three_adapters(tmp_path):
    """Three saved adapters on one base: different seeds, ranks, alphas and layers (one uses rsLoRA)."""
    settings = {
        "a": dict(targets=("q_lin", "v_lin"), r=4, alpha=8, seed=1),
        "b": dict(targets=("q_lin", "v_lin"), r=2, alpha=16, seed=2),
        "c": dict(targets=("q_lin", "lin1"), r=8, alpha=8, rslora=True, seed=3),
    }
    return {
        name: save_adapter(trained_looking(base_model(), **kw), tmp_path / name, extra=HEAD)
        for name, kw in settings.items()
    }


def batch(n=6, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, 5:] = 0  # one padded row
    return {"input_ids": torch.randint(0, 100, (n, length), generator=g), "attention_mask": mask}


def alone(adapter, inputs):
    """The logits of one adapter loaded into its own model: the reference for each row."""
    model = base_model()
    load_adapter(model, adapter)
    with torch.no_grad():
        return model.eval()(**inputs).logits


def test_each_row_gets_its_own_adapter(three_adapters):
    wrapped = base_model()
    apply_lora(wrapped, ["q_lin", "v_lin", "lin1"], r=8)  # every layer any adapter uses
    mixed, names = mixed_adapter_model(wrapped, three_adapters, head_modules=HEAD)
    inputs = batch()
    index = torch.tensor([0, 1, 2, 2, 0, 1])
    set_adapter_rows(mixed, index)
    with torch.no_grad():
        got = mixed.eval()(**inputs).logits
    references = {n: alone(three_adapters[n], inputs) for n in names}
    for row, k in enumerate(index.tolist()):
        torch.testing.assert_close(got[row], references[names[k]][row], atol=1e-5, rtol=0)
    # the adapters really differ, so a row served by the wrong adapter would fail
    assert (references["a"] - references["b"]).abs().max() > 1e-2
    # the input model was not changed
    assert not any(isinstance(m, (MultiLoRALinear, MultiLinear)) for m in wrapped.modules())


def test_base_rows_and_errors(three_adapters):
    wrapped = base_model()
    apply_lora(wrapped, ["q_lin", "v_lin", "lin1"], r=8)
    mixed, _ = mixed_adapter_model(wrapped, three_adapters)  # heads shared: the base model's
    inputs = batch(n=2)
    set_adapter_rows(mixed, [-1, -1])
    with torch.no_grad():
        torch.testing.assert_close(mixed(**inputs).logits, base_model()(**inputs).logits, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="-1..2"):
        set_adapter_rows(mixed, [0, 3])
    fresh, _ = mixed_adapter_model(wrapped, three_adapters)
    with pytest.raises(RuntimeError, match="set_adapter_rows"):
        fresh(**inputs)
    with pytest.raises(ValueError, match="apply_lora"):
        mixed_adapter_model(base_model(), three_adapters)
    with pytest.raises(ValueError, match="one per row"):
        set_adapter_rows(mixed, [0, 1, 2])  # three indices, two rows
        mixed(**inputs)
    merge_lora(wrapped)
    with pytest.raises(ValueError, match="unmerge_lora"):
        mixed_adapter_model(wrapped, three_adapters)


def test_matches_peft_mixed_batch(three_adapters, tmp_path):
    """PEFT's own mixed batch (``adapter_names=``) gives the same logits as ours."""
    import peft
    from packaging.version import Version
    from peft import PeftModel

    if Version(peft.__version__) < Version("0.13"):
        pytest.skip(
            "PEFT before 0.13 gives every row of a mixed batch the active adapter's head (modules_to_save); "
            "fixed by huggingface/peft#1990"
        )

    peft_dirs = {}
    for name in ("a", "b"):
        model = base_model()
        load_adapter(model, three_adapters[name])
        peft_dirs[name] = export_to_peft(model, tmp_path / f"peft-{name}", head_modules=HEAD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(base_model(), peft_dirs["a"], adapter_name="a")
        peft_model.load_adapter(peft_dirs["b"], adapter_name="b")
    peft_model.eval()
    inputs = batch(n=4)
    wrapped = base_model()
    apply_lora(wrapped, ["q_lin", "v_lin"], r=4)
    mixed, names = mixed_adapter_model(wrapped, {n: three_adapters[n] for n in ("a", "b")}, head_modules=HEAD)
    set_adapter_rows(mixed, [0, 1, 1, 0])
    with torch.no_grad():
        ours = mixed(**inputs).logits
        theirs = peft_model(**inputs, adapter_names=["a", "b", "b", "a"]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
