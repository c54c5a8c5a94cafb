"""ReferenceCache: storage (memory, mmap), refusals, resume after a real SIGKILL, and
bit-for-bit equality of losses and gradients with the uncached LoRA + NMTune path.

Offline and CPU only: a tiny random-init BERT wrapped with ``wrap_lora``.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft", reason='needs the "lora" extra: pip install "nmtune[lora]"')
transformers = pytest.importorskip("transformers", reason='needs the "lora" extra')

from transformers import BertConfig, BertModel  # noqa: E402

from nmtune import NMTuneLoss, wrap_lora  # noqa: E402
from nmtune.reference_cache import ReferenceCache, model_fingerprint  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

ROOT = Path(__file__).resolve().parents[1]
N, T, C = 24, 10, 3


def _bert(seed: int = 0, dropout: float = 0.1) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    return BertModel(cfg)


def _lora(seed: int = 0, **kw) -> nn.Module:
    kw.setdefault("pooling", "mean")
    return wrap_lora(_bert(seed), num_classes=C, r=4, dropout=0.1, **kw).train()


def _data(n: int = N) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 100, (n, T), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):  # right padding, varied lengths
        ids[i, T - i % 4:] = 0
        mask[i, T - i % 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, C, (n,), generator=g),
            "idx": torch.arange(n)}


def _batches(data: dict[str, torch.Tensor], epoch: int, b: int = 8, reshuffle: bool = True) -> list[dict]:
    """Shuffled batches; without ``reshuffle`` the batches keep their rows and only their order changes."""
    order = torch.randperm(N, generator=torch.Generator().manual_seed(100 + (epoch if reshuffle else 0)))
    batches = [{k: v[order[i:i + b]] for k, v in data.items()} for i in range(0, N, b)]
    return batches if reshuffle or epoch % 2 == 0 else batches[::-1]


def _ready(n: int = 10, d: int = 3, **kw) -> tuple[ReferenceCache, nn.Module]:
    ref = nn.Linear(4, d).requires_grad_(False).eval()
    cache = ReferenceCache(n, **kw)
    cache.check_model(ref)
    return cache, ref


# ----------------------------------------------------------------------------- basics
def test_memory_roundtrip_counters_and_verification() -> None:
    cache, ref = _ready()
    keys, x = torch.tensor([3, 7, 1]), torch.randn(3, 4)
    assert cache.lookup(keys) is None
    cache.store(keys, ref(x))
    assert cache.lookup(keys) is None, "the first fully cached batch is recomputed for verification"
    cache.store(keys, ref(x))
    assert cache.verified == 3
    got = cache.lookup(keys)
    assert got is not None and torch.equal(got, ref(x))
    assert (cache.hits, cache.misses, cache.num_filled) == (3, 6, 3)
    assert cache.lookup(torch.tensor([3, 4])) is None, "one uncached key makes the whole batch a miss"
    assert cache.resident_bytes == 10 * 3 * 4 + 10


def test_lookup_keeps_dtype_and_keys_device() -> None:
    cache, ref = _ready(dtype=torch.bfloat16, verify_batches=0)
    feats = ref(torch.randn(2, 4)).bfloat16()
    cache.store(torch.tensor([0, 9]), feats)
    got = cache.lookup(torch.tensor([9, 0]))
    assert got.dtype == torch.bfloat16 and got.device == torch.device("cpu")
    assert torch.equal(got, feats.flip(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mmap_roundtrip_reopen_and_sizes(tmp_path: Path, dtype: torch.dtype) -> None:
    n, d = 1000, 64
    ref = nn.Linear(4, d).requires_grad_(False).eval()
    feats = torch.randn(50, d).to(dtype)
    with ReferenceCache(n, path=tmp_path / "c", context={"max_length": 64}) as cache:
        cache.check_model(ref)
        cache.store(torch.arange(50), feats)
        assert cache.resident_bytes == n  # only the filled flags live in process memory
        assert 0 < cache.disk_bytes < n * d * feats.element_size(), "untouched rows take no disk space (sparse)"
    again = ReferenceCache(n, path=tmp_path / "c", context={"max_length": 64}, verify_batches=0)
    again.check_model(ref)
    assert again.num_filled == 50 and again.dim == d and again.dtype == dtype
    assert torch.equal(again.lookup(torch.arange(50)), feats)
    assert again.lookup(torch.arange(49, 51)) is None


def test_precompute_lora_and_get() -> None:
    model, data = _lora(), _data()
    cache = ReferenceCache(N)
    batches = _batches(data, 0)
    assert cache.precompute(model, batches) == N
    assert model.training, "precompute restores the model's mode"
    assert cache.precompute(model, batches) == 0, "a second pass finds everything cached"
    model.eval()
    with torch.no_grad():
        expected = model(**{k: v for k, v in data.items() if k not in ("idx", "labels")}).reference
    torch.testing.assert_close(cache.get(data["idx"]), expected, rtol=1e-6, atol=1e-6)
    batch = batches[1]
    with torch.no_grad():
        exact = model(**{k: v for k, v in batch.items() if k not in ("idx", "labels")}).reference
    assert torch.equal(cache.get(batch["idx"]), exact), "same batch composition: bit-identical"


def test_full_finetuning_frozen_copy_then_dropped() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5))
    frozen = copy.deepcopy(model).requires_grad_(False).eval()
    x = torch.randn(20, 4)
    cache = ReferenceCache(20)
    cache.precompute(frozen, [(x[i:i + 5], torch.arange(i, i + 5)) for i in range(0, 20, 5)], key=1,
                     features_fn=lambda m, inp: m(inp))
    expected = frozen(x)
    del frozen
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        ((model(x) - cache.get(torch.arange(20))) ** 2).mean().backward()
        with torch.no_grad():
            model[0].weight.add_(1.0)  # move far away from the frozen weights
        opt.step()
    assert torch.equal(cache.get(torch.arange(20)), expected), "F stays the pre-trained model's"
    with pytest.raises(ValueError, match="requires grad"):
        cache.check_model(model)


# ----------------------------------------------------------------------------- refusals
def test_refuses_dropout_in_the_reference_path() -> None:
    ref = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).requires_grad_(False)  # left in training mode
    with pytest.raises(ValueError, match=r"training mode.*\.eval\(\)"):
        ReferenceCache(4).check_model(ref)
    with pytest.raises(ValueError, match="reference_eval=False"):
        ReferenceCache(4).check_model(_lora(reference_eval=False))


def test_refuses_a_trainable_reference_and_merged_adapters() -> None:
    with pytest.raises(ValueError, match="every parameter .* requires grad"):
        ReferenceCache(4).check_model(nn.Linear(2, 2).eval())
    model = _lora()
    model.peft_model.merge_adapter()
    with pytest.raises(ValueError, match="merged adapters"):
        ReferenceCache(4).check_model(model)


def test_refuses_augmentation_by_verification() -> None:
    cache, ref = _ready()
    keys = torch.tensor([0, 1])
    cache.store(keys, ref(torch.randn(2, 4)))
    assert cache.lookup(keys) is None
    with pytest.raises(ValueError, match=r"key 0 differs .*augmentation"):
        cache.store(keys, ref(torch.randn(2, 4)))  # another random crop of the same examples


def test_verification_tolerance_and_exact_mode() -> None:
    cache, ref = _ready(verify_tol=0.0)
    keys, f = torch.tensor([2]), ref(torch.randn(1, 4))
    cache.store(keys, f)
    cache.store(keys, f.clone())  # bit-identical passes
    with pytest.raises(ValueError, match="verify_tol=0.0"):
        cache.store(keys, f.nextafter(f + 1))
    loose, ref = _ready(verify_tol=1e-3)
    loose.store(keys, f)
    loose.store(keys, f * (1 + 1e-5))  # within tolerance: kept, not overwritten
    loose.verify_batches = 0
    assert torch.equal(loose.lookup(keys), f)


def test_refuses_a_different_model(tmp_path: Path) -> None:
    model = _lora(seed=0)
    cache = ReferenceCache(N, path=tmp_path / "c")
    cache.check_model(model)
    cache.check_model(model)  # the same model again is fine
    model.train()
    with torch.no_grad():  # training the adapter and head does not change F
        for _, p in model.trainable_parameters():
            p.add_(0.1)
    cache.check_model(model)
    with pytest.raises(ValueError, match=r"base weights .* changed"):
        cache.check_model(_lora(seed=1))
    with pytest.raises(ValueError, match=r"reference settings .* changed"):
        cache.check_model(_lora(seed=0, pooling="cls"))
    cache.close()
    reopened = ReferenceCache(N, path=tmp_path / "c")
    with pytest.raises(ValueError, match=r"at .*c was built for a different model: base weights"):
        reopened.check_model(_lora(seed=1))
    with pytest.raises(ValueError, match="parameter names/shapes/dtypes"):
        _check_two(nn.Linear(3, 3))


def _check_two(other: nn.Module) -> None:
    cache = ReferenceCache(4)
    cache.check_model(nn.Linear(3, 2).requires_grad_(False).eval())
    cache.check_model(other.requires_grad_(False).eval())


def test_fingerprint_ignores_adapter_weights_but_sees_base_weights() -> None:
    model = _lora()
    fp = model_fingerprint(model)
    with torch.no_grad():
        model.base_model.encoder.layer[1].output.dense.weight[0, 0] += 1.0
    assert model_fingerprint(model)["weights"] != fp["weights"]
    assert model_fingerprint(model)["architecture"] == fp["architecture"]


def test_refuses_a_changed_context_or_shape(tmp_path: Path) -> None:
    ref = nn.Linear(4, 3).requires_grad_(False).eval()
    with ReferenceCache(10, path=tmp_path, context={"tokenizer": "minilm", "max_length": 64}) as cache:
        cache.check_model(ref)
        cache.store(torch.tensor([0]), ref(torch.randn(1, 4)))
    with pytest.raises(ValueError, match=r"context 'max_length': cached 64, now 128"):
        ReferenceCache(10, path=tmp_path, context={"tokenizer": "minilm", "max_length": 128})
    with pytest.raises(ValueError, match=r"num_examples: cached 10, asked 11"):
        ReferenceCache(11, path=tmp_path, context={"tokenizer": "minilm", "max_length": 64})
    with pytest.raises(ValueError, match=r"dtype: cached 'float32', asked 'float16'"):
        ReferenceCache(10, dtype=torch.float16, path=tmp_path, context={"tokenizer": "minilm", "max_length": 64})


def test_refuses_bad_keys() -> None:
    cache, ref = _ready()
    with pytest.raises(ValueError, match=r"duplicated key\(s\) \[3\]"):
        cache.lookup(torch.tensor([3, 1, 3]))
    with pytest.raises(ValueError, match="duplicated"):
        cache.store(torch.tensor([5, 5]), ref(torch.randn(2, 4)))
    with pytest.raises(ValueError, match=r"key 10 is outside \[0, 10\)"):
        cache.lookup(torch.tensor([10]))
    with pytest.raises(ValueError, match=r"key -1 is outside"):
        cache.lookup(torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="1-D integer"):
        cache.lookup(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"B = 2 keys; got \(3, 3\)"):
        cache.store(torch.tensor([1, 2]), ref(torch.randn(3, 4)))
    cache.store(torch.tensor([1, 2]), ref(torch.randn(2, 4)))
    with pytest.raises(KeyError, match=r"1 key\(s\) not in the reference cache, e.g. \[4\]"):
        cache.get(torch.tensor([1, 4]))
    with pytest.raises(TypeError, match="cache holds torch.float32"):
        cache.store(torch.tensor([3]), ref(torch.randn(1, 4)).double())
    with pytest.raises(ValueError, match="width 2; the cache holds D = 3"):
        cache.store(torch.tensor([3]), torch.zeros(1, 2))


def test_refuses_use_before_check_model_and_a_second_opener(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="check_model"):
        ReferenceCache(4).lookup(torch.tensor([0]))
    first = ReferenceCache(4, path=tmp_path)
    with pytest.raises(RuntimeError, match="another process .* own path"):
        ReferenceCache(4, path=tmp_path)
    first.close()
    ReferenceCache(4, path=tmp_path).close()


def test_argument_validation() -> None:
    with pytest.raises(ValueError, match="num_examples must be an int >= 1"):
        ReferenceCache(0)
    with pytest.raises(TypeError, match="verify_batches must be an int"):
        ReferenceCache(3, verify_batches=True)
    with pytest.raises(TypeError, match="JSON values"):
        ReferenceCache(3, context={"transform": object()})
    with pytest.raises(ValueError, match="floating torch dtype"):
        ReferenceCache(3, dtype=torch.int64)


# ----------------------------------------------------------------------------- crash safety
_WRITER = textwrap.dedent(
    """
    import os, sys, torch
    from torch import nn
    from nmtune.reference_cache import ReferenceCache
    path, mode = sys.argv[1], sys.argv[2]
    cache = ReferenceCache(4096, 256, dtype=torch.float32, path=path, commit_every=1 if mode == "kill" else 10**9)
    torch.manual_seed(0)
    cache.check_model(nn.Linear(1, 1).requires_grad_(False).eval())
    step = 0
    while True:
        keys = torch.arange(step * 16, step * 16 + 16) % 4096
        cache.store(keys, keys[:, None].float().expand(16, 256) + 0.5)
        step += 1
        if step == 8:
            print("stored", flush=True)
            if mode == "exit":   # rows written to the file, never committed
                os._exit(0)
        # keeps going (past 4096 rows it re-stores, i.e. verifies, filled rows) until killed
    """
)


def _writer_model() -> nn.Module:
    torch.manual_seed(0)  # the writer's model: same seed, same weights, same fingerprint
    return nn.Linear(1, 1).requires_grad_(False).eval()


def _writer(tmp_path: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "c"), mode], stdout=subprocess.PIPE,
                            text=True, env=env)


def _check_rows(cache: ReferenceCache) -> int:
    filled = torch.from_numpy(cache._rows._filled.nonzero()[0])
    if filled.numel():
        rows = cache.get(filled)
        torch.testing.assert_close(rows, filled[:, None].float().expand(-1, 256) + 0.5, rtol=0, atol=0)
    return filled.numel()


def test_resume_after_sigkill(tmp_path: Path) -> None:
    proc = _writer(tmp_path, "kill")
    assert proc.stdout.readline().strip() == "stored"
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    cache = ReferenceCache(4096, 256, path=tmp_path / "c", verify_batches=0)
    cache.check_model(_writer_model())
    before = _check_rows(cache)
    assert before >= 8 * 16, "every committed row survives"
    cache.store(torch.arange(4096)[~torch.from_numpy(cache._rows._filled)], torch.arange(4096)[
        ~torch.from_numpy(cache._rows._filled)][:, None].float().expand(-1, 256) + 0.5)  # resume: fill the rest
    cache.close()
    again = ReferenceCache(4096, 256, path=tmp_path / "c")
    again.check_model(_writer_model())
    assert _check_rows(again) == 4096


def test_rows_written_but_not_committed_are_not_valid(tmp_path: Path) -> None:
    proc = _writer(tmp_path, "exit")
    out, _ = proc.communicate(timeout=60)
    assert out.strip() == "stored" and proc.returncode == 0
    data = (tmp_path / "c" / "features.bin").read_bytes()
    assert any(data[: 8 * 16 * 256 * 4]), "the rows reached the data file"
    cache = ReferenceCache(4096, 256, path=tmp_path / "c")
    cache.check_model(_writer_model())
    assert cache.num_filled == 0, "without the committed bitmap no row is readable as valid"
    assert cache.lookup(torch.arange(16)) is None


# ----------------------------------------------------------------------------- bit-for-bit training
def _train(cached: bool, reshuffle: bool, epochs: int = 2) -> tuple[list, list[dict], ReferenceCache | None]:
    model, data = _lora(seed=0), _data()
    cache = ReferenceCache(N) if cached else None
    if cache is not None:
        cache.check_model(model)
    criterion = NMTuneLoss("paper", lambda_=1.0)
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-2)
    torch.manual_seed(123)  # LoRA and BERT dropout in the adapted pass draw from this
    losses, grads = [], []
    for epoch in range(epochs):
        for batch in _batches(data, epoch, reshuffle=reshuffle):
            keys, labels = batch.pop("idx"), batch.pop("labels")
            reference = cache.lookup(keys) if cache is not None else None
            out = model(**batch, compute_reference=reference is None)
            if reference is None:
                reference = out.reference
                if cache is not None:
                    cache.store(keys, reference)
            loss = criterion(out.logits, labels, out.features, reference)
            opt.zero_grad()
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in model.trainable_parameters()})
            opt.step()
    return losses, grads, cache


@pytest.mark.parametrize("reshuffle", [False, True])
def test_cached_training_equals_uncached(reshuffle: bool) -> None:
    """Bit for bit when each row of F is computed in the same batch both ways (the batches keep
    their rows). When the rows are reshuffled, the cached F of a row was computed inside another
    batch, and a CPU GEMM row may differ in its last bit with the batch's composition: 1e-6 then."""
    losses, grads, _ = _train(cached=False, reshuffle=reshuffle)
    c_losses, c_grads, cache = _train(cached=True, reshuffle=reshuffle)
    assert len(losses) == 6
    check = (lambda a, b, msg: torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=msg)) if reshuffle else (
        lambda a, b, msg: _assert_equal(a, b, msg))
    for step, (a, b) in enumerate(zip(losses, c_losses)):
        check(b, a, f"loss differs at step {step}: {a.item()} vs {b.item()}")
    for step, (ga, gb) in enumerate(zip(grads, c_grads)):
        for name in ga:
            check(gb[name], ga[name], f"grad of {name} differs at step {step}")
    # epoch 1: 24 misses; epoch 2: the first batch recomputed for verification, the rest cached
    assert (cache.hits, cache.misses, cache.verified) == (16, 32, 8)


def _assert_equal(a: torch.Tensor, b: torch.Tensor, msg: str) -> None:
    assert torch.equal(a, b), msg


def test_training_comparison_can_fail() -> None:
    """Guards the test above: a cache holding another model's F changes the losses."""
    losses, _, _ = _train(cached=False, reshuffle=False)
    model, data = _lora(seed=0), _data()
    wrong = _lora(seed=5)  # a different base model fills the cache
    cache = ReferenceCache(N, verify_batches=0)
    cache.precompute(wrong, _batches(data, 0, reshuffle=False))
    batch = _batches(data, 0, reshuffle=False)[0]
    keys, labels = batch.pop("idx"), batch.pop("labels")
    torch.manual_seed(123)
    out = model(**batch, compute_reference=False)
    loss = NMTuneLoss("paper", lambda_=1.0)(out.logits, labels, out.features, cache.lookup(keys))
    assert not torch.equal(loss.detach(), losses[0])
