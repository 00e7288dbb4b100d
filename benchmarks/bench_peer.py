"""ddp_jax against PyTorch DDP itself: the same parameter shapes, processes and gloo.

    python benchmarks/bench_peer.py                          # 4 processes, ResNet-50 shapes
    python benchmarks/bench_peer.py --processes 2 --tree bert_base --hooks allreduce fp16

Both sides train a model whose parameters have the tree's shapes and whose loss is
``sum(p * c)`` (``c`` fixed per rank), so the gradient is known and the forward/backward
costs next to nothing: what is measured is the data-parallel machinery. Per hook
(``allreduce``, ``fp16``, ``powersgd`` rank 4), each side reports what follows. PowerSGD
compresses from the 3rd iteration on both sides (``start_iter=2``, torch's minimum with
error feedback and warm start: the first iteration is a plain all-reduce); torch's gets
one bucket (its hook deadlocks on gloo with two, see ``run_torch``), ddp_jax's its
default buckets (one bucket of BERT-base compiles 2.4x longer than the default 15, and
GPT-2's ran out of memory).

- **first step**: construct (DDP's constructor; ddp_jax's ``broadcast_from_process0`` +
  ``init_state``) + the first iteration (ddp_jax: trace, compile and run; the XLA
  compile time inside it, from jax's ``backend_compile_duration`` events, is reported
  beside it: process 0's, 0 when the executable came from the cache);
- **construct + 3 iterations** (PowerSGD): up to the first compressed iteration (ddp_jax
  runs its warm-up program for the first two, see *Warm-up programs* in the docs, and
  traces and compiles the compressing program on the 3rd; compile time of all three);
- **sync cost**: a step minus the same step without communication, timed back to back
  (DDP: under ``no_sync()``; ddp_jax: ``hooks.noop()``), median over ``--steps``;
- **raw all-reduce** (``allreduce`` only): the floor under each side's sync, in the same
  processes: DDP's buckets (``ddp_jax.plan_buckets``: 1 MiB, then 25 MiB caps) as flat
  f32 buffers all-reduced by the framework's own collective, neither DDP nor ddp_jax
  (torch: ``dist.all_reduce(async_op=True)`` of every buffer, then wait, as DDP launches
  them; jax: one jitted ``lax.psum`` of all of them, the variadic all-reduce XLA makes
  of a step's buckets), median over ``--steps``.

Torch and ddp_jax run as separate ``ddp-jax-run`` launches (1 CPU device per process),
alternating for ``--rounds`` rounds; ddp_jax twice, with an empty persistent compilation
cache (a first start) and with the cache that run filled (a restart). A launch that does
not finish in ``--timeout`` seconds is reported as such. Skipped with a message when
torch is not installed.
``--host-memory`` is the launcher's (default ``hugepages``; ``reuse`` is faster and keeps
the heap's peak). Writes benchmarks/out/peer_<tree>_<N>proc.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOOKS = ("allreduce", "fp16", "powersgd")


def shapes(tree_name):
  sys.path.insert(0, str(HERE))
  import jax
  import trees
  leaves = jax.tree.leaves(trees.TREES[tree_name]())
  return [tuple(x.shape) for x in leaves]


def bucket_sizes(tree_name):
  """Element counts of DDP's buckets for the tree (f32; reverse order, 1 MiB then 25 MiB)."""
  import jax
  import numpy as np

  import ddp_jax
  tree = [jax.ShapeDtypeStruct(s, np.float32) for s in shapes(tree_name)]
  return [b.size for b in ddp_jax.plan_buckets(tree).buckets]


def median_time(fn, steps, barrier):
  """Median seconds of ``fn()`` over ``steps`` calls, every process starting together."""
  import numpy as np
  times = []
  for _ in range(steps):
    barrier()
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def gather_max(values, backend):
  if backend == "torch":
    import torch
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
  import numpy as np
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(values))).max(0).tolist()


