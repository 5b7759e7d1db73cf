"""mkdocs hooks for unitrain's site (``hooks:`` in mkdocs.yml).

- The gallery: every ``examples/*.py`` becomes ``gallery/<name>.md``, with the original it ports
  (its docstring), its output on each installed backend from a run in this build (``--max-steps``
  budget, so CI stays quick), side by side, the figures it drew, and its source.
  ``UNITRAIN_GALLERY_STEPS`` sets the budget (default 20), ``UNITRAIN_GALLERY_BACKENDS`` a subset
  of the installed backends (``numpy,torch``); ``UNITRAIN_GALLERY=off`` builds the pages without
  running anything (they say so): the quick strict build of the test suite.
  Outputs are cached in ``.gallery-cache/`` (or ``$UNITRAIN_GALLERY_CACHE``) under a digest of
  the script, the package's sources, the backend and the budget, so a rebuild of unchanged sources
  runs nothing.
- Docstrings are reStructuredText-flavoured (``:meth:`~unitrain.TrainingLoop.fit```): the roles
  become autorefs links (plain code where the name is not documented).
"""

from __future__ import annotations

import ast
import hashlib
import html
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CACHE = Path(os.environ.get("UNITRAIN_GALLERY_CACHE", ROOT / ".gallery-cache"))
_STAGED = None  # see stage_package
BACKENDS = ["numpy", "torch", "mindspore", "chainer"]
RUN_TIMEOUT = 600  # seconds for one example on one backend


def examples() -> list[Path]:
    return sorted(path for path in EXAMPLES.glob("*.py") if not path.name.startswith("_"))


# --- nav and pages -------------------------------------------------------------------------------


@event_priority(100)  # before mkdocstrings' on_config, which makes its handlers
def on_config(config):
    """The package as mkdocstrings reads it, and the gallery's nav section listing every example."""
    stage_package(config)
    pages = ["gallery/index.md", *(f"gallery/{path.stem}.md" for path in examples())]
    for index, item in enumerate(config["nav"] or []):
        if isinstance(item, dict) and "Gallery" in item:
            config["nav"][index] = {"Gallery": pages}
    return config


def stage_package(config) -> None:
    """A copy of the package's sources laid out as installed, in a temporary folder that
    mkdocstrings' Python handler searches first: it reads the sources without importing anything,
    so it knows nothing of pyproject's ``package-dir`` (backends/ and conformance/ import as
    unitrain.backends and unitrain.conformance). Copies, since griffe follows symbolic links back
    to the checkout; removed when the build's process ends."""
    global _STAGED
    _STAGED = tempfile.TemporaryDirectory(prefix="unitrain-docs-package-")
    staged = Path(_STAGED.name) / "unitrain"
    python_only = shutil.ignore_patterns("datafiles", "__pycache__", "*.pyc")
    shutil.copytree(ROOT / "unitrain", staged, ignore=python_only)
    for name in ("backends", "conformance"):
        shutil.copytree(ROOT / name, staged / name, ignore=python_only)
    handlers = config.plugins["mkdocstrings"].config.handlers  # read when the handler is first used
    handlers.setdefault("python", {})["paths"] = [_STAGED.name]


def on_files(files, config):
    for path in examples():
        page, figures = render_example(path)
        files.append(File.generated(config, f"gallery/{path.stem}.md", content=page))
        for name, data in figures.items():
            files.append(File.generated(config, f"gallery/{name}", content=data))
    return files


_ROLE = re.compile(r":(?:meth|func|class|attr|mod|data|exc|obj):<code>(~?)([\w.]+)(?:\(\))?</code>")


def on_page_content(html_text, page, config, files):
    def link(match):
        tilde, name = match.groups()
        title = name.rsplit(".", 1)[-1] if tilde else name
        return f'<autoref identifier="{name}" optional><code>{html.escape(title)}</code></autoref>'

    return _ROLE.sub(link, html_text)


# --- running the examples --------------------------------------------------------------------


def chosen_backends() -> list[str]:
    """The installed backends, or those of them ``UNITRAIN_GALLERY_BACKENDS`` (``numpy,torch``) names."""
    installed = [name for name in BACKENDS if importlib.util.find_spec(name) is not None]
    chosen = os.environ.get("UNITRAIN_GALLERY_BACKENDS")
    return installed if chosen is None else [name for name in installed if name in chosen.split(",")]


