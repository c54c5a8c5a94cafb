"""LoRA + NMTune with ``gather_distributed=True`` on 2 real gloo ranks (CPU).

Each rank runs one DDP step of a wrapped tiny BERT on its own half of the batch;
the loss averaged over ranks and the DDP-averaged LoRA/head gradients must equal
one process on the concatenated batch (the gather's backward sums across ranks).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason='needs the "lora" extra: pip install "nmtune[lora]"')
pytest.importorskip("transformers", reason='needs the "lora" extra')

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

WORLD, ROWS = 2, 5


def _model():
    from transformers import BertConfig, BertModel

    from nmtune.lora import wrap_lora

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model = wrap_lora(BertModel(cfg), num_classes=3).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return model


def _batch(rank: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(1, 100, (ROWS, 8), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.randint(0, 3, (ROWS,), generator=g)


def _criterion(**kw):
    from nmtune import NMTuneLoss

    return NMTuneLoss("paper", lambda_=1.0, **kw)  # large weights: the global terms dominate the gradients


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        ddp = DDP(model)
        batch, y = _batch(rank)
        out = ddp(**batch)
        loss = _criterion(gather_distributed=True)(out.logits, y, out.features, out.reference)
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        grads = {n: p.grad.detach().clone() for n, p in model.trainable_parameters()}
        torch.save({"loss": mean_loss / WORLD, "grads": grads}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_lora_gather_distributed_matches_one_process_on_the_global_batch(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    model = _model()
    parts = [_batch(r) for r in range(WORLD)]
    batch = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
    y = torch.cat([p[1] for p in parts])
    out = model(**batch)
    loss = _criterion()(out.logits, y, out.features, out.reference)
    loss.backward()
    no_gather = {}  # what DDP would average without the gather: each rank's local statistics
    for part, labels in parts:
        local = copy.deepcopy(model)
        local.zero_grad()
        o = local(**part)
        _criterion()(o.logits, labels, o.features, o.reference).backward()
        for n, p in local.trainable_parameters():
            no_gather[n] = no_gather.get(n, 0) + p.grad / WORLD
    for r, result in enumerate(ranks):
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-9, atol=0, msg=f"rank {r}")
        n_checked = 0
        for n, p in model.trainable_parameters():
            torch.testing.assert_close(result["grads"][n], p.grad, rtol=1e-7, atol=1e-10, msg=f"rank {r}, {n}")
            n_checked += "lora_A" in n
        assert n_checked == 3  # query, key, value of the one layer
    # without the gather the averaged gradients differ: the comparison above can catch a missing gather
    assert any(not torch.allclose(no_gather[n], p.grad, rtol=1e-4) for n, p in model.trainable_parameters())
