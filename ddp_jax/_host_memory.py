"""Host buffers without a page fault per 4 KiB: how ``ddp-jax-run`` starts processes.

XLA's CPU runtime allocates a step's outputs and temporary buffers with ``malloc`` on
every execution. glibc maps a large block afresh (``mmap``) and unmaps it on ``free``,
so every step takes one page fault per 4 KiB page of every large buffer. Measured
(25.6M float32, one process): ``x * 2`` takes 36 ms and 25k page faults per call, 4 ms
when its buffer is reused (``donate_argnums``); a ``psum`` of it over 4 processes 295
ms. PyTorch's DDP writes into buckets it keeps. Two remedies, set in the environment a
process starts with (glibc reads it then), by ``ddp-jax-run --host-memory MODE``:

- ``"hugepages"`` (the default): ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >=
  2.35) asks for transparent huge pages on those blocks (where
  ``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise`` or ``always``): one
  fault per 2 MiB. ``x * 2``: 10 ms, 400 faults; the ``psum``: 190 ms. Memory is
  returned to the system as before.
- ``"reuse"``: one arena, no ``mmap``, no trimming (``MALLOC_ARENA_MAX=1``,
  ``MALLOC_MMAP_MAX_=0``, ``MALLOC_TRIM_THRESHOLD_=16 GiB``): freed blocks are handed out
  again, no faults once warm (``x * 2``: 7 ms; the ``psum``: 158 ms), but the process
  keeps its heap's high-water mark (measured: 5-8x the step's largest buffer).
- ``"system"``: glibc as configured.

Values you set yourself win. The mode also decides how ``pack="auto"`` packs buckets
across processes (:func:`ddp_jax._pack.auto_ravel_below`).
"""

from __future__ import annotations

import os
import sys
from typing import Literal, get_args

HostMemory = Literal["hugepages", "reuse", "system"]
MODES = get_args(HostMemory)
HUGEPAGES = "glibc.malloc.hugetlb=1"
REUSE_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(16 << 30),
}


def host_memory_env(env: dict, mode: HostMemory) -> dict:
  """``env`` with ``mode``'s variables added where ``env`` does not set them.

  >>> host_memory_env({}, "hugepages")
  {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  >>> host_memory_env({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, "hugepages")
  {'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1'}
  """
  if mode not in MODES:
    raise ValueError(f"host memory mode must be one of {MODES}, got {mode!r}.")
  env = dict(env)
  if mode == "reuse":
    return {**REUSE_ENV, **env}
  if mode == "hugepages":
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" not in tunables:
      env["GLIBC_TUNABLES"] = f"{tunables}:{HUGEPAGES}" if tunables else HUGEPAGES
  return env


def host_memory_mode(environ=None) -> HostMemory:
  """The mode this process was started with, read from its environment: ``"reuse"``
  when all three of :data:`REUSE_ENV`'s settings are in effect (each alone does not
  help: ``x * 2`` took 37 ms without the trim threshold), ``"hugepages"`` when glibc's
  ``hugetlb`` tunable is on, else ``"system"`` (always, off Linux).

  >>> host_memory_mode({"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0"})
  'system'
  """
  env = os.environ if environ is None else environ
  if not sys.platform.startswith("linux"):
    return "system"
  trim = env.get("MALLOC_TRIM_THRESHOLD_", "")
  if (env.get("MALLOC_ARENA_MAX") == "1" and env.get("MALLOC_MMAP_MAX_") == "0"
      and trim.isdigit() and int(trim) >= 1 << 30):
    return "reuse"
  tunables = env.get("GLIBC_TUNABLES", "").split(":")
  if any(t in ("glibc.malloc.hugetlb=1", "glibc.malloc.hugetlb=2") for t in tunables):
    return "hugepages"
  return "system"
