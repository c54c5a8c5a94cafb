"""nmtune.analysis: spectra, summaries, claim checks and plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nmtune import analysis as A


def test_spectrum_summary_matches_numpy_reference():
    x = torch.randn(40, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = np.linalg.svd((x / x.norm(dim=1, keepdim=True)).numpy(), compute_uv=False)
    p = s / s.sum()
    got = A.spectrum_summary(x)
    assert got["sve"] == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-6)
    assert got["lsvr"] == pytest.approx(float(-np.log(p[0])), rel=1e-6)
    assert got["effective_rank"] == pytest.approx(math.exp(got["sve"]))
    assert got["top1_share"] == pytest.approx(float(p[0]), rel=1e-6)
    raw = A.feature_spectrum(x, normalize_rows=False)
    assert np.allclose(raw.numpy(), np.linalg.svd(x.numpy(), compute_uv=False), rtol=1e-6)


@pytest.mark.parametrize("bad", [torch.zeros(5), torch.zeros(1, 4), torch.zeros(3, 3, dtype=torch.long), [[1.0]]])
def test_feature_spectrum_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="features"):
        A.feature_spectrum(bad)


def _records(table):
    """table: {(method, gamma, kind): [per-seed accuracy]} -> records over two tasks."""
    out = []
    for (method, gamma, kind), accs in table.items():
        for seed, acc in enumerate(accs):
            for task, shift in (("a", 0.01), ("b", -0.01)):
                out.append(dict(gamma=gamma, method=method, kind=kind, task=task, domain="d", seed=seed,
                                fraction=1.0, accuracy=acc + shift, macro_f1=acc + shift, sve=1.0 + gamma,
                                lsvr=2.0 - gamma))
    return out


def test_summarize_records_averages_tasks_then_seeds():
    recs = _records({("lp", 0.0, "id"): [0.5, 0.7]})
    recs.append(dict(recs[0], fraction=0.5, accuracy=0.0))  # other fraction: ignored
    s = A.summarize_records(recs)
    mu, sd = s["lp"][0.0]["id"]["accuracy"]
    assert mu == pytest.approx(0.6) and sd == pytest.approx(math.sqrt(0.02))
    assert A.summarize_records(recs, fraction=0.5)["lp"][0.0]["id"]["accuracy"][0] == pytest.approx(0.0)


def _paper_like():
    gam = [0.0, 0.05, 0.1, 0.2, 0.3]
    id_acc = {"lp": [0.80, 0.82, 0.81, 0.78, 0.75], "mlp": [0.81, 0.83, 0.82, 0.79, 0.76],
              "nmtune": [0.86, 0.85, 0.84, 0.82, 0.80]}
    ood_acc = {"lp": [0.60, 0.55, 0.52, 0.48, 0.45], "mlp": [0.61, 0.56, 0.53, 0.49, 0.46],
               "nmtune": [0.66, 0.64, 0.60, 0.55, 0.50]}
    summary = {}
    for m in id_acc:
        summary[m] = {}
        for i, g in enumerate(gam):
            sve = {"lp": 3.0, "mlp": 2.5, "nmtune": 3.2}[m]
            lsvr = {"lp": 1.0, "mlp": 1.4, "nmtune": 0.9}[m]
            summary[m][g] = {
                "id": {"accuracy": (id_acc[m][i], 0.001), "macro_f1": (id_acc[m][i], 0.001), "sve": (sve, 0.0),
                       "lsvr": (lsvr, 0.0)},
                "ood": {"accuracy": (ood_acc[m][i], 0.001), "macro_f1": (ood_acc[m][i], 0.001), "sve": (sve, 0.0),
                        "lsvr": (lsvr, 0.0)},
            }
    backbone = {g: {"id_sve": 3 + g, "ood_lsvr": 1 + g} for g in gam}
    pre = {g: 0.9 - g for g in gam}
    return summary, backbone, pre


def test_check_claims_all_reproduced_on_paper_like_numbers():
    summary, backbone, pre = _paper_like()
    claims = A.check_claims(summary, backbone=backbone, pretrain_accuracy=pre)
    assert len(claims) == 16
    failed = [c["claim"] for c in claims if not c["reproduced"]]
    assert failed == [], failed
    md = A.claims_markdown(claims)
    assert md.count("\n") == len(claims) + 1 and "| yes |" in md


def test_check_claims_detects_contradicting_numbers():
    summary, backbone, pre = _paper_like()
    for g in summary["lp"]:  # OOD rises with noise, clean best ID: both noise claims must fail
        summary["lp"][g]["ood"]["accuracy"] = (0.5 + g, 0.001)
        summary["lp"][g]["id"]["accuracy"] = (0.9 - g, 0.001)
    backbone = {g: {"id_sve": 3 - g, "ood_lsvr": 1 - g} for g in backbone}
    claims = {c["claim"]: c for c in A.check_claims(summary, backbone=backbone, pretrain_accuracy=pre)}
    assert not claims["Slight noise (5-10%) helps ID transfer (LP)"]["reproduced"]
    assert not claims["OOD accuracy decreases monotonically with noise (LP)"]["reproduced"]
    assert not claims["SVE of the pre-trained features (ID test data) rises with noise"]["reproduced"]
    assert "Spearman -1.00" in claims["LSVR of the pre-trained features (OOD test data) rises with noise"]["evidence"]


def test_spearman_handles_ties():
    assert A._spearman([0, 1, 2], [5, 5, 5]) == 0.0
    assert A._spearman([0, 1, 2], [1, 2, 3]) == pytest.approx(1.0)


def test_mean_std_edge_cases():
    assert A.mean_std([2.0]) == (2.0, 0.0)
    assert all(math.isnan(v) for v in A.mean_std([]))


def test_plots_write_pngs(tmp_path):
    summary, backbone, _ = _paper_like()
    for g in backbone:
        backbone[g]["id_points"] = [(3.0 + g, 0.8), (3.1 + g, 0.7)]
        backbone[g]["ood_points"] = [(1.0 + g, 0.5)]
    paths = [
        A.plot_noise_curves({0.5: summary, 1.0: summary}, tmp_path / "f2.png"),
        A.plot_spectral_metrics(backbone, tmp_path / "f3.png"),
        A.plot_method_comparison(summary, tmp_path / "f5.png"),
        A.plot_spectra({"a": [3.0, 2.0, 1.0], "b": [1.0, 1.0, 1.0]}, tmp_path / "s.png", title="t"),
    ]
    for p in paths:
        data = open(p, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
