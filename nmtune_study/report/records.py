"""The study's records and what is computed from them alone: paired cells, grids, summaries.

Record schema (one dict per tuned head and test set)::

    {"regime": "supervised" | "contrastive", "gamma": 0.05, "pretrain_seed": 0,
     "method": "lp" | "mlp" | "nmtune" | "zeroshot", "kind": "id" | "ood",
     "task": "digits", "domain": "test", "seed": 0, "fraction": 1.0,
     "accuracy": 0.93, "macro_f1": 0.92, "sve": 4.1, "lsvr": 1.2}

Tuned records (not zero-shot) also carry ``protocol`` (``"selected"`` or ``"paper"``), ``lr``,
``train_loss`` and, for NMTune, ``regularizer_scale`` (``evaluate.tune_and_score``); a report
decides its claims on one protocol's records (:func:`by_protocol`). Ablation records
carry two more keys, ``ablation`` (its name) and ``variant`` (the setting); the paired
cells of the main claims ignore them.

A cell ``[p, t]`` of every method and noise ratio comes from pre-training seed ``p`` and
tuning seed ``t`` (same pre-trained model, tuning seed and data split), so differences
are taken cell by cell (:mod:`.claims`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from nmtune_study.common import mean_std

__all__ = ["METRICS", "RECORD_KEYS", "by_protocol", "grid", "method_name", "paired_cells", "primary_protocol",
           "summarize_records"]

RECORD_KEYS = ("regime", "gamma", "pretrain_seed", "method", "kind", "task", "domain", "seed", "fraction",
               "accuracy", "macro_f1", "sve", "lsvr")


METRICS = ("accuracy", "macro_f1", "sve", "lsvr")


_NAMES = {"lp": "LP", "mlp": "MLP", "nmtune": "NMTune", "zeroshot": "zero-shot"}


def method_name(m: str) -> str:
    """The display name of a method.

    Example:
        >>> method_name("nmtune"), method_name("lora")
        ('NMTune', 'LORA')
    """
    return _NAMES.get(m, m.upper())


def paired_cells(records: Iterable[Mapping[str, Any]], fraction: float | None) -> dict[tuple, float]:
    """``{(method, gamma, kind, pretrain_seed, seed): value per metric}``: each (pre-training
    seed, tuning seed) cell averaged over the ID tasks or the OOD (task, domain) pairs."""
    acc: dict[tuple, list] = defaultdict(list)
    for r in records:
        if "ablation" in r or (fraction is not None and not math.isclose(float(r["fraction"]), fraction)):
            continue
        acc[(r["method"], float(r["gamma"]), r["kind"], int(r.get("pretrain_seed", 0)), int(r["seed"]))].append(r)
    return {k: {m: sum(float(x[m]) for x in rows) / len(rows) for m in METRICS} for k, rows in acc.items()}


def grid(cells: Mapping[tuple, Mapping[str, float]], methods: Sequence[str], gammas: Sequence[float], kind: str,
         metric: str, scale: float = 1.0) -> np.ndarray:
    """``(P, T, M, G)`` array of one metric: pre-training seeds x tuning seeds x methods x
    noise ratios. A method scored once per pre-trained model (zero-shot) is repeated over
    the tuning seeds.

    Raises:
        KeyError: a cell is missing (the comparison would not be paired).

    Example:
        >>> c = {("lp", 0.0, "id", p, t): {"accuracy": p + t / 10} for p in (0, 1) for t in (0, 1)}
        >>> grid(c, ["lp"], [0.0], "id", "accuracy").shape
        (2, 2, 1, 1)
    """
    pseeds = sorted({k[3] for k in cells})
    tseeds = sorted({k[4] for k in cells if k[0] in methods and k[0] != "zeroshot"} or {k[4] for k in cells})
    out = np.empty((len(pseeds), len(tseeds), len(methods), len(gammas)))
    for i, p in enumerate(pseeds):
        for j, t in enumerate(tseeds):
            for a, m in enumerate(methods):
                for b, g in enumerate(gammas):
                    key = (m, float(g), kind, p, t)
                    if key not in cells:
                        alt = [k for k in cells if k[:4] == key[:4]]
                        if len(alt) != 1:
                            raise KeyError(f"no paired cell {key} (method, gamma, kind, pretrain_seed, seed)")
                        key = alt[0]
                    out[i, j, a, b] = scale * cells[key][metric]
    return out


def summarize_records(
    records: Sequence[Mapping[str, Any]], *, fraction: float | None = 1.0
) -> dict[str, dict[float, dict[str, dict[str, tuple[float, float]]]]]:
    """``summary[method][gamma][kind][metric] = (mean, std)`` over (pre-training seed,
    tuning seed) cells; each cell first averaged over ID tasks or OOD (task, domain) pairs.

    Example:
        >>> r = [dict(gamma=0.0, method="lp", kind="id", task="t", domain="test", seed=s,
        ...           fraction=1.0, accuracy=a, macro_f1=a, sve=1.0, lsvr=1.0) for s, a in [(0, .8), (1, .6)]]
        >>> [round(v, 4) for v in summarize_records(r)["lp"][0.0]["id"]["accuracy"]]
        [0.7, 0.1414]
    """
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (method, gamma, kind, _p, _t), vals in paired_cells(records, fraction).items():
        for m in METRICS:
            groups[(method, gamma, kind)][m].append(vals[m])
    out: dict = defaultdict(lambda: defaultdict(dict))
    for (method, gamma, kind), metrics in sorted(groups.items()):
        out[method][gamma][kind] = {m: mean_std(v) for m, v in metrics.items()}
    return {k: dict(v) for k, v in out.items()}


def by_protocol(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Records per downstream protocol; records without one (zero-shot, old runs) join every
    protocol, and a run without protocols is all ``"paper"``.

    Example:
        >>> sorted((k, len(v)) for k, v in by_protocol([{"protocol": "selected"}, {"protocol": "paper"}, {}]).items())
        [('paper', 2), ('selected', 2)]
    """
    names = list(dict.fromkeys(r["protocol"] for r in records if "protocol" in r)) or ["paper"]
    return {p: [r for r in records if r.get("protocol", p) == p] for p in names}


def primary_protocol(records: Sequence[Mapping[str, Any]]) -> tuple[str, list[Mapping[str, Any]]]:
    """The protocol a report decides on (``selected`` where a run has it) and its records.

    Example:
        >>> primary_protocol([{"protocol": "paper"}, {"protocol": "selected"}])
        ('selected', [{'protocol': 'selected'}])
    """
    protocols = by_protocol(records)
    primary = "selected" if "selected" in protocols else next(iter(protocols))
    return primary, protocols[primary]
