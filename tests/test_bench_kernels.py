"""The kernel census benchmark attributes a compiled step's kernels to its phases."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_kernels  # noqa: E402


def test_phase_is_the_innermost_ddp_jax_scope():
  assert bench_kernels.phase("jit(traced)/ddp_bucket0/orthogonalize_p/while/body/sub") == (
      "orthogonalize_p (loop)")
  assert bench_kernels.phase("jit(traced)/ddp_bucket2/compute_q/dot_general") == "compute_q"
  assert bench_kernels.phase("jit(traced)/nonfinite_policy/jit(_where)/select_n") == (
      "nonfinite_policy")
  assert bench_kernels.phase("jit(traced)/ddp_bucket1/slice") == "other sync"
  assert bench_kernels.phase("jit(traced)/add") == "step"


def test_powersgd_kernels_are_counted_per_phase(tmp_path):
  assert bench_kernels.main(["--tree", "mlp_2x2m", "--hook", "powersgd(rank=2, start_iter=0)",
                             "--out", str(tmp_path)]) == 0
  report = json.loads((tmp_path / "kernels_mlp_2x2m_powersgd_rank_2_start_iter_0.json")
                      .read_text())
  kernels = report["kernels"]
  assert report["total_kernels"] == sum(kernels.values()) > 0
  # Both matrices are compressed: each side is orthogonalized in one loop per bucket, and
  # the user's step (gradient, apply_updates) has kernels of its own.
  for name in ("orthogonalize_p (loop)", "orthogonalize_q (loop)", "nonfinite_policy", "step"):
    assert kernels.get(name, 0) > 0, (name, kernels)
  assert report["compile_s"] > 0
  assert "| orthogonalize_p (loop) |" in (
      tmp_path / "kernels_mlp_2x2m_powersgd_rank_2_start_iter_0.md").read_text()
  # The warm-up program runs no compression: none of its phases.
  assert bench_kernels.main(["--tree", "mlp_2x2m", "--hook", "powersgd(rank=2, start_iter=2)",
                             "--warm-up", "--out", str(tmp_path)]) == 0
  warm = json.loads((tmp_path / "kernels_mlp_2x2m_powersgd_rank_2_start_iter_2_warmup.json")
                    .read_text())["kernels"]
  assert not any(name.startswith(("orthogonalize", "approximation")) for name in warm), warm
