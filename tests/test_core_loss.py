"""NMTuneConfig, NMTuneRegularizer and NMTuneLoss."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import reference as ref
from nmtune import LossComponents, NMTuneConfig, NMTuneHead, NMTuneLoss, NMTuneRegularizer


def _zf(m=32, d=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(m, d, generator=g, dtype=dtype)
    z = f + 0.3 * torch.randn(m, d, generator=g, dtype=dtype)
    return z, f


def test_presets_have_the_exact_weights():
    paper = NMTuneConfig.from_preset("paper")
    assert (paper.lambda_, paper.consistency_weight, paper.covariance_weight, paper.singular_value_weight) == (0.01, 1.0, 1.0, 1.0)
    assert (paper.top_k, paper.consistency_mode, paper.precision) == (1, "sample", "float64")
    official = NMTuneConfig.from_preset("official")
    assert (official.lambda_, official.consistency_weight, official.covariance_weight, official.singular_value_weight) == (1.0, 1.0, 0.04, 0.001)
    assert (official.top_k, official.consistency_mode) == (5, "element")
    none = NMTuneConfig.from_preset("none")
    assert none.lambda_ == 0.0
    assert NMTuneConfig() == paper
    assert NMTuneLoss().config == paper


@pytest.mark.parametrize("preset", ["paper", "official", "none"])
def test_config_json_round_trip(preset):
    cfg = NMTuneConfig.from_preset(preset, precision="float32", check_finite=False)
    text = cfg.to_json()
    assert json.loads(text)["precision"] == "float32"
    assert NMTuneConfig.from_json(text) == cfg


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(lambda_=-1.0), ValueError, r"lambda_ must be >= 0.0; got -1.0"),
        (dict(covariance_weight=float("nan")), ValueError, "covariance_weight.*nan"),
        (dict(consistency_weight="1"), TypeError, "consistency_weight.*'1'"),
        (dict(top_k=0), ValueError, "top_k.*got 0"),
        (dict(consistency_mode="l2"), ValueError, "consistency_mode.*'l2'"),
        (dict(precision="half"), ValueError, "precision.*'half'"),
        (dict(check_finite=1), TypeError, "check_finite.*bool"),
        (dict(equal_local_batches="yes"), TypeError, "equal_local_batches.*bool"),
        (dict(distributed_statistics="allreduce"), ValueError, r"distributed_statistics.*\('auto', 'gather', 'reduce'\).*'allreduce'"),
    ],
)
def test_config_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        NMTuneConfig(**kwargs)


def test_unknown_preset_and_fields():
    with pytest.raises(ValueError, match=r"unknown preset 'paperz'.*\['none', 'official', 'paper'\]"):
        NMTuneConfig.from_preset("paperz")
    with pytest.raises(ValueError, match=r"unknown NMTuneConfig field\(s\) \['lam'\]"):
        NMTuneConfig.from_dict({"lam": 1.0})
    with pytest.raises(TypeError, match="preset name"):
        NMTuneLoss(config=3)


def test_loss_is_task_plus_regularizer_and_components_are_detached():
    z, f = _zf()
    logits = torch.randn(32, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (32,))
    crit = NMTuneLoss()
    total = crit(logits, y, z, f)
    expected = nn.functional.cross_entropy(logits, y) + ref.regularizer(z, f)
    torch.testing.assert_close(total, expected)

    parts = crit(logits, y, z, f, return_components=True)
    assert isinstance(parts, LossComponents)
    torch.testing.assert_close(parts.loss, total)
    assert parts.loss.requires_grad
    for field in dataclasses.fields(parts):
        if field.name != "loss":
            value = getattr(parts, field.name)
            assert not value.requires_grad and value.dim() == 0, field.name
    torch.testing.assert_close(parts.consistency.double(), ref.consistency(z, f), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.covariance.double(), ref.covariance(z), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.singular_value.double(), ref.ratio(z), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.sve.double(), ref.sve(z), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.lsvr.double(), ref.lsvr(z), rtol=1e-5, atol=1e-6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        parts.task = torch.zeros(())  # type: ignore[misc]


def test_components_report_metrics_even_when_spectrum_term_is_off():
    z, f = _zf()
    parts = NMTuneRegularizer(singular_value_weight=0.0)(z, f, return_components=True)
    assert float(parts.singular_value) == 0.0
    torch.testing.assert_close(parts.sve.double(), ref.sve(z), rtol=1e-5, atol=1e-6)


def test_disabled_terms_keep_graph_connected():
    head = NMTuneHead(8, 3)
    x = torch.randn(16, 8)
    out = head(x)
    reg = NMTuneRegularizer("none")(out.features, x)
    assert float(reg) == 0.0 and reg.requires_grad
    reg.backward()
    assert all(p.grad is not None for p in head.mlp.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loss(dtype):
    head = NMTuneHead(16, 4).to(dtype)
    x = torch.randn(32, 16).to(dtype)
    y = torch.randint(0, 4, (32,))
    out = head(x)
    loss = NMTuneLoss()(out.logits.float(), y, out.features, x)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad.float()).all() for p in head.parameters())


# -- the 0.1 names (one release with a DeprecationWarning) ------------------------------

RENAMED = {"mse_weight": "consistency_weight", "cov_weight": "covariance_weight", "svd_weight": "singular_value_weight",
           "consistency": "consistency_mode"}
OLD_VALUES = {"mse_weight": 0.5, "cov_weight": 0.25, "svd_weight": 0.125, "consistency": "element"}


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_old_field_names_still_work_with_a_deprecation_warning(old: str) -> None:
    new, value = RENAMED[old], OLD_VALUES[old]
    expected = NMTuneConfig(**{new: value})
    makers = {
        "NMTuneConfig": lambda: NMTuneConfig(**{old: value}),
        "from_preset": lambda: NMTuneConfig.from_preset("paper", **{old: value}),
        "replace": lambda: NMTuneConfig().replace(**{old: value}),
        "from_dict (a 0.1 file)": lambda: NMTuneConfig.from_dict(_old_dict(old, value)),
        "NMTuneRegularizer": lambda: NMTuneRegularizer(**{old: value}).config,
        "NMTuneLoss": lambda: NMTuneLoss("paper", **{old: value}).config,
    }
    for where, make in makers.items():
        with pytest.warns(DeprecationWarning, match=f"NMTuneConfig.{old} is renamed '{new}'"):
            got = make()
        assert got == expected, where
    with pytest.warns(DeprecationWarning, match=f"NMTuneConfig.{old} is renamed"):
        assert getattr(expected, old) == value


def _old_dict(old: str, value: object) -> dict:
    data = NMTuneConfig().to_dict()
    del data[RENAMED[old]]
    data[old] = value
    return data


def test_uses_spectrum_is_the_old_name_of_uses_singular_value() -> None:
    with pytest.warns(DeprecationWarning, match="uses_spectrum is renamed 'uses_singular_value'"):
        assert NMTuneConfig().uses_spectrum is True


def test_old_and_new_name_together_is_an_error() -> None:
    with pytest.raises(TypeError, match="both 'svd_weight' .* and 'singular_value_weight'"):
        with pytest.warns(DeprecationWarning):
            NMTuneConfig(svd_weight=0.5, singular_value_weight=0.5)


def test_new_names_emit_no_warning() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = NMTuneConfig.from_preset("official", consistency_weight=0.5)
        NMTuneConfig.from_json(cfg.to_json())
        NMTuneLoss(cfg)
        assert cfg.uses_singular_value and cfg.consistency_mode == "element"


@pytest.mark.parametrize(
    "old, new",
    [("singular_value_ratio_loss", "singular_value_loss"),
     ("ratio_from_singular_values", "singular_value_loss_from_singular_values"),
     ("entropy_from_singular_values", "sve_from_singular_values")],
)
def test_old_function_names_still_work_with_a_deprecation_warning(old: str, new: str) -> None:
    import nmtune.functional as NF

    z = torch.randn(12, 6, generator=torch.Generator().manual_seed(0))
    arg = z if "loss" in new and "from" not in new else NF.singular_values(z)
    with pytest.warns(DeprecationWarning, match=f"functional.{old} is renamed '{new}'"):
        got = getattr(NF, old)(arg)
    torch.testing.assert_close(got, getattr(NF, new)(arg))
