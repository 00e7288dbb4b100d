"""Failures across processes end loudly and in bounded time.

Three pieces, all host-side:

- **Collective timeout.** XLA's CPU runtime waits ``xla_cpu_collective_timeout_seconds``
  (gloo's per-operation timeout; XLA's default is 30 minutes) for a peer inside a
  collective; :func:`set_collective_timeout` sets it (and its GPU analogue for the
  first collective) before the backend starts.
- **Who stopped.** When a collective fails, :func:`diagnose` (run by
  ``initialize``'s exception hook) writes this process's failure to the coordination
  service's key-value store, waits briefly for the others' reports, and names the
  processes that neither reported nor exited: the ones that stopped making progress.
  A process that ends its script registers that it left (:func:`mark_exit`), so a peer
  waiting for it says so.
- **Same configuration everywhere.** :func:`agree` compares a fingerprint of what each
  process is about to run (the sync's plan and hook, see ``_sync.fingerprint``) across
  processes before the first collective, and raises naming the field and the process
  that differ.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time

import jax

DEFAULT_COLLECTIVE_TIMEOUT_S = 300
# Lines the verdict prints for ddp-jax-run, which names these ranks when it stops the run.
STALLED = "[ddp_jax] stalled: "
LEFT_EARLY = "[ddp_jax] left early: "
_ROOT = "ddp_jax"
_FLAGS = ("xla_cpu_collective_timeout_seconds",
          "xla_gpu_first_collective_call_terminate_timeout_seconds")
_state = {"timeout_s": None, "agreements": 0}
_collector = threading.local()


def check_timeout(value, name: str = "collective_timeout_s") -> int:
  """A positive whole number of seconds (what XLA's flag takes)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
      or value < 1:
    raise ValueError(f"{name} must be a whole number of seconds >= 1, got {value!r}.")
  return int(value)


def set_collective_timeout(timeout_s) -> int:
  """Sets XLA's collective timeouts for this process (before its backend starts).

  A value already in ``XLA_FLAGS`` wins (the user set it on purpose); returns the
  timeout in effect.
  """
  timeout_s = check_timeout(timeout_s)
  flags = os.environ.get("XLA_FLAGS", "")
  given = re.search(r"--xla_cpu_collective_timeout_seconds=(\d+)", flags)
  if given:
    timeout_s = int(given.group(1))
  else:
    flags += "".join(f" --{f}={timeout_s}" for f in _FLAGS if f"--{f}=" not in flags)
    os.environ["XLA_FLAGS"] = flags.strip()
  _state["timeout_s"] = timeout_s
  return timeout_s


def _client():
  from jax._src import distributed
  return distributed.global_state.client


def mark_exit() -> None:
  """Registers that this process's script ended (run at exit, before jax's shutdown)."""
  client = _client()
  if client is not None:
    with contextlib.suppress(Exception):
      client.key_value_set(f"{_ROOT}/exited/{jax.process_index()}", str(time.time()))


# What jax's runtime errors say when a collective with another process failed.
_COLLECTIVE_ERRORS = ("Gloo", "NCCL", "DEADLINE_EXCEEDED", "Connection closed by peer",
                      "Connection reset by peer", "CoordinationService")


def is_collective_failure(exc: BaseException) -> bool:
  return any(s in str(exc) for s in _COLLECTIVE_ERRORS)


def diagnose(exc: BaseException, wait_s: float = 3.0) -> str | None:
  """After a failed collective: which processes stopped making progress.

  Writes this process's failure to the key-value store, gives the others
  ``wait_s`` to report theirs, and returns a one-line verdict (``None`` if the
  coordination service cannot be reached or ``exc`` is not a collective failure).
  Bounded in time whatever the service does.
  """
  if not is_collective_failure(exc) or _client() is None:
    return None
  result: list = []
  worker = threading.Thread(target=lambda: result.append(_diagnose(exc, wait_s)), daemon=True)
  worker.start()
  worker.join(wait_s + 5)
  return result[0] if result else None


def _keys(client, prefix: str) -> set[int]:
  with contextlib.suppress(Exception):
    return {int(k.rstrip("/").rsplit("/", 1)[-1]) for k, _ in client.key_value_dir_get(prefix)}
  return set()


def _diagnose(exc, wait_s) -> str | None:
  client, me, n = _client(), jax.process_index(), jax.process_count()
  try:
    client.key_value_set(f"{_ROOT}/failed/{me}", type(exc).__name__)
  except Exception:  # the coordinator is gone (process 0 died): nothing to ask
    return (f"[ddp_jax] process {me}: a collective failed and the coordination service "
            "(process 0) does not answer: process 0 is likely the one that stopped.")
  deadline = time.monotonic() + wait_s
  while True:
    failed, exited = _keys(client, f"{_ROOT}/failed/"), _keys(client, f"{_ROOT}/exited/")
    silent = sorted(set(range(n)) - failed - exited)
    if not silent or time.monotonic() >= deadline:
      break
    time.sleep(0.2)
  timeout = _state["timeout_s"]
  timed_out = "Timed out" in str(exc) or "DEADLINE_EXCEEDED" in str(exc)
  what = (f"a collective timed out after {timeout} s (collective_timeout_s)"
          if timed_out and timeout else "a collective failed")
  left = sorted(exited - {me})
  parts, lines = [], []
  if left:
    parts.append(f"process(es) {', '.join(map(str, left))} had already ended their script "
                 "(left early)")
    lines.append(f"{LEFT_EARLY}{','.join(map(str, left))}")
  if silent:
    parts.append(f"process(es) {', '.join(map(str, silent))} never reached it (stuck, dead, "
                 "or slower than the timeout)")
    lines.append(f"{STALLED}{','.join(map(str, silent))}")
  verdict = "; ".join(parts) or "every process reported the same failure"
  return "\n".join([f"[ddp_jax] process {me}: {what}: {verdict}.", *lines])


# ---- configuration agreement ------------------------------------------------------------------

@contextlib.contextmanager
def collecting():
  """Gathers the fingerprints :func:`record` sees while tracing (this thread)."""
  previous = getattr(_collector, "records", None)
  _collector.records = records = []
  try:
    yield records
  finally:
    _collector.records = previous


def record(fields: dict) -> None:
  """Called at trace time by the sync: its fingerprint, if someone is collecting."""
  records = getattr(_collector, "records", None)
  if records is not None:
    records.append(fields)


def tree_fingerprint(tree) -> dict:
  """A tree's leaves as text (path, dtype, shape), for :func:`agree`."""
  import numpy as np

  from ddp_jax._plan import path_str
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"leaves": [f"{path_str(p)} {x.dtype if hasattr(x, 'dtype') else np.result_type(x)}"
                     f"{list(np.shape(x))}" for p, x in leaves]}


