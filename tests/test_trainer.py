"""NMTuneTrainer: compute_loss signature, logged components, no per-step sync, GA scaling,
checkpoints of adapter + head, activation checkpointing. Offline, CPU, tiny BERT."""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason='needs the "lora" extra: pip install "nmtune[lora]"')
pytest.importorskip("transformers", reason='needs the "lora" extra')
pytest.importorskip("accelerate", reason='needs the "lora" extra')

from transformers import BertConfig, BertModel, TrainingArguments  # noqa: E402

from nmtune import NMTuneConfig, NMTuneLoss  # noqa: E402
from nmtune.integrations import NMTuneTrainer  # noqa: E402
from nmtune.integrations.transformers import LOGGED_COMPONENTS  # noqa: E402
from nmtune.lora import load_lora, wrap_lora  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _base(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertModel(cfg)


def _model(config="paper", seed: int = 0):
    model = wrap_lora(_base(seed), num_classes=3, config=config)
    with torch.no_grad():  # a non-trivial adapter, so Z != F from the start
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def _data(n: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(1, 100, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
         "labels": torch.tensor(i % 3)}
        for i in range(n)
    ]


def _collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _args(tmp_path: Path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, per_device_eval_batch_size=8,
        learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
        logging_steps=2, max_steps=4, seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def test_compute_loss_accepts_num_items_in_batch_and_adds_the_regularizer(tmp_path: Path) -> None:
    params = inspect.signature(NMTuneTrainer.compute_loss).parameters
    assert list(params)[1:] == ["model", "inputs", "return_outputs", "num_items_in_batch"]
    model = _model().eval()
    trainer = NMTuneTrainer(model=model, args=_args(tmp_path), train_dataset=_data())
    batch = _collate(_data(8))
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(8))
        loss_none, outputs = trainer.compute_loss(model, batch, return_outputs=True)
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        expected = NMTuneLoss()(out.logits, batch["labels"], out.features, out.reference)
        task = torch.nn.functional.cross_entropy(out.logits, batch["labels"])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss_none, expected)
    assert set(outputs) == {"logits"} and outputs["logits"].shape == (8, 3)
    assert not torch.allclose(loss, task)  # the regularizer is really added
    assert "labels" in batch  # the caller's batch is not mutated


def test_components_accumulate_on_device_and_log_means_without_per_step_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model()
    # check_finite=False: the core's NaN check is the one (documented) host sync of the loss itself
    trainer = NMTuneTrainer(
        model=model, args=_args(tmp_path), train_dataset=_data(), nmtune_config=NMTuneConfig(check_finite=False)
    )
    crit = NMTuneLoss(check_finite=False)
    batches = [_collate(_data(16)[:8]), _collate(_data(16)[8:])]

    syncs: list[str] = []

    def spy(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("nmtune"):
                syncs.append(f"{caller}:{name}")
            return original(self, *a, **k)

        return wrapper

    for name in ("item", "tolist", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    model.train()
    expected = []
    for b in batches:
        trainer.compute_loss(model, b)
        with torch.no_grad():
            out = model(**{k: v for k, v in b.items() if k != "labels"})
            comp = crit(out.logits, b["labels"], out.features, out.reference, return_components=True)
        expected.append(torch.stack([getattr(comp, n).float() for n in LOGGED_COMPONENTS]))
    assert syncs == [], f"host syncs inside training steps: {syncs}"
    assert trainer._nmtune_terms.batches["train"] == 2
    assert trainer._nmtune_terms.sums["train"].device == next(model.parameters()).device
    monkeypatch.undo()

    logs = {"loss": 1.0}
    trainer.log(logs)
    mean = torch.stack(expected).mean(0)
    for i, name in enumerate(LOGGED_COMPONENTS):
        assert logs[f"nmtune_{name}"] == pytest.approx(mean[i].item(), rel=1e-4, abs=1e-6), name
    assert trainer._nmtune_terms.batches["train"] == 0  # reset after logging
    other = {"learning_rate": 0.1}
    trainer.log(other)
    assert not any(k.startswith("nmtune_") for k in other)


def test_train_logs_every_logging_step_and_evaluate_logs_eval_terms(tmp_path: Path) -> None:
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = NMTuneTrainer(
        model=model, args=_args(tmp_path, max_steps=4, logging_steps=2), train_dataset=_data(),
        eval_dataset=_data(8), data_collator=_collate,
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == [2, 4]
    for h in logged:
        assert all(f"nmtune_{n}" in h for n in LOGGED_COMPONENTS)
        assert h["nmtune_sve"] > 0 and h["nmtune_singular_value"] < 0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n or n.startswith("head.") for n in changed)
    metrics = trainer.evaluate()
    assert all(f"eval_nmtune_{n}" in metrics for n in LOGGED_COMPONENTS)
    assert "eval_loss" in metrics


def test_loss_is_a_per_batch_mean_scaled_for_gradient_accumulation(tmp_path: Path) -> None:
    model = _model()
    trainer = NMTuneTrainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=2), train_dataset=_data())
    assert trainer.model_accepts_loss_kwargs is False
    batch = _collate(_data(8))
    model.train()
    with torch.no_grad():
        full = trainer.compute_loss(model, batch)
    trainer.current_gradient_accumulation_steps = 2
    step = trainer.training_step(model, batch, num_items_in_batch=torch.tensor(8))
    torch.testing.assert_close(step, full / 2)


