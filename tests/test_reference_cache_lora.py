"""ReferenceCache end to end through the LoRA hook: ``NMTuneLoraModel.set_reference_cache``,
``forward(reference_keys=...)`` and ``NMTuneTrainer(reference_key_column=...)``.

Offline and CPU only: a tiny random-init BERT and a tiny timm ViT.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft", reason='needs the "lora" extra: pip install "nmtune[lora]"')
transformers = pytest.importorskip("transformers", reason='needs the "lora" extra')
timm = pytest.importorskip("timm", reason='needs the "vision" extra')

from transformers import BertConfig, BertModel, TrainingArguments  # noqa: E402

from nmtune import NMTuneLoss, wrap_lora  # noqa: E402
from nmtune.integrations import NMTuneTrainer  # noqa: E402
from nmtune.reference_cache import ReferenceCache  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

N, T, C = 24, 10, 3


def _model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    return wrap_lora(BertModel(cfg), num_classes=C, r=4, dropout=0.1, pooling="mean", **kw).train()


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 100, (N, T), generator=g)
    mask = torch.ones_like(ids)
    for i in range(N):
        ids[i, T - i % 4:] = 0
        mask[i, T - i % 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, C, (N,), generator=g),
            "idx": torch.arange(N)}


def _run(cache: ReferenceCache | None) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Two epochs; the batches keep their rows (only their order changes), so F is bit-exact both ways."""
    model, data = _model(), _data()
    if cache is not None:
        model.set_reference_cache(cache)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(7)).split(8)
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-2)
    criterion = NMTuneLoss("paper", lambda_=1.0)
    torch.manual_seed(123)
    losses, grads = [], []
    for epoch in range(2):
        for rows in order if epoch == 0 else order[::-1]:
            keys = data["idx"][rows] if cache is not None else None
            out = model(input_ids=data["input_ids"][rows], attention_mask=data["attention_mask"][rows],
                        reference_keys=keys)
            loss = criterion(out.logits, data["labels"][rows], out.features, out.reference)
            opt.zero_grad()
            loss.backward()
            losses.append(loss.detach())
            grads.append([p.grad.clone() for _, p in model.trainable_parameters()])
            opt.step()
    return losses, grads


def test_hook_training_equals_uncached_bit_for_bit() -> None:
    losses, grads = _run(None)
    cache = ReferenceCache(N)
    c_losses, c_grads = _run(cache)
    for step, (a, b) in enumerate(zip(losses, c_losses)):
        assert torch.equal(a, b), f"step {step}: {a.item()} vs {b.item()}"
    for step, (ga, gb) in enumerate(zip(grads, c_grads)):
        assert all(torch.equal(x, y) for x, y in zip(ga, gb)), f"gradients differ at step {step}"
    assert (cache.hits, cache.misses, cache.verified) == (16, 32, 8)


def test_hook_skips_the_reference_pass_on_a_hit() -> None:
    model, data = _model(), _data()
    cache = ReferenceCache(N, verify_batches=0)
    model.set_reference_cache(cache)
    batch = {"input_ids": data["input_ids"][:8], "attention_mask": data["attention_mask"][:8]}
    calls = []
    handle = model.peft_model.register_forward_pre_hook(lambda *a: calls.append(1))
    model(**batch, reference_keys=data["idx"][:8])
    assert len(calls) == 2, "a miss runs the reference pass and the adapted pass"
    calls.clear()
    out = model(**batch, reference_keys=data["idx"][:8])
    handle.remove()
    assert len(calls) == 1, "a hit runs the adapted pass only"
    model.eval()
    with torch.no_grad():
        expected = model(**batch, use_reference_cache=False).reference
    assert torch.equal(out.reference, expected)


def test_hook_refusals() -> None:
    model, data = _model(), _data()
    with pytest.raises(ValueError, match="reference_eval=False"):
        _model(reference_eval=False).set_reference_cache(ReferenceCache(N))
    cache = ReferenceCache(N)
    model.set_reference_cache(cache)
    with pytest.raises(ValueError, match="base weights"):
        _model(seed=3).set_reference_cache(cache)
    batch = {"input_ids": data["input_ids"][:4], "attention_mask": data["attention_mask"][:4]}
    with pytest.raises(ValueError, match="duplicated"):
        model(**batch, reference_keys=torch.tensor([0, 1, 1, 2]))
    with pytest.raises(ValueError, match="reference_keys"):
        model(**batch)


def test_hook_on_a_timm_vit_with_precompute(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = wrap_lora(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=C)).train()
    x = torch.randn(12, 3, 32, 32)
    batches = [{"pixel_values": x[i:i + 4], "idx": torch.arange(i, i + 4)} for i in range(0, 12, 4)]
    with ReferenceCache(12, path=tmp_path, context={"transform": "none"}, verify_batches=0) as cache:
        assert cache.precompute(model, batches) == 12
        model.set_reference_cache(cache)
        out = model(pixel_values=x[4:8], reference_keys=torch.arange(4, 8))
        assert cache.misses == 0 and cache.hits == 4
        model.eval()
        with torch.no_grad():
            expected = model(pixel_values=x[4:8], use_reference_cache=False).reference
        assert torch.equal(out.reference, expected)


def test_trainer_with_an_index_column(tmp_path: Path) -> None:
    model, data = _model(), _data()
    rows = [{"input_ids": data["input_ids"][i], "attention_mask": data["attention_mask"][i],
             "labels": int(data["labels"][i]), "idx": i} for i in range(N)]
    cache = ReferenceCache(N)
    model.set_reference_cache(cache)
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=8, num_train_epochs=3, logging_steps=3,
                             report_to="none", use_cpu=True, save_strategy="no", seed=0)
    trainer = NMTuneTrainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:8],
                            reference_key_column="idx")
    trainer.train()
    # epoch 1: 24 misses; epoch 2: one verified batch (8 misses), 16 hits; epoch 3: 24 hits
    assert (cache.hits, cache.misses) == (40, 32)
    metrics = trainer.evaluate()
    assert (cache.hits, cache.misses) == (40, 32), "evaluation batches do not use the cache"
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    logged = [h for h in trainer.state.log_history if "nmtune_cache_hits" in h]
    assert logged and logged[-1]["nmtune_cache_hits"] == 40
