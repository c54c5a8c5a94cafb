"""Supervised pre-training of a timm architecture with label noise ratio gamma.

Offline default (2 CPU cores, minutes)::

    python examples/pretrain.py --noise 0.1 --out runs/pretrain/g10

Paper scale (ImageNet-1K in ImageFolder layout, ResNet-50, 4 GPUs)::

    torchrun --nproc_per_node 4 examples/pretrain.py --dataset imagenet \\
        --data-root /data/imagenet --arch resnet50 --epochs 90 --batch-size 256 \\
        --lr 0.1 --noise 0.05 --out runs/in1k/g05

A checkpoint (model, optimizer, scheduler, AMP scaler, epoch, history and every RNG
state of every rank including the data-order generator) is written after each epoch
and, with ``--checkpoint-every-steps N``, every N optimizer steps together with the
position in the epoch; running the same command again (or ``torchrun
--max-restarts K`` restarting a failed group) resumes from it mid-epoch with the
batches an uninterrupted run would see, and gives bit-identical weights on the same
hardware (:mod:`nmtune_study.train_loop`; the cluster recipe is in ``examples/README.md``).
``metrics.json`` holds the pre-training accuracy (clean validation labels) for this gamma. AMP (bfloat16/float16) and DDP (``torchrun``) are used when CUDA is
present; that path cannot be exercised on a CPU-only machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from nmtune.noise import asymmetric_noise, symmetric_noise
from nmtune_study import train_loop as tl
from nmtune_study.common import atomic_save, cached, hit_rate, noise_ratio, positive_int
from nmtune_study.data import vision as vd

__all__ = ["PretrainConfig", "build_backbone", "backbone_features", "memorisation", "pretrain", "load_backbone",
           "main", "parser", "run"]

GLYPH_ARCH = "glyph_resnet"


@dataclasses.dataclass
class PretrainConfig:
    """Pre-training recipe (SGD + nesterov momentum, warm-up then cosine, per step).

    ``noise_type`` is ``"symmetric"`` (``nmtune.noise.symmetric_noise`` over all
    classes) or ``"asymmetric"`` (``nmtune.noise.asymmetric_noise``: the same ratio, only
    within ``noise_classes``, e.g. the pre-training classes that overlap a downstream
    task, as the paper does with the ImageNet classes overlapping CIFAR-100).
    """

    arch: str = GLYPH_ARCH
    noise: float = 0.0
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    seed: int = 0
    amp: str = "bf16"  # "bf16", "fp16" or "off"; CUDA only
    workers: int = 0
    pretrained: bool = False
    noise_type: str = "symmetric"
    noise_classes: tuple[int, ...] = ()
    memorisation_every: int = 1  # epochs between memorisation passes over the training set; 0: at the end only
    channels_last: bool = False  # model and batches in torch.channels_last (benchmarks/bench_pretrain.py)

    def __post_init__(self) -> None:
        self.noise_classes = tuple(int(c) for c in self.noise_classes)
        if self.noise_type not in ("symmetric", "asymmetric"):
            raise ValueError(f"noise_type must be 'symmetric' or 'asymmetric', got {self.noise_type!r}")
        if self.noise_type == "asymmetric" and len(set(self.noise_classes)) < 2:
            raise ValueError(f"asymmetric noise needs at least 2 noise_classes, got {self.noise_classes!r}")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {self.noise!r}")
        if int(self.memorisation_every) < 0:
            raise ValueError(f"memorisation_every must be >= 0, got {self.memorisation_every!r}")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.amp not in ("bf16", "fp16", "off"):
            raise ValueError(f"amp must be 'bf16', 'fp16' or 'off', got {self.amp!r}")


def build_backbone(arch: str, num_classes: int, in_chans: int = 3, *, pretrained: bool = False) -> nn.Module:
    """A timm model by name, or ``"glyph_resnet"``: timm's ResNet with one BasicBlock per
    stage and channels (16, 32, 64, 128) (0.33 M parameters, 128-d features) for
    the CPU default.

    Example:
        >>> m = build_backbone("glyph_resnet", 10, 1)
        >>> tuple(backbone_features(m, torch.zeros(2, 1, 32, 32)).shape)
        (2, 128)
    """
    try:
        import timm
        from timm.models.resnet import BasicBlock, ResNet
    except ModuleNotFoundError as err:  # pragma: no cover
        raise ModuleNotFoundError('pre-training needs timm: pip install "nmtune[vision]"') from err
    if arch == GLYPH_ARCH:
        return ResNet(BasicBlock, (1, 1, 1, 1), num_classes=num_classes, in_chans=in_chans,
                      channels=(16, 32, 64, 128), stem_width=16)
    return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans)


def backbone_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Penultimate (pooled, pre-logits) features of a timm model: ``(B, D)``."""
    m = model.module if hasattr(model, "module") else model
    return m.forward_head(m.forward_features(x), pre_logits=True)


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _accuracy(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device)
            correct += (model(x).argmax(-1) == y).sum()
            total += len(y)
    return float(correct) / max(total, 1)