def run_torch(tree_name, hook, steps):
  import numpy as np
  import torch
  import torch.distributed as dist
  from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
  from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
  from torch.nn.parallel import DistributedDataParallel as DDP

  dist.init_process_group("gloo")
  rank = dist.get_rank()
  torch.set_num_threads(1)
  shp = shapes(tree_name)
  rng = np.random.default_rng(rank)
  model = torch.nn.ParameterList(
      [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s).astype(np.float32)))
       for s in shp])
  consts = [torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in shp]

  class Model(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.params = model

    def forward(self):
      return sum((p * c).sum() for p, c in zip(self.params, consts))

  module = Model()
  dist.barrier()
  t0 = time.perf_counter()
  # torch's PowerSGD hook waits for its second all-reduce inside the first one's future
  # callback, which runs on one of gloo's two worker threads: with two buckets in flight
  # both threads wait and the step deadlocks (seen on ResNet-50 shapes). One bucket avoids
  # that, as in the original #14 measurement.
  ddp = DDP(module, bucket_cap_mb=4096) if hook == "powersgd" else DDP(module)
  if hook == "fp16":
    ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
  elif hook == "powersgd":
    state = psgd.PowerSGDState(None, matrix_approximation_rank=4, start_powerSGD_iter=2,
                               min_compression_rate=2, use_error_feedback=True,
                               warm_start=True)
    ddp.register_comm_hook(state, psgd.powerSGD_hook)
  construct = time.perf_counter() - t0
  t1 = time.perf_counter()
  ddp().backward()
  first = time.perf_counter() - t1
  ddp().backward()
  ddp().backward()  # PowerSGD compresses from its 3rd iteration on (its minimum)
  third = time.perf_counter() - t1
  ddp().backward()
  synced, local = [], []
  for _ in range(steps):
    dist.barrier()
    t = time.perf_counter()
    ddp().backward()
    synced.append(time.perf_counter() - t)
    dist.barrier()
    t = time.perf_counter()
    with ddp.no_sync():
      ddp().backward()
    local.append(time.perf_counter() - t)
  cost = float(np.median(np.asarray(synced) - np.asarray(local)))
  row = {"construct_s": construct, "first_iter_s": first, "sync_cost_s": cost,
         "three_iters_s": third}
  if hook == "allreduce":
    flat = [torch.from_numpy(rng.standard_normal(n).astype(np.float32))
            for n in bucket_sizes(tree_name)]

    def raw():
      for work in [dist.all_reduce(t, async_op=True) for t in flat]:
        work.wait()

    raw()
    row["raw_allreduce_s"] = median_time(raw, steps, dist.barrier)
  out = dict(zip(row, gather_max(list(row.values()), "torch")))
  dist.barrier()
  return rank, out


def jax_hook(name):
  """The ddp_jax hook each row names (PowerSGD compresses from its 3rd iteration)."""
  import ddp_jax
  return {"allreduce": ddp_jax.hooks.allreduce, "fp16": ddp_jax.hooks.fp16_compress,
          "powersgd": lambda: ddp_jax.hooks.powersgd(rank=4, start_iter=2)}[name]()


def jax_step(hook, mesh, out_specs=None):
  """``(tx, step)``: the benchmark's ``data_parallel`` step with ``hook``, SGD at rate 0
  (the parameters stay put), the loss ``sum(p * c)`` per leaf."""
  import jax.numpy as jnp
  import optax

  import ddp_jax
  tx = optax.chain(ddp_jax.sync_gradients("data", hook=hook), optax.sgd(0.0))

  def step(p, s, c):
    g = ddp_jax.grad(lambda p, c: sum(jnp.sum(a * b[0]) for a, b in zip(p, c)), "data")(p, c)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return tx, ddp_jax.data_parallel(step, mesh, "data", batch_argnums=2, out_specs=out_specs)


def run_jax(tree_name, hook, steps):
  import jax
  import numpy as np
  from jax.sharding import PartitionSpec as P

  import ddp_jax
  info = ddp_jax.initialize()
  rank = info["process_id"]
  shp = shapes(tree_name)
  rng = np.random.default_rng(rank)
  params = [rng.standard_normal(s).astype(np.float32) for s in shp]
  consts = [rng.standard_normal(s).astype(np.float32) for s in shp]
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  make = functools.partial(jax_step, mesh=mesh)
  c = ddp_jax.global_batch([x[None] for x in consts], mesh)
  compiled = []  # XLA's compile time (process 0 compiles, the others load its executable)
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **_: compiled.append(secs)
      if event == "/jax/core/compile/backend_compile_duration" else None)
  ddp_jax.verify_replicas({})
  t0 = time.perf_counter()
  tx, step = make(jax_hook(hook))
  p = ddp_jax.broadcast_from_process0(params, mesh)
  s = ddp_jax.init_state(tx, p, mesh, "data")
  jax.block_until_ready(s)
  construct = time.perf_counter() - t0
  compiled.clear()
  t1 = time.perf_counter()
  p, s = jax.block_until_ready(step(p, s, c))
  first = time.perf_counter() - t1
  compile_s = sum(compiled)
  for _ in range(2):  # PowerSGD compresses from its 3rd iteration on, as torch's
    p, s = jax.block_until_ready(step(p, s, c))
  third = time.perf_counter() - t1
  compile3_s = sum(compiled)
  # The same step without communication: its parameters differ per replica, so they
  # come out concatenated (P("data")) and are not fed back.
  tx0, _ = make(ddp_jax.hooks.noop())
  s0 = ddp_jax.init_state(tx0, p, mesh, "data")
  _, step0 = make(ddp_jax.hooks.noop(), out_specs=(P("data"), ddp_jax.state_specs(s0, "data")))
  jax.block_until_ready(step0(p, s0, c))
  p, s = jax.block_until_ready(step(p, s, c))
  synced, local = [], []
  for _ in range(steps):
    ddp_jax.verify_replicas({})
    t = time.perf_counter()
    p, s = jax.block_until_ready(step(p, s, c))
    synced.append(time.perf_counter() - t)
    ddp_jax.verify_replicas({})
    t = time.perf_counter()
    jax.block_until_ready(step0(p, s0, c))
    local.append(time.perf_counter() - t)
  cost = float(np.median(np.asarray(synced) - np.asarray(local)))
  row = {"construct_s": construct, "first_iter_s": first, "sync_cost_s": cost,
         "three_iters_s": third, "compile_s": compile_s, "compile3_s": compile3_s}
  if hook == "allreduce":
    sizes = bucket_sizes(tree_name)
    flat = ddp_jax.global_batch([rng.standard_normal((1, n)).astype(np.float32)
                                 for n in sizes], mesh)
    psum = jax.jit(jax.shard_map(lambda *xs: jax.lax.psum(xs, "data"), mesh=mesh,
                                 in_specs=(P("data"),) * len(sizes),
                                 out_specs=(P("data"),) * len(sizes)))
    jax.block_until_ready(psum(*flat))
    row["raw_allreduce_s"] = median_time(lambda: jax.block_until_ready(psum(*flat)), steps,
                                         lambda: ddp_jax.verify_replicas({}))
  return rank, dict(zip(row, gather_max(list(row.values()), "jax")))


