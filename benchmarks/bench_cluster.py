"""A bandwidth-limited cluster on one machine: N processes (1 CPU device each, gloo) in a
private network namespace whose loopback is rate-limited with ``tc tbf``, so the link is
the bottleneck as between real hosts.

    python benchmarks/bench_cluster.py                      # 4 processes, 1 Gbit/s
    python benchmarks/bench_cluster.py --processes 4 --gbit 1 --tree resnet50 \\
        --hooks "allreduce()" "fp16_compress()" "int8_allreduce()" "powersgd(rank=4, start_iter=0)"

Needs ``unshare -n`` (root or user namespaces) and ``tc``; skips with a message where they
are missing. Reports each hook's sync time against the ring lower bound for its own wire
bytes on one shared link (``N x bytes per replica / bandwidth``, i.e. ``2 (N-1) x B / bw``
for an all-reduce of B bytes), the bytes the loopback really carried, and the speed-up over
the f32 all-reduce. Writes benchmarks/out/sync_<N>proc_gloo_tbf.{json,md}.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOOKS = ["allreduce()", "fp16_compress()", "bf16_compress()", "int8_allreduce()",
         "powersgd(rank=4, start_iter=0)", "topk(0.01)", "sign_compress()"]


def available() -> str | None:
  """None when the namespace and tc work here, else why not."""
  for tool in ("unshare", "tc", "ip"):
    if shutil.which(tool) is None:
      return f"{tool} not found"
  probe = subprocess.run(["unshare", "-n", "sh", "-c",
                          "ip link set lo up && tc qdisc add dev lo root tbf rate 1gbit "
                          "burst 256kb latency 100ms"], capture_output=True, text=True)
  if probe.returncode != 0:
    return f"cannot make a rate-limited network namespace: {probe.stderr.strip()}"
  return None


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--processes", type=int, default=4)
  p.add_argument("--gbit", type=float, default=1.0)
  p.add_argument("--tree", default="resnet50")
  p.add_argument("--hooks", nargs="+", default=HOOKS)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)
  why = available()
  if why:
    print(f"bench_cluster: skipped ({why})")
    return 0
  methods = [f"hook:{h}" for h in args.hooks]
  inner = [sys.executable, str(HERE / "bench_sync.py"), "--processes", str(args.processes),
           "--trees", args.tree, "--repeats", str(args.repeats), "--bandwidth-gbit",
           str(args.gbit), "--tag", "_tbf", "--methods", *methods]
  script = (f"ip link set lo up && tc qdisc add dev lo root tbf rate {args.gbit}gbit "
            f"burst 256kb latency 100ms && exec {shlex.join(inner)}")
  return subprocess.run(["unshare", "-n", "sh", "-c", script]).returncode


if __name__ == "__main__":
  sys.exit(main())
