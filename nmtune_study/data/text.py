"""Text classification data for the language study: GLUE, GLUE-X and an offline task.

Three sources, one shape (:class:`TextTask`):

* **GLUE** (in-domain) and the **GLUE-X** out-of-domain sets the NMTune paper pairs
  with each task (Table 11 of arXiv 2309.17002): CoLA -> Grammar Test, SST-2 -> IMDB,
  MRPC -> QQP, MNLI -> MNLI-mismatched / SNLI / SICK, QNLI -> NewsQA, RTE -> SciTail /
  HANS (STS-B and QQP have no GLUE-X pair in the paper). Loaded with the ``datasets``
  library when the Hugging Face hub is reachable, or from local CSV / TSV / JSONL files
  with the same columns (see :func:`load_glue_task`).
* **WordNet lexicographer categories** (:func:`load_wordnet_task`), the offline default:
  a synset's gloss (its definition) is a text labelled with the synset's lexicographer
  file (``noun.animal``, ``verb.motion``, ...); in-domain data are definitions of
  disjoint train / test synsets and the out-of-domain test set is the usage examples
  quoted in the glosses of synsets never seen in training (dictionary definitions ->
  example sentences). It is *not* GLUE. The task ships with the repository
  (``nmtune_study/data/wordnet_task.jsonl.gz``, package data, WordNet's licence beside it), so nothing
  needs installing; ``python -m nmtune_study.data.make_wordnet_task`` regenerates it from Debian's
  ``wordnet-base`` files, which :func:`load_wordnet_task` also reads (``wordnet_dir=``)
  for other parameters.
* :func:`tiny_task`, a 4-class hand-written set of a few dozen sentences with the same
  definition -> usage-example shift, for tests and ``--tiny`` runs.

Metrics follow GLUE (:func:`task_metrics`): Matthews correlation for CoLA, Pearson and
Spearman for STS-B, F1 (with accuracy) for MRPC / QQP, accuracy otherwise; each is
scikit-learn's or scipy's (:mod:`nmtune_study.common`).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from nmtune_study.common import binary_f1, macro_f1, matthews, pearson, spearman

__all__ = [
    "GLUE_TASKS",
    "GLUE_X_OOD",
    "LEXNAMES",
    "TextSplit",
    "TextTask",
    "WORDNET_TASK_FILE",
    "load_glue_task",
    "load_wordnet_task",
    "read_wordnet_task",
    "write_wordnet_task",
    "primary_score",
    "task_metrics",
    "tiny_task",
]


# --------------------------------------------------------------------------- types
@dataclasses.dataclass
class TextSplit:
    """Texts (or text pairs) with their labels.

    Attributes:
        name: split name, e.g. ``"train"``, ``"validation"``, ``"ood:imdb"``.
        texts: first segment of each example.
        text_pairs: second segment for sentence-pair tasks, else ``None``.
        labels: ``int64`` class ids, or ``float32`` scores for a regression task.
    """

    name: str
    texts: list[str]
    labels: np.ndarray
    text_pairs: list[str] | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels)
        if self.labels.ndim != 1 or len(self.labels) != len(self.texts):
            raise ValueError(
                f"split {self.name!r}: labels must have shape ({len(self.texts)},) to match "
                f"the texts, got shape {tuple(self.labels.shape)}"
            )
        if self.text_pairs is not None and len(self.text_pairs) != len(self.texts):
            raise ValueError(
                f"split {self.name!r}: {len(self.text_pairs)} text_pairs for "
                f"{len(self.texts)} texts; expected one pair per text"
            )

    def __len__(self) -> int:
        return len(self.texts)

    def fingerprint(self) -> str:
        """A short content hash (texts, pairs, labels) used to key embedding caches."""
        h = hashlib.sha1()
        for i, t in enumerate(self.texts):
            h.update(t.encode("utf-8"))
            h.update(b"\x1f")
            if self.text_pairs is not None:
                h.update(self.text_pairs[i].encode("utf-8"))
            h.update(b"\x1e")
        h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()[:12]


@dataclasses.dataclass
class TextTask:
    """A downstream text task: one training split, an ID test split, OOD test splits.

    Attributes:
        name: task name (``"cola"``, ``"wordnet"``, ...).
        train: training split.
        id_test: in-domain evaluation split.
        ood: out-of-domain evaluation splits by name (may be empty).
        num_classes: number of classes, ``1`` for a regression task (STS-B).
        metric: ``"accuracy"``, ``"matthews"``, ``"f1"`` or ``"pearson_spearman"``.
        label_names: class names by id (empty for regression).
    """

    name: str
    train: TextSplit
    id_test: TextSplit
    ood: dict[str, TextSplit]
    num_classes: int
    metric: str
    label_names: tuple[str, ...] = ()

    @property
    def regression(self) -> bool:
        """Whether the labels are real-valued scores (STS-B)."""
        return self.metric == "pearson_spearman"

    @property
    def is_pair(self) -> bool:
        """Whether examples are sentence pairs."""
        return self.train.text_pairs is not None

    def dataset_id(self) -> str:
        """Identifier of the task's content for the embedding cache."""
        parts = [self.train.fingerprint(), self.id_test.fingerprint()]
        parts += [s.fingerprint() for s in self.ood.values()]
        return f"{self.name}-" + hashlib.sha1("".join(parts).encode()).hexdigest()[:10]


