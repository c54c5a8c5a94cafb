"""The training-loop toolkit of the pre-training examples (nmtune_study.train_loop): RNG state,
warm-up + cosine, index-level mid-epoch start and the checkpoint that resumes mid-epoch."""

from __future__ import annotations

import math
import pathlib
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, TensorDataset

from nmtune_study import train_loop as tl


class _Interrupt(Exception):
    pass


def test_capture_and_restore_cover_every_generator() -> None:
    g = torch.Generator().manual_seed(3)
    state = tl.capture_rng(g)
    assert set(state) == {"torch", "cuda", "numpy", "python", "data"}

    def draw():
        return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)],
                torch.rand(3, generator=g).tolist())

    first = draw()
    tl.restore_rng(state, g)
    assert draw() == first
    with pytest.raises(ValueError, match="no 'data' entry"):
        tl.restore_rng({k: v for k, v in state.items() if k != "data"}, g)


def test_warmup_cosine_is_the_examples_schedule() -> None:
    total, warm = 37, 5
    f = tl.warmup_cosine(total, warm)
    for s in range(total + 1):
        want = (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        assert f(s) == want
    assert tl.warmup_steps(0.5, 7) == 3 and tl.warmup_steps(0.01, 7) == 1
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        tl.warmup_cosine(10, 0)


def test_resumable_sampler_skips_indices_but_draws_like_a_whole_pass() -> None:
    ds = list(range(23))
    g_full, g_cut = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    full = list(tl.ResumableSampler(RandomSampler(ds, generator=g_full)))
    cut = tl.ResumableSampler(RandomSampler(ds, generator=g_cut))
    cut.skip_next(8)
    assert list(cut) == full[8:]
    assert torch.equal(g_full.get_state(), g_cut.get_state())  # the next epoch draws the same permutation
    assert len(list(cut)) == 23  # the skip applies to one pass only
    with pytest.raises(ValueError, match="n must be >= 0"):
        cut.skip_next(-1)


def test_resumable_sampler_passes_set_epoch_to_a_distributed_sampler() -> None:
    ds = list(range(10))
    inner = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=4)
    wrapped = tl.ResumableSampler(DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=4))
    inner.set_epoch(3)
    wrapped.set_epoch(3)
    wrapped.skip_next(2)
    assert list(wrapped) == list(inner)[2:] and len(wrapped) == 5


def test_batches_from_starts_a_data_loader_at_a_step_and_refuses_other_loaders() -> None:
    g = torch.Generator().manual_seed(1)
    dl = DataLoader(list(range(10)), batch_size=3, drop_last=True, generator=g,
                    sampler=tl.ResumableSampler(RandomSampler(range(10), generator=g)))
    g.manual_seed(1)
    whole = [b.tolist() for b in dl]
    g.manual_seed(1)
    assert [b.tolist() for b in tl.batches_from(dl, 2)] == whole[2:]
    assert tl.batches_from([1, 2], 0) == [1, 2]
    with pytest.raises(TypeError, match="cannot start list at step 1"):
        tl.batches_from([1, 2], 1)


# ----------------------------------------------------------------------------- the checkpoint


def _run(path: pathlib.Path, *, every: int | None = None, stop_at: tuple[int, int] | None = None,
         config: dict | None = None, epochs: int = 3, stop_after_epochs: int | None = None):
    """A loop as the examples write it: dropout (torch RNG), NumPy and Python draws in the step,
    a shuffled DataLoader, SGD with momentum and the warm-up + cosine schedule."""
    tl.seed_everything(0)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(43, 3), torch.randn(43, 1))
    loader = DataLoader(data, batch_size=4, drop_last=True, generator=gen,
                        sampler=tl.ResumableSampler(RandomSampler(data, generator=gen)))
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, tl.warmup_cosine(epochs * len(loader), 4))
    ck = tl.Checkpointer(path, config or {"lr": 0.05}, model=model, optimizer=opt, scheduler=sched, generator=gen,
                         steps_per_epoch=len(loader), every_steps=every)
    pos = ck.resume()
    history = pos.history
    for epoch in range(pos.epoch, epochs):
        first = pos.step if epoch == pos.epoch else 0
        total = pos.partial["loss"] if first else torch.zeros(())
        ck.begin_epoch()
        for step, (x, y) in enumerate(tl.batches_from(loader, first), start=first + 1):
            scale = 1 + 0.01 * float(np.random.rand()) + 0.01 * random.random()
            loss = scale * torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach()
            if ck.after_step(epoch, step, history, {"loss": total}) and (epoch, step) == stop_at:
                raise _Interrupt
        history.append(float(total))
        ck.end_epoch(epoch, history)
        if epoch + 1 == stop_after_epochs:
            break
    return model.state_dict(), history


