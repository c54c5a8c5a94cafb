"""nmtune_study.report: paired claims with intervals, ablation tables, figures; every docstring example."""

from __future__ import annotations

import doctest
import json
import pathlib
import importlib
import pkgutil

import numpy as np
import pytest

import nmtune_study
from nmtune_study import common as C
from nmtune_study.report import claims as R
from nmtune_study.report import markdown as MD
from nmtune_study.report import plots as P
from nmtune_study.report import records as RC

GAMMAS = [0.0, 0.05, 0.1, 0.2, 0.3]
ID_ACC = {"lp": [0.80, 0.82, 0.81, 0.78, 0.75], "mlp": [0.81, 0.83, 0.82, 0.79, 0.76],
          "nmtune": [0.86, 0.85, 0.84, 0.82, 0.80]}
OOD_ACC = {"lp": [0.60, 0.55, 0.52, 0.48, 0.45], "mlp": [0.61, 0.56, 0.53, 0.49, 0.46],
           "nmtune": [0.66, 0.64, 0.60, 0.55, 0.50]}
SVE = {"lp": 3.0, "mlp": 2.5, "nmtune": 3.2}
LSVR = {"lp": 1.0, "mlp": 1.4, "nmtune": 0.9}


def paper_like(noise: float = 0.002, pseeds=(0, 1, 2), tseeds=(0, 1), rng_seed: int = 0):
    rng = np.random.default_rng(rng_seed)
    recs = []
    for p in pseeds:
        shift = rng.normal(0, noise)  # a pre-training seed moves every method alike
        for t in tseeds:
            for m in ID_ACC:
                for i, g in enumerate(GAMMAS):
                    for kind, table in (("id", ID_ACC), ("ood", OOD_ACC)):
                        for task in ("a", "b"):
                            acc = table[m][i] + shift + rng.normal(0, noise / 2)
                            recs.append(dict(regime="supervised", gamma=g, pretrain_seed=p, method=m, kind=kind,
                                             task=task, domain="d", seed=t, fraction=1.0, accuracy=acc,
                                             macro_f1=acc, sve=SVE[m] + rng.normal(0, 0.01),
                                             lsvr=LSVR[m] + rng.normal(0, 0.01)))
    backbone = {g: {p: {"id_sve": 3 + g + 0.001 * p, "ood_lsvr": 1 + g} for p in pseeds} for g in GAMMAS}
    pre = {g: {p: 0.9 - g + 0.001 * p for p in pseeds} for g in GAMMAS}
    return recs, backbone, pre


def test_paper_like_numbers_reproduce_all_16_claims():
    recs, backbone, pre = paper_like()
    claims = R.check_claims(recs, backbone=backbone, pretrain_accuracy=pre)
    assert len(claims) == 16
    assert [c["claim"] for c in claims if c["verdict"] != "reproduced"] == []
    for c in claims:
        assert c["ci_low"] <= c["estimate"] <= c["ci_high"]
        assert (c["n_pretrain"], c["n_tune"]) in ((3, 2), (3, 1))
        assert set(c) >= {"claim", "verdict", "estimate", "ci_low", "ci_high", "n_pretrain", "n_tune"}
    md = MD.claims_markdown(claims)
    assert md.count("\n") == len(claims) + 1 and "**reproduced**" in md
    assert R.verdict_counts(claims) == {"reproduced": 16, "contradicted": 0, "inconclusive": 0}


