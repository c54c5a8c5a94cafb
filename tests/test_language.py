"""Tests of the language study (nmtune_study.language and its helpers), offline, CPU."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nmtune_study import encoders as E
from nmtune_study import language as L
from nmtune_study.data import make_wordnet_task as M
from nmtune_study.data import text as D

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# --------------------------------------------------------------------------- file helpers
def _write(path: Path, rows: list[dict], fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",",
                           **({"quoting": csv.QUOTE_NONE, "escapechar": "\\"} if fmt == "tsv" else {}))
        w.writeheader()
        w.writerows(rows)


def _rows(cols: tuple[str, ...], labels: list) -> list[dict]:
    return [{**{c: f"{c} text {i}, with a comma" for c in cols}, "label": lab} for i, lab in enumerate(labels)]


# Per GLUE task: (labels as written in the train file, expected ids, validation labels).
GLUE_CASES = {
    "cola": (["acceptable", "unacceptable", 1, 0], [1, 0, 1, 0], [0, 1]),
    "sst2": (["positive", "negative", "1", "0"], [1, 0, 1, 0], [1, 0]),
    "mrpc": (["equivalent", "not_equivalent", 1, 0], [1, 0, 1, 0], [1, 1]),
    "stsb": (["4.5", 0.0, "2.25", 5], [4.5, 0.0, 2.25, 5.0], [1.0, 3.0]),
    "qqp": (["duplicate", "not_duplicate", 0, 1], [1, 0, 0, 1], [0, 1]),
    "mnli": (["entailment", "neutral", "contradiction", 2], [0, 1, 2, 2], [0, 2]),
    "qnli": (["entailment", "not_entailment", 0, 1], [0, 1, 0, 1], [1, 0]),
    "rte": (["entailment", "not_entailment", 1, 0], [0, 1, 1, 0], [0, 0]),
}
# Per GLUE-X OOD set: (native columns, labels as written, expected ids).
OOD_CASES = {
    "grammar_test": (("sentence",), ["grammatical", "ungrammatical", 1], [1, 0, 1]),
    "imdb": (("text",), ["pos", "neg", 0], [1, 0, 0]),
    "qqp": (("question1", "question2"), ["duplicate", 0, 1], [1, 0, 1]),
    "mnli_mismatched": (("premise", "hypothesis"), ["neutral", 0, 2], [1, 0, 2]),
    "snli": (("premise", "hypothesis"), ["contradiction", -1, "entailment"], [2, 0]),  # -1: no gold label
    "sick": (("sentence_A", "sentence_B"), ["entailment", "neutral", "contradiction"], [0, 1, 2]),
    "newsqa": (("question", "sentence"), ["not_entailment", "entailment", 1], [1, 0, 1]),
    "scitail": (("premise", "hypothesis"), ["entails", "neutral", "entails"], [0, 1, 0]),
    "hans": (("premise", "hypothesis"), ["non-entailment", "entailment", 1], [1, 0, 1]),
}


@pytest.fixture()
def glue_dir(tmp_path: Path) -> Path:
    fmts = ["jsonl", "csv", "tsv"]
    for k, (task, (train_labels, _, val_labels)) in enumerate(GLUE_CASES.items()):
        cols = D.GLUE_TASKS[task].columns
        _write(tmp_path / task / f"train.{fmts[k % 3]}", _rows(cols, train_labels), fmts[k % 3])
        val_name = "validation_matched" if task == "mnli" else "validation"
        _write(tmp_path / task / f"{val_name}.{fmts[(k + 1) % 3]}", _rows(cols, val_labels), fmts[(k + 1) % 3])
    for k, (name, (cols, labels, _)) in enumerate(OOD_CASES.items()):
        _write(tmp_path / name / f"test.{fmts[k % 3]}", _rows(cols, labels), fmts[k % 3])
    return tmp_path


# --------------------------------------------------------------------------- GLUE / GLUE-X loading
@pytest.mark.parametrize("task", list(GLUE_CASES))
def test_glue_local_files_load_with_label_mapping_and_paired_ood(glue_dir: Path, task: str) -> None:
    t = D.load_glue_task(task, data_dir=glue_dir)
    _, expected, val = GLUE_CASES[task]
    np.testing.assert_allclose(t.train.labels, expected)
    np.testing.assert_allclose(t.id_test.labels, val)
    spec = D.GLUE_TASKS[task]
    assert t.metric == spec.metric
    assert t.num_classes == (1 if task == "stsb" else len(spec.label_names))
    assert t.is_pair == (len(spec.columns) == 2)
    assert t.train.texts[0] == f"{spec.columns[0]} text 0, with a comma"
    if t.is_pair:
        assert t.train.text_pairs[1] == f"{spec.columns[1]} text 1, with a comma"
    paired = {n for n, o in D.GLUE_X_OOD.items() if o.task == task}
    assert set(t.ood) == paired
    for name, split in t.ood.items():
        cols, _, ids = OOD_CASES[name]
        np.testing.assert_array_equal(split.labels, ids)
        assert split.texts[0] == f"{cols[0]} text 0, with a comma"  # native column names accepted
        assert (split.text_pairs is not None) == (len(cols) == 2)


def test_glue_x_pairs_are_the_papers() -> None:
    pairs = {}
    for name, spec in D.GLUE_X_OOD.items():
        pairs.setdefault(spec.task, set()).add(name)
    assert pairs == {
        "cola": {"grammar_test"}, "sst2": {"imdb"}, "mrpc": {"qqp"},
        "mnli": {"mnli_mismatched", "snli", "sick"}, "qnli": {"newsqa"}, "rte": {"scitail", "hans"},
    }


def test_glue_bad_inputs_raise_clear_errors(glue_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown GLUE task 'colaa'"):
        D.load_glue_task("colaa", data_dir=glue_dir)
    with pytest.raises(ValueError, match=r"not paired with 'sst2'"):
        D.load_glue_task("sst2", data_dir=glue_dir, ood=["snli"])
    bad = tmp_path / "bad"
    _write(bad / "rte" / "train.jsonl", _rows(("sentence1", "sentence2"), ["maybe"]), "jsonl")
    _write(bad / "rte" / "validation.jsonl", _rows(("sentence1", "sentence2"), [0]), "jsonl")
    with pytest.raises(ValueError, match="label 'maybe' in row 0"):
        D.load_glue_task("rte", data_dir=bad)
    _write(bad / "cola" / "train.jsonl", [{"text": "x", "label": 1}], "jsonl")
    _write(bad / "cola" / "validation.jsonl", [{"sentence": "x", "label": 1}], "jsonl")
    with pytest.raises(ValueError, match=r"expected one of \['sentence'\], found columns \['label', 'text'\]"):
        D.load_glue_task("cola", data_dir=bad)
    with pytest.raises(FileNotFoundError, match="no train file for 'sst2'"):
        D.load_glue_task("sst2", data_dir=bad)


def test_glue_hub_path_names_the_datasets_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(ModuleNotFoundError, match="pip install datasets"):
        D.load_glue_task("sst2")


def test_glue_hub_path_maps_class_label_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """With `datasets` present, ClassLabel ints go through their names (SciTail-style order differs)."""
    import types

    class _Label:
        def __init__(self, names: list[str]) -> None:
            self.names = names

    class _Ds(list):
        def __init__(self, rows: list[dict], names: list[str] | None) -> None:
            super().__init__(rows)
            self.features = {"label": _Label(names)} if names else {}

    calls = []

    def load_dataset(path: str, config: str | None, split: str) -> _Ds:
        calls.append((path, config, split))
        if path == D.GLUE_HUB:
            rows = [{"sentence1": f"s{i}", "sentence2": f"t{i}", "label": i % 2} for i in range(4)]
            return _Ds(rows, ["entailment", "not_entailment"])
        if path == "allenai/scitail":  # label strings, as its tsv_format
            return _Ds([{"premise": "p", "hypothesis": "h", "label": "entails"},
                        {"premise": "p", "hypothesis": "h", "label": "neutral"}], None)
        # HANS with a reversed ClassLabel order: 0 = non-entailment here
        return _Ds([{"premise": "p", "hypothesis": "h", "label": 0}], ["non-entailment", "entailment"])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    t = D.load_glue_task("rte")
    assert calls[:2] == [(D.GLUE_HUB, "rte", "train"), (D.GLUE_HUB, "rte", "validation")]
    assert ("allenai/scitail", "tsv_format", "test") in calls
    np.testing.assert_array_equal(t.train.labels, [0, 1, 0, 1])
    np.testing.assert_array_equal(t.ood["scitail"].labels, [0, 1])
    np.testing.assert_array_equal(t.ood["hans"].labels, [1])
    assert t.ood["hans"].text_pairs == ["h"]
    with pytest.raises(ValueError, match="'newsqa' set is not on the hub"):
        D.load_glue_task("qnli", ood=["newsqa"])


def test_glue_subsampling_is_seeded(glue_dir: Path) -> None:
    a = D.load_glue_task("mnli", data_dir=glue_dir, max_train=2, seed=3)
    b = D.load_glue_task("mnli", data_dir=glue_dir, max_train=2, seed=3)
    assert len(a.train) == 2 and a.train.texts == b.train.texts
    assert a.dataset_id() == b.dataset_id() != D.load_glue_task("mnli", data_dir=glue_dir).dataset_id()


# --------------------------------------------------------------------------- metrics
def test_metrics_match_hand_computed_values() -> None:
    # CoLA: TP=1, TN=2, FP=0, FN=1 -> (1*2 - 0*1) / sqrt(1*2*2*3) = 2 / sqrt(12)
    m = D.task_metrics("matthews", [1, 1, 0, 0], [1, 0, 0, 0])
    assert m["matthews"] == pytest.approx(2 / np.sqrt(12)) and m["score"] == m["matthews"]
    assert m["accuracy"] == pytest.approx(0.75)
    assert D.task_metrics("matthews", [0, 1, 0, 1], [0, 0, 0, 0])["matthews"] == 0.0  # constant prediction
    # MRPC / QQP: TP=2, FP=1, FN=1 -> F1 = 4 / 6
    m = D.task_metrics("f1", [1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(0.6)
    # STS-B: centred [-1.5,-.5,.5,1.5] . [-1.5,.5,-.5,1.5] = 4, norms^2 = 5 -> 0.8
    m = D.task_metrics("pearson_spearman", [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])
    assert m["pearson"] == pytest.approx(0.8) and m["spearman"] == pytest.approx(0.8)
    # Ties: ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4] -> 4.5 / sqrt(4.5 * 5)
    m = D.task_metrics("pearson_spearman", [1.0, 2.0, 2.0, 3.0], [10.0, 20.0, 30.0, 40.0])
    assert m["spearman"] == pytest.approx(4.5 / np.sqrt(22.5))
    assert m["score"] == pytest.approx((m["pearson"] + m["spearman"]) / 2)
    # MNLI: accuracy; macro-F1 over classes 0, 1, 2 = mean(1, 4/5, 0)
    m = D.task_metrics("accuracy", [0, 1, 2, 1], [0, 1, 1, 1])
    assert m["accuracy"] == pytest.approx(0.75) and m["macro_f1"] == pytest.approx((1 + 0.8 + 0) / 3)
    # Multiclass MCC agrees with scikit-learn.
    from sklearn.metrics import matthews_corrcoef

    y, p = [0, 1, 2, 2, 1, 0, 2], [0, 2, 2, 1, 1, 0, 0]
    assert D.task_metrics("matthews", y, p)["matthews"] == pytest.approx(matthews_corrcoef(y, p))
    with pytest.raises(ValueError, match=r"got shapes \(2,\) and \(3,\)"):
        D.task_metrics("accuracy", [0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="'bleu'"):
        D.task_metrics("bleu", [0], [0])
    assert D.primary_score("matthews") == "matthews" and D.primary_score("pearson_spearman") == "score"


# --------------------------------------------------------------------------- WordNet
def _wn_line(offset: int, lex: int, pos: str, word: str, gloss: str) -> str:
    return f"{offset:08d} {lex:02d} {pos} 01 {word} 0 000 | {gloss}  \n"


def test_wordnet_task_from_tiny_files(tmp_path: Path) -> None:
    lines = ["  1 This software and database is being provided ... licence header\n"]
    off = 1000
    for lex, word in ((5, "animal"), (13, "food"), (20, "plant")):
        for i in range(6):
            off += 1
            lines.append(_wn_line(off, lex, "n", f"{word}{i}", f'a {word} definition {i}; "the {word} example number {i}"; "ab"'))
    (tmp_path / "data.noun").write_text("".join(lines), encoding="utf-8")
    (tmp_path / "data.verb").write_text(_wn_line(9, 38, "v", "run", 'move fast; "he ran home quickly"'), encoding="utf-8")
    t = D.load_wordnet_task(tmp_path, n_train=2, n_test=1, n_ood=2, seed=0)
    assert t.label_names == ("noun.animal", "noun.food", "noun.plant")  # verb.motion: too few synsets
    assert (len(t.train), len(t.id_test), len(t.ood["usage_examples"])) == (6, 3, 6)
    for split in (t.train, t.id_test):
        for text, lab in zip(split.texts, split.labels):
            assert text.startswith(f"a {t.label_names[lab][5:]} definition") and '"' not in text
    for text, lab in zip(t.ood["usage_examples"].texts, t.ood["usage_examples"].labels):
        assert text.startswith(f"the {t.label_names[lab][5:]} example")  # 'ab' dropped (min_words)
    for lab in range(3):  # OOD sentences come from synsets outside train and ID test
        seen = {s.rsplit(" ", 1)[1] for s, y in zip(t.train.texts + t.id_test.texts,
                                                    list(t.train.labels) + list(t.id_test.labels)) if y == lab}
        ood = {s.rsplit(" ", 1)[1] for s, y in zip(t.ood["usage_examples"].texts, t.ood["usage_examples"].labels) if y == lab}
        assert not seen & ood
    assert D.load_wordnet_task(tmp_path, n_train=2, n_test=1, n_ood=2).dataset_id() == t.dataset_id()
    with pytest.raises(FileNotFoundError, match="apt-get install -y wordnet-base"):
        D.load_wordnet_task(tmp_path / "missing")
    with pytest.raises(ValueError, match="only 0 lexicographer classes"):
        D.load_wordnet_task(tmp_path, n_train=10, n_test=1, n_ood=1)


def test_shipped_wordnet_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """The task the study runs with no WordNet install: classes, split sizes, disjoint splits, and
    the same content (dataset_id) as the committed results, which were encoded from Debian's files."""
    monkeypatch.delenv("NMTUNE_WORDNET_DIR", raising=False)
    t = D.load_wordnet_task()
    ood = t.ood["usage_examples"]
    assert t.name == "wordnet" and t.metric == "accuracy" and list(t.ood) == ["usage_examples"]
    assert t.num_classes == len(t.label_names) == 35 and len(set(t.label_names)) == 35
    assert set(t.label_names) <= set(D.LEXNAMES)
    assert t.label_names[:2] == ("noun.act", "noun.artifact") and t.label_names[-1] == "verb.stative"
    assert (len(t.train), len(t.id_test), len(ood)) == (3500, 1400, 2100)
    for split, per_class in ((t.train, 100), (t.id_test, 40), (ood, 60)):
        assert np.bincount(split.labels, minlength=35).tolist() == [per_class] * 35
        assert all(text.strip() == text and text for text in split.texts)
    train, test, usage = set(t.train.texts), set(t.id_test.texts), set(ood.texts)
    assert not train & test and not train & usage and not test & usage  # no text in two splits
    assert all('"' not in text for text in t.train.texts + t.id_test.texts)  # definitions lose their quotes
    assert all(len(text.split()) >= 3 for text in ood.texts)
    committed = json.loads((EXAMPLES / "results" / "language" / "results.json").read_text(encoding="utf-8"))
    assert f'"dataset_id": "{t.dataset_id()}"' in json.dumps(committed)
    assert D.read_wordnet_task(D.WORDNET_TASK_FILE).dataset_id() == t.dataset_id()
    with pytest.raises(ValueError, match=r"\{'n_train': 20\} needs the WordNet 3.0 database"):
        D.load_wordnet_task(n_train=20)


