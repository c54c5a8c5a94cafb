"""First-hour reliability (issue 10): every floating dtype, NumPy input, checkpoint keys,
label ranges and argument relations get a result or a clear error, never a deep torch one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nmtune import NMTuneHead, NMTuneLoss, NMTuneRegularizer, TuningConfig, evaluate, extract_features, fit

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
