"""Data-parallel natural gradient on 8 forced host devices, in a subprocess.

The batch is sharded along its example axis over a mesh. Under plain ``jax.jit``
(GSPMD), and inside ``shard_map`` with ``axis_name`` (explicit all-reduces and
gathers), every Fisher function and solver must give the single-device numbers, on
layers whose primitives need device-varying operands too (convolutions, ReLU, scans).
"""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parent.parent


def test_sharded_batch_matches_single_device():
    result = subprocess.run(
        [sys.executable, "-m", "tests._sharded_checks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all sharded checks passed" in result.stdout
    assert result.stdout.count("ok update[") == 5
    assert result.stdout.count("ok sharded-params update[") == 2
    assert result.stdout.count("ok shard_map update[") == 12
    assert result.stdout.count("ok one-pass update[") == 3
    assert result.stdout.count("ok traced-inside update[") == 2