def sources_digest() -> str:
    """What an example's output depends on besides itself: the package's sources."""
    digest = hashlib.sha256()
    for folder in ("unitrain", "backends", "conformance"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def run_example(path: Path, argv: list[str]) -> dict:
    """``python examples/NAME.py ARGV`` in a new folder: its output, exit status, seconds and the
    PNG files it wrote."""
    key = hashlib.sha256(json.dumps([path.read_text(), _SOURCES, argv, sys.version]).encode()).hexdigest()[:32]
    cached = CACHE / f"{key}.json"
    if cached.is_file():
        result = json.loads(cached.read_text())
        return {**result, "figures": {name: bytes.fromhex(data) for name, data in result["figures"].items()}}
    with tempfile.TemporaryDirectory(prefix="unitrain-gallery-") as folder:
        started = time.perf_counter()
        env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
        try:
            done = subprocess.run([sys.executable, str(path), *argv], cwd=folder, env=env, capture_output=True,
                                  text=True, timeout=RUN_TIMEOUT)  # fmt: skip
            output, status = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as expired:
            output, status = f"{expired.stdout or ''}\n(stopped after {RUN_TIMEOUT} s)", None
        seconds = time.perf_counter() - started
        figures = {png.name: png.read_bytes() for png in sorted(Path(folder).rglob("*.png"))}
    result = {"argv": argv, "output": output, "status": status, "seconds": seconds, "figures": figures}
    if status == 0:
        CACHE.mkdir(exist_ok=True)
        cached.write_text(json.dumps({**result, "figures": {name: data.hex() for name, data in figures.items()}}))
    return result


_SOURCES = sources_digest()


def last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def fence(text: str, language: str = "text") -> str:
    ticks = "````" if "```" in text else "```"
    return f"{ticks}{language}\n{text.rstrip()}\n{ticks}\n"


def tab(title: str, body: str) -> str:
    return f'=== "{title}"\n\n' + "".join(f"    {line}" if line.strip() else line for line in body.splitlines(True))


def render_example(path: Path) -> tuple[str, dict[str, bytes]]:
    """The gallery page of one example, and the figures it links."""
    source = path.read_text()
    docstring = ast.get_docstring(ast.parse(source)) or ""
    title, _, details = docstring.partition("\n\n")
    steps = int(os.environ.get("UNITRAIN_GALLERY_STEPS", "20"))
    budget = ["--max-steps", str(steps)] if "--max-steps" in source else []
    compares = '"--compare"' in source  # the script trains every installed backend itself
    backends = chosen_backends()
    if compares:
        runs = [("compare", ["--compare", "--backends", ",".join(backends)])]
    else:
        runs = [(name, ["--backend", name, *budget]) for name in backends]
    lines = [f"# {path.stem}\n", f"**Ports:** {' '.join(title.split())}\n", f"Script: `examples/{path.name}`.\n"]
    figures = {}
    if os.environ.get("UNITRAIN_GALLERY") == "off":
        lines.append("!!! note\n    The outputs were not rendered in this build (`UNITRAIN_GALLERY=off`); "
                     "`scripts/docs` renders them.\n")  # fmt: skip
    else:
        results = [(name, run_example(path, argv)) for name, argv in runs]
        if compares:
            how = f"`python examples/{path.name} --compare --backends {','.join(backends)}`"
        else:
            how = f"`python examples/{path.name} --backend B {' '.join(budget)}` on each installed backend B"
        lines.append(f"Run in this build ({time.strftime('%Y-%m-%d')}): {how}.\n")
        lines.append("| run | exit status | seconds | last line of output |\n| --- | --- | --- | --- |")
        for name, result in results:
            status = "timed out" if result["status"] is None else result["status"]
            shown = last_line(result["output"]).replace("|", "\\|")
            lines.append(f"| {name} | {status} | {result['seconds']:.1f} | `{shown}` |")
        lines.append("")
        for name, result in results:
            body = fence(result["output"] or "(no output)")
            for figure, data in result["figures"].items():
                stored = f"{path.stem}-{name.replace(' ', '-')}-{figure}"
                figures[stored] = data
                body += f"\n![{figure} drawn on {name}]({stored})\n"
            lines.append(tab(name, body))
    lines.append("## What maps to what\n")
    lines.append(details.strip() + "\n")
    lines.append("## Source\n")
    lines.append(fence(source, "python"))
    return "\n".join(lines), figures
