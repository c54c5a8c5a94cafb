"""The training-loop toolkit of both pre-training regimes (``pretrain.py``, ``pretrain_clip.py``).

One implementation each of what a resumable loop needs:

* :func:`seed_everything`, :func:`capture_rng` / :func:`restore_rng`: the Python,
  NumPy, torch CPU and CUDA generators and the data-order generator;
* :func:`warmup_cosine_scheduler` (from :func:`warmup_cosine` and :func:`warmup_steps`):
  linear warm-up then cosine decay, per optimizer step;
* :func:`epochs_of_call`: the epochs one call trains (to the end, or ``stop_after`` of
  them: an interruption that the next call resumes);
* :class:`ResumableSampler` and :func:`batches_from`: start an epoch at step ``k``
  without loading the ``k`` batches before it, in the order an uninterrupted run
  draws;
* :func:`init_distributed`: join the process group ``torchrun`` describes, in a
  store scope of its own per restart attempt (see its docstring for why);
* :class:`Checkpointer`: an atomic ``checkpoint.pt`` (model, optimizer, scheduler,
  AMP scaler, every RNG of every rank, the epoch and the *position in the epoch*)
  written after every epoch and, with ``every_steps``, every N optimizer steps,
  and restored on the next start.

How a mid-epoch resume reproduces the batches of an uninterrupted run: the
checkpoint keeps the data-order generator as it was *at the start of the epoch in
progress* (key ``rng["data"]``; at an epoch boundary that is the current state, as
in checkpoints written before step checkpoints existed) next to every other RNG as
it is *now*, and the step reached. On resume the epoch's loader is rebuilt from
that generator state, so it draws the same permutation (and the same worker seed),
and its first ``step`` batches are skipped at the index level. The accumulators of
the epoch in progress (loss sum, correct count...) travel in ``partial`` so that
the epoch's logged figures are those of an uninterrupted run too.

Under ``torchrun`` every rank calls the save (the RNG states are gathered to rank
0, which writes; a barrier follows, so a checkpoint reported done is on disk) and
every rank reads the file on start. A restarted group (``torchrun --max-restarts
K``) thus continues from the last checkpoint. One thing is not replayed exactly:
with ``--workers > 0`` the worker processes' own RNG streams (random augmentation
inside the dataset) restart at the resume point; the batch order and every other
state are exact.

Fault injection for tests: with ``NMTUNE_SIGKILL_AFTER_STEP_CHECKPOINT=R`` in the
environment, rank ``R`` kills itself with SIGKILL right after the first step
checkpoint of a first attempt (``TORCHELASTIC_RESTART_COUNT`` unset or 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import math
import os
import pathlib
import random
import signal
import warnings
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

__all__ = [
    "CHECKPOINT_FORMAT",
    "add_resume_arguments",
    "Checkpointer",
    "Position",
    "ResumableSampler",
    "batches_from",
    "capture_rng",
    "check_every_steps",
    "epochs_of_call",
    "init_distributed",
    "restore_rng",
    "save_atomic",
    "seed_everything",
    "warmup_cosine",
    "warmup_cosine_scheduler",
    "warmup_steps",
]

#: Version of the checkpoint layout. 1 (no ``format`` key): epoch boundaries only;
#: 2: adds ``step``, ``partial``, ``ranks`` (each rank's ``rng`` and ``partial``), ``world_size``.
CHECKPOINT_FORMAT = 2
_KILL_ENV = "NMTUNE_SIGKILL_AFTER_STEP_CHECKPOINT"


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), NumPy's global generator and Python's ``random``.

    Example:
        >>> seed_everything(0); a = torch.rand(1); seed_everything(0); bool(torch.rand(1) == a)
        True
    """
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def capture_rng(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG state of this process: ``torch``, ``cuda`` (all devices, or None),
    ``numpy``, ``python`` and, when given, ``data`` (the data-order generator).

    Example:
        >>> g = torch.Generator().manual_seed(1)
        >>> s = capture_rng(g); a = torch.rand(2), torch.rand(2, generator=g)
        >>> restore_rng(s, g); b = torch.rand(2), torch.rand(2, generator=g)
        >>> all(torch.equal(x, y) for x, y in zip(a, b))
        True
    """
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if generator is not None:
        state["data"] = generator.get_state()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore what :func:`capture_rng` returned (a missing ``cuda`` entry, as in
    checkpoints written on a CPU, leaves the CUDA generators alone)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = state["cuda"][:torch.cuda.device_count()]
        for i, s in enumerate(cuda):
            torch.cuda.set_rng_state(s, i)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if generator is not None:
        if "data" not in state:
            raise ValueError("the RNG state has no 'data' entry for the data-order generator")
        generator.set_state(state["data"])


def warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
    """Warm-up length in optimizer steps: ``max(1, int(warmup_epochs * steps_per_epoch))``.

    Example:
        >>> warmup_steps(0.5, 7)
        3
    """
    return max(1, int(warmup_epochs * steps_per_epoch))


def warmup_cosine(total_steps: int, warmup: int) -> Callable[[int], float]:
    """The learning-rate factor of step ``s`` (a ``LambdaLR`` lambda): ``(s + 1) / warmup``
    during the warm-up, then a half cosine from 1 to 0 over the remaining steps.

    Example:
        >>> f = warmup_cosine(10, 2)
        >>> [round(f(s), 3) for s in (0, 1, 2, 6, 10)]
        [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 step, got {warmup!r}")

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return lr_at


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, *, epochs: int, steps_per_epoch: int,
                            warmup_epochs: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of both pre-training regimes, stepped once per optimizer step:
    :func:`warmup_cosine` over ``epochs * steps_per_epoch`` steps with a warm-up of
    :func:`warmup_steps` ``(warmup_epochs, steps_per_epoch)``.

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sch = warmup_cosine_scheduler(opt, epochs=2, steps_per_epoch=5, warmup_epochs=0.4)
        >>> sch.get_last_lr()
        [0.5]
    """
    total = epochs * steps_per_epoch
    warmup = warmup_steps(warmup_epochs, steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup))


def epochs_of_call(position: Position, epochs: int, stop_after: int | None = None) -> range:
    """The epochs (0-based) one call trains: from where ``position`` stands to ``epochs``, or
    ``stop_after`` of them (an interruption in tests; the next call resumes).

    Example:
        >>> epochs_of_call(Position(epoch=2), 10), epochs_of_call(Position(epoch=2), 10, stop_after=3)
        (range(2, 10), range(2, 5))
    """
    end = epochs if stop_after is None else min(epochs, position.epoch + stop_after)
    return range(position.epoch, end)


class ResumableSampler(Sampler[int]):
    """A sampler that can drop the first ``n`` indices of its next pass.

    The wrapped sampler is still iterated in full (so it draws from its generator
    exactly as an uninterrupted pass does); only the first ``n`` indices are not
    handed to the loader, so no skipped sample is loaded. ``set_epoch`` is passed
    on (``DistributedSampler``).

    Example:
        >>> s = ResumableSampler(range(5)); s.skip_next(3); list(s), list(s)
        ([3, 4], [0, 1, 2, 3, 4])
    """

    def __init__(self, sampler: Iterable[int]) -> None:
        self.sampler = sampler
        self._skip = 0

    def skip_next(self, n: int) -> None:
        """Drop the first ``n`` indices of the next pass only."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n!r}")
        self._skip = int(n)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return itertools.islice(iter(self.sampler), skip, None)


def batches_from(loader: Iterable, step: int) -> Iterable:
    """The batches of one epoch of ``loader`` from batch ``step`` on, as an
    uninterrupted epoch yields them.

    ``loader`` is either an object with ``iter_from(step)`` (``TensorBatches``) or a
    ``DataLoader`` whose ``sampler`` is a :class:`ResumableSampler` (batches of
    ``batch_size`` indices). ``step == 0`` returns ``loader`` itself.

    Example:
        >>> dl = DataLoader(list(range(6)), batch_size=2, sampler=ResumableSampler(range(6)))
        >>> [b.tolist() for b in batches_from(dl, 2)]
        [[4, 5]]
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    if step == 0:
        return loader
    if hasattr(loader, "iter_from"):
        return loader.iter_from(step)
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, ResumableSampler) and loader.batch_size:
        loader.sampler.skip_next(step * loader.batch_size)
        return loader
    raise TypeError(f"cannot start {type(loader).__name__} at step {step}: expected an object with iter_from(step) "
                    "or a DataLoader with batch_size whose sampler is a ResumableSampler")


def check_every_steps(value: Any, name: str = "every_steps") -> int | None:
    """``value`` if it is None or an int >= 1; else a ``TypeError`` / ``ValueError`` naming ``name``.

    Example:
        >>> check_every_steps(500), check_every_steps(None)
        (500, None)
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1 or None; got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1 or None; got {value!r}")
    return value


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file, ``fsync``, then ``os.replace`` onto ``path``:
    a kill (or a power loss) leaves either the old file or the new one, never half a file.

    Example:
        >>> import tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.pt"
        >>> save_atomic({"a": 1}, p); torch.load(p)
        {'a': 1}
    """
    path = pathlib.Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - file systems without directory fsync
        pass


@dataclasses.dataclass
class Position:
    """Where a run stands: ``epoch`` epochs done, ``step`` batches done in the next one,
    the ``history`` of finished epochs and the ``partial`` accumulators of the epoch in
    progress (empty at an epoch boundary)."""

    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    partial: dict[str, Any] = dataclasses.field(default_factory=dict)

    def in_epoch(self, epoch: int) -> tuple[int, dict[str, Any]]:
        """``(batches already done, accumulators)`` of epoch ``epoch`` (0-based): those of the step
        checkpoint for the epoch it stopped in, ``(0, {})`` for every other epoch.

        Example:
            >>> p = Position(epoch=1, step=3, partial={"seen": 24})
            >>> p.in_epoch(1), p.in_epoch(2)
            ((3, {'seen': 24}), (0, {}))
        """
        if epoch == self.epoch and self.step:
            return self.step, self.partial
        return 0, {}


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    """The two flags both pre-training commands share: ``--stop-after N`` (train N epochs of
    this call, then stop: an interruption the next call resumes) and ``--checkpoint-every-steps N``."""
    parser.add_argument("--stop-after", type=int, default=None, help="stop after N epochs (testing resume)")
    parser.add_argument("--checkpoint-every-steps", type=int, default=None, metavar="N",
                        help="also checkpoint every N optimizer steps (a restart or a rerun resumes mid-epoch); "
                             "default: per epoch")


def init_distributed(backend: str) -> None:
    """Join the process group that ``torchrun`` describes in the environment.

    ``NMTUNE_DIST_TIMEOUT`` (seconds; torch's default is 30 minutes) bounds how long a
    rank waits for the others (rendezvous, collectives) before it fails, so that
    ``torchrun --max-restarts K`` can restart the group.

    Why not a plain ``init_process_group(backend)``: with its default c10d rendezvous,
    ``torchrun`` shares its own TCPStore with the workers
    (``TORCHELASTIC_USE_AGENT_STORE=True``), and that store outlives a failed attempt.
    The restarted group then reads the dead group's keys, gloo's peer addresses among
    them: a rank connects to a closed port ("Connection refused") or both ranks wait in
    gloo's full-mesh connect for good (pytorch/pytorch#135712;
    ``tools/restart_soak.sh`` repeats such a restart). On one node every worker of an attempt sees the same
    ``TORCHELASTIC_RESTART_COUNT``, so the group gets a store scope of its own per
    attempt. Across nodes the agents count restarts each on their own, so no such
    scope is safe: launch with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (a fresh store
    every round), which this function asks for with a warning when it is missing.
    """
    env = os.environ
    timeout = datetime.timedelta(seconds=float(env.get("NMTUNE_DIST_TIMEOUT", "1800")))
    shared = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
    if shared and int(env.get("GROUP_WORLD_SIZE", "1")) == 1:
        # torch's own env:// rendezvous (a client of the agent's store), under a prefix of this attempt
        store, rank, world = next(torch.distributed.rendezvous("env://", timeout=timeout))
        scoped = torch.distributed.PrefixStore(f"nmtune/attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        torch.distributed.init_process_group(backend, store=scoped, rank=rank, world_size=world, timeout=timeout)
        return
    if shared:
        warnings.warn("torchrun shares its rendezvous store with the workers across restarts, and a restarted group "
                      "can read the failed group's addresses and hang (pytorch/pytorch#135712); on several nodes "
                      "launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for a fresh store every round", stacklevel=2)
    torch.distributed.init_process_group(backend, timeout=timeout)


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class Checkpointer:
    """Saves and restores one run's ``checkpoint.pt``.

    Call :meth:`resume` once after building the model, optimizer, scheduler and
    loader (it restores them and returns the :class:`Position`), :meth:`begin_epoch`
    before each epoch's loader is iterated, :meth:`after_step` after each optimizer
    step (it saves every ``every_steps`` global steps) and :meth:`end_epoch` after
    each epoch. Under ``torch.distributed`` every rank calls all four.

    Args:
        path: the checkpoint file.
        config: the recipe as a plain dict; a checkpoint written with another one
            is refused with a ``ValueError``.
        model: the module (not the DDP wrapper).
        optimizer: its optimizer.
        scheduler: the learning-rate scheduler (stepped once per optimizer step).
        generator: the data-order generator of the loader.
        steps_per_epoch: optimizer steps in one epoch (this rank's).
        scaler: the AMP ``GradScaler``, if any.
        every_steps: also save every this many optimizer steps (None: epochs only).
        map_location: where tensors are loaded.
        log: called with one line when a run resumes (None: silent).

    Example:
        >>> import tempfile
        >>> net = torch.nn.Linear(2, 1); opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> sch = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(4, 1))
        >>> ck = Checkpointer(pathlib.Path(tempfile.mkdtemp()) / "c.pt", {"lr": 0.1}, model=net, optimizer=opt,
        ...                   scheduler=sch, generator=torch.Generator(), steps_per_epoch=2)
        >>> ck.resume()
        Position(epoch=0, step=0, history=[], partial={})
    """

    def __init__(self, path: str | os.PathLike, config: dict[str, Any], *, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Any, generator: torch.Generator,
                 steps_per_epoch: int, scaler: Any = None, every_steps: int | None = None,
                 map_location: str | torch.device | None = None, log: Callable[[str], Any] | None = None) -> None:
        check_every_steps(every_steps)
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch!r}")
        self.path = pathlib.Path(path)
        self.config = config
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.generator = generator
        self.steps_per_epoch = steps_per_epoch
        self.every_steps = every_steps
        self.map_location = map_location
        self.log = log
        self._epoch_data: torch.Tensor = generator.get_state()

    # ------------------------------------------------------------------ resume
    def resume(self) -> Position:
        """Restore the saved state if ``path`` exists; the position to continue from."""
        if not self.path.exists():
            return Position()
        try:
            state = torch.load(self.path, map_location=self.map_location, weights_only=False)
        except Exception as err:  # a file from another program, or a truncated copy
            raise RuntimeError(f"{self.path} could not be read as a checkpoint ({type(err).__name__}: {err}); "
                               "move it away to start this run over") from err
        if not isinstance(state, dict) or not {"model", "optimizer", "epoch", "config", "rng"} <= set(state):
            raise RuntimeError(f"{self.path} is not a checkpoint of this training loop (expected a dict with model, "
                               "optimizer, epoch, config and rng); move it away to start this run over")
        fmt = state.get("format", 1)
        if fmt > CHECKPOINT_FORMAT:
            raise ValueError(f"{self.path} has checkpoint format {fmt}; this code reads formats up to "
                             f"{CHECKPOINT_FORMAT} (update the examples)")
        if state["config"] != self.config:
            raise ValueError(f"{self.path} was written with config {state['config']}, not {self.config}")
        world, rank = _dist()
        step = int(state.get("step", 0))
        saved_world = int(state.get("world_size", world))
        if step and saved_world != world:
            raise ValueError(f"{self.path} stopped at step {step} of epoch {state['epoch'] + 1} with {saved_world} "
                             f"process(es); this run has {world}, which splits the epoch differently. Resume with "
                             f"{saved_world} processes (or from an epoch checkpoint)")
        if step > self.steps_per_epoch:
            raise ValueError(f"{self.path} stopped at step {step} of an epoch, but an epoch has "
                             f"{self.steps_per_epoch} steps here")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        ranks = state.get("ranks")
        mine = ranks[rank] if ranks is not None and len(ranks) == world else state
        restore_rng(mine["rng"], self.generator)
        if self.log is not None:
            where = f"epoch {state['epoch'] + 1}, step {step}" if step else f"the end of epoch {state['epoch']}"
            self.log(f"[resume] {self.path}: continuing from {where}")
        return Position(int(state["epoch"]), step, state["history"], mine.get("partial") or {})

    # ------------------------------------------------------------------ saving
    def begin_epoch(self) -> None:
        """Note the data-order generator at the start of an epoch (before its loader is iterated)."""
        self._epoch_data = self.generator.get_state()

    def after_step(self, epoch: int, step: int, history: list[dict[str, Any]], partial: dict[str, Any]) -> bool:
        """After ``step`` (1-based) batches of epoch ``epoch`` (0-based): save when the
        global step is a multiple of ``every_steps``. True when it saved."""
        if self.every_steps is None or (epoch * self.steps_per_epoch + step) % self.every_steps:
            return False
        self._save(Position(epoch, step, history, partial), self._epoch_data)
        _after_step_checkpoint(_dist()[1])
        return True

    def end_epoch(self, epoch: int, history: list[dict[str, Any]]) -> None:
        """After epoch ``epoch`` (0-based) and its evaluation: save the epoch boundary."""
        self._save(Position(epoch + 1, 0, history, {}), self.generator.get_state())

    def _save(self, pos: Position, data_state: torch.Tensor) -> None:
        world, rank = _dist()
        rng = capture_rng()
        rng["data"] = data_state
        # each rank's accumulators, on the CPU (``map_location`` puts them back on the device)
        partial = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in pos.partial.items()}
        ranks = None
        if world > 1:
            ranks = [None] * world
            torch.distributed.all_gather_object(ranks, {"rng": rng, "partial": partial})
        if rank == 0:
            state = {
                "format": CHECKPOINT_FORMAT,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "epoch": pos.epoch,
                "step": pos.step,
                "history": pos.history,
                "partial": partial,
                "rng": rng,
                "ranks": ranks,
                "world_size": world,
                "config": self.config,
            }
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
            save_atomic(state, self.path)
        if world > 1:
            torch.distributed.barrier()  # every rank returns once the file is on disk


def _after_step_checkpoint(rank: int) -> None:
    """Test-only fault injection (see the module docstring): SIGKILL this rank after its
    first step checkpoint when ``NMTUNE_SIGKILL_AFTER_STEP_CHECKPOINT`` names it."""
    target = os.environ.get(_KILL_ENV)
    if target is None or int(target) != rank or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    os.kill(os.getpid(), signal.SIGKILL)
