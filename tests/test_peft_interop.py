"""lora_helpers.peft_interop: our adapters -> PEFT -> same logits, PEFT-trained adapters -> ours -> same logits,
and clear errors for what LoRALinear cannot represent. Runs on the offline stand-in backbone with tiny inputs."""

import copy
import json

import pytest
import torch
from fakes import trained_looking
from safetensors.torch import load_file, save_file

from lora_helpers import apply_lora, count_parameters, lora_layers
from lora_helpers.backbone import load_backbone
from lora_helpers.peft_interop import CONFIG_NAME, WEIGHTS_NAME, export_to_peft, import_from_peft

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

HEAD = ("pre_classifier", "classifier")


# peft 0.21 calls a transformers method that transformers 5 deprecated (a FutureWarning about
# is_gradient_checkpointing); it is not about this code
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="module")
def backbone():
    model, tokenizer, _ = load_backbone("minilm-standin", seed=0, verbose=False)
    texts = ["a wonderful, moving film", "dull plot, wooden acting and a silly ending"]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    return model, inputs


def fresh(backbone):
    return copy.deepcopy(backbone[0]).eval()


def logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


# ------------------------------------------------------------------ ours -> PEFT


def test_export_file_format(backbone, tmp_path):
    ours = trained_looking(fresh(backbone))
    export_to_peft(ours, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, False)
    assert sorted(config["target_modules"]) == ["q_lin", "v_lin"]
    assert config["modules_to_save"] == list(HEAD)
    assert config["base_model_name_or_path"] == "minilm-standin"
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    layer0 = "base_model.model.distilbert.transformer.layer.0.attention"
    assert tensors[f"{layer0}.q_lin.lora_A.weight"].shape == (4, 384)
    assert tensors[f"{layer0}.v_lin.lora_B.weight"].shape == (384, 4)
    assert torch.equal(tensors["base_model.model.classifier.weight"], ours.classifier.weight)
    assert {k for k in tensors if "lora" not in k} == {
        f"base_model.model.{h}.{p}" for h in HEAD for p in ("weight", "bias")
    }
    assert len(tensors) == 6 * 2 * 2 + 4


@pytest.mark.parametrize(
    "targets,rslora", [(("q_lin", "v_lin"), False), (("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"), True)]
)
def test_ours_to_peft_same_logits(backbone, tmp_path, targets, rslora):
    ours = trained_looking(fresh(backbone), targets=targets, rslora=rslora)
    export_to_peft(ours, tmp_path)
    theirs = PeftModel.from_pretrained(fresh(backbone), tmp_path)
    assert theirs.peft_config["default"].use_rslora == rslora
    mine, peft_logits = logits(ours, backbone[1]), logits(theirs, backbone[1])
    assert (mine - peft_logits).abs().max().item() < 1e-5
    # and the adapter really changed the model: not the fresh backbone's logits
    assert (mine - logits(fresh(backbone), backbone[1])).abs().max().item() > 1e-2


def test_export_full_names_when_leaves_would_select_more(backbone, tmp_path):
    ours = fresh(backbone)
    apply_lora(ours, ["layer.0.attention.q_lin"], r=2, lora_alpha=2)
    with torch.no_grad():
        ours.get_submodule("distilbert.transformer.layer.0.attention.q_lin").lora_B.fill_(0.01)
    export_to_peft(ours, tmp_path, head_modules=())
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["target_modules"] == ["distilbert.transformer.layer.0.attention.q_lin"]
    theirs = PeftModel.from_pretrained(fresh(backbone), tmp_path)
    assert (logits(ours, backbone[1]) - logits(theirs, backbone[1])).abs().max().item() < 1e-5


def test_export_errors(backbone, tmp_path):
    with pytest.raises(ValueError, match="no LoRALinear"):
        export_to_peft(fresh(backbone), tmp_path)
    with pytest.raises(ValueError, match="head module 'scorer'"):
        export_to_peft(trained_looking(fresh(backbone)), tmp_path, head_modules=("scorer",))


# ------------------------------------------------------------------ PEFT -> ours