# --------------------------------------------------------------------------- metrics
def _accuracy(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(y == p)) if len(y) else float("nan")


_METRICS = ("accuracy", "matthews", "f1", "pearson_spearman")


def task_metrics(metric: str, y_true: Sequence | np.ndarray, y_pred: Sequence | np.ndarray) -> dict[str, float]:
    """GLUE-style metrics of predictions against labels (fractions, not percent).

    Args:
        metric: the task's metric: ``"accuracy"`` (SST-2, MNLI, QNLI, RTE, WordNet),
            ``"matthews"`` (CoLA), ``"f1"`` (MRPC, QQP; positive class 1) or
            ``"pearson_spearman"`` (STS-B, real-valued predictions).
        y_true: labels, shape ``(N,)``.
        y_pred: predicted class ids (or scores for STS-B), shape ``(N,)``.

    Returns:
        ``accuracy`` and ``macro_f1`` for classification plus ``matthews`` / ``f1``
        where the task uses them; ``pearson``, ``spearman`` for regression. Always a
        ``score`` key: the task's GLUE score (mean of Pearson and Spearman for STS-B).

    Example:
        >>> task_metrics("matthews", [1, 1, 0, 0], [1, 0, 0, 0])["matthews"]  # doctest: +ELLIPSIS
        0.577...
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    y = np.asarray(y_true)
    p = np.asarray(y_pred)
    if y.ndim != 1 or p.shape != y.shape:
        raise ValueError(
            f"y_true and y_pred must be 1-D of the same length, got shapes {y.shape} and {p.shape}"
        )
    if metric == "pearson_spearman":
        pear = pearson(y, p)
        spear = spearman(y, p)
        return {"pearson": pear, "spearman": spear, "score": (pear + spear) / 2}
    y = y.astype(np.int64)
    p = p.astype(np.int64)
    out = {"accuracy": _accuracy(y, p), "macro_f1": macro_f1(y, p)}
    if metric == "matthews":
        out["matthews"] = matthews(y, p)
        out["score"] = out["matthews"]
    elif metric == "f1":
        out["f1"] = binary_f1(y, p)
        out["score"] = out["f1"]
    else:
        out["score"] = out["accuracy"]
    return out


def primary_score(metric: str) -> str:
    """Name of the key in :func:`task_metrics`' result that GLUE reports for ``metric``."""
    return {"accuracy": "accuracy", "matthews": "matthews", "f1": "f1"}.get(metric, "score")


# --------------------------------------------------------------------------- GLUE / GLUE-X
@dataclasses.dataclass(frozen=True)
class _GlueSpec:
    config: str
    columns: tuple[str, ...]
    label_names: tuple[str, ...]
    metric: str
    validation: str = "validation"


