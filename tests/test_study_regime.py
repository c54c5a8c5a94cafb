"""The study's regime checks (issue 20): memorisation, the validation split, the selection
protocol, the lambda ablation and the profiles."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from nmtune.noise import symmetric_noise
from nmtune_study import contrastive, language
from nmtune_study import evaluate as ev
from nmtune_study import pretrain as pt
from nmtune_study import pretrain_clip as pc
from nmtune_study import reproduce as rp
from nmtune_study.data import vision as vd
from nmtune_study.report import claims as R

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


# ----------------------------------------------------------------------------- memorisation


def test_memorisation_of_a_model_that_fits_every_flipped_label_is_one():
    clean = torch.arange(200) % 10
    noisy = symmetric_noise(clean, 0.3, num_classes=10, seed=0)
    m = pt.memorisation(noisy.labels, noisy.labels, clean, noisy.mask)
    assert m["memorised"] == 1.0 and m["unflipped_accuracy"] == 1.0 and m["flipped_clean"] == 0.0
    m = pt.memorisation(clean, noisy.labels, clean, noisy.mask)  # learned the truth, ignored the noise
    assert m["memorised"] == 0.0 and m["flipped_clean"] == 1.0 and m["unflipped_accuracy"] == 1.0


def test_memorisation_of_an_untrained_model_is_near_chance():
    data = vd.offline_pretrain_data(tiny=True)
    x, y = vd.tensor_source(data.train)
    noisy = symmetric_noise(y, 0.5, num_classes=data.num_classes, seed=0)
    torch.manual_seed(0)
    model = pt.build_backbone(pt.GLYPH_ARCH, data.num_classes, data.in_chans)
    pred = pt._predict(model, vd.TensorBatches(vd.TensorImageDataset(x, noisy.labels), 64, None), torch.device("cpu"))
    m = pt.memorisation(pred, noisy.labels, y, noisy.mask)
    # chance of hitting the noisy label is 1/(C-1) = 0.05 for 20 classes; an untrained net is far from fitting
    assert 0.0 <= m["memorised"] < 0.2, m


def test_memorisation_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="predictions must have shape"):
        pt.memorisation(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long),
                        torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool))


def test_pretrain_records_memorisation_every_epoch(tmp_path):
    data = vd.offline_pretrain_data(tiny=True)
    m = pt.pretrain(data, tmp_path, pt.PretrainConfig(noise=0.3, epochs=2, batch_size=16), progress=False)
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    assert all(0.0 <= h["memorised"] <= 1.0 and 0.0 <= h["unflipped_accuracy"] <= 1.0 for h in m["history"])
    assert m["memorised"] == m["history"][-1]["memorised"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["memorised"] == m["memorised"]


class _OneHotClip(torch.nn.Module):
    """encode_image returns the one-hot of a per-image target text; encode_text the one-hot of the text."""

    def __init__(self, targets: torch.Tensor, n_texts: int) -> None:
        super().__init__()
        self.targets, self.n = targets, n_texts

    def encode_image(self, x):  # x[:, 0, 0, 0] holds the image's index
        return torch.nn.functional.one_hot(self.targets[x[:, 0, 0, 0].long()], self.n).float()

    def encode_text(self, tokens):
        return torch.nn.functional.one_hot(tokens, self.n).float()


def test_caption_memorisation_counts_retrieved_swapped_captions():
    clean = [f"caption {i}" for i in range(6)]
    noisy = clean[:]
    noisy[0], noisy[1] = clean[1], clean[0]  # pairs 0 and 1 swapped
    swapped = torch.tensor([True, True, False, False, False, False])
    texts = sorted(set(clean))
    tokenizer = lambda batch: torch.tensor([texts.index(t) for t in batch])  # noqa: E731
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 1, 2, 2)
    fits_noise = _OneHotClip(torch.tensor([texts.index(t) for t in noisy]), len(texts))
    m = pc.caption_memorisation(fits_noise, tokenizer, images, noisy, clean, swapped)
    assert (m["memorised"], m["flipped_clean"], m["unflipped_accuracy"]) == (1.0, 0.0, 1.0)
    ignores_noise = _OneHotClip(torch.tensor([texts.index(t) for t in clean]), len(texts))
    m = pc.caption_memorisation(ignores_noise, tokenizer, images, noisy, clean, swapped)
    assert (m["memorised"], m["flipped_clean"]) == (0.0, 1.0)


# ----------------------------------------------------------------------------- validation split and selection


def test_validation_split_is_stratified_disjoint_and_fixed():
    y = torch.arange(100) % 5
    fit_idx, val_idx = ev.validation_split(y, 0.2, seed=0)
    assert not set(fit_idx.tolist()) & set(val_idx.tolist())
    assert sorted(fit_idx.tolist() + val_idx.tolist()) == list(range(100))
    assert torch.bincount(y[val_idx]).tolist() == [4] * 5
    again = ev.validation_split(y, 0.2, seed=0)
    assert torch.equal(again[0], fit_idx) and torch.equal(again[1], val_idx)
    one = ev.validation_split(torch.tensor([0, 1, 1]), 0.5)  # a class of one row stays in the fit part
    assert 0 in one[0].tolist()
    with pytest.raises(ValueError, match="fraction"):
        ev.validation_split(y, 1.0)


def _features(n_train=60, n_test=40, d=8, k=3):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n_train) % k
    x = torch.randn(n_train, d, generator=g) + 3 * torch.nn.functional.one_hot(y, d).float()
    yt = torch.arange(n_test) % k
    xt = 100.0 + torch.randn(n_test, d, generator=g)  # test rows are recognisable: all > 50
    return {"train": (x, y), "tests": {"test": (xt, yt)}, "num_classes": k, "kind": "id", "name": "toy"}


def test_selection_reads_no_test_row_and_uses_one_split_for_every_method(monkeypatch):
    events, splits = [], []
    real_fit, real_evaluate, real_split = ev.fit, ev.evaluate, ev.validation_split

    def fit_spy(x, y, method, **kw):
        assert float(x.max()) < 50, "a test row reached fit"
        events.append(("fit", method, len(x)))
        return real_fit(x, y, method, **kw)

    def evaluate_spy(head, x, y, **kw):
        events.append(("evaluate", float(x.min()) > 50))
        return real_evaluate(head, x, y, **kw)

    def split_spy(y, fraction=0.2, seed=0):
        out = real_split(y, fraction, seed)
        splits.append(tuple(tuple(t.tolist()) for t in out))
        return out

    monkeypatch.setattr(ev, "fit", fit_spy)
    monkeypatch.setattr(ev, "evaluate", evaluate_spy)
    monkeypatch.setattr(ev, "validation_split", split_spy)
    settings = ev.TuneSettings(seeds=(0,), epochs=2, batch_size=32, protocols=("selected", "paper"))
    records = ev.tune_and_score(_features(), gamma=0.0, settings=settings)
    first_eval = next(i for i, e in enumerate(events) if e[0] == "evaluate")
    selection_fits = [i for i, e in enumerate(events) if e[0] == "fit" and e[2] < 60]
    assert len(selection_fits) == 3 * len(ev.lr_grid("lp"))  # every method, every rate, on the fit part
    assert max(selection_fits) < first_eval, "a test set was read before the selection ended"
    assert all(e[1] for e in events if e[0] == "evaluate"), "evaluate saw non-test rows"
    assert len(splits) == 3 and len(set(splits)) == 1, "methods were selected on different validation splits"
    assert {r["protocol"] for r in records} == {"selected", "paper"}
    for r in records:
        assert r["lr"] in ev.lr_grid(r["method"]) and r["train_loss"] >= 0
        if r["protocol"] == "paper":
            assert r["lr"] == ev.lr_grid(r["method"])[1]
        else:
            assert r["lr"] == max(r["lr_val_accuracy"].items(), key=lambda kv: kv[1])[0] or \
                r["lr_val_accuracy"][str(r["lr"])] == max(r["lr_val_accuracy"].values())
    assert all("regularizer_scale" in r for r in records if r["method"] == "nmtune")


def test_tune_settings_reject_unknown_protocol():
    with pytest.raises(ValueError, match="protocols"):
        ev.TuneSettings(protocols=("best",))


def test_regularizer_scale_matches_the_weighted_terms():
    from nmtune import NMTuneConfig

    cfg = NMTuneConfig.from_preset("paper")
    h = [{"loss": 2.0 + cfg.lambda_ * (0.5 + 0.2 - 0.1), "consistency": 0.5, "covariance": 0.2,
          "singular_value": -0.1}] * 2
    sc = ev.regularizer_scale(h, cfg)
    assert sc["last"]["task"] == pytest.approx(2.0)
    assert sc["first"]["covariance"]["weighted"] == pytest.approx(cfg.lambda_ * 0.2 / 2.0)
    assert sc["first"]["singular_value"]["unweighted"] == pytest.approx(-0.05)


def test_regularizer_scale_summary_is_quartiles_over_fits():
    """The Diagnosis's scale: quartiles over NMTune fits of one protocol (a fit's ID and OOD records
    count once), so one fit whose task loss ended near zero cannot carry the summary."""
    from nmtune_study.report.diagnosis import scale_stats
    from nmtune_study.report.markdown import _scale_suspect

    def fit(seed, weighted, protocol="selected", kind="id"):
        term = {"weighted": weighted, "unweighted": 100 * weighted, "value": 1.0}
        sc = {w: {"task": 1.0, "consistency": term, "covariance": term, "singular_value": term} for w in ("first", "last")}
        return dict(method="nmtune", protocol=protocol, gamma=0.1, pretrain_seed=0, task="t", seed=seed, fraction=1.0,
                    kind=kind, regularizer_scale=sc)

    records = [fit(s, w) for s, w in enumerate((0.01, 0.02, 0.03, 0.04, 50.0))]
    records += [fit(0, 0.01, kind="ood"), fit(9, 7.0, protocol="paper"), dict(method="lp", protocol="selected")]
    sc = scale_stats(records, "selected")
    assert sc["fits"] == 5
    assert sc["last"]["covariance/weighted"] == pytest.approx((0.02, 0.03, 0.04))
    assert sc["first"]["consistency/unweighted"][1] == pytest.approx(3.0)
    assert scale_stats(records, "paper")["fits"] == 1 and scale_stats([records[-1]], "selected") == {}
    line = _scale_suspect(sc)[0]
    assert "over 5 NMTune fits" in line and "covariance +3.00e-02 [+2.00e-02, +4.00e-02] (+3.00 unweighted)" in line
    assert line.endswith("Conclusion: the regularisers are a small perturbation of the task loss (< 5 % of it).")
    assert _scale_suspect({}) == []


# ----------------------------------------------------------------------------- study wiring


def test_lambda_ablation_plan_starts_at_zero_and_reuses_the_paper_lambda():
    a = rp.parser().parse_args(["--ablations", "lambda"])
    plan = rp._ablation_plan("lambda", a, rp._settings(a))
    names = [v for v, _ in plan]
    assert names[0] == "lambda=0" and names == [f"lambda={x:g}" for x in sorted(rp.LAMBDAS)]
    reused = [v for v, over in plan if over is None]
    assert reused == ["lambda=0.01"]
    assert all(over["loss_config"].lambda_ == float(v.split("=")[1]) for v, over in plan if over is not None)


def test_default_profile_report_says_what_differs_from_faithful():
    a = rp.parser().parse_args([])
    notes = rp._profile_notes(rp._settings(a))
    assert notes and "faithful" in notes[0] and "pretrain_seeds" in notes[0]
    f = rp.parser().parse_args(["--profile", "faithful"])
    s = rp._settings(f)
    assert len(s["pretrain_seeds"]) >= 5 and s["protocols"][0] == "selected"
    assert rp._profile_notes(s) == ["The faithful profile: the committed study."]


def test_clip_epochs_override_the_profile_and_the_report_says_so(capsys):
    s = rp._settings(rp.parser().parse_args(["--profile", "faithful", "--clip-epochs", "60"]))
    assert s["clip"] == dict(rp.PROFILES["faithful"]["clip"], epochs=60)
    assert rp.PROFILES["faithful"]["clip"]["epochs"] == 20  # the profile itself is untouched
    assert "'epochs': 60" in rp._profile_notes(s)[0] and "(faithful: {" in rp._profile_notes(s)[0]
    assert rp._settings(rp.parser().parse_args(["--tiny", "--clip-epochs", "2"]))["clip"] == {"epochs": 2}
    for flag in ("--clip-epochs", "--pretrain-epochs"):  # 0 is refused, not read as "the profile's"
        with pytest.raises(SystemExit):
            rp.parser().parse_args([flag, "0"])
        assert f"{flag}: expected a positive whole number; got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pt.parser().parse_args(["--out", "x", "--per-char", "0"])
    assert "--per-char: expected a positive whole number" in capsys.readouterr().err


def test_pretrain_rule_quotes_the_committed_calibration():
    """The pre-training length rule's figures come from the committed calibration runs."""
    cal = EXAMPLES / "results" / "calibration"
    runs = {json.loads(p.read_text())["epochs_done"]: json.loads(p.read_text())
            for p in sorted(cal.glob("e*/metrics.json"))}
    assert runs, "no calibration run committed"
    for epochs, m in runs.items():
        assert m["noise"] == 0.3 and m["config"]["seed"] == 100
        assert f"{epochs} epochs: memorised {m['memorised']:.3f}" in rp.PRETRAIN_RULE
    chosen = min(e for e, m in runs.items() if m["memorised"] >= 0.9)
    assert rp.PROFILES["faithful"]["pretrain_epochs"] == chosen


