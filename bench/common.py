"""Helpers shared by the benchmarks: a throwaway BentoML home with the XGB demo model, servers, timing."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python bench/x.py` puts bench/ on the path, not the checkout: the test harness lives there.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
MODEL = "breast-cancer-xgb"


def throwaway_home() -> Path:
    """Point BentoML at a fresh home, removed when the benchmark exits (call before anything imports bentoml):
    with its servers' files and keys it holds several hundred MB. TMPDIR points inside it for the servers,
    whose engines leave temporary folders behind (concrete's, one per model load)."""
    from harness.session_dir import use_as_scratch

    home = use_as_scratch(Path(tempfile.mkdtemp(prefix="fhe-bento-bench-")))
    os.environ["BENTOML_HOME"] = str(home)
    return home


def setup_home() -> Path:
    """A throwaway BentoML home with the XGB demo model imported into it (call before other imports)."""
    home = throwaway_home()
    from fhe_bento.modelkit.demo import build_and_import

    build_and_import([MODEL])
    return home


def start_server(workdir: Path, store_url: str, **env: str):
    from harness.devserver import Server

    workdir.mkdir(parents=True, exist_ok=True)
    server = Server(workdir, {"FHE_BENTO_MODELS": f"{MODEL}:latest", "FHE_BENTO_KEY_STORE": store_url, **env})
    server.start()
    return server


def post_predict(url: str, key_id: str, ciphertext: bytes, model: str = MODEL) -> tuple[float, bytes]:
    import httpx

    started = time.perf_counter()
    response = httpx.post(
        f"{url}/v1/models/{model}/predict",
        content=ciphertext,
        timeout=600,
        headers={"Content-Type": "application/octet-stream", "X-FHE-Key-Id": key_id},
    )
    response.raise_for_status()
    return time.perf_counter() - started, response.content


def report(name: str, results: dict) -> None:
    """Print a markdown table and keep the figures in bench/results/<name>.json."""
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    print("| figure | value |\n|---|---|")
    for key, value in results.items():
        print(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")


def write_sections(path: Path, sections: dict[str, str], preamble: str | None = None) -> None:
    """Replace (or append) the `## heading` sections of a markdown report, and its text before the first
    heading if given, keeping the sections other benchmarks wrote."""
    old = path.read_text() if path.exists() else ""
    head, *parts = re.split(r"^## ", old, flags=re.M)
    kept = {part.split("\n", 1)[0].strip(): part.rstrip() + "\n\n" for part in parts}
    for heading, body in sections.items():
        kept[heading] = f"{heading}\n\n{body.strip()}\n\n"
    text = (preamble.strip() + "\n\n" if preamble is not None else head) + "".join(
        f"## {part}" for part in kept.values()
    )
    path.write_text(text.rstrip() + "\n")


def write_report(path: Path, markdown: str) -> None:
    """Write a whole report (a preamble, then `## ` sections) over `path`, keeping the sections that other
    benchmarks wrote there."""
    preamble, *parts = re.split(r"^## ", markdown, flags=re.M)
    write_sections(path, {part.split("\n", 1)[0].strip(): part.split("\n", 1)[1] for part in parts}, preamble)
