"""``ddp-jax-run``: start one Python process per device group, like ``torchrun``.

    ddp-jax-run --nproc-per-node 2 train.py --lr 0.1
    python -m ddp_jax.run --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 \\
        --master-port 29500 --nproc-per-node 8 train.py

Each child gets ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (and ``DDP_JAX_*`` twins) for
``ddp_jax.initialize()``; ``--cpu-devices K`` gives each child K fake CPU devices.
Output lines are prefixed with the child's rank. If a child fails, the others are
stopped and the launcher exits with its code, naming the rank (and the rank that
stopped making progress, when a collective timed out, or that ended early); Ctrl-C,
SIGTERM and SIGHUP stop all (TERM, then KILL after ``--grace-s``). A collective waits
at most ``--collective-timeout`` seconds for a peer (default 300). Compiled programs are
kept in jax's persistent cache (``--compilation-cache``), so a restart after a failure
skips XLA's compile. Children ask glibc for huge pages on large host buffers
(``--host-memory``), so a step does not take a page fault per 4 KiB of every buffer.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from ddp_jax._host_memory import MODES, host_memory_env


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="ddp-jax-run", description=__doc__.split("\n")[0])
  p.add_argument("--nproc-per-node", type=int, default=1)
  p.add_argument("--nnodes", type=int, default=1)
  p.add_argument("--node-rank", type=int, default=0)
  p.add_argument("--master-addr", default="127.0.0.1")
  p.add_argument("--master-port", type=int, default=None, help="default: a free port")
  p.add_argument("--bind-address", default=None,
                 help="where the coordinator (rank 0) listens; default: --master-addr only")
  p.add_argument("--collective-timeout", type=int, default=None, metavar="SECONDS",
                 help="how long a collective waits for a peer before every rank fails "
                      "(default: $DDP_JAX_COLLECTIVE_TIMEOUT or 300)")
  p.add_argument("--compilation-cache", default=None, metavar="DIR",
                 help="jax's persistent compilation cache, so a restart does not recompile "
                      "(default: $DDP_JAX_COMPILATION_CACHE or ~/.cache/ddp_jax/xla; 'off' "
                      "to disable)")
  p.add_argument("--cpu-devices", type=int, default=None,
                 help="fake CPU devices per process (XLA_FLAGS), for CPU runs")
  p.add_argument("--host-memory", choices=MODES, default="hugepages",
                 help="how children's glibc gives XLA its large host buffers: 'hugepages' "
                      "(default; GLIBC_TUNABLES=glibc.malloc.hugetlb=1: a page fault per 2 MiB "
                      "instead of per 4 KiB), 'reuse' (keep and reuse freed memory: fastest, "
                      "the heap keeps its peak) or 'system'; values you set win")
  p.add_argument("--grace-s", type=float, default=5.0,
                 help="seconds the others get to stop after a failure before SIGKILL")
  p.add_argument("-m", dest="module", action="store_true", help="run script as a module")
  p.add_argument("script")
  p.add_argument("script_args", nargs=argparse.REMAINDER)
  args = p.parse_args(argv)
  for name in ("nproc_per_node", "nnodes"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  if not 0 <= args.node_rank < args.nnodes:
    p.error(f"--node-rank must be in [0, {args.nnodes})")
  if args.nnodes > 1 and args.master_port is None:
    p.error("--master-port is required with --nnodes > 1 (every node must use the same)")
  if args.master_port is not None and not 1 <= args.master_port <= 65535:
    p.error(f"--master-port must be in 1..65535, got {args.master_port}")
  if args.cpu_devices is not None and args.cpu_devices < 1:
    p.error(f"--cpu-devices must be >= 1, got {args.cpu_devices}")
  if args.collective_timeout is not None and args.collective_timeout < 1:
    p.error(f"--collective-timeout must be >= 1 second, got {args.collective_timeout}")
  if args.grace_s < 0:
    p.error(f"--grace-s must be >= 0, got {args.grace_s}")
  return args


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


STALLED, LEFT_EARLY = "[ddp_jax] stalled: ", "[ddp_jax] left early: "  # as in _faults


def _pump(stream, prefix: str, out, verdicts: dict) -> None:
  for line in iter(stream.readline, ""):
    out.write(prefix + line)
    out.flush()
    for marker in (STALLED, LEFT_EARLY):  # a rank's verdict after a failed collective
      if line.startswith(marker):
        verdicts[marker].update(int(r) for r in line[len(marker):].strip().split(",") if r)
  stream.close()


def child_env(args, local_rank: int, port: int) -> dict:
  world = args.nnodes * args.nproc_per_node
  rank = args.node_rank * args.nproc_per_node + local_rank
  env = dict(os.environ)
  env.update(MASTER_ADDR=args.master_addr, MASTER_PORT=str(port), WORLD_SIZE=str(world),
             RANK=str(rank), LOCAL_RANK=str(local_rank),
             LOCAL_WORLD_SIZE=str(args.nproc_per_node),
             DDP_JAX_COORDINATOR=f"{args.master_addr}:{port}",
             DDP_JAX_NUM_PROCESSES=str(world), DDP_JAX_PROCESS_ID=str(rank),
             DDP_JAX_LOCAL_RANK=str(local_rank), PYTHONUNBUFFERED="1")
  if args.collective_timeout is not None:
    env["DDP_JAX_COLLECTIVE_TIMEOUT"] = str(args.collective_timeout)
  if args.bind_address is not None:
    env["DDP_JAX_BIND_ADDRESS"] = args.bind_address
  cache = args.compilation_cache or os.environ.get("DDP_JAX_COMPILATION_CACHE") or (
      os.path.join(os.path.expanduser("~"), ".cache", "ddp_jax", "xla"))
  if cache != "off":
    env.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
  env = host_memory_env(env, args.host_memory)
  if args.cpu_devices:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + f" --xla_force_host_platform_device_count={args.cpu_devices}")
    env.setdefault("JAX_PLATFORMS", "cpu")
  return env


class _Stop(Exception):
  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


def main(argv=None) -> int:
  args = parse_args(argv)
  port = args.master_port or free_port()
  cmd = [sys.executable, "-u"] + (["-m", args.script] if args.module else [args.script])
  cmd += args.script_args
  procs, pumps, verdicts = [], [], {STALLED: set(), LEFT_EARLY: set()}
  width = len(str(args.nnodes * args.nproc_per_node - 1))

  def on_signal(signum, frame):
    raise _Stop(signum)

  handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
  sigint = signal.getsignal(signal.SIGINT)
  t0 = time.monotonic()
  ended = {}  # rank -> (code, seconds since start), in the order they ended

  def stop_all(sig=signal.SIGTERM):
    for _, p in procs:
      if p.poll() is None:
        try:
          os.killpg(p.pid, sig)
        except ProcessLookupError:
          pass
    deadline = time.monotonic() + args.grace_s
    for _, p in procs:
      try:
        p.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(p.pid, signal.SIGKILL)
        p.wait()

  failed = None
  try:
    for local_rank in range(args.nproc_per_node):
      env = child_env(args, local_rank, port)
      p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
      procs.append((int(env["RANK"]), p))
      t = threading.Thread(target=_pump, args=(p.stdout, f"[{env['RANK']:>{width}}] ",
                                                sys.stdout, verdicts), daemon=True)
      t.start()
      pumps.append(t)
    while True:
      running = False
      for rank, p in procs:
        code = p.poll()
        if code is None:
          running = True
          continue
        if rank not in ended:
          ended[rank] = (code, time.monotonic() - t0)
        if code != 0 and failed is None:
          failed = (rank, code)
      if failed or not running:
        break
      time.sleep(0.05)
  except (KeyboardInterrupt, _Stop) as e:
    # Stopping is bounded (--grace-s, then SIGKILL): a repeated signal must not cut it
    # short. `timeout` sends SIGTERM to the launcher and again to its process group.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
      signal.signal(sig, signal.SIG_IGN)
    signum = e.signum if isinstance(e, _Stop) else signal.SIGINT
    name = signal.Signals(signum).name
    print(f"ddp-jax-run: {name} received: interrupted, stopping all ranks", file=sys.stderr,
          flush=True)
    stop_all(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)
    return 128 + signum
  finally:
    for sig, handler in handlers.items():
      signal.signal(sig, handler)
    signal.signal(signal.SIGINT, sigint)
  if failed:
    rank, code = failed
    time.sleep(0.3)  # the failing rank's last lines (its verdict) are still being pumped
    why = _blame(rank, ended, verdicts)
    print(f"ddp-jax-run: rank {rank} exited with code {code}{why}; stopping the other ranks",
          file=sys.stderr, flush=True)
    stop_all()
  for t in pumps:
    t.join(timeout=2)
  return failed[1] if failed and failed[1] > 0 else (1 if failed else 0)


def _blame(rank: int, ended: dict, verdicts: dict) -> str:
  """Why ``rank`` failed, when another rank is the cause."""
  early = {r: f"ended with code 0 {t:.1f} s into the run" for r, (code, t) in ended.items()
           if code == 0 and r != rank}
  early.update({r: "ended its script" for r in verdicts[LEFT_EARLY] - set(early) - {rank}})
  parts = [f"rank {r} {what} while the others still ran: it left early"
           for r, what in sorted(early.items())]
  stalled = sorted(verdicts[STALLED] - set(early) - {rank})
  if stalled:
    parts.append(f"rank {', '.join(map(str, stalled))} stopped making progress (never "
                 "reached the collective that failed)")
  return f" ({'; '.join(parts)})" if parts else ""


def main_cli() -> None:
  sys.exit(main())


if __name__ == "__main__":
  main_cli()
