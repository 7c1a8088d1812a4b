"""The benchmark scripts survive a broken optional peer (they print a skip line instead)."""

import argparse
import datetime
import pathlib
import sys

import jax
import pytest

import natgrad_jax as ng
from tests.helpers import benchmark_module

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


def test_digits_benchmark_prints_its_rows_without_the_broken_peer(tmp_path, monkeypatch, capsys):
    (tmp_path / "kfac_jax.py").write_text("raise AttributeError('removed in JAX v0.11.0')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delitem(sys.modules, "kfac_jax", raising=False)
    monkeypatch.setattr(
        sys, "argv", ["digits_mlp.py", "--max-steps", "4", "--seeds", "1", "--only", "diagonal"]
    )
    import digits_mlp

    monkeypatch.setattr(digits_mlp, "report_run_time", lambda: None)
    digits_mlp.main()
    out = capsys.readouterr().out
    assert "kfac_jax is skipped" in out and "jax " + jax.__version__ in out
    assert "(best Adam)" in out and "ngd diagonal, exact" in out and ">4 [>4–>4]" in out


def test_benchmark_figures_go_to_their_own_folder_unless_asked(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import _common

    monkeypatch.setattr(_common, "RESULTS", tmp_path / "results")
    default = _common.output_path(argparse.Namespace(update_docs=False), "figure.png")
    assert default == tmp_path / "results" / "figure.png" and default.parent.is_dir()
    asked = _common.output_path(argparse.Namespace(update_docs=True), "figure.png")
    assert asked.parent == BENCHMARKS.parent / "docs" / "images"


def test_seed_summaries_are_median_and_range():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import _common
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert _common.seed_summary([30, 20, 25], 100) == "25 [20–30]"
    assert _common.seed_summary([5, None, 3], 10) == "5 [3–>10]"
    assert _common.seed_summary([None, None, 7], 10) == ">10 [7–>10]"


def test_compile_times_measures_a_rows_lowering_and_compilation(monkeypatch):
    """The per-row measurement that benchmarks/compile_times.py runs in a child process:
    Adam's step on the autoencoder lowers to the matmuls of one forward (8) and one
    backward (15) pass."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import compile_times

    result = compile_times.measure("adam", 4)
    assert result["dots"] == 23 and result["ops"] > result["dots"]
    assert result["lower_s"] > 0 and result["compile_s"] > 0


def test_step_profile_sorts_a_programs_operations_into_kinds_and_times_them(monkeypatch):
    """benchmarks/step_profile.py: a matmul, a Cholesky factorisation (LAPACK) and a
    transposed concatenation (a copy) are told apart in the compiled program, and a
    traced step reports time for the kinds it ran."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import step_profile

    def step(params, state, x):
        factor = jax.numpy.linalg.cholesky(x @ x.T + jax.numpy.eye(len(x)))
        return params + factor, jax.numpy.concatenate([state[32:], state[:32]]).T * 2.0

    square = jax.numpy.ones((64, 64))
    compiled = jax.jit(step).lower(square, square, square).compile()
    kinds = step_profile.instruction_kinds(compiled.as_text())
    assert {"matmul", "LAPACK", "copy"} <= set(kinds.values())
    run = step_profile.Runner(compiled, square, square, [square])
    run()
    totals = step_profile.traced_milliseconds(run, kinds)
    assert run.count == 2 and totals["wall"] > 0
    assert totals["matmul"] > 0 and totals["LAPACK"] > 0


@pytest.mark.parametrize(
    "script, sizes",
    [
        (
            "transformer_lm",
            [
                "--width",
                "16",
                "--layers",
                "1",
                "--context",
                "8",
                "--batch",
                "4",
                "--corpus-chars",
                "20000",
            ],
        ),
        ("cnn", ["--channels", "4", "8", "--batch", "16"]),
    ],
)
def test_race_benchmarks_run_at_tiny_sizes(script, sizes, tmp_path, monkeypatch, capsys):
    """Each race prints its table (one row per family: the best AdamW first, Muon, the
    natural-gradient defaults, the KL-clipped K-FAC, eigenbasis Adam) with the machine,
    the jax version and the date, and saves its plot; 3 steps a run, one step size a
    family."""
    module = benchmark_module(script)
    common = benchmark_module("_common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(module, "report_run_time", lambda: None)
    only = "adamw lr=0.001|muon lr=0.003|ngd defaults lr=1|ngd kl-clipped max_kl=0.1|"
    only += "ng eigenbasis adam lr=0.003"
    argv = [*sizes, "--max-steps", "3", "--eval-every", "2", "--seconds", "600", "--only", only]
    chosen = module.main(argv)
    out = capsys.readouterr().out
    assert [r.name for r in chosen] == only.split("|")
    assert all(len(r.step_seconds) == 3 and r.curve[-1][0] == 3 for r in chosen)
    assert "jax " + jax.__version__ in out and str(datetime.date.today()) in out
    assert "val loss at 600 s" in out and "ngd defaults lr=1" in out
    assert (tmp_path / f"{script}.png").exists()


def test_factor_subsampling_benchmark_runs_at_tiny_sizes(monkeypatch, capsys):
    """Its table: per model the full factors (error 0, time ratio 1) and each S."""
    module = benchmark_module("factor_subsampling")
    monkeypatch.setattr(module, "report_run_time", lambda: None)
    tiny = ["--width", "16", "--layers", "1", "--context", "8", "--batch", "4"]
    tiny += ["--corpus-chars", "20000", "--channels", "4", "8", "--cnn-batch", "16"]
    rows = module.main([*tiny, "--positions", "8", "--draws", "2"])
    out = capsys.readouterr().out
    assert [row[:2] for row in rows] == [
        ("transformer LM", "all"),
        ("transformer LM", "8"),
        ("CNN", "all"),
        ("CNN", "8"),
    ]
    assert rows[0][2:4] == ("0", "0") and 0 < float(rows[1][2]) <= float(rows[1][3])
    assert "jax " + jax.__version__ in out and str(datetime.date.today()) in out