def _show(value, limit: int = 120) -> str:
  text = value if isinstance(value, str) else json.dumps(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _difference(mine: list, theirs: list) -> str | None:
  if len(mine) != len(theirs):
    return f"{len(theirs)} gradient syncs in its step, {len(mine)} here"
  for k, (a, b) in enumerate(zip(mine, theirs)):
    for field in sorted(set(a) | set(b), key=lambda f: list(a).index(f) if f in a else 99):
      x, y = a.get(field), b.get(field)
      if x == y:
        continue
      where = f"sync {k}: " if len(mine) > 1 else ""
      if isinstance(x, list) and isinstance(y, list):
        for i in range(max(len(x), len(y))):
          xi = x[i] if i < len(x) else "nothing"
          yi = y[i] if i < len(y) else "nothing"
          if xi != yi:
            return f"{where}{field}[{i}] is {_show(yi)} there, {_show(xi)} here"
      return f"{where}{field} is {_show(y)} there, {_show(x)} here"
  return None


def agree(what: str, records: list, timeout_s: float | None = None) -> None:
  """Raises on every process if ``records`` (JSON-able) differ between processes.

  Collective: every process calls it, in the same order. Host-side only (the
  coordination service's key-value store), so it runs before any device
  collective of a mismatched program could hang or abort.
  """
  n = jax.process_count()
  client = _client()
  if n == 1 or client is None:
    return
  me = jax.process_index()
  _state["agreements"] += 1
  key = f"{_ROOT}/agree/{_state['agreements']}"
  client.key_value_set(f"{key}/{me}", json.dumps(records))
  wait = timeout_s or _state["timeout_s"] or DEFAULT_COLLECTIVE_TIMEOUT_S
  for p in range(n):
    if p == me:
      continue
    try:
      theirs = json.loads(client.blocking_key_value_get(f"{key}/{p}", int(wait * 1000)))
    except Exception as e:
      raise RuntimeError(
          f"{what}: process {p} did not publish its configuration within {wait:.0f} s "
          f"(process {me} did; the configuration check is collective and runs on each "
          f"process's first call). Is process {p} stuck or running another program? ({e})"
      ) from None
    diff = _difference(records, theirs)
    if diff:
      raise ValueError(
          f"{what}: process {p} runs a different configuration than process {me}: "
          f"{diff}. Every process must build the same model, optimizer and hook "
          "(their collectives would not match: a hang, an abort or silently wrong "
          "gradients).")


def exit_handler_message(exc) -> None:
  """Prints :func:`diagnose`'s verdict for an uncaught exception, if any."""
  verdict = diagnose(exc)
  if verdict:
    print(verdict, file=sys.stderr, flush=True)