def test_a_step_checkpoint_resumes_mid_epoch_to_the_uninterrupted_weights(tmp_path) -> None:
    ref, ref_history = _run(tmp_path / "ref.pt")
    with pytest.raises(_Interrupt):  # 10 steps an epoch: global step 15 is epoch 1, step 5
        _run(tmp_path / "cut.pt", every=5, stop_at=(1, 5))
    state = torch.load(tmp_path / "cut.pt", weights_only=False)
    assert (state["format"], state["epoch"], state["step"], len(state["history"])) == (2, 1, 5, 1)
    torch.manual_seed(999)  # the resumed run must not depend on the process's RNG state
    np.random.seed(999)
    got, history = _run(tmp_path / "cut.pt")  # resuming needs no --checkpoint-every-steps
    assert history == ref_history
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_checkpoint_without_the_step_fields_resumes_at_its_epoch(tmp_path) -> None:
    ref, ref_history = _run(tmp_path / "ref.pt")
    _run(tmp_path / "cut.pt", stop_after_epochs=2)
    state = torch.load(tmp_path / "cut.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (2, 0)
    for key in ("format", "step", "partial", "ranks", "world_size"):
        del state[key]  # what a checkpoint written before step checkpoints existed holds
    torch.save(state, tmp_path / "cut.pt")
    got, history = _run(tmp_path / "cut.pt")
    assert history == ref_history and all(torch.equal(ref[k], got[k]) for k in ref)


def test_resume_refuses_what_it_cannot_continue(tmp_path) -> None:
    path = tmp_path / "c.pt"
    with pytest.raises(_Interrupt):
        _run(path, every=3, stop_at=(0, 3))
    with pytest.raises(ValueError, match=r"was written with config \{'lr': 0.05\}, not \{'lr': 0.1\}"):
        _run(path, config={"lr": 0.1})
    state = torch.load(path, weights_only=False)
    torch.save({**state, "world_size": 2}, path)
    with pytest.raises(ValueError, match="stopped at step 3 of epoch 1 with 2 process"):
        _run(path)
    torch.save({**state, "format": 3}, path)
    with pytest.raises(ValueError, match="checkpoint format 3; this code reads formats up to 2"):
        _run(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="could not be read as a checkpoint"):
        _run(path)
    torch.save({"model": {}}, path)
    with pytest.raises(RuntimeError, match="is not a checkpoint of this training loop"):
        _run(path)
    with pytest.raises(ValueError, match="every_steps must be an int >= 1 or None; got 0"):
        _run(tmp_path / "d.pt", every=0)
    with pytest.raises(TypeError, match="every_steps must be an int >= 1 or None; got float 2.0"):
        tl.check_every_steps(2.0)


def test_save_atomic_leaves_no_temporary_file(tmp_path) -> None:
    tl.save_atomic({"a": torch.ones(2)}, tmp_path / "x.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    assert torch.equal(torch.load(tmp_path / "x.pt")["a"], torch.ones(2))


def test_init_distributed_scopes_torchruns_shared_store_per_restart_attempt(monkeypatch) -> None:
    """Under torchrun with restarts on one node, the group's store is the agent's TCPStore under a
    prefix of the attempt; on several nodes a warning names TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1;
    without restarts or with the variable set, a plain env:// init."""
    import warnings

    calls: list[dict] = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: calls.append(kw))
    rendezvous: list[tuple] = []

    def fake_rendezvous(url, **kw):
        rendezvous.append((url, kw))
        yield "agent store", 1, 2

    monkeypatch.setattr(torch.distributed, "rendezvous", fake_rendezvous)
    monkeypatch.setattr(torch.distributed, "PrefixStore", lambda prefix, store: (prefix, store))
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "1", "GROUP_WORLD_SIZE": "1",
           "TORCHELASTIC_RESTART_COUNT": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29400", "RANK": "1",
           "WORLD_SIZE": "2", "NMTUNE_DIST_TIMEOUT": "7"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    tl.init_distributed("gloo")
    (kw,) = calls
    assert kw["store"] == ("nmtune/attempt-1", "agent store")
    assert rendezvous == [("env://", {"timeout": kw["timeout"]})]
    assert kw["rank"] == 1 and kw["world_size"] == 2 and kw["timeout"].total_seconds() == 7

    calls.clear()
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    with pytest.warns(UserWarning, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        tl.init_distributed("gloo")
    assert "store" not in calls[0]

    calls.clear()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what the variable makes torchrun export
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tl.init_distributed("gloo")
    assert calls == [{"timeout": calls[0]["timeout"]}]