def test_draw_decided_names_claims_with_seed_estimates_of_both_signs():
    claims = [{"claim": "a", "per_pretrain_seed": [1.0, -1.0]}, {"claim": "b", "per_pretrain_seed": [1.0, 2.0]}]
    assert R.draw_decided(claims) == ["a"]


def test_example_flags_share_one_vocabulary(capsys):
    """Noise ratios are fractions everywhere (a percentage is refused, naming the unit); seed lists
    are comma lists or repeated values everywhere; tuning seeds are --seeds."""
    for main, argv in ((rp.main, ["--gammas", "10"]), (rp.main, ["--ablation-gamma", "10"]),
                       (contrastive.main, ["--gammas", "30"]), (pt.main, ["--out", "x", "--gamma", "10"]),
                       (pt.main, ["--out", "x", "--noise", "10"]), (pc.main, ["--out", "x", "--gamma", "10"]),
                       (ev.main, ["--backbone", "x", "--out", "x", "--gamma", "10"])):
        with pytest.raises(SystemExit):
            main(argv)
        assert "a fraction in [0, 1]" in capsys.readouterr().err
    s = rp._settings(rp.parser().parse_args(["--gammas", "0", "0.3", "--seeds", "3,4", "--pretrain-seeds", "5", "6,7"]))
    assert s["gammas"] == [0.0, 0.3] and s["seeds"] == [3, 4] and s["pretrain_seeds"] == [5, 6, 7]
    for main in (contrastive.main, language.main, ev.main):
        with pytest.raises(SystemExit):
            main(["--seeds", "3,x"])
        assert "seeds are integers" in capsys.readouterr().err


def test_memorisation_conclusion_has_three_levels():
    """Below 0.1 the early-learning phase, at or above the 0.8 bar the paper's regime, partly memorised between."""
    from nmtune_study.report.markdown import _memorisation_suspect

    def conclusion(value):
        return _memorisation_suspect("contrastive", {0.3: {0: value, 1: value}})[0].rsplit("Conclusion: ", 1)[1]

    assert conclusion(0.016) == "not memorised: early-learning regime."
    assert conclusion(0.69).startswith("partly memorised (below the bar")
    assert conclusion(0.999) == "memorised (the paper's regime)."
