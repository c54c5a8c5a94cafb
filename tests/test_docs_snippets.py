"""Every Python snippet of README.md and docs/*.md runs, offline, as written.

Each file's ```python blocks run in order in one namespace (a later block may use
what an earlier one defined), in a scratch directory. Free names that stand for the
reader's own data or services (``train_x``, ``lm_loss``, ``path`` to a checkpoint, an
embeddings ``client``) are bound to small offline stand-ins below, never skipped. A
block that cannot run here at all says so in a comment the runner reads and lists:
``# doc-test: skip (reason)``.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
FILES = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if BLOCK.search(p.read_text())]
SKIP = re.compile(r"#\s*doc-test:\s*skip\s*\(([^)]+)\)")


def _blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def _tiny_bert(tmp_path: Path) -> str:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path / "tiny-bert"
    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(path)
    return str(path)


def _readme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    ids = torch.randint(1, 100, (8, 12))
    return {
        "z": torch.randn(16, 24, requires_grad=True), "f": torch.randn(16, 24), "lm_loss": torch.tensor(0.0),
        "train_x": torch.randn(64, 12), "train_y": torch.randint(0, 3, (64,)),
        "test_x": torch.randn(32, 12), "test_y": torch.randint(0, 3, (32,)),
        "path": _tiny_bert(tmp_path), "batch": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        "batch_labels": torch.randint(0, 2, (8,)),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    # torchrun's environment for one process on the loopback (gloo on CPU).
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(key, value)
    feats, labels = torch.randn(512, 768), torch.randint(0, 100, (512,))
    train_set = torch.utils.data.TensorDataset(feats, labels)
    return {"train_set": train_set, "loader": torch.utils.data.DataLoader(train_set, batch_size=64)}


def _language(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    class _Embeddings:  # an embeddings API client: deterministic vectors per text
        def create(self, model: str, input: list[str]) -> Any:
            rows = [torch.randn(16, generator=torch.Generator().manual_seed(hash(t) % 2**31)).tolist()
                    for t in input]
            return type("Resp", (), {"data": [type("Item", (), {"embedding": r})() for r in rows]})()

    from nmtune_study.data import text as _text_data

    def hub_rows(path: str, config: str | None, split: str) -> list[dict]:  # the hub, offline: 24 rows
        words = "the a cat dog sat ran on under mat rug red blue".split()
        text = {c: " ".join(words[(i * 7 + j) % len(words)] for j in range(5)) for i, c in enumerate(
            ("sentence", "sentence1", "sentence2", "question", "question1", "question2", "premise",
             "hypothesis", "text", "sentence_A", "sentence_B"))}
        return [{**{c: f"{s} {i}" for c, s in text.items()},
                 "label": float(i % 5) if config == "stsb" else i % 2} for i in range(24)]

    monkeypatch.setattr(_text_data, "_hub_rows", hub_rows)
    return {"client": type("Client", (), {"embeddings": _Embeddings()})()}


STANDINS: dict[str, Callable[[Path, pytest.MonkeyPatch], dict[str, Any]]] = {
    "README.md": _readme,
    "distributed.md": _distributed,
    "language.md": _language,
}


def test_the_docs_have_snippets() -> None:
    assert len(_blocks(ROOT / "README.md")) >= 4, "README lost its Python examples"
    assert sum(len(_blocks(p)) for p in FILES[1:]) >= 10, "docs/ lost their Python examples"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_snippets_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    blocks = _blocks(path)
    monkeypatch.chdir(tmp_path)  # snippets write to relative paths such as runs/lora
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    namespace: dict[str, Any] = {"__name__": f"doc_{path.stem}"}
    namespace.update(STANDINS.get(path.name, lambda *_: {})(tmp_path, monkeypatch))
    skipped = []
    for index, code in enumerate(blocks):
        reason = SKIP.search(code)
        if reason:
            skipped.append(f"{path.name} block {index}: {reason.group(1)}")
            continue
        try:
            exec(compile(code, f"{path.name} python block {index}", "exec"), namespace)  # noqa: S102
        except Exception as exc:  # name the block, not only the line inside it
            first = code.strip().splitlines()[0]
            raise AssertionError(f"{path.name} python block {index} ({first!r}) failed: {exc!r}") from exc
        if isinstance(namespace.get("loss"), torch.Tensor):
            assert torch.isfinite(namespace["loss"]).all(), f"{path.name} block {index}: non-finite loss"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # a snippet's process group must not outlive it
    if skipped:
        with capsys.disabled():
            print("\n".join(["", "doc-test skips:", *skipped]))
