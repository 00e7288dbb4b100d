"""``ddp-jax-run``: start one Python process per device group, like ``torchrun``.

    ddp-jax-run --nproc-per-node 2 train.py --lr 0.1
    python -m ddp_jax.run --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 \\
        --master-port 29500 --nproc-per-node 8 train.py

Each child gets ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (and ``DDP_JAX_*`` twins) for
``ddp_jax.initialize()``; ``--cpu-devices K`` gives each child K fake CPU devices.
Output lines are prefixed with the child's rank. If a child fails, the others are
stopped and the launcher exits with its code, naming the rank; Ctrl-C stops all.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="ddp-jax-run", description=__doc__.split("\n")[0])
  p.add_argument("--nproc-per-node", type=int, default=1)
  p.add_argument("--nnodes", type=int, default=1)
  p.add_argument("--node-rank", type=int, default=0)
  p.add_argument("--master-addr", default="127.0.0.1")
  p.add_argument("--master-port", type=int, default=None, help="default: a free port")
  p.add_argument("--cpu-devices", type=int, default=None,
                 help="fake CPU devices per process (XLA_FLAGS), for CPU runs")
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
  return args


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _pump(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(prefix + line)
    out.flush()
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
  if args.cpu_devices:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + f" --xla_force_host_platform_device_count={args.cpu_devices}")
    env.setdefault("JAX_PLATFORMS", "cpu")
  return env


def main(argv=None) -> int:
  args = parse_args(argv)
  port = args.master_port or free_port()
  cmd = [sys.executable, "-u"] + (["-m", args.script] if args.module else [args.script])
  cmd += args.script_args
  procs, pumps = [], []
  width = len(str(args.nnodes * args.nproc_per_node - 1))
  for local_rank in range(args.nproc_per_node):
    env = child_env(args, local_rank, port)
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    procs.append((int(env["RANK"]), p))
    t = threading.Thread(target=_pump, args=(p.stdout, f"[{env['RANK']:>{width}}] ",
                                              sys.stdout), daemon=True)
    t.start()
    pumps.append(t)

  def stop_all(sig=signal.SIGTERM):
    for _, p in procs:
      if p.poll() is None:
        try:
          os.killpg(p.pid, sig)
        except ProcessLookupError:
          pass
    deadline = time.time() + args.grace_s
    for _, p in procs:
      try:
        p.wait(timeout=max(0.0, deadline - time.time()))
      except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()

  failed = None
  try:
    while True:
      running = False
      for rank, p in procs:
        code = p.poll()
        if code is None:
          running = True
        elif code != 0 and failed is None:
          failed = (rank, code)
      if failed or not running:
        break
      time.sleep(0.05)
  except KeyboardInterrupt:
    print("ddp-jax-run: interrupted, stopping all ranks", file=sys.stderr)
    stop_all(signal.SIGINT)
    return 130
  if failed:
    rank, code = failed
    print(f"ddp-jax-run: rank {rank} exited with code {code}; stopping the other ranks",
          file=sys.stderr)
    stop_all()
  for t in pumps:
    t.join(timeout=2)
  return failed[1] if failed and failed[1] > 0 else (1 if failed else 0)


def main_cli() -> None:
  sys.exit(main())


if __name__ == "__main__":
  main_cli()
