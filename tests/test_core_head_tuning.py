"""NMTuneHead and black-box tuning (fit / evaluate / extract_features)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nmtune import NMTuneHead, TuningConfig, evaluate, extract_features, fit
from nmtune.tuning import _macro_f1


def test_head_shapes_and_presets():
    head = NMTuneHead(768, 100)
    out = head(torch.randn(8, 768))
    assert out.logits.shape == (8, 100) and out.features.shape == (8, 768)
    assert head.hidden_features == 768 and head.scale is None

    official = NMTuneHead.from_preset("official", 32, 10)
    assert official.hidden_features == 128
    assert any(isinstance(m, nn.BatchNorm1d) for m in official.mlp)
    torch.testing.assert_close(official.scale.detach(), torch.ones(32))
    x = torch.randn(6, 32)
    official.eval()
    out = official(x)
    torch.testing.assert_close(out.features, official.mlp(x) + x)  # residual, s = 1 at init

    lp = NMTuneHead.from_preset("linear", 32, 10)
    assert lp.is_linear_probe
    out = lp(x)
    assert out.features is x  # Z = F
    assert sum(p.numel() for p in lp.parameters()) == 32 * 10 + 10

    # leading dimensions go through BatchNorm as one batch
    assert official(torch.randn(2, 3, 32)).features.shape == (2, 3, 32)


def test_head_state_dict_round_trip(tmp_path):
    head = NMTuneHead.from_preset("official", 16, 4)
    head(torch.randn(8, 16))  # update BatchNorm running stats
    path = tmp_path / "head.pt"
    torch.save(head.state_dict(), path)
    other = NMTuneHead.from_preset("official", 16, 4)
    other.load_state_dict(torch.load(path))
    head.eval(), other.eval()
    x = torch.randn(5, 16)
    torch.testing.assert_close(head(x).logits, other(x).logits, rtol=0, atol=0)


def test_head_errors():
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 16\); got \(4, 15\)"):
        NMTuneHead(16, 3)(torch.randn(4, 15))
    with pytest.raises(TypeError, match="floating-point"):
        NMTuneHead(16, 3)(torch.ones(4, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="linear probe.*batch_norm=True"):
        NMTuneHead(16, 3, mlp=False, batch_norm=True)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1; got 0"):
        NMTuneHead(16, 0)
    with pytest.raises(ValueError, match="unknown head preset 'deep'"):
        NMTuneHead.from_preset("deep", 16, 3)


def _blobs(n=600, d=32, classes=4, sample_seed=0):
    """Separable but not trivially so: fixed random class means plus unit noise."""
    means = torch.randn(classes, d, generator=torch.Generator().manual_seed(1234)) * 0.6
    g = torch.Generator().manual_seed(sample_seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = means[y] + torch.randn(n, d, generator=g)
    return x, y


@pytest.mark.parametrize("method", ["lp", "mlp", "nmtune"])
def test_fit_learns_separable_features(method):
    x, y = _blobs()
    xt, yt = _blobs(n=300, sample_seed=1)  # same classes, fresh samples
    before = evaluate(NMTuneHead.from_preset("linear" if method == "lp" else "paper", 32, 4), xt, yt)
    res = fit(x, y, method, config=TuningConfig(epochs=15, batch_size=32))
    after = evaluate(res.head, xt, yt)
    assert after["accuracy"] > 0.9, after
    assert after["macro_f1"] > 0.9, after
    assert after["accuracy"] > before["accuracy"] + 0.3
    assert len(res.history) == 15
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert not res.head.training
    if method == "nmtune":
        assert res.history[-1]["covariance"] > 0 and res.history[-1]["singular_value"] < 0
    else:
        assert res.history[-1]["covariance"] == 0.0


def test_recipes():
    assert TuningConfig.recipe("vision", "lp").resolved("lp") == (0.1, 0.0)
    assert TuningConfig.recipe("vision", "mlp").resolved("mlp") == (1e-3, 1e-4)
    lang = TuningConfig.recipe("language", "nmtune")
    assert (lang.epochs, lang.schedule, lang.resolved("nmtune")) == (10, "linear", (1e-3, 1e-4))
    assert lang.resolved("lp") == (0.01, 0.0)
    assert TuningConfig(lr=0.5).resolved("lp") == (0.5, 0.0)
    with pytest.raises(ValueError, match="method must be one of.*'svm'"):
        TuningConfig().resolved("svm")
    with pytest.raises(ValueError, match="schedule.*'step'"):
        TuningConfig(schedule="step")


def test_fit_resumes_from_checkpoint(tmp_path, monkeypatch):
    x, y = _blobs(n=200)
    cfg = TuningConfig(epochs=4, batch_size=32)
    full = fit(x, y, "nmtune", config=cfg)
    # an interrupted run: two epochs, then the same call with more epochs resumes
    short = TuningConfig(epochs=4, batch_size=32)
    ckpt = tmp_path / "ckpt"

    class Stop(Exception):
        pass

    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2 * 7 + 1:  # 200 rows / 32 -> 7 batches per epoch; die inside epoch 3
            raise Stop
        return original(self, *a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", step)
        with pytest.raises(Stop):
            fit(x, y, "nmtune", config=short, checkpoint_dir=ckpt)
    resumed = fit(x, y, "nmtune", config=short, checkpoint_dir=ckpt)
    assert [h["epoch"] for h in resumed.history] == [1.0, 2.0, 3.0, 4.0]
    for a, b in zip(full.head.state_dict().values(), resumed.head.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="different fit"):
        fit(x, y, "nmtune", config=TuningConfig(epochs=5, batch_size=16), checkpoint_dir=ckpt)


def test_fit_errors():
    x, y = _blobs(n=50)
    with pytest.raises(ValueError, match="method must be one of"):
        fit(x, y, "svm")
    with pytest.raises(ValueError, match="50 rows but labels has 49"):
        fit(x, y[:-1])
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        fit(x[None], y)
    bad = x.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit(bad, y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=2\)"):
        fit(x, y, num_classes=2)
    with pytest.raises(ValueError, match="linear-probe head"):
        fit(x, y, "lp", head=NMTuneHead(32, 4))
    with pytest.raises(FloatingPointError, match="diverged"):
        fit(x * 1e30, y, "lp", config=TuningConfig(epochs=2, lr=1e30))


def test_macro_f1_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 6, (300,), generator=g)
    pred = torch.where(torch.rand(300, generator=g) < 0.6, y, torch.randint(0, 7, (300,), generator=g))
    ours = float(_macro_f1(pred, y, 7))
    theirs = sklearn_metrics.f1_score(y.numpy(), pred.numpy(), average="macro")
    assert math.isclose(ours, theirs, rel_tol=1e-9)


def test_extract_features_runs_backbone_once_per_batch():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    calls = {"n": 0}
    backbone.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    data = [(torch.randn(4, 3, 4), torch.arange(4)) for _ in range(3)]
    feats, labels = extract_features(backbone, data)
    assert feats.shape == (12, 5) and labels.tolist() == [0, 1, 2, 3] * 3
    assert calls["n"] == 3 and not feats.requires_grad
    with pytest.raises(ValueError, match=r"\(inputs, labels\)"):
        extract_features(backbone, [torch.randn(2, 12)])


def test_fit_with_custom_task_loss_regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    w = torch.randn(8, generator=g)
    y = x @ w  # float targets

    def mse(out, target):
        return nn.functional.mse_loss(out.squeeze(-1), target)

    with pytest.raises(ValueError, match="pass num_classes"):
        fit(x, y, "mlp", task_loss=mse)
    res = fit(x, y, "nmtune", num_classes=1, task_loss=mse, config=TuningConfig(epochs=20, batch_size=32, lr=1e-2))
    pred = res.head(x).logits.squeeze(-1).detach()
    r2 = 1 - ((pred - y) ** 2).mean() / y.var()
    assert r2 > 0.9, float(r2)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
