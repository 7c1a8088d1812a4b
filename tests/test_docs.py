"""The documentation site builds in strict mode and documents every public symbol."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

import natgrad_jax as ng
from tests.helpers import optional_import

optional_import("mkdocs")
optional_import("mkdocstrings")
optional_import("mkdocs_jupyter")

ROOT = pathlib.Path(__file__).parent.parent


def _mkdocs_build(config_dir, tmp_path, execute: bool) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "NO_MKDOCS_2_WARNING": "1",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "NATGRAD_DOCS_EXECUTE": str(execute).lower(),
    }
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=config_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_docs_build_strictly_and_cover_the_public_api(tmp_path):
    result = _mkdocs_build(ROOT, tmp_path, execute=False)
    assert result.returncode == 0, result.stdout + result.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    missing = [name for name in ng.__all__ if f'id="natgrad_jax.{name}"' not in api]
    assert not missing, f"public symbols missing from docs/api.md: {missing}"
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        assert (tmp_path / "site" / "notebooks" / notebook.stem / "index.html").exists()


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def test_every_readme_snippet_runs_and_trains():
    """The README's Python blocks, run in order in one namespace as a reader would paste
    them: the quick start, the equinox module and the flax NNX model each train."""
    blocks = _python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 3
    namespace: dict = {}
    for k, code in enumerate(blocks):
        exec(compile(code, f"README block {k + 1}", "exec"), namespace)
    model, w, x, y = (namespace[k] for k in ("model", "w", "x", "y"))
    assert float(model.nll(w, x, y)) < 0.35  # log 2 = 0.69 at the start
    report = ng.diagnostics(namespace["state"])  # the last block's state: nnx
    assert int(report.steps) == 1 and int(report.rejected_non_finite) == 0
    classifier, mlp, labels = (namespace[k] for k in ("classifier", "mlp", "labels"))
    assert float(classifier.nll(mlp, x, labels)) < 0.35
    linear, params = namespace["linear"], namespace["params"]
    nnx = namespace["nnx"]
    _, initial = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    assert float(linear.nll(params, x, labels)) < float(linear.nll(initial, x, labels))


def test_the_docs_quick_start_runs():
    (code,) = _python_blocks((ROOT / "docs" / "index.md").read_text())[:1]
    namespace: dict = {}
    exec(compile(code, "docs quick start", "exec"), namespace)
    model, w, x, y = (namespace[k] for k in ("model", "w", "x", "y"))
    assert float(model.nll(w, x, y)) < 0.35  # log 2 = 0.69 at the start


@pytest.mark.parametrize("cell", ["print(6 * 7)", "raise RuntimeError('made to fail')"])
def test_a_notebook_that_raises_fails_the_docs_build(tmp_path, cell):
    """The site's own notebook settings (executed, errors are errors, no cache) on a
    one-page site: a notebook that raises fails the build and names the error, and the
    same notebook without the error builds, its output on the page."""
    nbformat = optional_import("nbformat")
    yaml = optional_import("yaml")
    from mkdocs.utils.yaml import yaml_load

    with open(ROOT / "mkdocs.yml") as f:
        site = yaml_load(f)
    (notebook_options,) = [p["mkdocs-jupyter"] for p in site["plugins"] if "mkdocs-jupyter" in p]
    assert notebook_options["allow_errors"] is False and notebook_options["cache"] is False
    (tmp_path / "docs").mkdir()
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)])
    nbformat.write(notebook, tmp_path / "docs" / "page.ipynb")
    config = {
        "site_name": "one page",
        "strict": True,
        "nav": [{"Page": "page.ipynb"}],
        "plugins": [{"mkdocs-jupyter": {**notebook_options, "execute": True}}],
    }
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    result = _mkdocs_build(tmp_path, tmp_path, execute=True)
    if cell.startswith("raise"):
        assert result.returncode != 0
        assert "made to fail" in result.stdout + result.stderr
    else:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "42" in (tmp_path / "site" / "page" / "index.html").read_text()
