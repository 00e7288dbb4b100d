"""Where a step's compiled kernels come from: XLA:CPU compiles each kernel on its own
(about 8 ms each for PowerSGD's step here), so the count per phase is where compile time goes.

    python benchmarks/bench_kernels.py                                   # PowerSGD, ResNet-50
    python benchmarks/bench_kernels.py --tree bert_base --hook "powersgd(rank=4, start_iter=2)" --warm-up

Compiles ``bench_peer.py``'s step (``data_parallel``, SGD, 1 CPU device, one process)
for one hook, and counts the kernels of the optimized HLO (fusions; a ``dot`` or
``copy`` outside a fusion is a library call or a copy, listed apart) by the phase that
made each one: the innermost ddp_jax named scope in its op name (PowerSGD's
``matrices``, ``orthogonalize_q``, ``compute_p``, ``orthogonalize_p``, ``compute_q``,
``approximation``, ``result``, ``uncompressed``; the sync's ``nonfinite_check`` and
``nonfinite_policy``), ``... (loop)`` inside a ``while`` body, ``other sync`` for the
rest of a bucket's scope, ``step`` for the user's step (its gradient and
``apply_updates``). ``--warm-up`` counts the warm-up program instead of the full one.
Writes benchmarks/out/kernels_<tree>_<hook>.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_overlap_hlo import _called, _opcode, computations  # noqa: E402

SCOPES = ("matrices", "orthogonalize_q", "compute_p", "orthogonalize_p", "compute_q",
          "approximation", "result", "uncompressed", "nonfinite_check", "nonfinite_policy")
_NAME = re.compile(r'op_name="([^"]+)"')


def census(hlo_text: str) -> dict:
  """``{"kernels": {phase: count}, "library": {phase: count}}`` of an optimized HLO module's
  text: fusions are kernels (those nested in another fusion's body are part of it);
  ``dot``/``copy``/``custom-call`` outside fusions are library calls or copies (cheap to
  compile)."""
  comps, _ = computations(hlo_text)
  fused = {name for lines in comps.values() for line in lines
           if _opcode(line) == "fusion" for name in _called(line)}
  kernels, library = collections.Counter(), collections.Counter()
  for name, lines in comps.items():
    if name in fused:
      continue
    for line in lines:
      op = _opcode(line)
      if op not in ("fusion", "dot", "copy", "custom-call"):
        continue
      scope = _NAME.search(line)
      (kernels if op == "fusion" else library)[phase(scope.group(1) if scope else "")] += 1
  return {"kernels": dict(kernels.most_common()), "library": dict(library.most_common())}


def phase(op_name: str) -> str:
  """The phase of an op name: its innermost ddp_jax scope (``(loop)`` in a while body)."""
  parts = op_name.split("/")
  loop = " (loop)" if "while" in parts else ""
  for part in reversed(parts):
    if part in SCOPES:
      return part + loop
  if any(p.startswith("ddp_bucket") for p in parts):
    return "other sync" + loop
  return "step" if op_name else "unnamed (XLA's own: broadcasts, reductions)"


def run(tree: str, hook_expr: str, warm_up: bool) -> dict:
  import jax
  import numpy as np
  from bench_peer import jax_step, shapes

  import ddp_jax

  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  params = [np.zeros(s, np.float32) for s in shapes(tree)]
  batch = ddp_jax.global_batch([x[None] for x in params], mesh)
  tx, step = jax_step(ddp_jax.hooks.parse(hook_expr), mesh)
  state = ddp_jax.init_state(tx, params, mesh, "data")
  t = time.perf_counter()
  lowered = step.lower(params, state, batch, warm_up=warm_up)
  traced = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  counts = census(compiled.as_text())
  return {"tree": tree, "hook": hook_expr, "program": "warm-up" if warm_up else "full",
          "trace_lower_s": traced, "compile_s": compile_s,
          "total_kernels": sum(counts["kernels"].values()), **counts}


def table(report: dict) -> str:
  lines = [f"Kernels of the {report['program']} program, {report['tree']} shapes, hook "
           f"`{report['hook']}` (1 CPU device): {report['total_kernels']} kernels, XLA "
           f"compile {report['compile_s']:.2f} s (trace + lower {report['trace_lower_s']:.2f} s)",
           "", "| phase | kernels | share | library calls, copies |", "|---|---:|---:|---:|"]
  total = max(report["total_kernels"], 1)
  for name in dict.fromkeys(list(report["kernels"]) + list(report["library"])):
    k = report["kernels"].get(name, 0)
    lines.append(f"| {name} | {k} | {100 * k / total:.0f}% | {report['library'].get(name, 0)} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tree", default="resnet50", help="a name in trees.TREES")
  p.add_argument("--hook", default="powersgd(rank=4, start_iter=0)",
                 help="a hook expression (ddp_jax.hooks.parse)")
  p.add_argument("--warm-up", action="store_true", help="count the warm-up program")
  p.add_argument("--out", default=str(HERE / "out"))
  args = p.parse_args(argv)
  report = run(args.tree, args.hook, args.warm_up)
  os.makedirs(args.out, exist_ok=True)
  tag = re.sub(r"[^A-Za-z0-9]+", "_", args.hook).strip("_")
  stem = Path(args.out) / f"kernels_{args.tree}_{tag}{'_warmup' if args.warm_up else ''}"
  Path(f"{stem}.json").write_text(json.dumps(report, indent=1))
  text = table(report)
  Path(f"{stem}.md").write_text(text + "\n")
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
