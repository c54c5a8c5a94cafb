"""Pre-training throughput of the offline study: images per second of one training step.

The supervised study's pre-training step (``examples/pretrain.py``: the glyph ResNet,
SGD + Nesterov, cross-entropy on 32x32 grey glyphs held as uint8 tensors) in the
variants a PyTorch user reaches for first, each against the step as the study runs it
(``baseline``: eager, contiguous NCHW, batch 128), timed in the same interleaved rounds:

* ``channels_last``: model and batch in ``torch.channels_last``;
* ``batch256``: batch 256 (images/s per step, the schedule aside);
* ``compile``: ``torch.compile`` of the model (inductor; the compile time is reported
  apart and left out of the rate);
* ``compile_channels_last``: both.

Usage::

    python benchmarks/bench_pretrain.py                 # about a minute on 1 CPU thread
    python benchmarks/bench_pretrain.py --quick         # seconds, no compile
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any, Callable

import torch

from _common import interleaved_medians, machine_info, machine_markdown, markdown_table, setup, write_csv, \
    write_report

ROOT = Path(__file__).resolve().parents[1]


def _builder():
    from timm.models.resnet import BasicBlock, ResNet

    def build(num_classes: int) -> torch.nn.Module:  # the study's glyph_resnet (examples/pretrain.py)
        return ResNet(BasicBlock, (1, 1, 1, 1), num_classes=num_classes, in_chans=1, channels=(16, 32, 64, 128),
                      stem_width=16)
    return build


def _step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, channels_last: bool,
          compiled: bool) -> tuple[Callable[[], Any], float]:
    """One training step as a closure, and the seconds spent compiling (0 in eager)."""
    model = copy.deepcopy(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    fwd = torch.compile(model) if compiled else model
    x = images.float() / 127.5 - 1.0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(fwd(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    if compiled:
        step()  # compiles forward and backward
    return step, time.perf_counter() - t0 if compiled else 0.0


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--classes", type=int, default=99)
    p.add_argument("--quick", action="store_true", help="few repeats, no compile")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out-dir", type=Path, default=Path("runs/benchmarks"))
    a = p.parse_args(argv)
    device = setup(a.threads, "cpu", malloc="default")
    repeats = 3 if a.quick else a.repeats
    compile_ = not (a.quick or a.no_compile)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (256, 1, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, a.classes, (256,), generator=g)
    model = _builder()(a.classes)
    variants: dict[str, tuple[int, bool, bool]] = {"baseline": (128, False, False), "channels_last": (128, True, False),
                                                   "batch256": (256, False, False)}
    if compile_:
        variants |= {"compile": (128, False, True), "compile_channels_last": (128, True, True)}
    fns, compile_s, batch = {}, {}, {}
    for name, (bs, cl, comp) in variants.items():
        fns[name], compile_s[name] = _step(model, images[:bs], labels[:bs], channels_last=cl, compiled=comp)
        batch[name] = bs
    ms = interleaved_medians(fns, device, repeats=repeats, warmup=2)
    base = batch["baseline"] / ms["baseline"]
    rows = [{"variant": n, "batch": batch[n], "ms_per_step": ms[n], "images_per_s": 1e3 * batch[n] / ms[n],
             "rate/baseline": (batch[n] / ms[n]) / base, "compile_s": compile_s[n]} for n in variants]
    a.out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, a.out_dir / "bench_pretrain.csv")
    info = machine_info(device)
    write_report(a.out_dir, "bench_pretrain", [
        "# Pre-training step throughput (glyph ResNet, 32x32 grey, SGD)", "", machine_markdown(info), "",
        markdown_table(rows, ["variant", "batch", "ms_per_step", "images_per_s", "rate/baseline", "compile_s"]), "",
        f"Median of {repeats} interleaved repeats; `rate/baseline` > 1 is faster than the step the study runs."])
    return rows


if __name__ == "__main__":
    main()
