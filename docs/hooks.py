"""MkDocs hooks of the documentation site (``mkdocs.yml``: ``hooks: [docs/hooks.py]``).

* **API reference**: one generated page per public module of ``nmtune`` (every module
  whose dotted name has no part starting with ``_``, found on disk, nothing imported),
  rendered from its docstrings by mkdocstrings, listed under "API reference" in the nav.
* **New pages**: a ``docs/*.md`` page that the nav does not list is appended to the
  "Guides" section, so adding a page needs no nav line (one line places it elsewhere).
* **Links to repository files**: a page may link outside ``docs/`` (``../examples/...``)
  so the link works on GitHub; the linked file is published under ``repo/`` and the link
  rewritten to it. A link to a file that does not exist is left alone, so the strict
  build fails on it like on any broken link.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files, InclusionLevel

log = logging.getLogger("mkdocs.hooks.nmtune")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "nmtune"
API_DIR = "api"
GUIDES = "Guides"
API_SECTION = "API reference"
REPO_DIR = "repo"
# Markdown link or image target, [text](target) / [text](target "title"), outside code spans.
_LINK = re.compile(r"(\]\()(\.\./[^)\s#]+)((?:#[^)\s]*)?(?:\s+\"[^\"]*\")?\))")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def public_modules(root: Path = ROOT, package: str = PACKAGE) -> list[str]:
    """Dotted names of the package's public modules, package first, then sorted."""
    names = []
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if any(p.startswith("_") for p in parts):
            continue
        names.append(".".join(parts))
    return sorted(names, key=lambda n: (n != package, n))


def _api_page(module: str) -> str:
    return f"{API_DIR}/{module}.md"


def _listed(nav: Any) -> set[str]:
    """Every page path named anywhere in a nav tree."""
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, dict):
        return set().union(*(_listed(v) for v in nav.values())) if nav else set()
    if isinstance(nav, list):
        return set().union(*(_listed(v) for v in nav)) if nav else set()
    return set()


def _section(nav: list, title: str) -> list:
    for item in nav:
        if isinstance(item, dict) and title in item:
            if item[title] is None:
                item[title] = []
            return item[title]
    raise ValueError(f"mkdocs.yml's nav has no {title!r} section; docs/hooks.py fills it in")


def on_config(config: Any) -> Any:
    nav = config["nav"]
    docs_dir = Path(config["docs_dir"])
    _section(nav, API_SECTION)[:] = [{m: _api_page(m)} for m in public_modules()]
    listed = _listed(nav)
    guides = _section(nav, GUIDES)
    for page in sorted(p.name for p in docs_dir.glob("*.md")):
        if page not in listed:
            log.info("docs/%s is not in mkdocs.yml's nav: listed at the end of %r", page, GUIDES)
            guides.append(page)
    return config


def _outside_links(markdown: str) -> list[str]:
    return [m.group(2) for m in _LINK.finditer(_FENCE.sub("", markdown))]


def _target(page_src_uri: str, link: str) -> str | None:
    """Repository-relative path of a ``../`` link if it leaves docs/ and names a file in the repo."""
    rel = posixpath.normpath(posixpath.join("docs", posixpath.dirname(page_src_uri), link))
    if rel.startswith("..") or rel.startswith("docs/"):
        return None
    return rel if (ROOT / rel).is_file() else None


def on_files(files: Files, config: Any) -> Files:
    for module in public_modules():
        content = f"# `{module}`\n\n::: {module}\n"
        files.append(File.generated(config, _api_page(module), content=content))
    added: set[str] = set()
    for f in list(files.documentation_pages()):
        if f.abs_src_path is None:
            continue
        for link in _outside_links(Path(f.abs_src_path).read_text(encoding="utf-8")):
            rel = _target(f.src_uri, link)
            if rel is None or rel in added:
                continue
            added.add(rel)
            files.append(File.generated(config, f"{REPO_DIR}/{rel}", abs_src_path=str(ROOT / rel),
                                        inclusion=InclusionLevel.NOT_IN_NAV))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    src_uri = page.file.src_uri

    def rewrite(m: re.Match) -> str:
        rel = _target(src_uri, m.group(2))
        if rel is None:
            return m.group(0)  # not a repository file: mkdocs reports it if it is broken
        new = posixpath.relpath(f"{REPO_DIR}/{rel}", posixpath.dirname(src_uri) or ".")
        return f"{m.group(1)}{new}{m.group(3)}"

    if src_uri.startswith(f"{REPO_DIR}/"):
        return markdown
    parts = re.split(r"(^(?:```|~~~).*?^(?:```|~~~))", markdown, flags=re.S | re.M)
    return "".join(p if i % 2 else _LINK.sub(rewrite, p) for i, p in enumerate(parts))