def test_contradicting_numbers_are_contradicted_and_noise_is_inconclusive():
    recs, backbone, pre = paper_like()
    for r in recs:  # LP's OOD accuracy now rises with noise
        if r["method"] == "lp" and r["kind"] == "ood":
            r["accuracy"] = 0.5 + r["gamma"] + 0.001 * r["seed"]
    backbone = {g: {p: {"id_sve": 3 - g, "ood_lsvr": 1 - g} for p in b} for g, b in backbone.items()}
    claims = {c["claim"].split(" (")[0]: c for c in R.check_claims(recs, backbone=backbone, pretrain_accuracy=pre)}
    assert claims["OOD accuracy decreases monotonically with noise"]["verdict"] == "contradicted"
    assert claims["OOD accuracy decreases monotonically with noise"]["estimate"] == pytest.approx(1.0)
    assert claims["SVE of the pre-trained features"]["verdict"] == "contradicted"
    # Pure noise, large against the effects: every method claim is inconclusive.
    noisy, _, _ = paper_like(noise=0.5)
    verdicts = {c["claim"]: c["verdict"] for c in R.check_claims(noisy)}
    assert all(v == "inconclusive" for k, v in verdicts.items() if k.startswith("NMTune beats")), verdicts


def test_pretrain_seed_variance_widens_the_interval():
    """A shift shared by all tuning seeds of a pre-trained model is what the interval must see."""
    recs, _, _ = paper_like(noise=0.0)
    shifted = [dict(r, accuracy=r["accuracy"] + (0.03 if r["pretrain_seed"] == 0 else -0.03) * (r["gamma"] > 0)
                    * (r["method"] == "lp")) for r in recs]
    a = {c["claim"]: c for c in R.check_claims(recs)}
    b = {c["claim"]: c for c in R.check_claims(shifted)}
    k = next(k for k in a if k.startswith("Slight noise"))
    assert b[k]["ci_high"] - b[k]["ci_low"] > a[k]["ci_high"] - a[k]["ci_low"] + 1.0


def test_unpaired_cells_raise():
    recs, _, _ = paper_like()
    recs = [r for r in recs if not (r["method"] == "mlp" and r["pretrain_seed"] == 1 and r["gamma"] == 0.1)]
    with pytest.raises(KeyError, match="paired"):
        R.check_claims(recs)


def test_zeroshot_claims_and_broadcast_over_tuning_seeds():
    recs, _, _ = paper_like()
    for p in (0, 1, 2):
        for g in GAMMAS:
            for kind in ("id", "ood"):
                recs.append(dict(regime="contrastive", gamma=g, pretrain_seed=p, method="zeroshot", kind=kind,
                                 task="a", domain="d", seed=0, fraction=1.0, accuracy=0.3, macro_f1=0.3, sve=1.0,
                                 lsvr=1.0))
    zs = [c for c in R.check_claims(recs) if "zero-shot" in c["claim"]]
    assert len(zs) == 2 and all(c["verdict"] == "reproduced" and c["n_tune"] == 2 for c in zs)


