"""Sync cost of ddp_jax against plain ``lax.pmean``, measured in the same run.

Methods: ``pmean`` (plain ``lax.pmean``), ``sync_auto`` / ``sync_ravel`` / ``sync_variadic``
(the default hook with each pack mode) and ``hook:<expr>`` for any hook, e.g.
``"hook:powersgd(rank=4, start_iter=0)"``.

Single process (8 fake CPU devices by default):
    python benchmarks/bench_sync.py --trees resnet50 tiny_161x4k
Every hook (``--methods all``), on every GPU of this machine instead of CPU devices:
    python benchmarks/bench_sync.py --platform gpu --methods hooks --inner 20 --trees resnet50
(``--inner 20`` chains 20 syncs in one jitted loop: device time, not Python dispatch.)
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
# Every hook that runs on a 1-D mesh, compressing from the first step (start_iter=0: the
# benchmark always passes the init state). hierarchical() needs a 2-D mesh: see
# tests/test_hierarchical.py.
HOOKS = [
    "allreduce()", "noop()", "fp16_compress()", "bf16_compress()",
    "allgather_then_aggregate()", "quantize_per_tensor()", "quantize_per_channel()",
    "int8_allreduce()", "powersgd(rank=1, start_iter=0)", "powersgd(rank=4, start_iter=0)",
    "batched_powersgd(rank=4, start_iter=0)",
    "fp16_compress_wrapper(powersgd(rank=4, start_iter=0))", "topk(0.01)", "sign_compress()",
    "error_feedback(fp16_compress())", "adasum()",
]
ALIASES = {"all": METHODS + [f"hook:{h}" for h in HOOKS],
           "hooks": ["pmean", "sync_auto"] + [f"hook:{h}" for h in HOOKS]}


def expand(methods):
  """``all`` / ``hooks`` -> the method names they stand for."""
  out = []
  for m in methods:
    out.extend(ALIASES.get(m, [m]))
  return list(dict.fromkeys(out))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--trees", nargs="+", default=["resnet50", "tiny_161x4k"])
  p.add_argument("--methods", nargs="+", default=METHODS)
  p.add_argument("--devices", type=int, default=8, help="CPU devices (single process)")
  p.add_argument("--platform", choices=["cpu", "gpu"], default="cpu",
                 help="gpu: one process over every GPU here (hook compute cost on a GPU)")
  p.add_argument("--processes", type=int, default=1)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--inner", type=int, default=1,
                 help="syncs chained in one jitted loop per timed call (GPU: hides dispatch)")
  p.add_argument("--out", default=str(HERE / "out"))
  p.add_argument("--bandwidth-gbit", type=float, default=None,
                 help="the link's rate: adds the ring lower bound per method")
  p.add_argument("--tag", default="", help="suffix for the output file names")
  p.add_argument("--update", action="store_true",
                 help="merge into the existing output file: rows measured now replace the "
                      "rows of the same tree and method, the others stay")
  p.add_argument("--paired", action="store_true",
                 help="time pmean right before each call of every method and report the "
                      "median of the per-pair ratios (machine drift cancels out)")
  p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def make_step(method, mesh, axis="data", inner=1):
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
    # Each replica returns its own result (noop() and local-SGD hooks are not replicated).
    g = jax.tree.map(lambda x: x[0], g)
    if inner > 1:  # chained syncs in one program: device time without dispatch overhead
      from ddp_jax.hooks._collectives import as_varying
      g = jax.lax.fori_loop(0, inner, lambda i, c: as_varying(sync(c), axis), g)
    else:
      g = sync(g)
    return jax.tree.map(lambda x: x[None], g)

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(axis), out_specs=P(axis)))


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


def free_bytes(device) -> int | None:
  """Memory the next allocation can still get: the GPU's allocator, else MemAvailable."""
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  try:
    for line in Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def measure(method, tree_name, mesh, repeats, inner=1, paired=False):
  import jax
  import numpy as np
  import trees

  from ddp_jax.inspect import collectives

  tree = trees.TREES[tree_name]()
  g = global_grads(tree, mesh)
  step = make_step(method, mesh, inner=inner)
  t0 = time.perf_counter()
  lowered = step.lower(g)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  report = collectives(step, g)
  mem = compiled.memory_analysis()
  local_n = len(mesh.local_devices)
  need = local_n * (mem.output_size_in_bytes + mem.temp_size_in_bytes) if mem else 0
  have = free_bytes(mesh.local_devices[0])
  if have is not None and need > 0.8 * have:
    return {"tree": tree_name, "method": method, "compile_s": compile_s,
            "skipped": f"needs {need / 2**30:.1f} GiB for outputs and temporaries "
                       f"({local_n} replicas in this process), {have / 2**30:.1f} GiB free"}
  base, t0 = None, time.perf_counter()
  if paired:
    base = make_step("pmean", mesh, inner=inner).lower(g).compile()
  base_compile_s = time.perf_counter() - t0
  for _ in range(2):
    jax.block_until_ready(compiled(g))
    if base is not None:
      jax.block_until_ready(base(g))
  times, base_times = [], []
  lo0 = _lo_tx_bytes()
  for _ in range(repeats):
    if base is not None:
      t = time.perf_counter()
      jax.block_until_ready(base(g))
      base_times.append((time.perf_counter() - t) / inner)
    t = time.perf_counter()
    jax.block_until_ready(compiled(g))
    times.append((time.perf_counter() - t) / inner)
  lo_bytes = (_lo_tx_bytes() - lo0) / repeats
  paired_fields = {} if base is None else {
      "pmean_paired_median_s": statistics.median(base_times),
      "pmean_paired_compile_s": base_compile_s,
      "paired_ratio_to_pmean": statistics.median(a / b for a, b in zip(times, base_times))}
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
      **paired_fields,
  }