def memorisation(
    predictions: torch.Tensor, noisy_labels: torch.Tensor, clean_labels: torch.Tensor, flipped: torch.Tensor
) -> dict[str, float]:
    """How far a model has fitted its noisy training labels (Arpit et al.'s memorisation).

    Args:
        predictions: the model's predicted class of every training example ``(N,)``
            (eval mode, no augmentation).
        noisy_labels: the labels it was trained on ``(N,)``.
        clean_labels: the true labels ``(N,)``.
        flipped: ``True`` where the noise changed the label ``(N,)``.

    Returns:
        ``memorised``: the fraction of flipped examples predicted *as their noisy label*
        (``nan`` without flipped examples); ``flipped_clean``: the fraction of flipped
        examples still predicted as their true label; ``unflipped_accuracy``: accuracy on
        the examples whose label was kept; ``noisy_label_accuracy``: accuracy against the
        noisy labels over all examples.

    Example:
        >>> y = torch.tensor([0, 1, 2, 3]); noisy = torch.tensor([1, 1, 2, 0])
        >>> flipped = noisy != y
        >>> memorisation(noisy, noisy, y, flipped)["memorised"]
        1.0
        >>> memorisation(y, noisy, y, flipped)["flipped_clean"]
        1.0
    """
    n = len(noisy_labels)
    for name, t in (("predictions", predictions), ("clean_labels", clean_labels), ("flipped", flipped)):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) like noisy_labels; got {tuple(t.shape)}")
    flipped = flipped.bool()
    hit = predictions == noisy_labels
    k = int(flipped.sum())
    kept = n - k
    return {
        "memorised": hit_rate(hit & flipped, k),
        "flipped_clean": hit_rate((predictions == clean_labels) & flipped, k),
        "unflipped_accuracy": hit_rate(hit & ~flipped, kept),
        "noisy_label_accuracy": hit_rate(hit, n),
    }