# Hub dataset and column names of each GLUE task (the `nyu-mll/glue` configurations).
GLUE_HUB = "nyu-mll/glue"
GLUE_TASKS: dict[str, _GlueSpec] = {
    "cola": _GlueSpec("cola", ("sentence",), ("unacceptable", "acceptable"), "matthews"),
    "sst2": _GlueSpec("sst2", ("sentence",), ("negative", "positive"), "accuracy"),
    "mrpc": _GlueSpec("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "f1"),
    "stsb": _GlueSpec("stsb", ("sentence1", "sentence2"), (), "pearson_spearman"),
    "qqp": _GlueSpec("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), "f1"),
    "mnli": _GlueSpec(
        "mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "accuracy",
        validation="validation_matched",
    ),
    "qnli": _GlueSpec("qnli", ("question", "sentence"), ("entailment", "not_entailment"), "accuracy"),
    "rte": _GlueSpec("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), "accuracy"),
}


@dataclasses.dataclass(frozen=True)
class _OodSpec:
    task: str  # the GLUE task it is the OOD test of
    columns: tuple[str, ...]  # native column names (the ID task's names are accepted too)
    hub: tuple[str, str | None, str] | None  # (path, config, split), None: local file only
    label_column: str = "label"


# GLUE-X out-of-domain test sets as the NMTune paper pairs them (its Table 11).
GLUE_X_OOD: dict[str, _OodSpec] = {
    "grammar_test": _OodSpec("cola", ("sentence",), None),
    "imdb": _OodSpec("sst2", ("text",), ("stanfordnlp/imdb", None, "test")),
    "qqp": _OodSpec("mrpc", ("question1", "question2"), (GLUE_HUB, "qqp", "validation")),
    "mnli_mismatched": _OodSpec(
        "mnli", ("premise", "hypothesis"), (GLUE_HUB, "mnli", "validation_mismatched")
    ),
    "snli": _OodSpec("mnli", ("premise", "hypothesis"), ("stanfordnlp/snli", None, "test")),
    "sick": _OodSpec("mnli", ("sentence_A", "sentence_B"), ("RobZamp/sick", None, "test")),
    "newsqa": _OodSpec("qnli", ("question", "sentence"), None),
    "scitail": _OodSpec("rte", ("premise", "hypothesis"), ("allenai/scitail", "tsv_format", "test")),
    "hans": _OodSpec("rte", ("premise", "hypothesis"), ("jhu-cogsci/hans", None, "validation")),
}

# String labels accepted in files (lower-cased), mapped onto each task's class ids.
_LABEL_ALIASES: dict[str, dict[str, int]] = {
    "cola": {"unacceptable": 0, "acceptable": 1, "ungrammatical": 0, "grammatical": 1},
    "sst2": {"negative": 0, "positive": 1, "neg": 0, "pos": 1},
    "mrpc": {"not_equivalent": 0, "equivalent": 1, "not_duplicate": 0, "duplicate": 1},
    "qqp": {"not_duplicate": 0, "duplicate": 1, "not_equivalent": 0, "equivalent": 1},
    "mnli": {"entailment": 0, "neutral": 1, "contradiction": 2},
    "qnli": {"entailment": 0, "not_entailment": 1, "non-entailment": 1, "non_entailment": 1},
    "rte": {
        "entailment": 0, "not_entailment": 1, "entails": 0, "neutral": 1,
        "non-entailment": 1, "non_entailment": 1,
    },
}


def _map_labels(task: str, raw: Sequence, *, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Class ids (or float scores for STS-B) and a mask of rows to keep.

    Rows with an empty label, ``-1`` (SNLI's "no gold label") or ``"-"`` are dropped.
    """
    spec = GLUE_TASKS[task]
    keep = np.ones(len(raw), dtype=bool)
    if spec.metric == "pearson_spearman":
        out = np.zeros(len(raw), dtype=np.float32)
        for i, v in enumerate(raw):
            if v is None or str(v).strip() == "":
                keep[i] = False
                continue
            try:
                out[i] = float(v)
            except ValueError:
                raise ValueError(f"{where}: STS-B label {v!r} in row {i} is not a number") from None
        return out, keep
    aliases = _LABEL_ALIASES[task]
    k = len(spec.label_names)
    out = np.zeros(len(raw), dtype=np.int64)
    for i, v in enumerate(raw):
        s = "" if v is None else str(v).strip()
        if s in ("", "-", "-1"):
            keep[i] = False
            continue
        if s.lower() in aliases:
            out[i] = aliases[s.lower()]
            continue
        try:
            val = float(s)
        except ValueError:
            raise ValueError(
                f"{where}: label {v!r} in row {i} is not one of {sorted(aliases)} nor a class id "
                f"in [0, {k})"
            ) from None
        if val != int(val) or not 0 <= int(val) < k:
            raise ValueError(f"{where}: label {v!r} in row {i} is not a class id in [0, {k})")
        out[i] = int(val)
    return out, keep


def _read_table(path: Path) -> list[dict[str, str]]:
    """Rows of a ``.jsonl`` / ``.json`` (one object a line), ``.csv`` or ``.tsv`` file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{n}: not a JSON object ({exc.msg})") from None
        return rows
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as fh:
            if suffix == ".tsv":
                return list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
            return list(csv.DictReader(fh))
    raise ValueError(f"{path}: unsupported file type {suffix!r}; expected .jsonl, .json, .csv or .tsv")


def _find_file(folder: Path, stems: Sequence[str]) -> Path | None:
    for stem in stems:
        for ext in (".jsonl", ".json", ".csv", ".tsv"):
            p = folder / f"{stem}{ext}"
            if p.is_file():
                return p
    return None


def _split_from_rows(
    rows: Sequence[Mapping], task: str, columns: Sequence[Sequence[str]], label_column: str,
    *, name: str, where: str,
) -> TextSplit:
    """Build a split; ``columns`` lists, per segment, the accepted column names."""
    if not rows:
        raise ValueError(f"{where}: no rows")
    have = set(rows[0].keys())
    chosen = []
    for alts in columns:
        col = next((c for c in alts if c in have), None)
        if col is None:
            raise ValueError(
                f"{where}: missing text column; expected one of {list(alts)}, found columns {sorted(have)}"
            )
        chosen.append(col)
    if label_column not in have:
        raise ValueError(f"{where}: missing label column {label_column!r}, found columns {sorted(have)}")
    labels, keep = _map_labels(task, [r[label_column] for r in rows], where=where)
    texts = [str(r[chosen[0]]) for r, k in zip(rows, keep) if k]
    pairs = [str(r[chosen[1]]) for r, k in zip(rows, keep) if k] if len(chosen) > 1 else None
    return TextSplit(name, texts, labels[keep], pairs)


def _subsample(split: TextSplit, n: int | None, seed: int) -> TextSplit:
    if n is None or len(split) <= n:
        return split
    idx = np.sort(np.random.default_rng(seed).choice(len(split), size=n, replace=False))
    return TextSplit(
        split.name,
        [split.texts[i] for i in idx],
        split.labels[idx],
        None if split.text_pairs is None else [split.text_pairs[i] for i in idx],
    )


def _hub_rows(path: str, config: str | None, split: str) -> list[dict]:
    try:
        import datasets  # noqa: PLC0415  (optional, network only)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "loading GLUE / GLUE-X from the Hugging Face hub needs the `datasets` library: "
            "pip install datasets (or pass data_dir= with local CSV/TSV/JSONL files)"
        ) from exc
    ds = datasets.load_dataset(path, config, split=split)
    label_feat = ds.features.get("label") if hasattr(ds, "features") else None
    names = getattr(label_feat, "names", None)
    rows = []
    for r in ds:
        r = dict(r)
        # ClassLabel ints become their names so that differing orders map correctly.
        if names is not None and isinstance(r.get("label"), int) and 0 <= r["label"] < len(names):
            r["label"] = names[r["label"]]
        rows.append(r)
    return rows


def load_glue_task(
    task: str,
    *,
    data_dir: str | os.PathLike | None = None,
    ood: Sequence[str] | None = None,
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
) -> TextTask:
    """Load a GLUE task (train / validation) with its GLUE-X out-of-domain test sets.

    With ``data_dir`` the files are local: ``<data_dir>/<task>/train.<ext>``,
    ``<data_dir>/<task>/validation.<ext>`` (MNLI: ``validation_matched`` also accepted)
    and, for each OOD set, ``<data_dir>/<ood>/test.<ext>``, where ``<ext>`` is
    ``jsonl``, ``json`` (JSON lines), ``csv`` or ``tsv`` (with a header row). Columns are
    the hub's: e.g. ``sentence,label`` for CoLA / SST-2, ``premise,hypothesis,label``
    for MNLI; an OOD file may use its own set's native columns (``text`` for IMDB,
    ``sentence_A,sentence_B`` for SICK) or the ID task's. Labels are class ids or names
    (``entailment``, ``not_entailment``, SciTail's ``entails`` / ``neutral``, ...);
    STS-B labels are scores in [0, 5]. Without ``data_dir`` the ``datasets`` library
    loads them from the hub (Grammar Test and NewsQA are GLUE-X's own files, which
    the hub does not carry: pass them locally).

    Args:
        task: one of ``cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte``.
        data_dir: folder of local files, or ``None`` for the hub.
        ood: OOD set names to load (default: all that :data:`GLUE_X_OOD` pairs with
            ``task``; locally, only those whose file exists).
        max_train: subsample the training split to at most this many rows.
        max_eval: subsample every evaluation split to at most this many rows.
        seed: seed of the subsampling.

    Returns:
        The :class:`TextTask`.

    Example:
        >>> t = load_glue_task("sst2", data_dir="glue_files")  # doctest: +SKIP
        >>> sorted(t.ood)  # doctest: +SKIP
        ['imdb']
    """
    key = task.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; expected one of {sorted(GLUE_TASKS)}")
    spec = GLUE_TASKS[key]
    paired = [n for n, o in GLUE_X_OOD.items() if o.task == key]
    if ood is None:
        wanted, explicit = paired, False
    else:
        wanted, explicit = list(ood), True
        bad = [n for n in wanted if n not in paired]
        if bad:
            raise ValueError(f"OOD sets {bad} are not paired with {key!r}; GLUE-X pairs it with {paired}")
    id_cols = [(c,) for c in spec.columns]

    if data_dir is not None:
        root = Path(data_dir)
        splits = {}
        for name, stems in (("train", ["train"]), ("validation", ["validation", spec.validation, "dev"])):
            f = _find_file(root / key, stems)
            if f is None:
                raise FileNotFoundError(
                    f"no {name} file for {key!r} under {root / key}; expected {stems[0]}.jsonl/.json/.csv/.tsv"
                )
            splits[name] = _split_from_rows(_read_table(f), key, id_cols, "label", name=name, where=str(f))
        ood_splits = {}
        for n in wanted:
            f = _find_file(root / n, ["test"])
            if f is None:
                if explicit:
                    raise FileNotFoundError(f"no file for OOD set {n!r}: expected {root / n}/test.jsonl/.csv/.tsv")
                continue
            o = GLUE_X_OOD[n]
            cols = [(a, b) if a != b else (a,) for a, b in zip(o.columns, spec.columns)]
            ood_splits[n] = _split_from_rows(
                _read_table(f), key, cols, o.label_column, name=f"ood:{n}", where=str(f)
            )
    else:
        for n in wanted:  # fail before any download
            if explicit and GLUE_X_OOD[n].hub is None:
                o = GLUE_X_OOD[n]
                raise ValueError(
                    f"GLUE-X's {n!r} set is not on the hub; download it from the GLUE-X release "
                    f"and pass data_dir= with {n}/test.jsonl (columns {list(o.columns)} + label)"
                )
        splits = {
            "train": _split_from_rows(
                _hub_rows(GLUE_HUB, spec.config, "train"), key, id_cols, "label", name="train", where=key
            ),
            "validation": _split_from_rows(
                _hub_rows(GLUE_HUB, spec.config, spec.validation), key, id_cols, "label",
                name="validation", where=key,
            ),
        }
        ood_splits = {}
        for n in wanted:
            o = GLUE_X_OOD[n]
            if o.hub is None:
                continue
            cols = [(a, b) if a != b else (a,) for a, b in zip(o.columns, spec.columns)]
            ood_splits[n] = _split_from_rows(
                _hub_rows(*o.hub), key, cols, o.label_column, name=f"ood:{n}", where=f"{o.hub[0]}"
            )

    return TextTask(
        name=key,
        train=_subsample(splits["train"], max_train, seed),
        id_test=_subsample(splits["validation"], max_eval, seed + 1),
        ood={n: _subsample(s, max_eval, seed + 2) for n, s in ood_splits.items()},
        num_classes=1 if spec.metric == "pearson_spearman" else len(spec.label_names),
        metric=spec.metric,
        label_names=spec.label_names,
    )


# --------------------------------------------------------------------------- WordNet
# Lexicographer file names by number (WordNet 3.0 `lexnames`, which wordnet-base omits).
LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)

# The task the study uses, built from Debian's wordnet-base by nmtune_study/data/make_wordnet_task.py.
WORDNET_TASK_FILE = Path(__file__).resolve().parent / "wordnet_task.jsonl.gz"
_WORDNET_FORMAT = "nmtune-wordnet-task/1"
_WORDNET_HINT = (
    "pass wordnet_dir=None to read the task shipped in nmtune_study/data/wordnet_task.jsonl.gz, or point "
    "wordnet_dir= / NMTUNE_WORDNET_DIR to a WordNet 3.0 database folder holding data.noun and data.verb "
    "(Debian's wordnet-base package puts one in /usr/share/wordnet: apt-get install -y wordnet-base)"
)
_QUOTED = re.compile(r'"([^"]+)"')


def _parse_wordnet(path: Path, min_words: int) -> list[tuple[int, str, list[str]]]:
    """(lexicographer file number, definition, usage examples) of each synset in a data file."""
    out = []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  ") or " | " not in line:
                continue  # licence header
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            lex = int(fields[1])
            gloss = gloss.strip()
            q = gloss.find('"')
            definition = (gloss if q < 0 else gloss[:q]).strip().rstrip(";").strip()
            examples = [e.strip() for e in _QUOTED.findall(gloss)]
            examples = [e for e in examples if len(e.split()) >= min_words]
            if definition:
                out.append((lex, definition, examples))
    return out


def load_wordnet_task(
    wordnet_dir: str | os.PathLike | None = None,
    *,
    pos: Sequence[str] = ("noun", "verb"),
    n_train: int = 100,
    n_test: int = 40,
    n_ood: int = 60,
    min_words: int = 3,
    max_classes: int | None = None,
    seed: int = 0,
) -> TextTask:
    """WordNet glosses classified by lexicographer category, usage examples as OOD.

    Each class is a lexicographer file (``noun.animal``, ``verb.motion``, ...). For each
    class, synsets are shuffled with ``seed``; the first ``n_train`` give the training
    definitions, the next ``n_test`` the in-domain test definitions, and the
    out-of-domain test set is ``n_ood`` usage examples (the quoted sentences of a gloss,
    at least ``min_words`` words) drawn from the *remaining* synsets, so no OOD sentence
    belongs to a synset seen in training. Only classes with enough synsets and examples
    for all three are kept. This is an offline stand-in, **not GLUE**.

    Where the data come from: ``wordnet_dir`` if given, else ``$NMTUNE_WORDNET_DIR`` if
    set (both: a WordNet 3.0 database folder, e.g. Debian's ``wordnet-base`` in
    ``/usr/share/wordnet``), else the task shipped in the repository
    (:data:`WORDNET_TASK_FILE`, built from those files with the default arguments by
    ``nmtune_study/data/make_wordnet_task.py``: same texts, labels, order and
    :meth:`TextTask.dataset_id`). The shipped file holds only the default task, so other
    arguments need the database folder.

    Args:
        wordnet_dir: folder with ``data.noun`` / ``data.verb`` (default:
            ``$NMTUNE_WORDNET_DIR``, else the shipped task file).
        pos: which data files to read (``"noun"``, ``"verb"``, ``"adj"``, ``"adv"``).
        n_train: training definitions per class.
        n_test: in-domain test definitions per class.
        n_ood: out-of-domain usage examples per class.
        min_words: shortest usage example kept.
        max_classes: keep at most this many classes (the largest ones).
        seed: sampling seed.

    Returns:
        A :class:`TextTask` with ``ood == {"usage_examples": ...}`` and metric accuracy.

    Raises:
        FileNotFoundError: ``wordnet_dir`` lacks the WordNet files (the message says
            where to get them), or the shipped task file is missing.
        ValueError: non-default arguments without a database folder, or too few
            classes qualify.

    Example:
        >>> task = load_wordnet_task()  # the shipped task, no WordNet install needed
        >>> len(task.train), len(task.id_test), len(task.ood["usage_examples"]), task.num_classes
        (3500, 1400, 2100, 35)
        >>> task.label_names[:2]
        ('noun.act', 'noun.artifact')
    """
    for name, v in (("n_train", n_train), ("n_test", n_test), ("n_ood", n_ood)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    for p in pos:
        if p not in ("noun", "verb", "adj", "adv"):
            raise ValueError(f"pos entries must be noun, verb, adj or adv, got {p!r}")
    params = {"pos": list(pos), "n_train": n_train, "n_test": n_test, "n_ood": n_ood,
              "min_words": min_words, "max_classes": max_classes, "seed": seed}
    folder = wordnet_dir or os.environ.get("NMTUNE_WORDNET_DIR")
    if not folder:
        task, meta = _read_wordnet_file(WORDNET_TASK_FILE)
        if meta["params"] != params:
            diff = {k: v for k, v in params.items() if meta["params"].get(k) != v}
            raise ValueError(
                f"the shipped WordNet task ({WORDNET_TASK_FILE.name}) was built with {meta['params']}; "
                f"{diff} needs the WordNet 3.0 database: pass wordnet_dir= (or set NMTUNE_WORDNET_DIR) "
                "to a folder holding data.noun and data.verb, e.g. /usr/share/wordnet from Debian's wordnet-base"
            )
        return task
    root = Path(folder)
    synsets: list[tuple[int, str, list[str]]] = []
    for p in pos:
        f = root / f"data.{p}"
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: {_WORDNET_HINT}")
        synsets += _parse_wordnet(f, min_words)

    by_class: dict[int, list[tuple[str, list[str]]]] = {}
    for lex, definition, examples in synsets:
        by_class.setdefault(lex, []).append((definition, examples))
    rng = np.random.default_rng(seed)
    chosen: dict[int, tuple[list[str], list[str], list[str]]] = {}
    for lex in sorted(by_class):
        items = by_class[lex]
        order = rng.permutation(len(items))
        train = [items[i][0] for i in order[:n_train]]
        test = [items[i][0] for i in order[n_train : n_train + n_test]]
        pool = [e for i in order[n_train + n_test :] for e in items[i][1]]
        if len(train) < n_train or len(test) < n_test or len(pool) < n_ood:
            continue
        ood_idx = np.sort(rng.choice(len(pool), size=n_ood, replace=False))
        chosen[lex] = (train, test, [pool[i] for i in ood_idx])
    if max_classes is not None and len(chosen) > max_classes:
        biggest = sorted(chosen, key=lambda k: (-len(by_class[k]), k))[:max_classes]
        chosen = {k: chosen[k] for k in sorted(biggest)}
    if len(chosen) < 2:
        raise ValueError(
            f"only {len(chosen)} lexicographer classes in {root} have {n_train}+{n_test} synsets and "
            f"{n_ood} usage examples; lower n_train / n_test / n_ood"
        )
    names = tuple(LEXNAMES[k] if k < len(LEXNAMES) else f"lex{k:02d}" for k in chosen)

    return _three_part_task("wordnet", [chosen[lex] for lex in chosen], names)


def write_wordnet_task(task: TextTask, path: str | os.PathLike, *, params: Mapping, source: str) -> None:
    """Write a WordNet task as gzip-compressed JSON lines, byte-for-byte reproducibly.

    The first line is a header (format, ``source``, the :func:`load_wordnet_task`
    arguments ``params``, class names, split sizes, ``dataset_id``); then one
    ``{"split", "label", "text"}`` object per text, in the task's order. The gzip
    header carries no file name or time, so the same task gives the same bytes.

    Args:
        task: a task from :func:`load_wordnet_task` (three-part: train, test, one OOD split).
        path: output file (``.jsonl.gz``).
        params: the arguments the task was built with (checked again on loading).
        source: where the texts come from, for the header.
    """
    if set(task.ood) != {"usage_examples"}:
        raise ValueError(f"task must have one OOD split 'usage_examples', got {sorted(task.ood)}")
    splits = [task.train, task.id_test, task.ood["usage_examples"]]
    header = {
        "format": _WORDNET_FORMAT, "source": source, "licence": "LICENSE-WordNet-3.0.txt (beside this file)",
        "params": dict(params), "label_names": list(task.label_names),
        "splits": {s.name: len(s) for s in splits}, "dataset_id": task.dataset_id(),
    }
    lines = [json.dumps(header, ensure_ascii=False)]
    for s in splits:
        lines += [json.dumps({"split": s.name, "label": int(y), "text": t}, ensure_ascii=False)
                  for t, y in zip(s.texts, s.labels)]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as fh:
        fh.write(data)


def _read_wordnet_file(path: Path) -> tuple[TextTask, dict]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: it ships with the nmtune_study package (nmtune_study/data/); a copy without it "
            "can rebuild it with python -m nmtune_study.data.make_wordnet_task from WordNet 3.0's database, or "
            f"{_WORDNET_HINT}"
        )
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        header = json.loads(fh.readline())
        if header.get("format") != _WORDNET_FORMAT:
            raise ValueError(f"{path}: format {header.get('format')!r}, expected {_WORDNET_FORMAT!r}")
        rows = [json.loads(line) for line in fh if line.strip()]
    names = tuple(header["label_names"])
    order = list(header["splits"])
    if len(order) != 3:
        raise ValueError(f"{path}: expected 3 splits (train, test, OOD), header lists {order}")
    texts: dict[str, list[str]] = {n: [] for n in order}
    labels: dict[str, list[int]] = {n: [] for n in order}
    for i, r in enumerate(rows, 2):
        if r["split"] not in texts or not 0 <= r["label"] < len(names):
            raise ValueError(f"{path}:{i}: split {r['split']!r} / label {r['label']!r} not in the header")
        texts[r["split"]].append(r["text"])
        labels[r["split"]].append(r["label"])
    got = {n: len(texts[n]) for n in order}
    if got != header["splits"]:
        raise ValueError(f"{path}: split sizes {got} differ from the header's {header['splits']}")
    train, test, ood = (TextSplit(n, texts[n], np.asarray(labels[n], dtype=np.int64)) for n in order)
    task = TextTask(name="wordnet", train=train, id_test=test, ood={"usage_examples": ood},
                    num_classes=len(names), metric="accuracy", label_names=names)
    if task.dataset_id() != header["dataset_id"]:
        raise ValueError(f"{path}: content gives dataset_id {task.dataset_id()}, the header says {header['dataset_id']}")
    return task, header


def read_wordnet_task(path: str | os.PathLike = WORDNET_TASK_FILE) -> TextTask:
    """The WordNet task stored in a file from :func:`write_wordnet_task`.

    Args:
        path: the ``.jsonl.gz`` file (default: the shipped :data:`WORDNET_TASK_FILE`).

    Returns:
        The task, with the same texts, labels, order and ``dataset_id`` as when written.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not in this format, or its content does not match its header.

    Example:
        >>> read_wordnet_task().dataset_id() == load_wordnet_task().dataset_id()
        True
    """
    return _read_wordnet_file(Path(path))[0]


def _three_part_task(name: str, per_class: Sequence[Sequence[Sequence[str]]], names: tuple[str, ...]) -> TextTask:
    """A classification task from ``per_class[c] = (train texts, ID test texts, OOD texts)``."""

    def split(split_name: str, part: int) -> TextSplit:
        texts: list[str] = []
        labels: list[int] = []
        for cls, parts in enumerate(per_class):
            texts += list(parts[part])
            labels += [cls] * len(parts[part])
        return TextSplit(split_name, texts, np.asarray(labels, dtype=np.int64))

    return TextTask(
        name=name,
        train=split("train", 0),
        id_test=split("test", 1),
        ood={"usage_examples": split("ood:usage_examples", 2)},
        num_classes=len(per_class),
        metric="accuracy",
        label_names=names,
    )


# --------------------------------------------------------------------------- tiny task
# Hand-written, 4 classes; definitions in-domain, usage sentences out-of-domain.
_TINY: dict[str, tuple[list[str], list[str], list[str]]] = {
    "animal": (
        [
            "a large wild cat with a tawny coat found in Africa",
            "a small domesticated carnivore kept as a pet",
            "a bird that cannot fly and lives in the Antarctic",
            "a large marine mammal that breathes through a blowhole",
            "a slow reptile protected by a hard shell",
            "an insect that makes honey and lives in a hive",
            "a hoofed mammal used for riding and pulling loads",
            "a rodent with a long tail that lives near people",
        ],
        ["a striped wild cat of Asian forests", "a nocturnal bird of prey with large eyes"],
        ["the dog barked at the mailman all morning", "we watched the horses gallop across the field"],
    ),
    "food": (
        [
            "a baked food made from flour water and yeast",
            "a sweet frozen dessert made from cream and sugar",
            "a round fruit with red or green skin and crisp flesh",
            "a thick soup made from vegetables and stock",
            "a dish of cooked pasta served with a sauce",
            "a dairy product made by curdling milk",
            "a flat round cake of dough topped with cheese and tomato",
            "a grain boiled in water and eaten as a staple",
        ],
        ["a yellow fruit with a soft sweet pulp", "a slice of cooked meat from a pig"],
        ["she spread butter on her toast at breakfast", "the soup was too salty to eat"],
    ),
    "weather": (
        [
            "water falling from the clouds in drops",
            "a violent storm with strong winds and heavy rain",
            "frozen water vapour falling in white flakes",
            "a thick cloud of tiny water droplets near the ground",
            "a sudden flash of light in the sky during a storm",
            "a long period without any rainfall",
            "air moving across the surface of the earth",
            "pellets of ice falling from the sky",
        ],
        ["the loud noise that follows lightning", "a light wind that is pleasant and cool"],
        ["it rained all weekend so we stayed inside", "the wind blew the leaves off the trees"],
    ),
    "motion": (
        [
            "move forward quickly on foot",
            "propel the body through water using the limbs",
            "travel through the air on wings",
            "move by lifting and setting down each foot in turn",
            "go up a slope or ladder using hands and feet",
            "jump into the air with both feet",
            "move smoothly over a surface while in contact",
            "turn around a central point repeatedly",
        ],
        ["move slowly and quietly to avoid being noticed", "descend through the air from a height"],
        ["the children ran to the playground after school", "he swam across the lake in an hour"],
    ),
}


def tiny_task() -> TextTask:
    """A 4-class hand-written task of 48 sentences for tests and ``--tiny`` runs.

    Same structure as :func:`load_wordnet_task` (definitions in-domain, usage sentences
    out-of-domain) with 8 training, 2 ID-test and 2 OOD-test texts per class.

    Example:
        >>> t = tiny_task()
        >>> len(t.train), len(t.id_test), t.num_classes
        (32, 8, 4)
    """
    names = tuple(_TINY)

    return _three_part_task("tiny", [_TINY[n] for n in names], names)
