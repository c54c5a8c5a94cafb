"""The README's Python snippets run as written, with their free names bound to small data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _namespace(tmp_path: Path) -> dict[str, object]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path / "tiny-bert"
    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(path)
    ids = torch.randint(1, 100, (8, 12))
    return {
        # the regularizer snippet
        "z": torch.randn(16, 24, requires_grad=True), "f": torch.randn(16, 24), "lm_loss": torch.tensor(0.0),
        # black-box tuning
        "train_x": torch.randn(64, 12), "train_y": torch.randint(0, 3, (64,)),
        "test_x": torch.randn(32, 12), "test_y": torch.randint(0, 3, (32,)),
        # LoRA
        "path": str(path), "batch": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        "labels": torch.randint(0, 2, (8,)),
    }


def test_readme_has_the_snippets() -> None:
    assert len(BLOCKS) >= 4, "README lost its Python examples"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # snippets write to relative paths such as runs/lora
    namespace = _namespace(tmp_path)
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), namespace)  # noqa: S102
    if "loss" in namespace:
        assert torch.isfinite(namespace["loss"]).all()
