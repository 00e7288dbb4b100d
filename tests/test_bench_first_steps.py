"""The first-steps timeline benchmark runs end to end (a smoke test, no timing asserts)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_first_steps.py"


def test_bench_first_steps_splits_each_new_program_into_its_phases(tmp_path):
  proc = subprocess.run(
      [sys.executable, str(BENCH), "--tree", "mlp_2x2m", "--processes", "2", "--hook",
       "powersgd", "--iters", "3", "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads((tmp_path / "first_steps_mlp_2x2m_powersgd_2proc.json").read_text())
  assert len(report["per_process"]) == 2
  for rank, rows in enumerate(report["per_process"]):
    assert list(rows) == ["construct", "iteration 1", "iteration 2", "iteration 3"], rows
    # PowerSGD compresses from its 3rd iteration: a warm-up program first, then the full one
    assert [rows[f"iteration {i}"]["program"] for i in (1, 2, 3)] == ["warm-up", "warm-up",
                                                                       "full"], rows
    for i in (1, 3):  # a new program: traced, lowered, compiled (or loaded), run
      row = rows[f"iteration {i}"]
      assert min(row[k] for k in ("trace", "lower", "compile", "run")) > 0, (rank, i, row)
      assert row["total_s"] >= row["trace"] + row["lower"] + row["compile"], (rank, i, row)
      # process 0 compiles, the others load its executable
      assert (row["load"] > 0) == (rank > 0), (rank, i, row)
    assert rows["iteration 2"]["compile"] == 0 and rows["iteration 2"]["trace"] == 0, rows
  table = (tmp_path / "first_steps_mlp_2x2m_powersgd_2proc.md").read_text()
  assert "| 1 | iteration 3 | full |" in table, table
  assert not (tmp_path / "first_steps_compilation_cache").exists()