@torch.no_grad()
def _predict(model: nn.Module, loader, device: torch.device) -> torch.Tensor:
    model.eval()
    out = [model(x.to(device, non_blocking=True)).argmax(-1).cpu() for x, _ in loader]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def pretrain(
    data: vd.PretrainData,
    out_dir: str | os.PathLike,
    config: PretrainConfig,
    *,
    progress: bool = True,
    stop_after: int | None = None,
    device: str | torch.device | None = None,
    checkpoint_every_steps: int | None = None,
) -> dict[str, Any]:
    """Pre-train ``config.arch`` on ``data`` with symmetric label noise ``config.noise``.

    Writes ``out_dir/checkpoint.pt`` after every epoch and every
    ``checkpoint_every_steps`` optimizer steps (resumed automatically, mid-epoch too),
    ``out_dir/model.pt`` (final weights + metadata), ``out_dir/noisy_labels.pt``
    and ``out_dir/metrics.json``.

    Args:
        data: the pre-training data (clean labels in ``data.labels``).
        out_dir: output folder.
        config: the recipe.
        progress: show tqdm bars.
        stop_after: stop after this many epochs *in this call* (simulates an
            interruption; the next call resumes).
        device: default CUDA when available, else CPU.
        checkpoint_every_steps: also checkpoint every this many optimizer steps
            (global count); None: after each epoch only. It does not change the
            result, so it may differ between a run and its resume.

    Returns:
        The metrics dict (``val_accuracy``, ``train_noisy_accuracy``, ``noise``,
        ``epochs_done``, ``history``...).

    Example:
        >>> d = vd.offline_pretrain_data(tiny=True)
        >>> m = pretrain(d, "/tmp/pt", PretrainConfig(epochs=1), progress=False)  # doctest: +SKIP
    """
    tl.check_every_steps(checkpoint_every_steps, "checkpoint_every_steps")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world, rank, device, joined = _setup_device(device)
    distributed = world > 1

    tl.seed_everything(config.seed)
    noisy = _noisy_labels(data, config)
    if rank == 0:
        atomic_save({"labels": noisy.labels, "mask": noisy.mask, "noise": config.noise}, out / "noisy_labels.pt")
    train_ds = vd.RelabeledDataset(data.train, noisy.labels)

    model = build_backbone(config.arch, data.num_classes, data.in_chans, pretrained=config.pretrained).to(device)
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    generator = torch.Generator().manual_seed(config.seed)
    loader, sampler = _train_loader(train_ds, config, generator, world, rank, device)
    val_loader = _eval_loader(data.val, config.workers)
    train_eval_loader = _eval_loader(train_ds, config.workers)  # fixed order, for the memorisation pass

    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                                weight_decay=config.weight_decay)
    per_epoch = len(loader)
    scheduler = tl.warmup_cosine_scheduler(optimizer, epochs=config.epochs, steps_per_epoch=per_epoch,
                                           warmup_epochs=config.warmup_epochs)
    use_amp = device.type == "cuda" and config.amp != "off"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and config.amp == "fp16")
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    from tqdm.auto import tqdm

    ckpt = tl.Checkpointer(out / "checkpoint.pt", dataclasses.asdict(config),
                           model=model.module if distributed else model, optimizer=optimizer, scheduler=scheduler,
                           scaler=scaler, generator=generator, steps_per_epoch=per_epoch,
                           every_steps=checkpoint_every_steps, map_location=device,
                           log=tqdm.write if progress and rank == 0 else None)
    resumed = ckpt.resume()
    history = resumed.history
    step = _Step(model, optimizer, scheduler, scaler, device, layout,
                 torch.bfloat16 if config.amp == "bf16" else torch.float16, use_amp)
    t0 = time.time()
    for epoch in tl.epochs_of_call(resumed, config.epochs, stop_after):
        if sampler is not None:
            sampler.set_epoch(epoch)
        first, part = resumed.in_epoch(epoch)  # batches of this epoch already done (a step checkpoint)
        ckpt.begin_epoch()
        bar = tqdm(tl.batches_from(loader, first), desc=f"pretrain g={config.noise:g} ep {epoch + 1}/{config.epochs}",
                   total=per_epoch - first, disable=not progress or rank != 0, leave=False)
        sums = step.epoch(bar, first, part, lambda s, acc: ckpt.after_step(epoch, s, history, acc))
        record = {
            "epoch": epoch + 1,
            "train_loss": float(sums["loss_sum"]) / max(sums["seen"], 1),  # one host sync per epoch
            "train_noisy_accuracy": float(sums["correct"]) / max(sums["seen"], 1),
            "val_accuracy": _accuracy(model, val_loader, device),
            "lr": scheduler.get_last_lr()[0],
        }
        every = config.memorisation_every
        if (every and (epoch + 1) % every == 0) or epoch + 1 == config.epochs:
            record.update(memorisation(_predict(model, train_eval_loader, device), noisy.labels, data.labels,
                                       noisy.mask))
        history.append(record)
        ckpt.end_epoch(epoch, history)
        if rank == 0 and progress:
            tqdm.write(f"[pretrain g={config.noise:g}] epoch {epoch + 1}: loss {record['train_loss']:.3f} "
                       f"val acc {record['val_accuracy']:.4f}")
    metrics = _metrics(config, history, data, len(train_ds), int(noisy.mask.sum()), time.time() - t0)
    if rank == 0:
        if metrics["finished"]:
            atomic_save({"model": (model.module if distributed else model).state_dict(),
                          "arch": config.arch, "num_classes": data.num_classes, "in_chans": data.in_chans,
                          "noise": config.noise}, out / "model.pt")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if distributed:
        torch.distributed.barrier()  # every rank returns once rank 0's files are on disk
        if joined:  # a rank leaving with its gloo threads running can abort at exit ("terminate called ...")
            torch.distributed.destroy_process_group()
    return metrics