def test_wordnet_task_file_round_trip(tmp_path: Path) -> None:
    """Writing the shipped task again gives the same bytes; a damaged file is refused."""
    import gzip

    with gzip.open(D.WORDNET_TASK_FILE, "rt", encoding="utf-8") as fh:
        header = json.loads(fh.readline())
    t = D.read_wordnet_task()
    out = tmp_path / "task.jsonl.gz"
    D.write_wordnet_task(t, out, params=header["params"], source=header["source"])
    assert out.read_bytes() == D.WORDNET_TASK_FILE.read_bytes()
    lines = gzip.decompress(out.read_bytes()).decode("utf-8").splitlines()
    lines[5] = lines[5].replace('"label": 0', '"label": 1')
    out.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode("utf-8")))
    with pytest.raises(ValueError, match="content gives dataset_id"):
        D.read_wordnet_task(out)
    with pytest.raises(FileNotFoundError, match="make_wordnet_task"):
        D.read_wordnet_task(tmp_path / "missing.jsonl.gz")


def test_make_wordnet_task_script(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """nmtune_study.data.make_wordnet_task on a synthetic WordNet folder: the file it writes loads back
    as the task the Debian-path loader gives, a rebuild is byte-identical, --check spots a change."""
    wn = tmp_path / "wordnet"
    wn.mkdir()
    noun = ["  1 licence header\n"] + [
        _wn_line(1000 + 300 * k + i, lex, "n", f"{word}{i}", f'a {word} number {i}; "the {word} seen at {i}"')
        for k, (lex, word) in enumerate(((6, "artifact"), (13, "food"))) for i in range(210)]
    (wn / "data.noun").write_text("".join(noun), encoding="utf-8")
    (wn / "data.verb").write_text(_wn_line(9, 38, "v", "run", 'move fast; "he ran home quickly"'), encoding="utf-8")
    out = tmp_path / "task.jsonl.gz"
    assert M.main(["--wordnet-dir", str(wn), "--out", str(out)]) == 0
    assert "2 classes, train 200, test 80, ood:usage_examples 120" in capsys.readouterr().out
    t = D.read_wordnet_task(out)
    ref = D.load_wordnet_task(wn)
    assert t.dataset_id() == ref.dataset_id() and t.label_names == ("noun.artifact", "noun.food")
    assert t.train.texts == ref.train.texts and t.ood["usage_examples"].texts == ref.ood["usage_examples"].texts
    assert M.main(["--wordnet-dir", str(wn), "--out", str(out), "--check"]) == 0
    out.write_bytes(out.read_bytes() + b"\0")
    assert M.main(["--wordnet-dir", str(wn), "--out", str(out), "--check"]) == 1


# --------------------------------------------------------------------------- API callable encoder
class _FakeApi:
    """Deterministic embeddings from the text; fails on chosen call numbers."""

    def __init__(self, dim: int = 6, fail_on: set[int] | None = None, shape_bug: int | None = None) -> None:
        self.dim, self.fail_on, self.shape_bug, self.calls, self.texts = dim, fail_on or set(), shape_bug, 0, 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        if self.calls in self.fail_on:
            raise ConnectionError(f"transient failure on call {self.calls}")
        self.texts += len(texts)
        out = np.array([[(hash(t) >> (4 * k)) % 17 for k in range(self.dim)] for t in texts], dtype=np.float64)
        return out[:, : self.shape_bug] if self.shape_bug is not None else out


def test_callable_encoder_retries_with_backoff_then_gives_up() -> None:
    sleeps: list[float] = []
    api = _FakeApi(fail_on={1, 2, 4})
    enc = E.CallableEncoder(api, name="fake", batch_size=3, max_attempts=3, backoff=0.5, sleep=sleeps.append)
    x = enc.encode([f"t{i}" for i in range(5)])
    assert x.shape == (5, 6) and x.dtype == np.float32
    assert sleeps == [0.5, 1.0, 0.5] and api.calls == 5
    np.testing.assert_array_equal(x, E.CallableEncoder(_FakeApi(), name="f").encode([f"t{i}" for i in range(5)]))
    always = E.CallableEncoder(_FakeApi(fail_on=set(range(1, 10))), name="down", max_attempts=2, sleep=lambda s: None)
    with pytest.raises(ConnectionError, match="call 2"):
        always.encode(["a"])
    not_transient = E.CallableEncoder(lambda xs: 1 / 0, name="bug", retry_on=(ConnectionError,), sleep=sleeps.append)
    n_sleeps = len(sleeps)
    with pytest.raises(ZeroDivisionError):
        not_transient.encode(["a"])
    assert len(sleeps) == n_sleeps


def test_callable_encoder_wrong_shapes_raise_value_errors() -> None:
    with pytest.raises(ValueError, match=r"returned shape \(3,\) for a batch of 3 texts; expected \(3, D\)"):
        E.CallableEncoder(lambda xs: np.zeros(len(xs)), name="flat").encode(["a", "b", "c"])
    with pytest.raises(ValueError, match=r"returned shape \(2, 4\) for a batch of 3 texts"):
        E.CallableEncoder(lambda xs: np.zeros((2, 4)), name="short").encode(["a", "b", "c"])
    widths = iter([4, 5])
    with pytest.raises(ValueError, match=r"returned shape \(2, 5\) for a batch of 2 texts; expected \(2, 4\)"):
        E.CallableEncoder(lambda xs: np.zeros((len(xs), next(widths))), name="drift", batch_size=2).encode(list("abcd"))
    with pytest.raises(ValueError, match="non-finite"):
        E.CallableEncoder(lambda xs: np.full((len(xs), 2), np.nan), name="nan").encode(["a"])
    with pytest.raises(TypeError, match="fn must be callable"):
        E.CallableEncoder("not a function", name="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_attempts must be a positive int, got 0"):
        E.CallableEncoder(lambda xs: xs, name="x", max_attempts=0)


# --------------------------------------------------------------------------- cache
def test_cache_second_run_calls_encoder_zero_times(tmp_path: Path) -> None:
    texts = [f"sentence {i}" for i in range(10)]
    api = _FakeApi()
    enc = E.CallableEncoder(api, name="fake", batch_size=4)
    x1, s1 = E.encode_cached(enc, texts, cache_dir=tmp_path, dataset_id="d1", split="train", chunk_size=3)
    assert s1["texts_encoded"] == 10 and s1["chunks"] == 4 and api.calls > 0
    calls = api.calls
    x2, s2 = E.encode_cached(enc, texts, cache_dir=tmp_path, dataset_id="d1", split="train", chunk_size=3)
    assert api.calls == calls and s2["texts_encoded"] == 0 and s2["chunks_cached"] == 4
    np.testing.assert_array_equal(x1, x2)
    E.encode_cached(enc, texts, cache_dir=tmp_path, dataset_id="d1", split="test", chunk_size=3)
    assert api.calls > calls  # another split is another key
    with pytest.raises(ValueError, match="holds n=10, chunk_size=3 but this call has n=9"):
        E.encode_cached(enc, texts[:9], cache_dir=tmp_path, dataset_id="d1", split="train", chunk_size=3)


def test_cache_resumes_after_a_crash_mid_way(tmp_path: Path) -> None:
    texts = [f"sentence {i}" for i in range(10)]
    reference = E.CallableEncoder(_FakeApi(), name="fake").encode(texts)
    crashing = E.CallableEncoder(_FakeApi(fail_on={3}), name="fake", batch_size=2, max_attempts=1)
    with pytest.raises(ConnectionError):  # chunk size 4: chunk 0 done (calls 1-2), chunk 1 crashes
        E.encode_cached(crashing, texts, cache_dir=tmp_path, dataset_id="d", split="s", chunk_size=4)
    api = _FakeApi()
    x, stats = E.encode_cached(E.CallableEncoder(api, name="fake", batch_size=2), texts, cache_dir=tmp_path,
                               dataset_id="d", split="s", chunk_size=4)
    assert stats["chunks_cached"] == 1 and stats["texts_encoded"] == 6 and api.texts == 6
    np.testing.assert_array_equal(x, reference)
    assert not list(tmp_path.rglob("*.tmp.npy"))


# --------------------------------------------------------------------------- pooling
def test_pooling_cls_mean_last_with_left_and_right_padding() -> None:
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    torch.testing.assert_close(E._pool(h, right, "cls"), h[:, 0])
    torch.testing.assert_close(E._pool(h, right, "mean"), torch.stack([h[0, :3].mean(0), h[1, :2].mean(0)]))
    torch.testing.assert_close(E._pool(h, right, "last"), torch.stack([h[0, 2], h[1, 1]]))
    torch.testing.assert_close(E._pool(h, left, "last"), torch.stack([h[0, 3], h[1, 3]]))
    with pytest.raises(ValueError, match="pooling must be one of .* got 'max'"):
        E.TransformersEncoder("unused", pooling="max")


# --------------------------------------------------------------------------- end to end
def test_study_on_stsb_files_with_an_api_encoder(tmp_path: Path) -> None:
    """Regression (STS-B) through NMTuneLoss(task_loss=MSE), sentence pairs, an API-style encoder."""
    rows = [{"sentence1": f"a {i}", "sentence2": f"b {i % 7}", "label": (i % 6) * 1.0} for i in range(40)]
    _write(tmp_path / "glue" / "stsb" / "train.jsonl", rows, "jsonl")
    _write(tmp_path / "glue" / "stsb" / "validation.jsonl", rows[:12], "jsonl")
    api = _FakeApi(dim=8)
    enc = E.CallableEncoder(api, name="fake-api", batch_size=16)
    res = L.run_study(tmp_path / "out", task="stsb", encoder=enc, data_dir=tmp_path / "glue", seeds=(0, 1),
                      cache_dir=tmp_path / "cache", batch_size=16, epochs=2, log=None)
    stsb = res["tasks"]["stsb"]
    assert stsb["metric"] == "pearson_spearman" and set(stsb["methods"]) == {"lp", "mlp", "nmtune"}
    for agg in stsb["methods"].values():
        assert -100 <= agg["id_score"]["mean"] <= 100 and "id_acc" not in agg
    assert "Pearson/Spearman" in (tmp_path / "out" / "table.md").read_text()
    assert api.texts == 52  # 40 train + 12 validation, each pair once


@pytest.mark.slow
def test_transformers_mean_pooling_matches_sentence_transformers_minilm() -> None:
    texts = ["a small domesticated carnivore", "rain fell all day", "x"]
    hf = L.build_encoder("minilm", pooling="mean")
    st = E.SentenceTransformerEncoder(E.minilm_path())
    a, b = hf.encode(texts), st.encode(texts)
    assert a.shape == b.shape == (3, 384)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)  # all-MiniLM's pipeline: mean pooling, then normalise
    np.testing.assert_allclose(a, b, atol=1e-4)
    cls = L.build_encoder("minilm", pooling="cls").encode(texts)
    assert not np.allclose(cls, hf.encode(texts))
    pair = hf.encode(texts[:2], pairs=texts[1:])
    assert pair.shape == (2, 384) and not np.allclose(pair, hf.encode(texts[:2]))


