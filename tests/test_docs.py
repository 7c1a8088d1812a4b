"""The documentation site builds in strict mode and documents every public symbol."""

import os
import pathlib
import subprocess
import sys

import natgrad_jax as ng
from tests.helpers import optional_import

optional_import("mkdocs")
optional_import("mkdocstrings")
optional_import("mkdocs_jupyter")

ROOT = pathlib.Path(__file__).parent.parent


def test_docs_build_strictly_and_cover_the_public_api(tmp_path):
    env = {
        **os.environ,
        "NO_MKDOCS_2_WARNING": "1",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "NATGRAD_DOCS_EXECUTE": "false",
    }
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    missing = [name for name in ng.__all__ if f'id="natgrad_jax.{name}"' not in api]
    assert not missing, f"public symbols missing from docs/api.md: {missing}"
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        assert (tmp_path / "site" / "notebooks" / notebook.stem / "index.html").exists()


def _first_python_block(text: str, after: str) -> str:
    section = text[text.index(after) :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


def test_the_quick_starts_run():
    readme = (ROOT / "README.md").read_text()
    for code in (
        _first_python_block(readme, "## Quick start"),
        _first_python_block((ROOT / "docs" / "index.md").read_text(), "# natgrad_jax"),
    ):
        namespace: dict = {}
        exec(compile(code, "quick start", "exec"), namespace)
        model, w, x, y = (namespace[k] for k in ("model", "w", "x", "y"))
        assert float(model.nll(w, x, y)) < 0.35  # log 2 = 0.69 at the start