def write_report(stem, report: dict, lines: list) -> int:
  """Writes ``<stem>.json`` and ``<stem>.md`` and prints the table."""
  text = "\n".join(lines)
  Path(f"{stem}.json").write_text(json.dumps(report, indent=1))
  Path(f"{stem}.md").write_text(text + "\n")
  print(text)
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--processes", type=int, default=4)
  p.add_argument("--tree", default="resnet50", help="a name in trees.TREES")
  p.add_argument("--hooks", nargs="+", default=list(HOOKS), choices=HOOKS)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--rounds", type=int, default=1)
  p.add_argument("--host-memory", default="hugepages", choices=("hugepages", "reuse", "system"),
                 help="ddp-jax-run's --host-memory for both sides")
  p.add_argument("--timeout", type=int, default=240, help="seconds per launch")
  p.add_argument("--out", default=str(HERE / "out"))
  p.add_argument("--child", nargs=3, metavar=("BACKEND", "HOOK", "FILE"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    backend, hook, path = args.child
    rank, row = (run_torch if backend == "torch" else run_jax)(args.tree, hook, args.steps)
    if rank == 0:
      Path(path).write_text(json.dumps(row))
    if backend == "torch":
      # gloo's teardown at interpreter exit sometimes aborts a rank ("terminate called
      # without an active exception", after fp16) once the results are written: skip it.
      sys.stdout.flush()
      os._exit(0)
    return 0
  try:
    import torch  # noqa: F401
  except ImportError:
    print("bench_peer: skipped (torch is not installed: pip install torch==2.13.0)")
    return 0
  os.makedirs(args.out, exist_ok=True)
  stem = Path(args.out) / (f"peer_{args.tree}_{args.processes}proc"
                           + ("" if args.host_memory == "hugepages" else f"_{args.host_memory}"))
  env = {**os.environ, "XLA_FLAGS": "", "OMP_NUM_THREADS": "1"}
  rows: dict = {}
  cache = Path(args.out) / "peer_compilation_cache"
  for rnd in range(args.rounds):
    for hook in args.hooks:
      shutil.rmtree(cache, ignore_errors=True)
      # torch; ddp_jax with an empty compilation cache (a first start), then again with
      # the cache the first run filled (a restart after a failure).
      for backend, label in (("torch", "torch"), ("jax", "jax"), ("jax", "jax_restart")):
        tmp = Path(f"{stem}.{label}.{hook}.tmp")
        cmd = [sys.executable, "-m", "ddp_jax.run", "--nproc-per-node", str(args.processes),
               "--cpu-devices", "1", "--host-memory", args.host_memory,
               "--compilation-cache", str(cache), __file__, "--tree", args.tree,
               "--steps", str(args.steps), "--child", backend, hook, str(tmp)]
        try:
          code = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                timeout=args.timeout)
        except subprocess.TimeoutExpired:
          print(f"round {rnd} {hook:9s} {label:11s} did not finish in {args.timeout} s",
                flush=True)
          rows.setdefault((hook, label), [])
          continue
        if code.returncode:
          print(code.stdout[-3000:], code.stderr[-2000:])
          return code.returncode
        # ddp_jax's rows also hold the XLA compile time inside the first (three) iteration(s)
        row = json.loads(tmp.read_text())
        tmp.unlink()
        rows.setdefault((hook, label), []).append(row)
        print(f"round {rnd} {hook:9s} {label:11s} construct {row['construct_s']:6.2f} s  first "
              f"iteration {row['first_iter_s']:6.2f} s  sync cost "
              f"{row['sync_cost_s'] * 1e3:8.1f} ms"
              + (f"  raw all-reduce {row['raw_allreduce_s'] * 1e3:8.1f} ms"
                 if "raw_allreduce_s" in row else "")
              + (f"  compile {row['compile_s']:5.2f} s" if "compile_s" in row else ""),
              flush=True)
  shutil.rmtree(cache, ignore_errors=True)

  def med(hook, label, key):
    import statistics
    values = [r[key] for r in rows.get((hook, label)) or [] if key in r]
    return statistics.median(values) if values else float("nan")

  def first(hook, label):
    return med(hook, label, "construct_s") + med(hook, label, "first_iter_s")

  def third(hook, label):
    return med(hook, label, "construct_s") + med(hook, label, "three_iters_s")

  def cell(hook, label, iters="first_iter_s", compiled="compile_s"):
    runs = rows.get((hook, label))
    if not runs:
      return f"did not finish in {args.timeout} s"
    compile_s = (f", compile {med(hook, label, compiled):.2f}"
                 if all(compiled in r for r in runs) else "")
    return (f"{med(hook, label, 'construct_s') + med(hook, label, iters):.2f} s "
            f"({med(hook, label, 'construct_s'):.2f} + "
            f"{med(hook, label, iters):.2f}{compile_s})")

  def ratio(a, b):
    return "-" if math.isnan(a / b) else f"{a / b:.2f}x"

  def ms(t):
    return "-" if math.isnan(t) else f"{t * 1e3:.0f} ms"

  lines = [f"ddp_jax vs torch {__import__('torch').__version__} DDP, {args.tree} shapes, "
           f"{args.processes} processes x 1 CPU device, gloo over loopback, host memory "
           f"{args.host_memory}; medians of "
           f"{args.rounds} round(s); first step = construct + first iteration (ddp_jax: with "
           "the XLA compile time inside it); PowerSGD rank 4 compressing from the 3rd "
           "iteration on both sides (torch: one bucket, ddp_jax: its default buckets)", "",
           "| hook | what | torch DDP | ddp_jax | ratio |", "|---|---|---:|---:|---:|"]
  report = {"tree": args.tree, "processes": args.processes, "rows": []}
  for hook in args.hooks:
    t_first, j_first, j_restart = first(hook, "torch"), first(hook, "jax"), first(
        hook, "jax_restart")
    t_cost, j_cost = med(hook, "torch", "sync_cost_s"), med(hook, "jax", "sync_cost_s")
    lines.append(f"| {hook} | first step | {cell(hook, 'torch')} | {cell(hook, 'jax')} | "
                 f"{ratio(j_first, t_first)} |")
    lines.append(f"| {hook} | first step, restart (compilation cache) | {cell(hook, 'torch')} "
                 f"| {cell(hook, 'jax_restart')} | {ratio(j_restart, t_first)} |")
    if hook == "powersgd":  # the first compressed iteration is the 3rd
      t_third, j_third = third(hook, "torch"), third(hook, "jax")
      lines.append(f"| {hook} | construct + 3 iterations (the 3rd compresses) | "
                   f"{cell(hook, 'torch', 'three_iters_s', 'compile3_s')} | "
                   f"{cell(hook, 'jax', 'three_iters_s', 'compile3_s')} | "
                   f"{ratio(j_third, t_third)} |")
    lines.append(f"| {hook} | sync cost per step | {ms(t_cost)} | {ms(j_cost)} | "
                 f"{ratio(j_cost, t_cost)} |")
    t_raw, j_raw = med(hook, "torch", "raw_allreduce_s"), med(hook, "jax", "raw_allreduce_s")
    if not math.isnan(t_raw + j_raw):
      lines.append(f"| {hook} | raw all-reduce of DDP's buckets (floor) | {ms(t_raw)} | "
                   f"{ms(j_raw)} | {ratio(j_raw, t_raw)} |")
      lines.append(f"| {hook} | sync cost above the floor | {ms(t_cost - t_raw)} | "
                   f"{ms(j_cost - j_raw)} | {ratio(j_cost - j_raw, t_cost - t_raw)} |")
    report["rows"].append({"hook": hook, "torch_first_s": t_first, "jax_first_s": j_first,
                           "jax_restart_first_s": j_restart, "torch_sync_s": t_cost,
                           "torch_three_iters_s": third(hook, "torch"),
                           "jax_three_iters_s": third(hook, "jax"),
                           "jax_sync_s": j_cost,
                           **({"torch_raw_allreduce_s": t_raw, "jax_raw_allreduce_s": j_raw}
                              if not math.isnan(t_raw + j_raw) else {}),
                           "runs": {b: rows.get((hook, b), [])
                                    for b in ("torch", "jax", "jax_restart")}})
  return write_report(stem, report, lines)


if __name__ == "__main__":
  sys.exit(main())