def test_checkpoints_hold_adapter_and_head_and_resume(tmp_path: Path) -> None:
    model = _model()
    trainer = NMTuneTrainer(
        model=model, args=_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=_data(), data_collator=_collate,
    )
    trainer.train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"adapter_model.safetensors", "nmtune_head.safetensors", "nmtune_lora.json"} <= files
    assert "model.safetensors" not in files  # no full copy of the frozen base
    batch = {k: v for k, v in _collate(_data(8)).items() if k != "labels"}
    model.eval()
    loaded = load_lora(_base(seed=0), ckpt).eval()  # same pre-trained base
    other = _model(seed=0)  # untrained adapter and head, overwritten by the resume
    resumed = NMTuneTrainer(model=other, args=_args(tmp_path), train_dataset=_data())
    resumed._load_from_checkpoint(str(ckpt))
    other.eval()
    with torch.no_grad():
        out, again, again2 = model(**batch), loaded(**batch), other(**batch)
    for a, b, c in zip(out, again, again2):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_activation_checkpointing_argument_reaches_the_backbone(tmp_path: Path) -> None:
    model = _model()
    fields = TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = _args(tmp_path, max_steps=1, logging_steps=1, **{name: True})
    trainer = NMTuneTrainer(model=model, args=args, train_dataset=_data(), data_collator=_collate)
    base = model.base_model
    flag = "is_activation_checkpointing" if hasattr(base, "is_activation_checkpointing") else (
        "is_gradient_checkpointing"
    )
    assert not getattr(base, flag)
    before = {n: p.detach().clone() for n, p in model.trainable_parameters()}
    trainer.train()
    assert getattr(base, flag)  # the Trainer switched it on through the wrapper
    assert any(not torch.equal(p, before[n]) for n, p in model.trainable_parameters() if "lora_A" in n)


def test_missing_reference_with_consistency_term_is_refused(tmp_path: Path) -> None:
    model = _model(config="none")  # wrapped without a reference
    assert model.compute_reference is False
    trainer = NMTuneTrainer(model=model, args=_args(tmp_path), train_dataset=_data(), nmtune_config="paper")
    with pytest.raises(ValueError, match="returned no reference features"):
        trainer.compute_loss(model, _collate(_data(8)))
    quiet = NMTuneTrainer(model=model, args=_args(tmp_path), train_dataset=_data())
    assert quiet.nmtune_loss.config.lambda_ == 0.0  # takes the config the model was wrapped with


# ----------------------------------------------------------------------------- ragged batches, logging
def test_ragged_last_batches_train_evaluate_and_predict_every_row(tmp_path: Path) -> None:
    """17 rows at batch 16 and 33 eval rows at batch 32: a last batch of one row is normal."""
    model = _model()
    trainer = NMTuneTrainer(
        model=model, train_dataset=_data(17), eval_dataset=_data(33, seed=1), data_collator=_collate,
        args=_args(tmp_path, per_device_train_batch_size=16, per_device_eval_batch_size=32, max_steps=-1,
                   num_train_epochs=1, logging_steps=1),
    )
    assert trainer.nmtune_loss.config.small_batch == "skip"
    head_before = model.head.weight.detach().clone()
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2]
    assert [h["nmtune_skipped_batches"] for h in steps] == [0, 1]
    assert steps[1]["nmtune_regularizer"] == 0.0 and steps[1]["nmtune_task"] > 0  # task loss only for that row
    assert steps[1]["loss"] == pytest.approx(steps[1]["nmtune_task"], rel=1e-4)
    assert not torch.equal(model.head.weight, head_before)
    final = trainer.state.log_history[-1]
    assert final["train_nmtune_skipped_batches"] == 1

    metrics = trainer.evaluate()
    assert metrics["eval_nmtune_skipped_batches"] == 1
    assert metrics["eval_nmtune_task"] + metrics["eval_nmtune_regularizer"] == pytest.approx(
        metrics["eval_loss"], rel=1e-5
    )
    pred = trainer.predict(_data(33, seed=1))
    assert pred.predictions.shape == (33, 3)  # no sample dropped
    assert pred.metrics["test_nmtune_skipped_batches"] == 1


def test_predict_does_not_leak_into_the_next_evaluate(tmp_path: Path) -> None:
    model = _model().eval()
    trainer = NMTuneTrainer(model=model, args=_args(tmp_path), eval_dataset=_data(8), data_collator=_collate)
    clean = trainer.evaluate()
    other = [dict(r, input_ids=r["input_ids"].flip(0)) for r in _data(24, seed=5)]
    pred = trainer.predict(other)
    assert pred.metrics["test_nmtune_task"] != pytest.approx(clean["eval_nmtune_task"])
    again = trainer.evaluate()
    for name in LOGGED_COMPONENTS:
        assert again[f"eval_nmtune_{name}"] == pytest.approx(clean[f"eval_nmtune_{name}"], rel=1e-6, abs=1e-9), name