def add_bounds(results, args, world):
  """Ring lower bound on one shared link: every replica's bytes cross it."""
  if not args.bandwidth_gbit:
    return
  rate = args.bandwidth_gbit * 1e9 / 8
  base = {r["tree"]: r for r in results if r["method"] in ("hook:allreduce()", "pmean")
          and "skipped" not in r}
  for r in results:
    if "skipped" in r:
      continue
    r["bound_s"] = world * r["stated_bytes_per_replica"] / rate
    r["ratio_to_bound"] = r["median_s"] / r["bound_s"] if r["bound_s"] else float("nan")
    if r["tree"] in base:
      r["speedup_vs_f32"] = base[r["tree"]]["median_s"] / r["median_s"]


def run_all(args, mesh, stem):
  """Measures every (tree, method); rows so far go to ``{stem}.partial.json`` as they come."""
  import jax
  results = []
  partial = Path(args.out) / f"{stem}.partial.json"
  partial.parent.mkdir(parents=True, exist_ok=True)
  total, start = len(args.trees) * len(args.methods), time.perf_counter()
  for tree_name in args.trees:
    for method in args.methods:
      r = measure(method, tree_name, mesh, args.repeats, args.inner,
                  paired=getattr(args, "paired", False) and method != "pmean")
      results.append(r)
      if jax.process_index() != 0:
        continue
      partial.write_text(json.dumps(results, indent=1))
      done = f"[{len(results)}/{total} {time.perf_counter() - start:5.0f} s]"
      if "skipped" in r:
        print(f"{done} {tree_name:16} {method:14} skipped: {r['skipped']}", flush=True)
      else:
        print(f"{done} {tree_name:16} {method:14} {r['median_s'] * 1e3:9.2f} ms  "
              f"compile {r['compile_s']:.2f} s  ops {r['lowered_allreduce_ops']}->"
              f"{r['compiled_allreduce_ops']} ({r['compiled_allreduce_operands']} operands)",
              flush=True)
  add_ratios(results)
  add_bounds(results, args, mesh.size)
  return results


def add_ratios(results):
  """Each row's time and compile time relative to pmean's: its paired pmean's, else the
  pmean row of its tree (same process)."""
  base = {r["tree"]: r for r in results if r["method"] == "pmean" and "skipped" not in r}
  for r in results:
    if "paired_ratio_to_pmean" in r:
      r["ratio_to_pmean"] = r["paired_ratio_to_pmean"]
      r["compile_ratio_to_pmean"] = r["compile_s"] / r["pmean_paired_compile_s"]
    elif r["tree"] in base and "skipped" not in r:
      r["ratio_to_pmean"] = r["median_s"] / base[r["tree"]]["median_s"]
      r["compile_ratio_to_pmean"] = r["compile_s"] / base[r["tree"]]["compile_s"]


