"""The reference-cache hook of NMTuneLoraModel and NMTuneTrainer, with a small in-test cache.

The real cache is ``nmtune.reference_cache``; here a dictionary stands in for it, to pin
down the protocol: ``check_model(model)``, ``lookup(keys) -> Tensor | None``,
``store(keys, features)``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason='needs the "lora" extra: pip install "nmtune[lora]"')
pytest.importorskip("transformers", reason='needs the "lora" extra')

from transformers import BertConfig, BertModel, TrainingArguments  # noqa: E402

from nmtune import NMTuneLoss  # noqa: E402
from nmtune.integrations import NMTuneTrainer  # noqa: E402
from nmtune.lora import wrap_lora  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


class DictCache:
    """In-memory reference cache following the protocol; counts its calls."""

    def __init__(self) -> None:
        self.rows: dict[int, torch.Tensor] = {}
        self.checked: list[object] = []
        self.hits = self.misses = self.lookups = 0

    def check_model(self, model: torch.nn.Module) -> None:
        if not model.reference_eval:
            raise ValueError("the reference path has dropout")
        self.checked.append(model)

    def lookup(self, keys: torch.Tensor) -> torch.Tensor | None:
        self.lookups += 1
        ks = keys.tolist()
        if len(set(ks)) != len(ks):
            raise ValueError(f"duplicated keys in a batch: {ks}")
        if all(k in self.rows for k in ks):
            self.hits += len(ks)
            return torch.stack([self.rows[k] for k in ks]).to(keys.device)
        self.misses += len(ks)
        return None

    def store(self, keys: torch.Tensor, features: torch.Tensor) -> None:
        for k, f in zip(keys.tolist(), features):
            self.rows[k] = f.detach().clone()


def _model():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.0)
    model = wrap_lora(BertModel(cfg), num_classes=3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def _batch(n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 100, (n, 8), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _CountPasses:
    """Counts forward passes of the base model (the adapted one and the reference one)."""

    def __init__(self, model) -> None:
        self.n = 0
        model.base_model.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.n += 1


def test_set_reference_cache_checks_the_model_once_and_none_removes_it() -> None:
    model, cache = _model(), DictCache()
    model.set_reference_cache(cache)
    assert cache.checked == [model] and model.reference_cache is cache
    model.set_reference_cache(None)
    assert model.reference_cache is None
    with pytest.raises(TypeError, match=r"lacks \['lookup', 'store'\]"):
        model.set_reference_cache(type("Half", (), {"check_model": lambda self, m: None})())
    noisy = wrap_lora(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=64)), num_classes=2, reference_eval=False)
    with pytest.raises(ValueError, match="dropout"):
        noisy.set_reference_cache(DictCache())
    assert noisy.reference_cache is None  # refused: not set


def test_miss_runs_and_stores_hit_skips_the_reference_pass_with_equal_loss_and_gradients() -> None:
    model = _model()
    plain = copy.deepcopy(model)
    cache = DictCache()
    model.set_reference_cache(cache)
    passes = _CountPasses(model)
    batch, keys, y = _batch(), torch.arange(10, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    crit = NMTuneLoss(lambda_=1.0)
    for m in (model, plain):
        m.train()
    torch.manual_seed(1)
    expected = plain(**batch)
    loss_plain = crit(expected.logits, y, expected.features, expected.reference)
    loss_plain.backward()
    for epoch in range(2):  # epoch 0 misses and stores, epoch 1 hits
        model.zero_grad()
        before = passes.n
        torch.manual_seed(1)  # the same dropout mask in the adapted pass as the uncached run
        out = model(**batch, reference_keys=keys)
        assert passes.n - before == (2 if epoch == 0 else 1)  # a hit skips the reference forward
        assert torch.equal(out.reference, expected.reference) and torch.equal(out.features, expected.features)
        loss = crit(out.logits, y, out.features, out.reference)
        loss.backward()
        assert torch.equal(loss, loss_plain)
        grads = dict(plain.trainable_parameters())
        for n, p in model.trainable_parameters():
            assert torch.equal(p.grad, grads[n].grad), n
    assert (cache.misses, cache.hits) == (6, 6) and sorted(cache.rows) == list(range(10, 16))


def test_keys_are_required_checked_and_refused_without_a_cache() -> None:
    model = _model().eval()
    batch = _batch()
    with pytest.raises(ValueError, match="no reference cache is set"):
        model(**batch, reference_keys=torch.arange(6))
    cache = DictCache()
    model.set_reference_cache(cache)
    with pytest.raises(ValueError, match="forward needs reference_keys"):
        model(**batch)
    with pytest.raises(TypeError, match="1-D integer tensor"):
        model(**batch, reference_keys=torch.arange(6.0))
    with pytest.raises(TypeError, match="1-D integer tensor"):
        model(**batch, reference_keys=[0, 1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="4 key\\(s\\) for a batch of 6 row\\(s\\)"):
        model(**batch, reference_keys=torch.arange(4))
    with pytest.raises(ValueError, match="duplicated keys"):
        model(**batch, reference_keys=torch.tensor([0, 0, 1, 2, 3, 4]))
    out = model(**batch, use_reference_cache=False)  # another dataset: computed, nothing stored
    assert out.reference is not None and cache.rows == {} and cache.lookups == 2
    assert model(**batch, compute_reference=False).reference is None


def _rows(n: int, seed: int = 0, with_key: bool = True) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        row = {"input_ids": torch.randint(1, 100, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
               "labels": torch.tensor(i % 3), "unused_text_length": torch.tensor(8)}
        if with_key:
            row["idx"] = torch.tensor(i)
        rows.append(row)
    return rows


def _collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def test_trainer_passes_the_key_column_and_logs_hits_and_misses(tmp_path: Path) -> None:
    model = _model()
    cache = DictCache()
    model.set_reference_cache(cache)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, per_device_eval_batch_size=8,
        learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
        logging_steps=2, num_train_epochs=2, seed=0,
    )
    trainer = NMTuneTrainer(model=model, args=args, train_dataset=_rows(16), eval_dataset=_rows(8, seed=9),
                            data_collator=_collate, reference_key_column="idx")
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [(h["nmtune_cache_hits"], h["nmtune_cache_misses"]) for h in logs] == [(0, 16), (16, 16)]
    assert sorted(cache.rows) == list(range(16))  # the column reached the model; unused columns were removed
    lookups = cache.lookups
    metrics = trainer.evaluate()  # evaluation keys are not training keys: the cache is bypassed
    assert cache.lookups == lookups and "eval_nmtune_consistency" in metrics
    assert trainer.predict(_rows(8, seed=9)).predictions.shape == (8, 3)
    assert cache.lookups == lookups
    no_key = NMTuneTrainer(model=model, args=args, train_dataset=_rows(16, with_key=False),
                           data_collator=_collate, reference_key_column="idx")
    with pytest.raises(ValueError, match="reference_key_column='idx' but the batch has no such column"):
        no_key.train()
