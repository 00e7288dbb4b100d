"""Start-up and consistency across replicas: broadcast, buffer sync, verification."""

from __future__ import annotations

import atexit
import hashlib
import inspect
import os
import sys
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils

from ddp_jax import _faults
from ddp_jax._axes import check_axis_name
from ddp_jax._plan import path_str

BufferMode = Literal["broadcast", "mean"]
BUFFER_MODES = get_args(BufferMode)


def _numeric(x) -> bool:
  return hasattr(x, "dtype") and x.dtype != jax.dtypes.float0 and (
      jnp.issubdtype(x.dtype, jnp.number) or x.dtype == jnp.bool_)


def broadcast_params(tree: Any, axis_name, source: int = 0) -> Any:
  """Every replica gets replica ``source``'s values (DDP's start-up broadcast).

  Call inside a mapped step (``shard_map``/``pmap``); one ``psum`` of the tree
  with every replica but ``source`` contributing zeros, so the result is
  exact and replicated.

  Examples:
    >>> import jax, jax.numpy as jnp, ddp_jax
    >>> f = jax.vmap(lambda w: ddp_jax.broadcast_params(w, "i"), axis_name="i")
    >>> print(f(jnp.arange(4.0) + 1))
    [1. 1. 1. 1.]
  """
  check_axis_name(axis_name)
  if not isinstance(source, int) or isinstance(source, bool) or source < 0:
    raise ValueError(f"broadcast_params: source must be a replica index >= 0, got {source!r}.")
  index = lax.axis_index(axis_name)

  def one(x):
    if not _numeric(x):
      return x
    as_num = x.astype(jnp.int32) if x.dtype == jnp.bool_ else x
    out = lax.psum(jnp.where(index == source, as_num, jnp.zeros_like(as_num)), axis_name)
    return out.astype(x.dtype)

  return jax.tree.map(one, tree)


def sync_buffers(buffers: Any, axis_name, how: BufferMode = "broadcast") -> Any:
  """Keeps model buffers (e.g. flax ``batch_stats``) equal across replicas.

  ``how="broadcast"``: replica 0's values (DDP ``broadcast_buffers=True``);
  ``"mean"``: the average over replicas (SyncBatchNorm-like running stats).
  """
  if how not in BUFFER_MODES:
    raise ValueError(f"sync_buffers: how must be one of {BUFFER_MODES}, got {how!r}.")
  if how == "broadcast":
    return broadcast_params(buffers, axis_name)
  return jax.tree.map(
      lambda x: lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.inexact) else x, buffers)


def broadcast_from_process0(tree: Any, mesh: jax.sharding.Mesh | None = None) -> Any:
  """Host level: every process gets process 0's values (multi-process start-up).

  Checks first that the tree matches across processes (a mismatch would hang or fail
  obscurely inside the collective), then moves it in one collective per dtype: the
  leaves are concatenated into one flat buffer each (``broadcast_one_to_all`` of the
  tree as it is compiles a program with one operand per leaf and pays one gloo call
  per leaf). Returns host (numpy) arrays, like ``broadcast_one_to_all``; with ``mesh``,
  arrays replicated (``P()``) over it, ready for ``init_state`` and the step: placed
  once, without the equality check by digest that placing host values needs (they
  came out of one collective, so they are equal by construction).

  Examples:
    >>> import jax, numpy as np, ddp_jax
    >>> mesh = jax.make_mesh((8,), ("data",))
    >>> p = ddp_jax.broadcast_from_process0({"w": np.ones(3, np.float32)}, mesh)
    >>> print(p["w"].sharding.spec == jax.sharding.PartitionSpec(), p["w"])
    True [1. 1. 1.]
  """
  if mesh is not None:  # the host values (checked and moved below), then placed once
    hosts, treedef = jax.tree.flatten(broadcast_from_process0(tree))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.unflatten(treedef, [
        jax.make_array_from_callback(h.shape, sharding, lambda index, h=h: h[index])
        for h in hosts])
  verify_replicas(tree)
  leaves, treedef = jax.tree.flatten(tree)
  if jax.process_count() == 1:
    return jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
  hosts = [np.asarray(x) for x in leaves]
  groups: dict[str, list[int]] = {}
  for i, h in enumerate(hosts):
    groups.setdefault(h.dtype.str, []).append(i)
  flat = {}
  source = jax.process_index() == 0
  for key, idx in groups.items():
    # Only process 0's values travel: the others send zeros (the collective is a sum),
    # so they skip copying their whole tree into one buffer (1 s of page faults for
    # BERT-base's 440 MB on each process).
    if source:
      buf = np.concatenate([hosts[i].ravel() for i in idx])
    else:
      buf = np.zeros((sum(hosts[i].size for i in idx),), np.dtype(key))
    flat[key] = buf.view(np.uint8) if buf.dtype == np.bool_ else buf
  out = multihost_utils.broadcast_one_to_all(flat)
  result = [None] * len(hosts)
  for key, idx in groups.items():
    buf = np.asarray(out[key])
    buf = buf.view(np.bool_) if np.dtype(key) == np.bool_ else buf
    start = 0
    for i in idx:
      n = hosts[i].size
      result[i] = buf[start:start + n].reshape(hosts[i].shape)
      start += n
  return jax.tree.unflatten(treedef, result)