def test_ablation_table_and_figures(tmp_path):
    recs = []
    for v, acc in (("full", 0.9), ("-COV", 0.8), ("-SVD", 0.9)):
        for p in (0, 1, 2):
            for t in (0, 1):
                for kind in ("id", "ood"):
                    recs.append(dict(ablation="terms", variant=v, method="nmtune", gamma=0.1, pretrain_seed=p,
                                     kind=kind, task="x", domain="d", seed=t, fraction=1.0,
                                     accuracy=acc + 0.01 * p + 0.001 * t, macro_f1=0.0, sve=0.0, lsvr=0.0))
    rows = R.ablation_table(recs, "terms")
    by = {(r["variant"], r["kind"]): r for r in rows}
    assert by[("-COV", "id")]["diff"]["estimate"] == pytest.approx(-10.0)
    assert by[("-COV", "id")]["diff"]["ci_high"] < 0 and by[("-SVD", "id")]["diff"]["estimate"] == pytest.approx(0)
    assert "| -COV | NMTune | ID |" in MD.ablation_markdown(rows)
    main, backbone, _ = paper_like()
    claims = R.check_claims(main, backbone=backbone)
    for path in (P.plot_ablation(rows, tmp_path / "abl.png", title="terms"),
                 P.plot_forest(claims, tmp_path / "forest.png", title="claims")):
        data = open(path, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_summarize_records_over_pretrain_and_tuning_seeds():
    recs, _, _ = paper_like(noise=0.0)
    s = RC.summarize_records(recs)
    mu, sd = s["lp"][0.0]["id"]["accuracy"]
    assert mu == pytest.approx(0.80) and sd == pytest.approx(0.0, abs=1e-12)


def test_common_metrics_are_scipy_and_sklearn():
    from scipy.stats import spearmanr
    from sklearn.metrics import f1_score

    y, p = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 3]  # class 3 only predicted: counts in sklearn's macro average
    assert C.macro_f1(y, p) == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    assert C.spearman([0, 1, 2, 3], [1, 3, 2, 4]) == pytest.approx(spearmanr([0, 1, 2, 3], [1, 3, 2, 4]).statistic)
    assert C.spearman([0, 1, 2], [5, 5, 5]) == 0.0
    assert C.mean_std([2.0]) == (2.0, 0.0)
    # the language study's GLUE metrics: F1 of one class is 2 TP / (2 TP + FP + FN) with any other labels around
    y, p = [1, 1, 0, 2, 1, 2], [1, 0, 1, 2, 1, 1]  # TP 2, FP 2, FN 1
    assert C.binary_f1(y, p) == pytest.approx(4 / 7) and C.binary_f1([0, 2], [2, 0]) == 0.0
    assert C.matthews([0, 1, 0, 1], [0, 0, 0, 0]) == 0.0 and C.matthews([2, 2], [2, 2]) == 0.0  # undefined: 0
    x, z = [0.5, 1.5, 2.0, 4.0], [1.0, 0.0, 3.0, 5.0]
    assert C.pearson(x, z) == pytest.approx(np.corrcoef(x, z)[0, 1], abs=1e-15) and C.pearson(x, [1, 1, 1, 1]) == 0.0


MODULES = sorted(m.name for m in pkgutil.walk_packages(nmtune_study.__path__, "nmtune_study."))


def test_every_study_module_is_collected() -> None:
    assert {"nmtune_study.common", "nmtune_study.report.claims", "nmtune_study.report.stats",
            "nmtune_study.reproduce", "nmtune_study.data.text"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    res = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0, f"{res.failed} of {res.attempted} doctest examples in {name} failed (see stdout)"


def test_compare_runs_command_tables_each_regime_and_names_a_missing_run(tmp_path, capsys) -> None:
    from nmtune_study.report import compare

    def run(name: str, verdicts: dict[str, str]) -> pathlib.Path:
        d = tmp_path / name
        d.mkdir()
        claims = [{"claim": claim, "regime": regime, "verdict": v, "estimate": 0.5, "ci_low": 0.1, "ci_high": 0.9,
                   "unit": "rho" if regime == "contrastive" else "points"}
                  for (regime, claim), v in ((k.split(":"), v) for k, v in verdicts.items())]
        (d / "claims.json").write_text(json.dumps(claims))
        return d

    a = run("a", {"supervised:s1": "reproduced", "contrastive:c1": "inconclusive", "contrastive:c2": "contradicted"})
    b = run("b", {"supervised:s1": "reproduced", "contrastive:c1": "reproduced", "contrastive:c2": "reproduced"})
    out = tmp_path / "cmp" / "comparison.md"
    assert compare.main([str(a), str(b), "--labels", "20 epochs", "60 epochs", "--regimes", "contrastive",
                         "--title", "T", "--intro", "what differs", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# T\n\nwhat differs\n\n## contrastive\n") and "## supervised" not in text
    assert "| c1 | +0.500 [+0.100, +0.900] inconclusive | +0.500 [+0.100, +0.900] reproduced | yes |" in text
    assert capsys.readouterr().out.strip() == "Verdicts flipping between reproduced and contradicted: 1."
    with pytest.raises(FileNotFoundError, match="finished run"):
        compare.main([str(a), str(tmp_path / "missing"), "--labels", "x", "y", "--title", "T", "--out", str(out)])
