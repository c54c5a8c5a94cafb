"""First-hour reliability (issue 10): every floating dtype, NumPy input, checkpoint keys,
label ranges and argument relations get a result or a clear error, never a deep torch one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nmtune import (
    NMTuneConfig, NMTuneHead, NMTuneLoss, NMTuneRegularizer, TuningConfig, evaluate, extract_features, fit,
)

FAST = TuningConfig(epochs=2, batch_size=16)


def _data(n: int = 48, d: int = 8, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    return torch.randn(n, d, generator=g) + y[:, None].float(), y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["lp", "mlp", "nmtune"])
def test_fit_and_evaluate_take_any_floating_dtype(dtype: torch.dtype, method: str) -> None:
    x, y = _data()
    res = fit(x.to(dtype), y, method, config=FAST)
    assert next(res.head.parameters()).dtype == torch.float32  # trains in float32 by default
    m = evaluate(res.head, x.to(dtype), y)
    assert 0.0 <= m["accuracy"] <= 1.0 and np.isfinite(m["sve"])


def test_fit_dtype_option_and_numpy_inputs() -> None:
    x, y = _data()
    res = fit(x.double().numpy(), y.numpy(), "mlp", config=FAST, dtype=torch.float64)
    assert next(res.head.parameters()).dtype == torch.float64
    assert evaluate(res.head, x.numpy(), y.numpy())["n"] == 48.0
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        fit(x, y, "mlp", config=FAST, dtype=torch.int64)
    with pytest.raises(TypeError, match="features must be a torch.Tensor or a NumPy array; got list"):
        fit(x.tolist(), y, "mlp", config=FAST)


def test_checkpoint_refuses_other_data_of_the_same_shape(tmp_path) -> None:
    x, y = _data()
    fit(x, y, "mlp", config=FAST, checkpoint_dir=tmp_path)
    x2, _ = _data(seed=1)
    with pytest.raises(ValueError, match=r"different fit \(changed: features\)"):
        fit(x2, y, "mlp", config=FAST, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"changed: labels"):
        fit(x, y.roll(1), "mlp", config=FAST, checkpoint_dir=tmp_path)
    # the same call resumes (finished: returns the saved head without training)
    again = fit(x, y, "mlp", config=FAST, checkpoint_dir=tmp_path)
    assert len(again.history) == 2


def test_labels_out_of_range_are_named() -> None:
    x, y = _data()
    bad = y.clone()
    bad[5] = -1
    with pytest.raises(ValueError, match=r"labels must be class indices >= 0; got -1 at index 5"):
        fit(x, bad, "mlp", config=FAST)
    res = fit(x, y, "mlp", config=FAST)
    with pytest.raises(ValueError, match=r"got -1 at index 5"):
        evaluate(res.head, x, bad)
    bad[5] = 7
    with pytest.raises(ValueError, match=r"lie in \[0, num_classes=3\); got 7 at index 5"):
        evaluate(res.head, x, bad)
    with pytest.raises(TypeError, match="labels must be integer class indices"):
        fit(x, y.float(), "mlp", config=FAST)


def test_extract_features_refuses_non_tensor_outputs() -> None:
    model = torch.nn.Linear(4, 3)
    loader = [(torch.randn(5, 4), torch.zeros(5))]
    feats, labels = extract_features(model, loader)
    assert feats.shape == (5, 3) and labels.dtype == torch.int64
    with pytest.raises(TypeError, match="must return a floating tensor of features; got dict"):
        extract_features(model, loader, forward=lambda m, x: {"out": m(x)})


def test_half_precision_loss_is_float32_and_finite() -> None:
    # M=64, D=768, feature std 32: the float16 result used to overflow to inf (the float32 value is ~1.3e5)
    g = torch.Generator().manual_seed(0)
    z32 = 32 * torch.randn(64, 768, generator=g)
    f32 = torch.randn(64, 768, generator=g)
    reference = NMTuneRegularizer()(z32, f32)
    for dtype in (torch.float16, torch.bfloat16):
        out = NMTuneRegularizer()(z32.to(dtype), f32.to(dtype))
        assert out.dtype == torch.float32 and torch.isfinite(out)
        torch.testing.assert_close(out, reference, rtol=2e-2, atol=0.0)
    parts = NMTuneLoss()(torch.randn(64, 3, dtype=torch.float16), torch.zeros(64, dtype=torch.long),
                         z32.half(), f32.half(), return_components=True)
    assert parts.loss.dtype == torch.float32 and parts.covariance.dtype == torch.float32


def test_float64_components_keep_float64() -> None:
    z, f = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    parts = NMTuneLoss()(torch.randn(16, 3, dtype=torch.float64), torch.zeros(16, dtype=torch.long), z, f,
                         return_components=True)
    assert {getattr(parts, k).dtype for k in ("loss", "task", "covariance", "sve", "lsvr")} == {torch.float64}


def test_argument_relations_are_checked() -> None:
    crit = NMTuneLoss()
    z, f = torch.randn(32, 8), torch.randn(32, 8)
    with pytest.raises(ValueError, match=r"logits has 16 row\(s\) but z has 32"):
        crit(torch.randn(16, 3), torch.zeros(16, dtype=torch.long), z, f)
    with pytest.raises(ValueError, match=r"target has shape \(16,\) but logits has 32 row"):
        crit(torch.randn(32, 3), torch.zeros(16, dtype=torch.long), z, f)
    with pytest.raises(ValueError, match="one device; got z on meta, f on cpu"):
        NMTuneRegularizer()(torch.empty(32, 8, device="meta"), f)
    with pytest.raises(ValueError, match="one device; got logits on cpu, target on cpu, z on meta"):
        crit(torch.randn(32, 3), torch.zeros(32, dtype=torch.long), torch.empty(32, 8, device="meta"), f)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor; got list"):
        crit([0.0] * 32, torch.zeros(32, dtype=torch.long), z, f)
    with pytest.raises(ValueError, match=r"logits must be floating \(N, C\) scores"):
        crit(torch.randn(32), torch.zeros(32, dtype=torch.long), z, f)
    with pytest.raises(ValueError, match="z and f must have the same shape"):
        crit(torch.randn(32, 3), torch.zeros(32, dtype=torch.long), z, f[:16])


def test_one_row_is_an_error_unless_skip_is_asked() -> None:
    z, f = torch.randn(1, 8, requires_grad=True), torch.randn(1, 8)
    logits, y = torch.randn(1, 3, requires_grad=True), torch.tensor([2])
    with pytest.raises(ValueError, match=r"z has 1 row\(s\); the batch statistics need at least 2"):
        NMTuneLoss()(logits, y, z, f)
    parts = NMTuneLoss(small_batch="skip")(logits, y, z, f, return_components=True)
    parts.loss.backward()
    assert float(parts.skipped) == 1.0 and float(parts.regularizer) == 0.0
    torch.testing.assert_close(parts.loss, torch.nn.functional.cross_entropy(logits, y))
    assert z.grad is not None and float(z.grad.abs().sum()) == 0.0  # z stays in the graph with a zero gradient


def test_fit_with_top_k_keeps_every_sample_on_a_short_trailing_batch() -> None:
    # 51 rows at batch 16 leave a trailing batch of 3 rows, fewer than top_k = 5 singular values:
    # it joins the previous batch instead of raising (found by the top_k ablation).
    x, y = _data(n=51)
    res = fit(x, y, "nmtune", config=FAST, loss_config=NMTuneConfig(top_k=5))
    assert len(res.history) == 2 and all(np.isfinite(h["loss"]) for h in res.history)


@pytest.mark.parametrize(
    "where, call",
    [("loss_config", lambda: fit(torch.randn(16, 4), torch.arange(16) % 2, "nmtune", config=FAST, loss_config=3)),
     ("config", lambda: NMTuneLoss(config=3.5)),
     ("config", lambda: NMTuneRegularizer(config=[1]))],  # wrap_lora's: tests/test_lora_api.py
)
def test_every_config_argument_names_the_accepted_types(where, call) -> None:
    with pytest.raises(TypeError, match=f"{where} must be an NMTuneConfig, a preset name or None; got"):
        call()
