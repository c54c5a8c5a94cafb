"""Features larger than memory (issue 23, item 2): ``fit`` / ``evaluate`` stream memory-mapped
arrays and datasets of ``(features, label)`` rows to the same head and metrics as the in-memory
path, and ``extract_features(path=...)`` writes to disk in chunks and resumes after a kill."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import nmtune._rows as rows_module
from nmtune import NMTuneHead, TuningConfig, evaluate, extract_features, fit

# 70 rows in batches of 16: a trailing batch of 6 rows, shuffled differently each epoch
CFG = TuningConfig(epochs=2, batch_size=16, seed=3)


def _data(n: int = 70, d: int = 12, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    return torch.randn(n, d, generator=g) + y[:, None].float(), y


def _memmaps(tmp_path, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    return np.load(tmp_path / "x.npy", mmap_mode="r"), np.load(tmp_path / "y.npy", mmap_mode="r")


def _same_head(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k  # bit-identical


@pytest.mark.parametrize("method", ["lp", "nmtune"])
def test_fit_on_a_memmap_gives_the_in_memory_head(tmp_path, method: str) -> None:
    x, y = _data()
    xm, ym = _memmaps(tmp_path, x, y)
    assert isinstance(xm, np.memmap)
    ref = fit(x, y, method, config=CFG)
    res = fit(xm, ym, method, config=CFG)
    _same_head(ref.head, res.head)
    assert res.history == ref.history
    # labels as a tensor beside a memory-mapped feature file
    _same_head(ref.head, fit(xm, y, method, config=CFG).head)


def test_fit_on_a_float64_memmap_casts_each_batch_like_the_in_memory_path(tmp_path) -> None:
    x, y = _data()
    xm, ym = _memmaps(tmp_path, x.double(), y.int())
    _same_head(fit(x.double(), y.int(), "nmtune", config=CFG).head, fit(xm, ym, "nmtune", config=CFG).head)


def test_fit_on_a_dataset_of_rows_gives_the_in_memory_head() -> None:
    x, y = _data()
    ref = fit(x, y, "nmtune", config=CFG)
    _same_head(ref.head, fit(TensorDataset(x, y), None, "nmtune", config=CFG).head)

    class Rows:  # any indexable of (features, label) pairs, NumPy rows included
        def __len__(self) -> int:
            return len(y)

        def __getitem__(self, i: int):
            return x[i].numpy(), int(y[i])

    _same_head(ref.head, fit(Rows(), method="nmtune", config=CFG).head)


def test_streamed_batches_never_read_the_whole_array(tmp_path, monkeypatch) -> None:
    x, y = _data()
    xm, ym = _memmaps(tmp_path, x, y)
    reads: list[int] = []

    class Spy(np.memmap):
        def __getitem__(self, key):
            out = super().__getitem__(key)
            if isinstance(out, np.ndarray) and out.ndim == 2:
                reads.append(out.shape[0])
            return out

    monkeypatch.setattr(rows_module, "_CHUNK_BYTES", 20 * 12 * 4)  # validation chunks of 20 rows
    res = fit(xm.view(Spy), ym, "nmtune", config=CFG)
    evaluate(res.head, xm.view(Spy), ym, batch_size=32)
    assert reads and max(reads) <= 32 < len(x)  # chunks of 20, batches of <= 16 + 6, evaluation of 32


def test_evaluate_streams_to_the_in_memory_metrics(tmp_path) -> None:
    x, y = _data()
    xm, ym = _memmaps(tmp_path, x, y)
    head = fit(x, y, "nmtune", config=CFG).head
    for normalize_rows in (False, True):
        ref = evaluate(head, x, y, normalize_rows=normalize_rows)
        for source, labels in ((xm, ym), (TensorDataset(x, y), None)):
            got = evaluate(head, source, labels, batch_size=32, normalize_rows=normalize_rows)
            assert got["accuracy"] == ref["accuracy"] and got["macro_f1"] == ref["macro_f1"] and got["n"] == 70
            assert got["sve"] == pytest.approx(ref["sve"], abs=1e-6)
            assert got["lsvr"] == pytest.approx(ref["lsvr"], abs=1e-6)


def test_streamed_inputs_are_checked_with_the_row_named(tmp_path) -> None:
    x, y = _data()
    bad = x.clone()
    bad[45, 3] = float("nan")
    xm, ym = _memmaps(tmp_path, bad, y)
    with pytest.raises(ValueError, match=r"features \(rows 0:70\) holds 1 NaN"):
        fit(xm, ym, "nmtune", config=CFG)
    xm, ym = _memmaps(tmp_path, x, y)
    y2 = y.clone()
    y2[33] = -2
    with pytest.raises(ValueError, match=r"labels must be class indices >= 0; got -2 at index 33"):
        fit(xm, y2, "mlp", config=CFG)
    with pytest.raises(ValueError, match=r"lie in \[0, num_classes=3\); got 3 at index 3"):
        fit(xm, ym, "mlp", config=CFG, num_classes=3)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor or a NumPy array; got NoneType"):
        fit(xm, None, "mlp", config=CFG)
    with pytest.raises(ValueError, match="features has 70 rows but labels has shape"):
        fit(xm, ym[:60], "mlp", config=CFG)
    with pytest.raises(ValueError, match="its labels come from the rows; pass labels=None"):
        fit(TensorDataset(x, y), y, "mlp", config=CFG)
    with pytest.raises(TypeError, match="floating-point .* row 0 is a torch.int64"):
        fit(TensorDataset(y[:, None], y), None, "mlp", config=CFG)
    with pytest.raises(TypeError, match=r"must yield \(features, label\) pairs; row 0 is a tuple of 1"):
        fit(TensorDataset(x), None, "mlp", config=CFG)
    head = NMTuneHead(12, 4)
    with pytest.raises(ValueError, match=r"lie in \[0, num_classes=4\); got 9 at index 50"):
        evaluate(head, xm, np.where(np.arange(70) == 50, 9, ym))


def test_checkpoints_key_the_content_not_the_container(tmp_path) -> None:
    x, y = _data()
    xm, ym = _memmaps(tmp_path, x, y)
    first = fit(x, y, "nmtune", config=CFG, checkpoint_dir=tmp_path / "ck")
    again = fit(xm, ym, "nmtune", config=CFG, checkpoint_dir=tmp_path / "ck")  # resumes the finished run
    _same_head(first.head, again.head)
    x2 = x.clone()
    x2[7, 0] += 1.0
    xm2, _ = _memmaps(tmp_path, x2, y)
    with pytest.raises(ValueError, match=r"changed: features"):
        fit(xm2, ym, "nmtune", config=CFG, checkpoint_dir=tmp_path / "ck")


class _Backbone(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(5, 3)
        self.calls = 0
        self.fail_after: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")  # what a SIGINT or a crash looks like to the loop
        self.calls += 1
        return self.lin(x)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(23, 5, generator=g), torch.arange(23) % 4), batch_size=4)


def test_extract_features_to_disk_resumes_after_a_kill(tmp_path) -> None:
    torch.manual_seed(0)
    model = _Backbone()
    x_mem, y_mem = extract_features(model, _loader())
    clean_x, clean_y = extract_features(model, _loader(), path=tmp_path / "clean")
    assert isinstance(clean_x, np.memmap) and clean_x.shape == (23, 3) and clean_y.dtype == np.int64
    assert np.array_equal(clean_x, x_mem.numpy()) and np.array_equal(clean_y, y_mem.numpy())

    model.calls, model.fail_after = 0, 3  # dies in the 4th of 6 batches
    with pytest.raises(KeyboardInterrupt):
        extract_features(model, _loader(), path=tmp_path / "killed")
    progress = json.loads((tmp_path / "killed" / "progress.json").read_text())
    assert progress == dict(num_examples=23, dim=3, rows=12, batches=3)
    model.calls, model.fail_after = 0, None
    x, y = extract_features(model, _loader(), path=tmp_path / "killed")
    assert model.calls == 3  # only the 3 missing batches ran the model
    assert np.array_equal(x, clean_x) and np.array_equal(y, clean_y)
    model.calls = 0
    extract_features(model, _loader(), path=tmp_path / "killed")  # finished: nothing runs
    assert model.calls == 0
    # the on-disk output feeds fit's streaming path
    assert len(fit(x, y, "mlp", config=TuningConfig(epochs=1, batch_size=8)).history) == 1


def test_extract_features_to_disk_checks_its_row_count(tmp_path) -> None:
    model = _Backbone()
    with pytest.raises(ValueError, match="yields more than num_examples=20 rows"):
        extract_features(model, _loader(), path=tmp_path / "a", num_examples=20)
    with pytest.raises(ValueError, match="yielded 23 rows but num_examples=30"):
        extract_features(model, _loader(), path=tmp_path / "b", num_examples=30)
    with pytest.raises(ValueError, match="needs num_examples"):
        extract_features(model, [(torch.randn(2, 5), torch.zeros(2))], path=tmp_path / "c")
    extract_features(model, _loader(), path=tmp_path / "d")
    with pytest.raises(ValueError, match="holds an extraction of num_examples=23 rows"):
        extract_features(model, _loader(), path=tmp_path / "d", num_examples=24)
