"""The documentation site (mkdocs.yml: docs/*.md + the API reference from the docstrings)
builds in strict mode, offline: a broken link, reference or docstring fails the suite.

The builds run in-process with every socket connection and name lookup refused, so a
theme or plugin that reaches for the network (fonts, CDN, inventories) fails the test.
"""

from __future__ import annotations

import logging
import shutil
import socket
from pathlib import Path

import pytest
from mkdocs import config as mkdocs_config  # the docs extra, part of the test extra
from mkdocs.commands.build import build
from mkdocs.exceptions import Abort

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "mkdocs.yml"


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Refuse every network access; record what was attempted."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[1:] if len(args) > 1 else args))
        raise OSError("network access during the docs build (tests/test_docs_site.py)")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")
    return attempts


def _build(site: Path, docs: Path | None = None) -> None:
    overrides = {"site_dir": str(site), "strict": True}
    if docs is not None:
        overrides["docs_dir"] = str(docs)
    build(mkdocs_config.load_config(str(CONFIG), **overrides))


def _nav_titles(html: str) -> str:
    return html[html.find('class="md-nav md-nav--primary"'):]


def test_site_builds_strictly_offline(tmp_path: Path, offline: list[str]) -> None:
    site = tmp_path / "site"
    _build(site)
    assert offline == []
    pages = {p.parent.relative_to(site).as_posix() for p in site.rglob("index.html")}
    for page in sorted(ROOT.joinpath("docs").glob("*.md")):
        assert (page.stem if page.stem != "index" else ".") in pages, f"docs/{page.name} not built"
    # the API reference: one page per public module, rendered from the docstrings
    for module in ("nmtune", "nmtune.functional", "nmtune.loss", "nmtune.lora.wrap", "nmtune.integrations"):
        assert f"api/{module}" in pages
    assert not any(p.startswith("api/nmtune._") or "._" in p for p in pages)  # private modules stay out
    loss = (site / "api" / "nmtune.loss" / "index.html").read_text(encoding="utf-8")
    assert 'id="nmtune.loss.NMTuneLoss"' in loss and "Examples:" in loss
    root = (site / "api" / "nmtune" / "index.html").read_text(encoding="utf-8")
    assert "<code>NMTuneLoss</code>" in root and ":class:" not in root  # Sphinx roles shown as code
    # a link from docs/ to a repository file (docs/language.md -> the committed results) is published
    assert (site / "repo" / "examples" / "results" / "language" / "table" / "index.html").is_file()
    assert "../repo/examples/results/language/table/" in (site / "language" / "index.html").read_text(encoding="utf-8")
    # nothing is loaded from another host when the site is viewed
    index = (site / "index.html").read_text(encoding="utf-8")
    assert "fonts.googleapis" not in index and "fonts.gstatic" not in index


def test_new_page_is_in_nav_and_broken_link_fails(tmp_path: Path, offline: list[str],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs, ignore=shutil.ignore_patterns("__pycache__"))
    (docs / "zz_new_page.md").write_text("# A page no nav line lists\n\nSee [the method](method.md).\n")
    (docs / "zz_broken.md").write_text("# Broken\n\nSee [nothing](no_such_page.md) and [`x`][nmtune.no_such_name].\n")
    site = tmp_path / "site"
    with caplog.at_level(logging.WARNING, logger="mkdocs"), pytest.raises(Abort, match="strict mode"):
        _build(site, docs)
    assert "no_such_page.md" in caplog.text and "nmtune.no_such_name" in caplog.text
    assert "zz_new_page.md" not in caplog.text  # the valid new page raised nothing
    # mkdocs writes the pages before it aborts: the new page is in the nav (end of "Guides")
    assert "A page no nav line lists" in _nav_titles((site / "method" / "index.html").read_text(encoding="utf-8"))
    assert offline == []