@pytest.mark.slow
def test_tiny_end_to_end_with_the_real_minilm(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    committed = EXAMPLES / "results" / "language" / "results.json"
    before = committed.stat().st_mtime if committed.exists() else None
    monkeypatch.chdir(tmp_path)  # the default output goes under ./runs/, never into the checkout
    assert L.main(["--tiny"]) == 0
    assert "| NMTune |" in capsys.readouterr().out
    out = tmp_path / "runs" / "language"
    assert (out / "cache").is_dir()
    assert (committed.stat().st_mtime if committed.exists() else None) == before
    saved = json.loads((out / "results.json").read_text())
    assert saved["meta"]["encoder"] == "hf-all-MiniLM-L6-v2-mean-128" and saved["meta"]["texts_encoded"] == 48
    tiny = saved["tasks"]["tiny"]
    assert set(tiny["methods"]) == {"lp", "mlp", "nmtune"} and len(tiny["per_seed"]["nmtune"]) == 2
    for agg in tiny["methods"].values():
        # 4 well-separated classes: a real sentence encoder gets most of the ID test right.
        assert agg["id_acc"]["mean"] >= 75.0
        assert 0.0 <= agg["ood_acc"]["mean"] <= 100.0 and agg["id_sve"]["mean"] > 0
    assert tiny["frozen_features"]["id"]["sve"] > 0
    table = (out / "table.md").read_text()
    assert "| NMTune |" in table and "paired by tuning seed" in table and saved["verdict"]
    again = L.run_study(tmp_path / "out2", tiny=True, methods=("lp",), seeds=(0,),
                        cache_dir=out / "cache", log=None)
    assert again["meta"]["texts_encoded"] == 0  # every split came from the cache
    assert again["tasks"]["tiny"]["methods"]["lp"]["id_acc"]["mean"] == pytest.approx(
        tiny["per_seed"]["lp"][0]["summary"]["id_acc"])


def test_refresh_results_is_explicit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr(L, "run_study", lambda out, **kw: seen.append(Path(out)) or {"tasks": {}})
    monkeypatch.setattr(L, "language_table", lambda res: "")
    monkeypatch.setattr(L, "committed_results", lambda: tmp_path / "committed")
    assert L.main(["--tiny"]) == 0
    L.main(["--tiny", "--refresh-results"])
    assert seen == [Path("runs") / "language", tmp_path / "committed" / "language"]
    with pytest.raises(SystemExit):
        L.main(["--refresh-results", "--out", str(tmp_path / "x")])


def test_paired_comparisons_over_tuning_seeds_with_test_set_error(tmp_path: Path) -> None:
    enc = E.CallableEncoder(_FakeApi(dim=8), name="fake-api", batch_size=64)
    res = L.run_study(tmp_path / "out", task="tiny", encoder=enc, seeds=(0, 1, 2), cache_dir=tmp_path / "cache",
                      batch_size=16, epochs=2, log=None)
    comps = res["comparisons"]
    assert {(c["key"], c["vs"]) for c in comps} == {(k, b) for k in ("id_acc", "ood_acc") for b in ("lp", "mlp")}
    per = res["tasks"]["tiny"]["per_seed"]
    for c in comps:
        diffs = [a["summary"][c["key"]] - b["summary"][c["key"]] for a, b in zip(per["nmtune"], per[c["vs"]])]
        assert c["estimate"] == pytest.approx(np.mean(diffs)) and c["n_tune"] == 3
        assert c["test_se"] is not None and c["test_se"] >= 0
        assert c["ci_low"] <= c["seed_low"] + 1e-9 and c["ci_high"] >= c["seed_high"] - 1e-9
        assert c["verdict"] in ("reproduced", "contradicted", "inconclusive")
    assert "_correct" not in json.dumps(res)
    assert "combined 95% CI" in (tmp_path / "out" / "table.md").read_text()
