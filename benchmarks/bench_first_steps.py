"""Where the first iterations of a data-parallel step go, phase by phase, per process.

    python benchmarks/bench_first_steps.py                       # PowerSGD, ResNet-50, 4 processes
    python benchmarks/bench_first_steps.py --hook allreduce --iters 2 --processes 2

Launches itself with ``ddp-jax-run`` (1 CPU device per process, gloo over loopback, an
empty compilation cache) and runs ``bench_peer.py``'s step (``ddp_jax.data_parallel``;
PowerSGD rank 4 compresses from its 3rd iteration, ``start_iter=2``). Each iteration is
split into what ``data_parallel`` does on a new program: **trace** (the step traced once,
``DataParallelStep._out_specs``), **lower**, **compile** (process 0 compiles, the
others wait for its executable and load it: their *compile* is that wait plus
**load**), and the program's **run** (the call until its results are ready; a first
run includes waiting at the first collective for the slowest process). *Other* is the rest
of the call (the configuration check across processes, argument placement). Reports
processes 0 and 1; writes benchmarks/out/first_steps_<tree>_<hook>_<N>proc.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHASES = ("trace", "lower", "compile", "load", "run")


def _instrument(seconds: dict, current: list) -> None:
  """Adds each phase's wall time to ``seconds[iteration][phase]`` (``current[0]`` is the
  iteration in progress)."""
  import jax
  import jax.stages

  from ddp_jax import _compile, _step

  def timed(owner, name, phase, block=False):
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
      t = time.perf_counter()
      out = original(*args, **kwargs)
      if block:
        out = jax.block_until_ready(out)
      row = seconds.setdefault(current[0], dict.fromkeys(PHASES, 0.0))
      row[phase] += time.perf_counter() - t
      return out
    setattr(owner, name, wrapper)

  timed(_step.DataParallelStep, "_out_specs", "trace")
  timed(jax.stages.Traced, "lower", "lower")
  timed(_compile, "compile_shared", "compile")
  timed(_compile, "_load", "load")
  timed(jax.stages.Compiled, "__call__", "run", block=True)


def child(tree: str, hook_name: str, iters: int, out: str) -> None:
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  import ddp_jax
  sys.path.insert(0, str(HERE))
  from bench_peer import jax_hook, jax_step, shapes

  info = ddp_jax.initialize()
  rank = info["process_id"]
  seconds: dict = {}
  current = ["construct"]
  _instrument(seconds, current)
  rng = np.random.default_rng(rank)
  params = [rng.standard_normal(s).astype(np.float32) for s in shapes(tree)]
  consts = [rng.standard_normal(s).astype(np.float32) for s in shapes(tree)]
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  c = ddp_jax.global_batch([x[None] for x in consts], mesh)
  ddp_jax.verify_replicas({})
  total, programs = {}, {}
  t = time.perf_counter()
  tx, run = jax_step(jax_hook(hook_name), mesh)
  p = ddp_jax.broadcast_from_process0(params, mesh)
  s = jax.block_until_ready(ddp_jax.init_state(tx, p, mesh, "data"))
  total["construct"] = time.perf_counter() - t
  for i in range(iters):
    current[0] = f"iteration {i + 1}"
    t = time.perf_counter()
    p, s = jax.block_until_ready(run(p, s, c))
    total[current[0]] = time.perf_counter() - t
    programs[current[0]] = run.last_program  # the same on every process (agreed)
  # One row of numbers per iteration, gathered from every process.
  mine = np.array([[total[name]] + [seconds.get(name, {}).get(k, 0.0) for k in PHASES]
                   for name in total])
  everyone = np.asarray(multihost_utils.process_allgather(mine))
  if rank == 0:
    per_process = [{name: {"total_s": float(row[0]), **dict(zip(PHASES, map(float, row[1:]))),
                           **({"program": programs[name]} if name in programs else {})}
                    for name, row in zip(total, rows)} for rows in everyone[:2]]
    Path(out).write_text(json.dumps({"tree": tree, "hook": hook_name,
                                     "processes": len(everyone),
                                     "per_process": per_process}, indent=1))


def table(report: dict) -> str:
  lines = [f"first iterations, {report['tree']} shapes, hook {report['hook']}, "
           f"{report['processes']} processes x 1 CPU device, gloo over loopback, empty "
           "compilation cache; seconds", "",
           "| process | iteration | program | total | trace | lower | compile (+ load) | run "
           "| other |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
  for rank, rows in enumerate(report["per_process"]):
    for name, r in rows.items():
      if name == "construct":
        lines.append(f"| {rank} | construct | | {r['total_s']:.2f} | | | | | |")
        continue
      parts = [r.get(k, 0.0) for k in PHASES]
      compile_cell = f"{parts[2]:.2f}" + (f" ({parts[3]:.2f})" if parts[3] else "")
      other = r["total_s"] - parts[0] - parts[1] - parts[2] - parts[4]
      lines.append(f"| {rank} | {name} | {r.get('program') or ''} | {r['total_s']:.2f} | "
                   f"{parts[0]:.2f} | {parts[1]:.2f} | {compile_cell} | {parts[4]:.2f} | "
                   f"{other:.2f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--processes", type=int, default=4)
  p.add_argument("--tree", default="resnet50", help="a name in trees.TREES")
  p.add_argument("--hook", default="powersgd", choices=("allreduce", "fp16", "powersgd"))
  p.add_argument("--iters", type=int, default=4)
  p.add_argument("--out", default=str(HERE / "out"))
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  stem = Path(args.out) / f"first_steps_{args.tree}_{args.hook}_{args.processes}proc"
  if args.child:
    child(args.tree, args.hook, args.iters, str(stem) + ".json")
    return 0
  os.makedirs(args.out, exist_ok=True)
  cache = Path(args.out) / "first_steps_compilation_cache"
  shutil.rmtree(cache, ignore_errors=True)
  env = {**os.environ, "XLA_FLAGS": "", "OMP_NUM_THREADS": "1"}
  code = subprocess.run([sys.executable, "-m", "ddp_jax.run", "--nproc-per-node",
                         str(args.processes), "--cpu-devices", "1", "--compilation-cache",
                         str(cache), __file__, "--child", "--processes", str(args.processes),
                         "--tree", args.tree, "--hook", args.hook, "--iters", str(args.iters),
                         "--out", args.out], env=env).returncode
  shutil.rmtree(cache, ignore_errors=True)
  if code:
    return code
  text = table(json.loads(Path(str(stem) + ".json").read_text()))
  Path(str(stem) + ".md").write_text(text + "\n")
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