def _digest(text: bytes) -> np.ndarray:
  return np.frombuffer(hashlib.blake2b(text, digest_size=8).digest(), np.int32)


def _local_bytes(x) -> bytes:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_shards[0].data
  return np.ascontiguousarray(np.asarray(x)).tobytes()


def verify_replicas(tree: Any, check_values: bool = False) -> None:
  """Checks every process holds the same tree: structure, shapes, dtypes (and values).

  DDP's ``verify_params_across_processes``. Collective over all processes
  (call it on all of them). With ``check_values``, the values are compared too,
  as well as the device copies of each fully replicated array inside this
  process. Raises ``ValueError`` naming the first mismatching leaf path and
  process.

  Examples:
    >>> import jax.numpy as jnp, ddp_jax
    >>> ddp_jax.verify_replicas({"w": jnp.ones(3)}, check_values=True)
  """
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [path_str(p) for p, _ in with_path]
  me = jax.process_index()
  if jax.process_count() > 1:
    head = np.concatenate([np.array([len(paths)], np.int32), _digest(str(treedef).encode())])
    heads = np.asarray(multihost_utils.process_allgather(head))
    for proc, other in enumerate(heads):
      if other[0] != len(paths):
        raise ValueError(
            f"verify_replicas: process {proc} has {other[0]} leaves, process {me} has "
            f"{len(paths)} (first leaf here: {paths[0] if paths else '-'}).")
    rows = []
    for (_, x), name in zip(with_path, paths):
      meta = f"{name}|{tuple(np.shape(x))}|{np.result_type(x)}".encode()
      row = [_digest(meta)]
      if check_values:
        row.append(_digest(_local_bytes(x)))
      rows.append(np.concatenate(row))
    mine = np.stack(rows) if rows else np.zeros((0, 4 if check_values else 2), np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine))
    for i, name in enumerate(paths):
      for proc in range(every.shape[0]):
        if not np.array_equal(every[proc, i, :2], mine[i, :2]):
          x = with_path[i][1]
          raise ValueError(
              f"verify_replicas: leaf {i} {name} ({np.result_type(x)}{list(np.shape(x))} on "
              f"process {me}) differs in path, shape or dtype on process {proc}.")
        if check_values and not np.array_equal(every[proc, i, 2:], mine[i, 2:]):
          raise ValueError(
              f"verify_replicas: leaf {name} has different values on process {proc} "
              f"than on process {me}.")
    if not np.array_equal(heads[:, 1:], np.broadcast_to(heads[me, 1:], heads[:, 1:].shape)):
      proc = int(np.nonzero((heads[:, 1:] != heads[me, 1:]).any(axis=1))[0][0])
      raise ValueError(
          f"verify_replicas: the tree's container types differ on process {proc} "
          f"({treedef} on process {me}).")
  if check_values:
    for name, (_, x) in zip(paths, with_path):
      if isinstance(x, jax.Array) and x.sharding.is_fully_replicated:
        shards = x.addressable_shards
        first = np.asarray(shards[0].data)
        for shard in shards[1:]:
          if not np.array_equal(np.asarray(shard.data), first, equal_nan=True):
            raise ValueError(
                f"verify_replicas: leaf {name} is replicated but device {shard.device} "
                f"holds different values than device {shards[0].device} (process {me}).")


# ---- process start-up -----------------------------------------------------------------------

