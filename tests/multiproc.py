"""Run a snippet on N processes joined by jax.distributed (gloo CPU collectives, localhost).

Each process runs ``PRELUDE`` then the snippet; whatever it prints on a line starting
with ``RESULT `` is parsed as JSON and returned, per process.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PRELUDE = """
import os, sys, json
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(os.environ["COORD"], int(os.environ["NPROC"]),
                           int(os.environ["RANK"]), initialization_timeout=60)
import jax.numpy as jnp, numpy as np, ddp_jax
rank = jax.process_index()
def result(obj):
  print("RESULT " + json.dumps(obj), flush=True)
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(code: str, nproc: int = 2, devices: int = 1, timeout: float = 120):
  """Returns ``(results, returncodes, outputs)``; results[i] is a list of RESULT objects."""
  port = free_port()
  script = PRELUDE + textwrap.dedent(code)
  procs = []
  for rank in range(nproc):
    env = dict(os.environ, COORD=f"127.0.0.1:{port}", NPROC=str(nproc), RANK=str(rank),
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outputs, codes = [], []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      out, _ = p.communicate()
    outputs.append(out)
    codes.append(p.returncode)
  results = [[json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
             for out in outputs]
  return results, codes, outputs
