"""Sync cost of ddp_jax against plain ``lax.pmean``, measured in the same run.

Methods: ``pmean`` (plain ``lax.pmean``), ``sync_auto`` / ``sync_ravel`` / ``sync_variadic``
(the default hook with each pack mode) and ``hook:<expr>`` for any hook, e.g.
``"hook:powersgd(rank=4, start_iter=0)"``.

Single process (8 fake CPU devices by default):
    python benchmarks/bench_sync.py --trees resnet50 tiny_161x4k
Several processes, one CPU device each, gloo collectives over localhost:
    python benchmarks/bench_sync.py --processes 2 --trees resnet50 tiny_161x4k

Per tree and method: median time of one sync over ``--repeats`` runs, the ratio
to pmean, compile time, collectives in the lowered and compiled HLO, and the
compiled temp memory. Writes JSON, a markdown table and a PNG bar chart to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ["pmean", "sync_auto", "sync_ravel", "sync_variadic"]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--trees", nargs="+", default=["resnet50", "tiny_161x4k"])
  p.add_argument("--methods", nargs="+", default=METHODS)
  p.add_argument("--devices", type=int, default=8, help="CPU devices (single process)")
  p.add_argument("--processes", type=int, default=1)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--out", default=str(HERE / "out"))
  p.add_argument("--bandwidth-gbit", type=float, default=None,
                 help="the link's rate: adds the ring lower bound per method")
  p.add_argument("--tag", default="", help="suffix for the output file names")
  p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def make_step(method, mesh, axis="data"):
  import jax
  from jax import lax
  from jax.sharding import PartitionSpec as P

  import ddp_jax

  if method == "pmean":
    def sync(g):
      return lax.pmean(g, axis)
  else:
    if method.startswith("hook:"):
      tx = ddp_jax.sync_gradients(axis, hook=ddp_jax.hooks.parse(method[5:]))
    else:
      tx = ddp_jax.sync_gradients(axis, pack=method.split("_", 1)[1])

    def sync(g):
      return tx.update(g, tx.init(g))[0]

  def local(g):
    return sync(jax.tree.map(lambda x: x[0], g))

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(axis), out_specs=P()))


def global_grads(tree, mesh, axis="data"):
  """A (replicas, *shape) array per leaf, each replica's slice different."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  sharding = NamedSharding(mesh, P(axis))
  rank = jax.process_index()
  local_n = len(mesh.local_devices)

  def make(i, x):
    shape = (local_n,) + x.shape
    rng = np.random.default_rng(1000 * rank + i)
    local = rng.standard_normal(shape, dtype=np.float32).astype(x.dtype)
    return jax.make_array_from_process_local_data(sharding, local)

  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [make(i, x) for i, x in enumerate(leaves)])


def _lo_tx_bytes() -> int:
  """Bytes sent on this network namespace's loopback (/proc/net/dev is per namespace)."""
  try:
    for line in Path("/proc/net/dev").read_text().splitlines():
      name, _, fields = line.partition(":")
      if name.strip() == "lo":
        return int(fields.split()[8])
  except OSError:
    pass
  return 0


def stated_bytes(method, tree, world):
  import ddp_jax
  hook = (ddp_jax.hooks.parse(method[5:]) if method.startswith("hook:")
          else ddp_jax.hooks.allreduce())
  plan = ddp_jax.plan_buckets(tree)
  return sum(c.bytes for c in ddp_jax.hooks.wire_bytes(hook, plan, world))


def measure(method, tree_name, mesh, repeats):
  import jax
  import numpy as np
  import trees

  from ddp_jax.inspect import collectives

  tree = trees.TREES[tree_name]()
  g = global_grads(tree, mesh)
  step = make_step(method, mesh)
  t0 = time.perf_counter()
  lowered = step.lower(g)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  report = collectives(step, g)
  mem = compiled.memory_analysis()
  for _ in range(2):
    jax.block_until_ready(compiled(g))
  times = []
  lo0 = _lo_tx_bytes()
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(compiled(g))
    times.append(time.perf_counter() - t)
  lo_bytes = (_lo_tx_bytes() - lo0) / repeats
  low = report.lowered.get("all-reduce")
  comp = report.compiled.get("all-reduce")
  nbytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
  return {
      "tree": tree_name, "method": method, "leaves": len(jax.tree.leaves(tree)),
      "bytes": nbytes, "median_s": statistics.median(times), "min_s": min(times),
      "compile_s": compile_s,
      "lowered_allreduce_ops": low.ops if low else 0,
      "compiled_allreduce_ops": comp.ops if comp else 0,
      "compiled_allreduce_operands": comp.operands if comp else 0,
      "compiled_allreduce_bytes": comp.bytes if comp else 0,
      "temp_bytes": getattr(mem, "temp_size_in_bytes", None) if mem else None,
      "stated_bytes_per_replica": stated_bytes(method, tree, mesh.size),
      "loopback_bytes_per_sync": lo_bytes,
  }


def add_bounds(results, args, world):
  """Ring lower bound on one shared link: every replica's bytes cross it."""
  if not args.bandwidth_gbit:
    return
  rate = args.bandwidth_gbit * 1e9 / 8
  base = {r["tree"]: r for r in results if r["method"] in ("hook:allreduce()", "pmean")}
  for r in results:
    r["bound_s"] = world * r["stated_bytes_per_replica"] / rate
    r["ratio_to_bound"] = r["median_s"] / r["bound_s"] if r["bound_s"] else float("nan")
    if r["tree"] in base:
      r["speedup_vs_f32"] = base[r["tree"]]["median_s"] / r["median_s"]


