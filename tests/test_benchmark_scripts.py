"""The benchmark scripts survive a broken optional peer (they print a skip line instead)."""

import pathlib
import sys

import natgrad_jax as ng

BENCHMARKS = pathlib.Path(__file__).parent.parent / "benchmarks"


def test_a_peer_that_fails_to_import_is_skipped_with_its_reason(tmp_path, monkeypatch, capsys):
    # kfac-jax 0.0.8 on jax >= 0.11 raises AttributeError (not ImportError) on import.
    (tmp_path / "kfac_jax.py").write_text(
        "raise AttributeError('jax.core.Effects was removed in JAX v0.11.0')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delitem(sys.modules, "kfac_jax", raising=False)
    import digits_mlp

    model = ng.Model(lambda w, x: x @ w, ng.Categorical())
    assert digits_mlp.kfac_runner(model) is None
    out = capsys.readouterr().out
    assert "kfac_jax is skipped" in out and "AttributeError" in out and "v0.11.0" in out