def test_eval_terms_are_row_weighted_and_add_up_to_eval_loss(tmp_path: Path) -> None:
    model = _model().eval()
    trainer = NMTuneTrainer(
        model=model, args=_args(tmp_path, per_device_eval_batch_size=8), eval_dataset=_data(12, seed=2),
        data_collator=_collate,
    )
    metrics = trainer.evaluate()  # batches of 8 and 4 rows
    assert metrics["eval_nmtune_task"] + metrics["eval_nmtune_regularizer"] == pytest.approx(
        metrics["eval_loss"], rel=1e-5
    )
    crit = NMTuneLoss("paper", small_batch="skip")
    rows = _data(12, seed=2)
    parts = []
    with torch.no_grad():
        for chunk in (rows[:8], rows[8:]):
            b = _collate(chunk)
            out = model(**{k: v for k, v in b.items() if k != "labels"})
            parts.append((len(chunk), crit(out.logits, b["labels"], out.features, out.reference,
                                           return_components=True)))
    for name in LOGGED_COMPONENTS:
        weighted = sum(n * getattr(c, name).item() for n, c in parts) / 12
        assert metrics[f"eval_nmtune_{name}"] == pytest.approx(weighted, rel=1e-4, abs=1e-6), name


def test_a_run_shorter_than_logging_steps_still_logs_the_terms(tmp_path: Path) -> None:
    trainer = NMTuneTrainer(
        model=_model(), args=_args(tmp_path, max_steps=2, logging_steps=50), train_dataset=_data(),
        data_collator=_collate,
    )
    result = trainer.train()
    final = trainer.state.log_history[-1]
    assert "train_loss" in final
    for name in LOGGED_COMPONENTS:
        assert f"train_nmtune_{name}" in final, name
    assert final["train_nmtune_task"] + final["train_nmtune_regularizer"] == pytest.approx(
        result.training_loss, rel=1e-4
    )
    assert final["train_nmtune_skipped_batches"] == 0


def test_plain_transformers_trainer_points_to_nmtune_trainer(tmp_path: Path) -> None:
    from transformers import Trainer

    trainer = Trainer(model=_model(), args=_args(tmp_path), train_dataset=_data(), data_collator=_collate)
    with pytest.raises(ValueError, match="nmtune.integrations.NMTuneTrainer"):
        trainer.train()


def test_hand_written_loop_over_a_ragged_dataset(tmp_path: Path) -> None:
    """A wrap_lora model in a plain loop: small_batch="skip" trains the last row on its task loss."""
    model = _model()
    loader = torch.utils.data.DataLoader(_data(17), batch_size=16, collate_fn=_collate)
    crit = NMTuneLoss(small_batch="skip")
    opt = torch.optim.SGD([p for _, p in model.trainable_parameters()], lr=0.1)
    skipped, rows = torch.zeros(()), 0
    model.train()
    for batch in loader:
        labels = batch.pop("labels")
        out = model(**batch)
        comp = crit(out.logits, labels, out.features, out.reference, return_components=True)
        opt.zero_grad()
        comp.loss.backward()
        assert model.head.weight.grad.abs().sum() > 0  # every batch trains, the one-row batch too
        opt.step()
        skipped += comp.skipped
        rows += labels.shape[0]
    assert rows == 17 and skipped.item() == 1
    with pytest.raises(ValueError, match="z has 1 row"):  # the default keeps its clear error
        out = model(**{k: v for k, v in _collate(_data(1)).items() if k != "labels"})
        NMTuneLoss()(out.logits, torch.tensor([0]), out.features, out.reference)


def test_bad_trainer_inputs_get_clear_errors(tmp_path: Path) -> None:
    model = _model()
    with pytest.raises(TypeError, match="nmtune_config must be an NMTuneConfig, a preset name or None; got int"):
        NMTuneTrainer(model=model, args=_args(tmp_path), train_dataset=_data(), nmtune_config=3)
    with pytest.raises(ValueError, match="unknown preset|preset"):
        NMTuneTrainer(model=model, args=_args(tmp_path), train_dataset=_data(), nmtune_config="papr")
    with pytest.raises(TypeError, match="reference_key_column must be a column name"):
        NMTuneTrainer(model=model, args=_args(tmp_path), train_dataset=_data(), reference_key_column=5)
    with pytest.raises(TypeError, match="task_loss must be callable"):
        NMTuneTrainer(model=model, args=_args(tmp_path), train_dataset=_data(), task_loss="ce")
    trainer = NMTuneTrainer(model=model, args=_args(tmp_path), train_dataset=_data())
    batch = _collate(_data(8))
    with pytest.raises(ValueError, match="needs `labels` in each batch"):
        trainer.compute_loss(model, {k: v for k, v in batch.items() if k != "labels"})

    class NoFeatures(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None):
            return {"logits": torch.zeros(input_ids.shape[0], 3)}

    with pytest.raises(TypeError, match="needs a model whose output has tensors `logits` and `features`"):
        trainer.compute_loss(NoFeatures(), batch)
