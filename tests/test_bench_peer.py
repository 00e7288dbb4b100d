"""The peer benchmark runs end to end against torch DDP (a smoke test, no timing asserts).

Covers what made it stop before: torch's PowerSGD hook with gloo and two buckets (it
deadlocks on 4 ranks, and on 2 ranks the buckets' all-reduces cross and gloo aborts with
"Received data size doesn't match expected size"), so the benchmark gives it one bucket.
``mlp_2x2m`` is a tree DDP would split into two buckets.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytestmark = [pytest.mark.conformance, pytest.mark.multiprocess]
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_peer.py"


def run_bench(tmp_path, hook, steps):
  """The benchmark on ``mlp_2x2m`` over 2 processes; its JSON report."""
  proc = subprocess.run(
      [sys.executable, str(BENCH), "--tree", "mlp_2x2m", "--processes", "2", "--hooks",
       hook, "--steps", str(steps), "--timeout", "120", "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "did not finish" not in proc.stdout, proc.stdout
  return json.loads((tmp_path / "peer_mlp_2x2m_2proc.json").read_text())


def test_bench_peer_runs_torch_powersgd_on_two_bucket_shapes(tmp_path):
  report = run_bench(tmp_path, "powersgd", 1)
  (row,) = report["rows"]
  assert row["hook"] == "powersgd"
  for side in ("torch", "jax", "jax_restart"):
    (run,) = row["runs"][side]
    assert run["construct_s"] > 0 and run["first_iter_s"] > 0, (side, run)
    assert run["three_iters_s"] > run["first_iter_s"], (side, run)
  assert row["runs"]["jax"][0]["compile_s"] > 0  # a first start compiles
  # ... the warm-up program first, the compressing one on the 3rd iteration
  assert row["runs"]["jax"][0]["compile3_s"] > row["runs"]["jax"][0]["compile_s"]
  assert row["runs"]["jax_restart"][0]["compile_s"] < row["runs"]["jax"][0]["compile_s"]
  table = (tmp_path / "peer_mlp_2x2m_2proc.md").read_text()
  assert "| powersgd | sync cost per step |" in table and "x |" in table, table
  assert "| powersgd | construct + 3 iterations (the 3rd compresses) |" in table, table


def test_bench_peer_reports_the_raw_allreduce_floor_of_both_sides(tmp_path):
  report = run_bench(tmp_path, "allreduce", 2)
  (row,) = report["rows"]
  assert row["torch_raw_allreduce_s"] > 0 and row["jax_raw_allreduce_s"] > 0, row
  for side in ("torch", "jax"):
    (run,) = row["runs"][side]
    assert run["raw_allreduce_s"] > 0, (side, run)
  table = (tmp_path / "peer_mlp_2x2m_2proc.md").read_text()
  assert "| allreduce | raw all-reduce of DDP's buckets (floor) |" in table, table
  assert "| allreduce | sync cost above the floor |" in table, table
