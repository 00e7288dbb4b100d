"""Does the gradient sync hide behind the backward pass? ddp_jax against PyTorch DDP on an
MLP with real compute.

    python benchmarks/bench_overlap.py                    # 4 processes, 1 Gbit/s link
    python benchmarks/bench_overlap.py --gbit 0           # unlimited loopback
    python benchmarks/bench_overlap.py --processes 2 --width 1024 --layers 4 --batch 64

Each side trains the same MLP (``--layers`` x ``--width`` tanh layers, 25.2M parameters
by default) on its own batch per process (1 CPU device each, gloo) and measures, median
over ``--steps`` back-to-back triples:

- **compute**: the step without communication (DDP ``no_sync()``; ddp_jax
  ``hooks.noop()``);
- **with sync**: the same step with DDP's gradient all-reduce (``sync_gradients``);
- **communication alone**: the same buckets all-reduced with no backward pass to hide
  behind (torch: ``all_reduce`` of DDP's flat buckets; ddp_jax: a step that syncs fixed
  gradients, its SGD update included, small against the seconds of communication at 1 Gbit/s);

and reports ``overhead / communication = (with sync - compute) / communication``: 1.0
when nothing overlaps, lower when buckets are sent while later gradients are still being
computed (DDP's reason for buckets). ddp_jax runs twice: as built (each bucket's
collective depends on the previous one's result, so XLA keeps the buckets apart and can
schedule them inside the backward pass) and with ``DDP_JAX_BUCKET_CHAIN=0`` (XLA's
all-reduce combiner merges every bucket into one all-reduce after the backward pass).
With ``--gbit G > 0`` the processes run in a private network namespace whose loopback is
rate-limited with ``tc tbf`` (as ``bench_cluster.py``; skipped with a message where
``unshare -n``/``tc`` are missing). torch rows are skipped when torch is not installed.
``--trace DIR`` also traces one synced step of rank 0 with ``jax.profiler`` per ddp_jax
side and writes its kernels and collectives, in start order and by thread, beside the table.
Writes benchmarks/out/overlap_<N>proc_<link>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_peer import gather_max, write_report  # noqa: E402

SIDES = ("torch", "jax", "jax_merged")


def mlp_params(layers, width, rng):
  import numpy as np
  return [(rng.standard_normal((width, width)).astype(np.float32) / np.sqrt(width),
           np.zeros(width, np.float32)) for _ in range(layers)]


def data(rank, batch, width):
  import numpy as np
  rng = np.random.default_rng(100 + rank)
  return (rng.standard_normal((batch, width)).astype(np.float32),
          rng.standard_normal((batch, width)).astype(np.float32))


def triples(fns, steps, barrier):
  """Median seconds of each function, timed back to back ``steps`` times after a barrier
  (the max over processes is taken by the caller)."""
  times = [[] for _ in fns]
  for _ in range(steps):
    for t, fn in zip(times, fns):
      barrier()
      start = time.perf_counter()
      fn()
      t.append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


def run_torch(args):
  import numpy as np
  import torch
  import torch.distributed as dist
  from torch.nn.parallel import DistributedDataParallel as DDP

  dist.init_process_group("gloo")
  rank = dist.get_rank()
  torch.set_num_threads(1)
  layers = []
  for w, b in mlp_params(args.layers, args.width, np.random.default_rng(0)):
    lin = torch.nn.Linear(args.width, args.width)
    with torch.no_grad():
      lin.weight.copy_(torch.from_numpy(w.T))
      lin.bias.copy_(torch.from_numpy(b))
    layers += [lin, torch.nn.Tanh()]
  ddp = DDP(torch.nn.Sequential(*layers))
  x, y = (torch.from_numpy(a) for a in data(rank, args.batch, args.width))

  def step():
    ddp.zero_grad(set_to_none=True)
    ((ddp(x) - y) ** 2).mean().backward()

  def local():
    with ddp.no_sync():
      step()

  # DDP's buckets (reverse parameter order, 1 MiB first, then 25 MiB), as flat buffers.
  buckets, cur, cap = [], [], 1 << 20
  for p in reversed(list(ddp.parameters())):
    cur.append(p.numel())
    if sum(cur) * 4 >= cap:
      buckets.append(torch.zeros(sum(cur)))
      cur, cap = [], 25 << 20
  if cur:
    buckets.append(torch.zeros(sum(cur)))

  def comm():
    for w in [dist.all_reduce(b, async_op=True) for b in buckets]:
      w.wait()

  for fn in (step, local, comm, step):
    fn()
  out = triples([local, step, comm], args.steps, dist.barrier)
  out = gather_max(out, "torch")
  dist.destroy_process_group()
  return rank, out


def run_jax(args):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import PartitionSpec as P

  import ddp_jax
  info = ddp_jax.initialize()
  rank = info["process_id"]
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  params = ddp_jax.broadcast_from_process0(
      mlp_params(args.layers, args.width, np.random.default_rng(0)), mesh)

  def loss(p, batch):
    x, y = batch
    for w, b in p:
      x = jnp.tanh(x @ w + b)
    return jnp.mean((x - y) ** 2)

  def make(hook, out_specs=None, grads_given=False):
    tx = optax.chain(ddp_jax.sync_gradients("data", hook=hook), optax.sgd(0.0))

    def step(p, s, batch):
      g = (jax.tree.map(lambda a: a[0], batch) if grads_given
           else ddp_jax.grad(loss, "data")(p, batch))
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    return tx, ddp_jax.data_parallel(step, mesh, "data", batch_argnums=2, out_specs=out_specs)

  batch = ddp_jax.global_batch(data(rank, args.batch, args.width), mesh)
  tx, synced = make(ddp_jax.hooks.allreduce())
  s = ddp_jax.init_state(tx, params, mesh, "data")
  # Without communication the parameters differ per replica: they come out concatenated
  # (P("data")) and are not fed back.
  tx0 = make(ddp_jax.hooks.noop())[0]
  s0 = ddp_jax.init_state(tx0, params, mesh, "data")
  local = make(ddp_jax.hooks.noop(), (P("data"), ddp_jax.state_specs(s0, "data")))[1]
  grads = ddp_jax.global_batch(jax.tree.map(lambda a: np.asarray(a)[None], jax.tree.map(
      np.ones_like, mlp_params(args.layers, args.width, np.random.default_rng(0)))), mesh)
  comm = make(ddp_jax.hooks.allreduce(), grads_given=True)[1]
  state = {"p": params, "s": s}

  def step():
    state["p"], state["s"] = jax.block_until_ready(synced(state["p"], state["s"], batch))

  def run_local():
    jax.block_until_ready(local(state["p"], s0, batch))

  def run_comm():
    jax.block_until_ready(comm(state["p"], s, grads))

  for fn in (step, run_local, run_comm, step):
    fn()
  barrier = lambda: ddp_jax.verify_replicas({})  # noqa: E731
  out = triples([run_local, step, run_comm], args.steps, barrier)
  if args.trace:  # one synced step under jax.profiler, rank 0 only
    barrier()
    if rank == 0:
      with jax.profiler.trace(args.trace, create_perfetto_trace=True):
        step()
    else:
      step()
  return rank, gather_max(out + runtime_probe(mesh, loss, params, batch, barrier), "jax")


def timeline(trace_dir, min_ms=3.0) -> str:
  """The XLA kernels and collectives of a jax.profiler trace that took ``min_ms`` or
  more, in start order: start, duration, thread, name."""
  import glob
  import gzip
  path = sorted(glob.glob(f"{trace_dir}/plugins/profile/*/perfetto_trace.json.gz"))[-1]
  data = json.load(gzip.open(path))
  events = data["traceEvents"] if isinstance(data, dict) else data
  threads = {e["tid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  ops = [e for e in events if e.get("ph") == "X" and e.get("dur", 0) >= min_ms * 1e3
         and not e["name"].startswith(("$", "ThunkExecutor", "SlinkyThreadPool"))]
  t0 = min(e["ts"] for e in ops)
  return "\n".join(f"{(e['ts'] - t0) / 1e3:9.1f} ms  +{e['dur'] / 1e3:7.1f} ms  "
                   f"{threads.get(e['tid'], e['tid'])[:24]:24s}  {e['name']}"
                   for e in sorted(ops, key=lambda e: e["ts"]))


def runtime_probe(mesh, loss, params, batch, barrier, steps=3):
  """Can XLA's runtime run a collective while it computes? One program holding the
  backward pass and an all-reduce of as many floats that does not depend on it, timed
  against each part alone: [backward, all-reduce, both]. Both ~ the sum: no concurrency;
  both ~ the larger part: full overlap."""
  import jax
  import numpy as np
  from jax.sharding import PartitionSpec as P

  import ddp_jax
  n = sum(x.size for x in jax.tree.leaves(params))
  flat = ddp_jax.global_batch(np.ones((1, n), np.float32), mesh)

  def grads(p, b):
    return jax.tree.map(lambda a: a[None], ddp_jax.grad(loss, "data")(p, b))

  def reduce(x):
    return jax.lax.psum(x, "data")

  def jit(f, in_specs, out_specs):
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs))

  fns = [(jit(grads, (P(), P("data")), P("data")), (params, batch)),
         (jit(reduce, P("data"), P("data")), (flat,)),
         (jit(lambda p, b, x: (grads(p, b), reduce(x)), (P(), P("data"), P("data")),
              (P("data"), P("data"))), (params, batch, flat))]
  for f, a in fns:
    jax.block_until_ready(f(*a))
  return triples([lambda f=f, a=a: jax.block_until_ready(f(*a)) for f, a in fns],
                 steps, barrier)


def available() -> str | None:
  import bench_cluster
  return bench_cluster.available()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--processes", type=int, default=4)
  p.add_argument("--gbit", type=float, default=1.0, help="link rate; 0: unlimited loopback")
  p.add_argument("--layers", type=int, default=6)
  p.add_argument("--width", type=int, default=2048)
  p.add_argument("--batch", type=int, default=256, help="per process")
  p.add_argument("--steps", type=int, default=7)
  p.add_argument("--rounds", type=int, default=1)
  p.add_argument("--timeout", type=int, default=600, help="seconds per launch")
  p.add_argument("--out", default=str(HERE / "out"))
  p.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
  p.add_argument("--trace", default=None, metavar="DIR",
                 help="also trace one synced step of rank 0 (jax.profiler) per ddp_jax side "
                      "and write its kernel/collective timeline next to the table")
  p.add_argument("--child", nargs=2, metavar=("BACKEND", "FILE"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    backend, path = args.child
    rank, row = (run_torch if backend == "torch" else run_jax)(args)
    if rank == 0:
      Path(path).write_text(json.dumps(row))
    return 0
  if args.gbit > 0:
    why = available()
    if why:
      print(f"bench_overlap: skipped ({why}); --gbit 0 runs on the plain loopback")
      return 0
  backends = []
  if "torch" in args.sides:
    try:
      import torch  # noqa: F401
      backends.append(("torch", "torch DDP", {}))
    except ImportError:
      print("bench_overlap: torch is not installed (pip install torch==2.13.0): "
            "ddp_jax rows only")
  if "jax" in args.sides:
    backends.append(("jax", "ddp_jax, buckets chained (DDP_JAX_BUCKET_CHAIN=1)",
                     {"DDP_JAX_BUCKET_CHAIN": "1"}))
  if "jax_merged" in args.sides:
    backends.append(("jax", "ddp_jax, buckets merged (DDP_JAX_BUCKET_CHAIN=0, CPU's default)",
                     {"DDP_JAX_BUCKET_CHAIN": "0"}))
  os.makedirs(args.out, exist_ok=True)
  link = f"{args.gbit:g}gbit" if args.gbit > 0 else "loopback"
  stem = Path(args.out) / f"overlap_{args.processes}proc_{link}"
  rows: dict = {}
  probes: list = []
  for rnd in range(args.rounds):
    for backend, label, extra in backends:
      tmp = Path(f"{stem}.{backend}.tmp")
      trace = None
      if args.trace and backend == "jax":
        trace = str(Path(args.trace).resolve() / f"chain{extra['DDP_JAX_BUCKET_CHAIN']}_{rnd}")
      cmd = [sys.executable, "-m", "ddp_jax.run", "--nproc-per-node", str(args.processes),
             "--cpu-devices", "1", "--compilation-cache", "off", __file__,
             "--layers", str(args.layers), "--width", str(args.width), "--batch",
             str(args.batch), "--steps", str(args.steps), *(["--trace", trace] if trace else []),
             "--child", backend, str(tmp)]
      if args.gbit > 0:
        cmd = ["unshare", "-n", "sh", "-c",
               f"ip link set lo up && tc qdisc add dev lo root tbf rate {args.gbit}gbit "
               f"burst 256kb latency 100ms && exec {shlex.join(cmd)}"]
      env = {**os.environ, "XLA_FLAGS": "", "OMP_NUM_THREADS": "1", **extra}
      try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
      except subprocess.TimeoutExpired:
        print(f"round {rnd} {label}: did not finish in {args.timeout} s", flush=True)
        continue
      if done.returncode:
        print(done.stdout[-3000:], done.stderr[-3000:])
        return done.returncode
      compute, synced, comm, *probe = json.loads(tmp.read_text())
      tmp.unlink()
      if trace:
        text = timeline(trace)
        Path(f"{stem}.timeline_chain{extra['DDP_JAX_BUCKET_CHAIN']}.txt").write_text(
            f"{label}: rank 0, one synced step\n{text}\n")
        print(f"{label}: rank 0's kernels and collectives of one synced step:\n{text}")
      rows.setdefault(label, []).append(
          {"compute_s": compute, "with_sync_s": synced, "communication_s": comm})
      if probe:
        probes.append(dict(zip(("backward_s", "all_reduce_s", "both_s"), probe)))
        print(f"round {rnd} runtime probe: backward {probe[0]:.3f} s, independent "
              f"all-reduce {probe[1]:.3f} s, both in one program {probe[2]:.3f} s", flush=True)
      print(f"round {rnd} {label}: compute {compute:.3f} s, with sync {synced:.3f} s, "
            f"communication alone {comm:.3f} s, overhead/communication "
            f"{(synced - compute) / comm:.2f}", flush=True)
  n_params = args.layers * (args.width + 1) * args.width
  lines = [f"Overlap of the gradient sync with the backward pass: MLP {args.layers} x "
           f"{args.width} ({n_params / 1e6:.1f}M parameters), batch {args.batch} per "
           f"process, {args.processes} processes x 1 CPU device, gloo over "
           f"{'a ' + link + ' link (tc tbf)' if args.gbit > 0 else 'unlimited loopback'}; "
           f"medians of {args.steps} steps, median of {args.rounds} round(s)", "",
           "| | compute | with sync | overhead | communication alone | "
           "overhead / communication |", "|---|---:|---:|---:|---:|---:|"]
  report = {"processes": args.processes, "gbit": args.gbit, "layers": args.layers,
            "width": args.width, "batch": args.batch, "rows": {}}
  for label, runs in rows.items():
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    over = med["with_sync_s"] - med["compute_s"]
    med["overhead_over_communication"] = over / med["communication_s"]
    report["rows"][label] = {**med, "runs": runs}
    lines.append(f"| {label} | {med['compute_s']:.3f} s | {med['with_sync_s']:.3f} s | "
                 f"{over:.3f} s | {med['communication_s']:.3f} s | "
                 f"{med['overhead_over_communication']:.2f} |")
  if probes:
    med = {k: statistics.median(r[k] for r in probes) for k in probes[0]}
    lines += ["", "Runtime probe (XLA): the backward pass and an all-reduce of as many floats "
              "that does not depend on it, in one program", "",
              "| backward alone | all-reduce alone | both in one program | "
              "both / (sum of the parts) | both / (larger part) |",
              "|---:|---:|---:|---:|---:|",
              f"| {med['backward_s']:.3f} s | {med['all_reduce_s']:.3f} s | "
              f"{med['both_s']:.3f} s | "
              f"{med['both_s'] / (med['backward_s'] + med['all_reduce_s']):.2f} | "
              f"{med['both_s'] / max(med['backward_s'], med['all_reduce_s']):.2f} |"]
    report["runtime_probe"] = {**med, "runs": probes}
  return write_report(stem, report, lines)


if __name__ == "__main__":
  sys.exit(main())