@pytest.fixture(scope="module")
def peft_trained(backbone):
    """A PEFT LoRA model trained for a few AdamW steps, so that A, B and the head all moved."""
    torch.manual_seed(0)
    config = LoraConfig(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_lin", "v_lin"],
        modules_to_save=list(HEAD),
    )
    model = get_peft_model(copy.deepcopy(backbone[0]), config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(**backbone[1], labels=torch.tensor([1, 0])).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("via", ["model", "folder"])
def test_peft_to_ours_same_logits(backbone, peft_trained, tmp_path, via):
    if via == "folder":
        peft_trained.save_pretrained(tmp_path)
        source = tmp_path
    else:
        source = peft_trained
    ours = import_from_peft(fresh(backbone), source)
    assert len(lora_layers(ours)) == 12
    layer = ours.get_submodule("distilbert.transformer.layer.3.attention.v_lin")
    assert (layer.r, layer.lora_alpha, layer.scaling) == (4, 8, 2.0)
    assert layer.lora_B.abs().max() > 0  # trained, not the zero init
    assert (logits(ours, backbone[1]) - logits(peft_trained, backbone[1])).abs().max().item() < 1e-5
    # the same parameters train as in PEFT
    assert count_parameters(ours).trainable == peft_trained.get_nb_trainable_parameters()[0]


def test_round_trip_ours_peft_ours(backbone, tmp_path):
    ours = trained_looking(fresh(backbone), rslora=True)
    export_to_peft(ours, tmp_path)
    back = import_from_peft(fresh(backbone), tmp_path)
    assert back.get_submodule("distilbert.transformer.layer.0.attention.q_lin").use_rslora
    assert torch.equal(logits(back, backbone[1]), logits(ours, backbone[1]))


# ------------------------------------------------------------------ what we refuse, and say so


def _edit(tmp_path, backbone, **changes):
    """An exported adapter whose config has ``changes`` applied."""
    export_to_peft(trained_looking(fresh(backbone)), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config.update(changes)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(use_dora=True), "DoRA"),
        (dict(peft_type="IA3"), "only 'LORA'"),
        (dict(rank_pattern={"q_lin": 8}), "rank_pattern.*per-layer"),
        (dict(alpha_pattern={"v_lin": 32}), "alpha_pattern.*per-layer"),
        (dict(bias="lora_only"), "bias='lora_only'"),
        (dict(fan_in_fan_out=True), "fan_in_fan_out"),
        (dict(target_modules=["q_lin", "query_proj"]), r"\['query_proj'\] match no module"),
    ],
)
def test_unsupported_configs_raise(backbone, tmp_path, changes, message):
    path = _edit(tmp_path, backbone, **changes)
    model = fresh(backbone)
    with pytest.raises(ValueError, match=message) as err:
        import_from_peft(model, path)
    if "match no module" not in message:
        assert "Supported: plain LoRA" in str(err.value)
    assert not lora_layers(model)  # nothing changed


def test_dora_peft_model_raises(backbone):
    dora = get_peft_model(
        copy.deepcopy(backbone[0]), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_lin"], use_dora=True)
    )
    with pytest.raises(ValueError, match="use_dora=True: DoRA"):
        import_from_peft(fresh(backbone), dora)


def test_tensors_for_missing_layers_raise(backbone, tmp_path):
    path = _edit(tmp_path, backbone)
    tensors = load_file(path / WEIGHTS_NAME)
    key = "base_model.model.distilbert.transformer.layer.0.attention.q_lin.lora_A.weight"
    tensors[key.replace("layer.0.", "layer.9.")] = tensors[key].clone()
    save_file(tensors, str(path / WEIGHTS_NAME))
    with pytest.raises(
        ValueError,
        match=r"do not exist in DistilBertForSequenceClassification: "
        r"\['distilbert.transformer.layer.9.attention.q_lin'\]",
    ):
        import_from_peft(fresh(backbone), path)


def test_import_refuses_a_model_with_lora(backbone, tmp_path):
    path = _edit(tmp_path, backbone)
    with pytest.raises(ValueError, match="already has LoRA"):
        import_from_peft(trained_looking(fresh(backbone)), path)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        import_from_peft(fresh(backbone), tmp_path / "nowhere")


# ------------------------------------------------------------------ robustness (issue 14)


def test_export_into_a_folder_with_an_older_pickle_adapter_leaves_no_stale_file(backbone, tmp_path):
    old = get_peft_model(fresh(backbone), LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["k_lin"]))
    old.save_pretrained(tmp_path, safe_serialization=False, save_embedding_layers=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    (tmp_path / "README.md").write_text("my notes")
    ours = trained_looking(fresh(backbone))
    export_to_peft(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    theirs = PeftModel.from_pretrained(fresh(backbone), tmp_path)
    assert (logits(ours, backbone[1]) - logits(theirs, backbone[1])).abs().max().item() < 1e-5


def test_export_that_fails_leaves_the_previous_adapter(backbone, tmp_path, monkeypatch):
    export_to_peft(trained_looking(fresh(backbone)), tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr("lora_helpers.utils.os.fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "disk full")))
    with pytest.raises(OSError, match="disk full"):
        export_to_peft(trained_looking(fresh(backbone), r=2, seed=5), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


def test_export_refuses_pissa_initialised_layers(backbone, tmp_path):
    from lora_helpers.lora import pissa_init_

    model = trained_looking(fresh(backbone))
    pissa_init_(model.get_submodule("distilbert.transformer.layer.0.attention.q_lin"))
    with pytest.raises(ValueError, match="PiSSA-initialised"):
        export_to_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_of_the_tensor_file_instead_of_its_folder_says_so(backbone, tmp_path):
    path = _edit(tmp_path, backbone)
    with pytest.raises(NotADirectoryError, match=rf"is a file; .*pass the folder that holds it, {tmp_path}"):
        import_from_peft(fresh(backbone), path / WEIGHTS_NAME)


def test_import_of_damaged_files_names_the_file(backbone, tmp_path):
    path = _edit(tmp_path, backbone)
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[:100])
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME} cannot be read as safetensors"):
        import_from_peft(fresh(backbone), path)
    (path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME} is not valid JSON"):
        import_from_peft(fresh(backbone), path)


def test_import_of_a_config_without_r_names_the_file(backbone, tmp_path):
    path = _edit(tmp_path, backbone)
    config = json.loads((path / CONFIG_NAME).read_text())
    del config["r"]
    (path / CONFIG_NAME).write_text(json.dumps(config))
    model = fresh(backbone)
    with pytest.raises(
        ValueError,
        match=rf"{CONFIG_NAME} is not a valid LoRA config: r is missing",
    ):
        import_from_peft(model, path)
    assert not lora_layers(model)