def _setup_device(device: str | torch.device | None) -> tuple[int, int, torch.device, bool]:
    """``(world size, rank, device, joined)`` of this process; ``joined``: this call joined the
    ``torchrun`` process group (:func:`train_loop.init_distributed`), so :func:`pretrain` leaves it."""
    world, rank, local_rank = _dist_info()
    if device is None:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    joined = world > 1 and not torch.distributed.is_initialized()
    if joined:
        tl.init_distributed("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return world, rank, device, joined


def _noisy_labels(data: vd.PretrainData, config: PretrainConfig):
    """The training labels with ``config``'s noise (seed ``config.seed + 1000``)."""
    if config.noise_type == "asymmetric":
        return asymmetric_noise(data.labels, config.noise, classes=config.noise_classes, seed=config.seed + 1000)
    return symmetric_noise(data.labels, config.noise, num_classes=data.num_classes, seed=config.seed + 1000)


def _train_loader(train_ds, config: PretrainConfig, generator: torch.Generator, world: int, rank: int,
                  device: torch.device):
    """``(loader, DistributedSampler or None)``: every loader can start an epoch at a step
    (:func:`train_loop.batches_from`)."""
    if world == 1 and vd.tensor_source(train_ds) is not None:
        # in-memory uint8 tensors: index whole batches, no per-sample Python overhead
        return vd.TensorBatches(train_ds, config.batch_size, generator), None
    if world > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
        return DataLoader(train_ds, batch_size=config.batch_size, sampler=tl.ResumableSampler(sampler),
                          drop_last=True, num_workers=config.workers, pin_memory=device.type == "cuda",
                          generator=generator), sampler
    # what shuffle=True builds, in a sampler that can start mid-epoch
    return DataLoader(train_ds, batch_size=config.batch_size,
                      sampler=tl.ResumableSampler(RandomSampler(train_ds, generator=generator)),
                      drop_last=True, num_workers=config.workers, generator=generator), None


def _eval_loader(ds, workers: int):
    """Batches of 512 in the dataset's order."""
    if vd.tensor_source(ds) is not None:
        return vd.TensorBatches(ds, 512, None)
    return DataLoader(ds, batch_size=512, num_workers=workers)


class _Step:
    """One optimizer step of the supervised recipe (AMP on CUDA), and an epoch of them."""

    def __init__(self, model, optimizer, scheduler, scaler, device: torch.device, layout, amp_dtype, use_amp: bool):
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.device, self.layout, self.amp_dtype, self.use_amp = device, layout, amp_dtype, use_amp

    def epoch(self, batches, first: int, part: dict[str, Any], after_step) -> dict[str, Any]:
        """Train on ``batches`` (batch ``first + 1`` on); ``part``: the accumulators of the batches
        before it; ``after_step(step, accumulators)`` after each. The epoch's loss sum, correct
        count and rows seen."""
        self.model.train()
        loss_sum = part.get("loss_sum", torch.zeros((), device=self.device))
        correct = part.get("correct", torch.zeros((), dtype=torch.long, device=self.device))
        seen = part.get("seen", 0)
        for step, (x, y) in enumerate(batches, start=first + 1):
            x = x.to(self.device, non_blocking=True, memory_format=self.layout)
            y = y.to(self.device, non_blocking=True)
            with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                logits = self.model(x)
                loss = nn.functional.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            loss_sum += loss.detach().float() * len(y)
            correct += (logits.detach().argmax(-1) == y).sum()
            seen += len(y)
            after_step(step, {"loss_sum": loss_sum, "correct": correct, "seen": seen})
        return {"loss_sum": loss_sum, "correct": correct, "seen": seen}


def _metrics(config: PretrainConfig, history: list[dict[str, Any]], data: vd.PretrainData, num_train: int,
             num_noisy: int, seconds: float) -> dict[str, Any]:
    """``metrics.json``: the last epoch's figures, the run's size and its history."""
    last = history[-1] if history else {}
    epochs_done = last.get("epoch", 0)
    return {
        "noise": config.noise,
        "arch": config.arch,
        "epochs_done": epochs_done,
        "finished": epochs_done >= config.epochs,
        "val_accuracy": last.get("val_accuracy", float("nan")),
        "train_noisy_accuracy": last.get("train_noisy_accuracy", float("nan")),
        **{k: last.get(k, float("nan"))
           for k in ("memorised", "flipped_clean", "unflipped_accuracy", "noisy_label_accuracy")},
        "num_classes": data.num_classes,
        "num_train": num_train,
        "num_noisy": num_noisy,
        "seconds_this_call": seconds,
        "history": history,
        "config": dataclasses.asdict(config),
    }


def load_backbone(path: str | os.PathLike, *, arch: str | None = None, map_location: str = "cpu") -> nn.Module:
    """Load ``model.pt`` written by :func:`pretrain` (eval mode).

    With ``arch`` (a timm name), ``path`` is any timm-loadable checkpoint of that
    architecture instead (classifier weights are dropped), or ``"hub"`` for timm's own
    pre-trained weights (needs network).
    """
    if arch is not None:
        import timm

        if str(path) == "hub":
            return timm.create_model(arch, pretrained=True, num_classes=0).eval()
        return timm.create_model(arch, pretrained=False, num_classes=0, checkpoint_path=str(path)).eval()
    state = torch.load(path, map_location=map_location, weights_only=False)
    model = build_backbone(state["arch"], state["num_classes"], state["in_chans"])
    model.load_state_dict(state["model"])
    return model.eval()


def load_pretrain_data(dataset: str, data_root: str | None, *, image_size: int = 224, tiny: bool = False,
                       download: bool = False, cache: pathlib.Path | None = None,
                       per_char: int = 80) -> vd.PretrainData:
    """``glyphs`` (offline default), ``imagenet``/``imagefolder`` (``root/train``, ``root/val``),
    ``cifar10``/``cifar100``."""
    if dataset == "glyphs":
        return cached(cache, lambda: vd.offline_pretrain_data(tiny=tiny, per_char=per_char))
    if data_root is None:
        raise ValueError(f"--dataset {dataset} needs --data-root")
    if dataset in ("imagenet", "imagefolder"):
        root = pathlib.Path(data_root)
        train = vd.imagefolder_dataset(root / "train", train=True, image_size=image_size)
        val = vd.imagefolder_dataset(root / "val", train=False, image_size=image_size, class_to_idx=train.class_to_idx)
        return vd.PretrainData(train, val, torch.tensor(train.targets), len(train.classes), 3, image_size)
    if dataset in ("cifar10", "cifar100"):
        train = vd.cifar_dataset(data_root, dataset, train=True, image_size=image_size, download=download)
        val = vd.cifar_dataset(data_root, dataset, train=False, image_size=image_size)
        return vd.PretrainData(train, val, torch.tensor(train.targets), 10 if dataset == "cifar10" else 100, 3,
                               image_size)
    raise ValueError(f"unknown dataset {dataset!r}; expected glyphs, imagenet, imagefolder, cifar10 or cifar100")



def parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--dataset", default="glyphs", choices=["glyphs", "imagenet", "imagefolder", "cifar10", "cifar100"])
    p.add_argument("--data-root")
    p.add_argument("--download", action="store_true")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--arch", default=GLYPH_ARCH)
    p.add_argument("--gamma", "--noise", dest="noise", type=noise_ratio, default=0.0,
                   help="label noise ratio as a fraction (0.1 = 10%%); --noise is the same flag")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "off"])
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--per-char", type=positive_int, default=80, help="glyph renderings per character (offline data)")
    p.add_argument("--channels-last", action="store_true", help="channels-last model and batches (faster on CPU)")
    p.add_argument("--tiny", action="store_true")
    tl.add_resume_arguments(p)
    return p


def run(argv: list[str] | None = None) -> dict[str, Any]:
    a = parser().parse_args(argv)
    data = load_pretrain_data(a.dataset, a.data_root, image_size=a.image_size, tiny=a.tiny, download=a.download,
                              per_char=a.per_char)
    cfg = PretrainConfig(arch=a.arch, noise=a.noise, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                         weight_decay=a.weight_decay, seed=a.seed, amp=a.amp, workers=a.workers,
                         channels_last=a.channels_last)
    return pretrain(data, a.out, cfg, stop_after=a.stop_after, checkpoint_every_steps=a.checkpoint_every_steps)


def main(argv: list[str] | None = None) -> int:
    """``python examples/pretrain.py``, ``python -m nmtune_study.pretrain``: :func:`run`, then print
    the metrics without the history (rank 0); exit status 0."""
    metrics = run(argv)
    if _dist_info()[1] == 0:
        print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