def bound_table(results, title):
  lines = [f"### {title}", "",
           "| tree | method | median s | stated MiB/replica | loopback MiB/sync | bound s | "
           "/ bound | speed-up vs f32 |", "|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    if "skipped" in r:
      lines.append(f"| {r['tree']} | {r['method']} | skipped: {r['skipped']} |||||||")
      continue
    lines.append(
        f"| {r['tree']} | {r['method']} | {r['median_s']:.3f} | "
        f"{r['stated_bytes_per_replica'] / 2**20:.2f} | "
        f"{r['loopback_bytes_per_sync'] / 2**20:.2f} | {r['bound_s']:.3f} | "
        f"{r['ratio_to_bound']:.2f} | {r.get('speedup_vs_f32', float('nan')):.2f} |")
  return "\n".join(lines) + "\n"


def table(results, title):
  if results and "bound_s" in results[0]:
    return bound_table(results, title)
  paired = any("paired_ratio_to_pmean" in r for r in results)
  lines = [f"### {title}", "", *(["/ pmean: median of per-call ratios, pmean timed right before "
                                  "each call (--paired)", ""] if paired else []),
           "| tree | method | median ms | / pmean | compile s | / pmean | all-reduce ops "
           "lowered -> compiled (operands) | temp MiB |",
           "|---|---|---:|---:|---:|---:|---|---:|"]
  for r in results:
    if "skipped" in r:
      lines.append(f"| {r['tree']} | {r['method']} | skipped: {r['skipped']} ||||||")
      continue
    temp = r["temp_bytes"] / 2**20 if r["temp_bytes"] is not None else float("nan")
    lines.append(
        f"| {r['tree']} | {r['method']} | {r['median_s'] * 1e3:.2f} | "
        f"{r.get('ratio_to_pmean', float('nan')):.2f} | {r['compile_s']:.2f} | "
        f"{r.get('compile_ratio_to_pmean', float('nan')):.2f} | "
        f"{r['lowered_allreduce_ops']} -> {r['compiled_allreduce_ops']} "
        f"({r['compiled_allreduce_operands']}) | {temp:.1f} |")
  return "\n".join(lines) + "\n"


def merge(old, new):
  """``old`` rows with those of ``new`` put in place (same tree and method) or appended."""
  key = lambda r: (r["tree"], r["method"])  # noqa: E731
  fresh = {key(r): r for r in new}
  rows = [fresh.pop(key(r), r) for r in old]
  return rows + list(fresh.values())


def write(results, args, title, stem):
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if getattr(args, "update", False) and (out / f"{stem}.json").exists():
    results = merge(json.loads((out / f"{stem}.json").read_text()), results)
  (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
  (out / f"{stem}.partial.json").unlink(missing_ok=True)
  md = table(results, title)
  (out / f"{stem}.md").write_text(md)
  print(md)
  plot(results, title, out / f"{stem}.png")


def plot(results, title, path):
  """One panel per tree: each method's median sync time relative to the first method's
  (log scale; skipped methods left blank)."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  results = [r for r in results if "skipped" not in r]
  trees = list(dict.fromkeys(r["tree"] for r in results))
  methods = list(dict.fromkeys(r["method"] for r in results))
  if not trees:
    return
  fig, axes = plt.subplots(1, len(trees), figsize=(2.2 + 2.6 * len(trees), 1.2 + 0.28 * len(methods)),
                           sharex=True, sharey=True, squeeze=False)
  for ax, tree in zip(axes[0], trees):
    rows = {r["method"]: r for r in results if r["tree"] == tree}
    base = rows.get(methods[0])
    ys = [rows[m]["median_s"] / base["median_s"] if base and m in rows else float("nan")
          for m in methods]
    ax.barh(range(len(methods)), ys, color=["tab:gray"] + ["tab:blue"] * (len(methods) - 1))
    for i, y in enumerate(ys):
      if y == y:
        ax.text(y, i, f" {y:.2g}", va="center", fontsize=6)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set(xscale="log", title=tree)
    ax.tick_params(labelsize=7)
  axes[0][0].set_yticks(range(len(methods)), [m.removeprefix("hook:")[:34] for m in methods])
  axes[0][0].invert_yaxis()
  fig.supxlabel(f"sync time / {methods[0]} (log; blank: skipped)", fontsize=9)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def single_process(args):
  if args.platform == "gpu":
    os.environ["JAX_PLATFORMS"] = "cuda"
  else:
    # 8 devices share this machine's cores: a long per-device step (top-k over a 31M-row
    # embedding) can make the first replica wait at a collective longer than XLA:CPU's
    # default 40 s, after which it aborts the process.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}"
                               " --xla_cpu_collective_call_terminate_timeout_seconds=1800"
                               " --xla_cpu_collective_call_warn_stuck_timeout_seconds=300")
  import jax
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
  kind = devices[0].device_kind if args.platform == "gpu" else "CPU device"
  stem = (f"sync_gpu_{len(devices)}dev" if args.platform == "gpu"
          else f"sync_1proc_{len(devices)}dev") + args.tag
  results = run_all(args, mesh, stem)
  write(results, args, f"1 process, {len(devices)} x {kind} (jax {jax.__version__})", stem)


def worker(args):
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{args.port}", args.processes, args.worker,
                             initialization_timeout=120)
  mesh = jax.make_mesh((args.processes,), ("data",))
  stem = f"sync_{args.processes}proc_gloo{args.tag}"
  results = run_all(args, mesh, stem)
  if args.worker == 0:
    link = f", {args.bandwidth_gbit:g} Gbit/s link" if args.bandwidth_gbit else ""
    write(results, args, f"{args.processes} processes x 1 CPU device, gloo{link} "
          f"(jax {jax.__version__})", stem)
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
  args.methods = expand(args.methods)
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