_ENV = {  # ours first, then torchrun's
    "coordinator": ("DDP_JAX_COORDINATOR",),
    "addr": ("MASTER_ADDR",),
    "port": ("MASTER_PORT",),
    "num_processes": ("DDP_JAX_NUM_PROCESSES", "WORLD_SIZE"),
    "process_id": ("DDP_JAX_PROCESS_ID", "RANK"),
    "local_rank": ("DDP_JAX_LOCAL_RANK", "LOCAL_RANK"),
}


def _from_env(key: str):
  for name in _ENV[key]:
    value = os.environ.get(name)
    if value not in (None, ""):
      return name, value
  return None, None


def _as_int(name: str, value) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"ddp_jax.initialize: {name}={value!r} is not an integer.") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None,
               timeout_s: int = 300, shutdown_timeout_s: int = 60,
               collective_timeout_s: int | None = None, bind_address: str | None = None,
               cpu_collectives: str | None = "gloo", exit_on_error: bool = True) -> dict:
  """Joins this process to the others (``jax.distributed.initialize``), torchrun-style.

  Arguments not given are read from the environment: ``DDP_JAX_COORDINATOR``
  (``host:port``), ``DDP_JAX_NUM_PROCESSES``, ``DDP_JAX_PROCESS_ID``, or torchrun's
  ``MASTER_ADDR``/``MASTER_PORT``/``WORLD_SIZE``/``RANK`` (what ``ddp-jax-run`` sets);
  with none of them, jax's own cluster detection (SLURM, Open MPI, ...) decides. On CPU
  the cross-process collectives use ``cpu_collectives`` (gloo). Idempotent: a second call
  returns the same description.

  With ``exit_on_error`` an uncaught exception prints its traceback and ends the process
  at once with code 1: jax's exit-time shutdown would otherwise wait for the other
  processes (up to ``shutdown_timeout_s``) and a failing rank would hang instead of
  failing, so ``ddp-jax-run`` could not stop the others.

  Returns:
    ``{"process_id", "num_processes", "local_devices", "global_devices"}``.
  """
  if jax.distributed.is_initialized():
    return _describe_processes()
  if coordinator_address is None:
    name, coordinator_address = _from_env("coordinator")
    if coordinator_address is None:
      (_, addr), (port_name, port) = _from_env("addr"), _from_env("port")
      if addr and port:
        coordinator_address = f"{addr}:{_as_int(port_name, port)}"
      elif addr or port:
        raise ValueError(
            "ddp_jax.initialize: MASTER_ADDR and MASTER_PORT must be set together "
            f"(got MASTER_ADDR={addr!r}, MASTER_PORT={port!r}).")
  if num_processes is None:
    name, value = _from_env("num_processes")
    num_processes = None if value is None else _as_int(name, value)
  if process_id is None:
    name, value = _from_env("process_id")
    process_id = None if value is None else _as_int(name, value)
  given = [coordinator_address is not None, num_processes is not None, process_id is not None]
  if any(given) and not all(given):
    raise ValueError(
        "ddp_jax.initialize: give the coordinator address, the number of processes and this "
        f"process's id together (got coordinator={coordinator_address!r}, "
        f"num_processes={num_processes!r}, process_id={process_id!r}); launch with "
        "ddp-jax-run, or set MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK.")
  if num_processes is not None:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(
          f"ddp_jax.initialize: process_id {process_id} is not in [0, {num_processes}).")
  if collective_timeout_s is None:
    name, value = "DDP_JAX_COLLECTIVE_TIMEOUT", os.environ.get("DDP_JAX_COLLECTIVE_TIMEOUT")
    collective_timeout_s = (_faults.DEFAULT_COLLECTIVE_TIMEOUT_S if value in (None, "")
                            else _as_int(name, value))
  _faults.check_timeout(collective_timeout_s)
  kwargs = dict(local_device_ids=local_device_ids, initialization_timeout=timeout_s)
  if coordinator_address is not None:  # every address checked before anything changes
    host, port = _split_address(coordinator_address, "coordinator address")
    bind_address = _with_port(
        bind_address or os.environ.get("DDP_JAX_BIND_ADDRESS") or host, port)
    bind_host, bind_port = _split_address(bind_address, "bind address")
    kwargs["coordinator_bind_address"] = bind_address
    if process_id == 0:
      _check_port_free(bind_host, bind_port)
  _faults.set_collective_timeout(collective_timeout_s)
  if cpu_collectives:  # only used by the CPU backend; harmless on GPUs
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  if coordinator_address is not None and process_id not in (None, 0):
    _wait_for_coordinator(coordinator_address, timeout_s, num_processes, process_id)
  if coordinator_address is not None:
    print(f"[ddp_jax] process {process_id}/{num_processes}: joining {coordinator_address} "
          f"(up to {timeout_s} s; a DEADLINE_EXCEEDED abort from jax means a peer never "
          "arrived)", file=sys.stderr, flush=True)
  if "shutdown_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
    kwargs["shutdown_timeout_seconds"] = shutdown_timeout_s
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
  except Exception as e:  # jax raises RuntimeError/XlaRuntimeError/ValueError here
    if coordinator_address is None:
      raise RuntimeError(
          "ddp_jax.initialize: no cluster configured and jax found none to detect "
          f"({e}). Launch with ddp-jax-run, set MASTER_ADDR, MASTER_PORT, WORLD_SIZE and "
          "RANK (or DDP_JAX_COORDINATOR, DDP_JAX_NUM_PROCESSES, DDP_JAX_PROCESS_ID), or "
          "pass the arguments.") from e
    raise RuntimeError(
        f"ddp_jax.initialize: could not join {num_processes} processes at "
        f"{coordinator_address} as process {process_id} within {timeout_s} s ({e}). Check "
        "that every process was started, with the same address and process count, and "
        "that the coordinator's port is reachable.") from e
  if exit_on_error:
    _exit_on_uncaught_exception()
  atexit.register(_faults.mark_exit)  # runs before jax's shutdown (registered earlier)
  return _describe_processes()