def run_all(args, mesh):
  import jax
  results = []
  for tree_name in args.trees:
    for method in args.methods:
      r = measure(method, tree_name, mesh, args.repeats)
      results.append(r)
      if jax.process_index() == 0:
        print(f"{tree_name:16} {method:14} {r['median_s'] * 1e3:9.2f} ms  "
              f"compile {r['compile_s']:.2f} s  ops {r['lowered_allreduce_ops']}->"
              f"{r['compiled_allreduce_ops']} ({r['compiled_allreduce_operands']} operands)",
              flush=True)
  base = {r["tree"]: r for r in results if r["method"] == "pmean"}
  for r in results:
    if r["tree"] in base:
      r["ratio_to_pmean"] = r["median_s"] / base[r["tree"]]["median_s"]
      r["compile_ratio_to_pmean"] = r["compile_s"] / base[r["tree"]]["compile_s"]
  add_bounds(results, args, mesh.size)
  return results


def bound_table(results, title):
  lines = [f"### {title}", "",
           "| tree | method | median s | stated MiB/replica | loopback MiB/sync | bound s | "
           "/ bound | speed-up vs f32 |", "|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    lines.append(
        f"| {r['tree']} | {r['method']} | {r['median_s']:.3f} | "
        f"{r['stated_bytes_per_replica'] / 2**20:.2f} | "
        f"{r['loopback_bytes_per_sync'] / 2**20:.2f} | {r['bound_s']:.3f} | "
        f"{r['ratio_to_bound']:.2f} | {r.get('speedup_vs_f32', float('nan')):.2f} |")
  return "\n".join(lines) + "\n"


def table(results, title):
  if results and "bound_s" in results[0]:
    return bound_table(results, title)
  lines = [f"### {title}", "",
           "| tree | method | median ms | / pmean | compile s | / pmean | all-reduce ops "
           "lowered -> compiled (operands) | temp MiB |",
           "|---|---|---:|---:|---:|---:|---|---:|"]
  for r in results:
    temp = r["temp_bytes"] / 2**20 if r["temp_bytes"] is not None else float("nan")
    lines.append(
        f"| {r['tree']} | {r['method']} | {r['median_s'] * 1e3:.2f} | "
        f"{r.get('ratio_to_pmean', float('nan')):.2f} | {r['compile_s']:.2f} | "
        f"{r.get('compile_ratio_to_pmean', float('nan')):.2f} | "
        f"{r['lowered_allreduce_ops']} -> {r['compiled_allreduce_ops']} "
        f"({r['compiled_allreduce_operands']}) | {temp:.1f} |")
  return "\n".join(lines) + "\n"


def write(results, args, title, stem):
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
  md = table(results, title)
  (out / f"{stem}.md").write_text(md)
  print(md)
  plot(results, title, out / f"{stem}.png")


def plot(results, title, path):
  """Bars: each method's median sync time per tree, relative to the first method's."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  trees = list(dict.fromkeys(r["tree"] for r in results))
  methods = list(dict.fromkeys(r["method"] for r in results))
  fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(trees) * len(methods) / 2), 4))
  width = 0.8 / len(methods)
  for k, m in enumerate(methods):
    xs, ys = [], []
    for i, t in enumerate(trees):
      rows = [r for r in results if r["tree"] == t and r["method"] == m]
      base = [r for r in results if r["tree"] == t and r["method"] == methods[0]]
      if rows and base:
        xs.append(i + k * width)
        ys.append(rows[0]["median_s"] / base[0]["median_s"])
    ax.bar(xs, ys, width, label=m)
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set_xticks([i + 0.4 - width / 2 for i in range(len(trees))], trees)
  ax.set(ylabel=f"sync time / {methods[0]}", yscale="log", title=title)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def single_process(args):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={args.devices}")
  import jax
  mesh = jax.make_mesh((args.devices,), ("data",))
  results = run_all(args, mesh)
  write(results, args, f"1 process, {args.devices} CPU devices (jax {jax.__version__})",
        f"sync_1proc_{args.devices}dev{args.tag}")


def worker(args):
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{args.port}", args.processes, args.worker,
                             initialization_timeout=120)
  mesh = jax.make_mesh((args.processes,), ("data",))
  results = run_all(args, mesh)
  if args.worker == 0:
    link = f", {args.bandwidth_gbit:g} Gbit/s link" if args.bandwidth_gbit else ""
    write(results, args, f"{args.processes} processes x 1 CPU device, gloo{link} "
          f"(jax {jax.__version__})", f"sync_{args.processes}proc_gloo{args.tag}")
  jax.distributed.shutdown()


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(args, argv):
  port = free_port()
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, __file__, *argv, "--worker", str(i),
                             "--port", str(port)], env=env) for i in range(args.processes)]
  codes = [p.wait() for p in procs]
  if any(codes):
    sys.exit(f"worker exit codes: {codes}")


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  sys.path.insert(0, str(HERE))
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if args.worker is not None:
    worker(args)
  elif args.processes > 1:
    launch(args, argv)
  else:
    single_process(args)


if __name__ == "__main__":
  main()
