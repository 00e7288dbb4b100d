"""Start-up across processes: process 0's parameters to every process, then the optimizer
state laid out on the mesh (what DDP's constructor does with one broadcast).

    python benchmarks/bench_startup.py                    # 4 processes, ResNet-50 shapes
    python benchmarks/bench_startup.py --processes 2 --tree bert_base

Launches itself with ``ddp-jax-run`` (1 CPU device per process, gloo over loopback) and
reports, per phase, the slowest process's wall time and the bytes the loopback carried
(``/proc/net/dev``, all processes together): ``broadcast_from_process0(params)`` and
``init_state(tx, params, mesh, "data")`` with the default hook. Writes
benchmarks/out/startup_<tree>_<N>proc.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(tree_name: str, out: str) -> None:
  import jax
  import numpy as np
  import optax

  import ddp_jax
  sys.path.insert(0, str(HERE))
  import trees
  from bench_sync import _lo_tx_bytes

  info = ddp_jax.initialize()
  rank, n = info["process_id"], info["num_processes"]
  shapes = getattr(trees, tree_name)()
  rng = np.random.default_rng(rank)  # different on every process, as after a local init
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  tx = optax.chain(ddp_jax.sync_gradients("data"), optax.sgd(0.1))
  rows = {}
  phases = [("broadcast_from_process0", ddp_jax.broadcast_from_process0),
            ("init_state", lambda p: ddp_jax.init_state(tx, p, mesh, "data"))]
  for phase, fn in phases:
    ddp_jax.verify_replicas({})  # a barrier, so each phase starts together
    b0, t0 = _lo_tx_bytes(), time.perf_counter()
    result = fn(params)
    jax.block_until_ready(result)
    seconds = time.perf_counter() - t0
    ddp_jax.verify_replicas({})
    rows[phase] = {"seconds": seconds, "lo_bytes": _lo_tx_bytes() - b0}
    if phase == "broadcast_from_process0":
      params = result
  times = np.asarray(jax.experimental.multihost_utils.process_allgather(
      np.array([rows[p]["seconds"] for p in rows])))
  if rank == 0:
    mib = sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20
    report = {"tree": tree_name, "processes": n, "param_mib": mib,
              "phases": {p: {"seconds_max": float(times[:, i].max()),
                             "lo_mib": rows[p]["lo_bytes"] / 2**20}
                         for i, p in enumerate(rows)}}
    Path(out).write_text(json.dumps(report, indent=1))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--processes", type=int, default=4)
  p.add_argument("--tree", default="resnet50")
  p.add_argument("--out", default=str(HERE / "out"))
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  stem = Path(args.out) / f"startup_{args.tree}_{args.processes}proc"
  if args.child:
    child(args.tree, str(stem) + ".json")
    return 0
  os.makedirs(args.out, exist_ok=True)
  env = {**os.environ, "XLA_FLAGS": ""}
  code = subprocess.run([sys.executable, "-m", "ddp_jax.run", "--nproc-per-node",
                         str(args.processes), "--cpu-devices", "1", __file__, "--child",
                         "--processes", str(args.processes), "--tree", args.tree,
                         "--out", args.out], env=env).returncode
  if code:
    return code
  report = json.loads(Path(str(stem) + ".json").read_text())
  lines = [f"start-up, {report['tree']} ({report['param_mib']:.1f} MiB of f32 parameters), "
           f"{report['processes']} processes x 1 CPU device, gloo over loopback", "",
           "| phase | seconds (slowest process) | loopback MiB (all processes) |",
           "|---|---:|---:|"]
  for phase, r in report["phases"].items():
    lines.append(f"| `{phase}` | {r['seconds_max']:.2f} | {r['lo_mib']:.1f} |")
  text = "\n".join(lines)
  Path(str(stem) + ".md").write_text(text + "\n")
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