def _split_address(address: str, what: str) -> tuple[str, int]:
  """``host:port`` (``[v6]:port``) -> (host, port), with a message that says what is wrong."""
  host, sep, port = str(address).rpartition(":")
  if not sep or not host or (":" in host and not host.startswith("[")):
    raise ValueError(
        f"ddp_jax.initialize: the {what} {address!r} is not host:port (e.g. 10.0.0.1:29500; "
        "an IPv6 host in brackets, [::1]:29500).")
  try:
    number = int(port)
  except ValueError:
    number = -1
  if not 1 <= number <= 65535:
    raise ValueError(
        f"ddp_jax.initialize: the port of the {what} {address!r} must be an integer in "
        "1..65535.")
  return host, number


def _with_port(address: str, port: int) -> str:
  """``address`` with ``port`` added when it has none (IPv6 hosts get brackets)."""
  if address.startswith("["):
    return address if "]:" in address else f"{address}:{port}"
  if address.count(":") > 1:  # a bare IPv6 address
    return f"[{address}]:{port}"
  return address if ":" in address else f"{address}:{port}"


def _check_port_free(host: str, port: int) -> None:
  """Process 0: a clear error if the coordinator's port is taken (jax would crash)."""
  import socket
  family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
  with socket.socket(family, socket.SOCK_STREAM) as s:
    try:
      s.bind((host.strip("[]"), port))
    except OSError as e:
      raise RuntimeError(
          f"ddp_jax.initialize: process 0 cannot listen on {host}:{port} ({e.strerror}): "
          "the port is in use (another run still going?) or the address is not this "
          "machine's. Pick another --master-port, or let ddp-jax-run choose a free one."
      ) from None


def _wait_for_coordinator(address: str, timeout_s: float, num_processes, process_id) -> None:
  """Raises a helpful error if the coordinator's port never opens (jax would abort)."""
  import socket
  import time
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise RuntimeError(
            f"ddp_jax.initialize: could not join {num_processes} processes at {address} as "
            f"process {process_id} within {timeout_s} s: nothing listens there ({e}). Check "
            "that process 0 was started, with the same address and process count, and that "
            "its port is reachable.") from None
      time.sleep(0.2)


def _exit_on_uncaught_exception() -> None:
  previous = sys.excepthook

  def hook(kind, value, tb):
    previous(kind, value, tb)
    _faults.exit_handler_message(value)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)

  sys.excepthook = hook


def _describe_processes() -> dict:
  return {"process_id": jax.process_index(), "num_processes": jax.process_count(),
          "local_devices": jax.local_device_count(), "global_devices": jax.device_count()}
