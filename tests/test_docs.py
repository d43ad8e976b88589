"""The docs: the MkDocs site builds strictly (a broken link or anchor, a missing page, or a page left out of
the nav fails the build), the README links only to pages that exist, and the HTTP API page lists exactly
the error codes the server sends."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MKDOCS = Path(sys.executable).parent / "mkdocs"
PRODUCT = ("protocol", "core", "service", "runners")  # the folders whose code raises the server's errors


def _nav_pages(nav: list) -> list[str]:
    pages = []
    for entry in nav:
        target = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += _nav_pages(target) if isinstance(target, list) else [target]
    return pages


def _config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def _build(project: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(site)],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # mkdocs-material's banner, not a build warning
    )


def test_the_docs_site_builds_strictly_with_every_page(tmp_path):
    config = _config()
    assert config["strict"] is True and config["docs_dir"] == "docs"
    pages = _nav_pages(config["nav"])
    on_disk = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(pages) == on_disk  # every page is in the nav, and the nav names no missing page

    site = tmp_path / "site"
    result = _build(ROOT, site)
    assert result.returncode == 0, result.stdout + result.stderr
    for page in pages:
        html = site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert html.is_file(), page
    api = (site / "http-api" / "index.html").read_text()
    assert 'id="errors"' in api and "<table>" in api  # the error table rendered as a table
    assert (site / "img" / "throughput.png").is_file()


def test_a_broken_link_fails_the_build(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(ROOT / "docs", project / "docs")
    shutil.copy(ROOT / "mkdocs.yml", project / "mkdocs.yml")
    page = project / "docs" / "index.md"
    page.write_text(page.read_text() + "\n[gone](no-such-page.md) [anchor](models.md#no-such-heading)\n")

    result = _build(project, tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stderr and "no-such-heading" in result.stderr, result.stderr


def test_the_readme_links_only_to_docs_pages_that_exist():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme) + re.findall(r"^\[[^\]]+\]:\s*(\S+)", readme, re.M)
    relative = [link for link in links if not re.match(r"[a-z][a-z0-9+.-]*:", link) and link[0] != "#"]
    pages = set(_nav_pages(_config()["nav"]))
    linked = set()
    for link in relative:
        path = link.split("#", 1)[0]
        assert path.startswith("docs/") and path.endswith(".md"), link
        assert (ROOT / path).is_file(), link
        assert path.removeprefix("docs/") in pages, link  # a page of the site, not a stray file
        linked.add(path.removeprefix("docs/"))
    assert linked == pages  # the README's list of pages is complete


def test_the_docs_list_exactly_the_error_codes_the_server_sends():
    from fhe_bento.protocol.errors import ERROR_CODES

    text = (ROOT / "docs" / "http-api.md").read_text()
    section = text.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for status, codes in re.findall(r"^\| (\d{3}) \| ([^|]+) \|", section, re.M):
        documented.update(dict.fromkeys(re.findall(r"`([a-z_]+)`", codes), int(status)))
    assert documented == ERROR_CODES
    raised = set()
    for folder in PRODUCT:
        for path in (ROOT / folder).glob("*.py"):
            raised |= set(re.findall(r"(?:FHEBentoError|_refused)\(\s*\"([a-z_]+)\"", path.read_text()))
    assert raised <= ERROR_CODES.keys(), raised - ERROR_CODES.keys()
    assert len(raised) > 20  # the pattern still finds the raise sites
