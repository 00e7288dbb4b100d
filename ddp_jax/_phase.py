"""Warm-up programs: a step compiled without the branch its hooks cannot take yet.

PowerSGD all-reduces until ``start_iter`` and compresses after: a ``lax.cond`` on the
hook state's iteration count, so a step's program holds both branches, and its first
call traces, lowers and compiles a compression that will not run for ``start_iter``
steps (on ResNet-50 shapes, most of PowerSGD's first step). :func:`until` is that cond
for hooks. :func:`ddp_jax.data_parallel` compiles two programs as needed:

- a **warm-up program**: the step traced with its :class:`~ddp_jax.SyncState` arguments
  marked ``warm_up`` (:func:`mark`; a static field, so any jit cache keys on it), which
  the sync hands to its hooks (``HookContext.warm_up``): every :func:`until` takes its
  first branch statically;
- the **full program** (the cond), built the first time a call could reach a
  ``start_iter``.

It runs the warm-up program only while that is exact: the largest ``iter`` in the hook
states it is given (read once, then bounded by the syncs a call traces, each moving an
iteration by at most one, and read again near the switch or when the state is not the
one its last call returned), plus that bound per call, stays at or below the smallest
``start_iter``. A step whose :func:`until` sits inside a loop (``lax.scan``, ``while``:
no bound per call), or whose hook states are not among its arguments, gets the full
program only. ``DDP_JAX_WARMUP_PROGRAM=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading

import jax
import numpy as np
from jax import lax

MARK = "ddp_jax_warmup"
_local = threading.local()
# Higher-order primitives that run their body at most once per call.
_ONCE = {"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "cond",
         "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "shard_map",
         "named_call"}


def enabled() -> bool:
  """Whether ``data_parallel`` may run warm-up programs (``DDP_JAX_WARMUP_PROGRAM``)."""
  return os.environ.get("DDP_JAX_WARMUP_PROGRAM", "1") not in ("0", "false", "off")


@contextlib.contextmanager
def recording():
  """Collects the ``start_iter`` of each :func:`until` traced inside (a list)."""
  previous = getattr(_local, "starts", None)
  _local.starts = starts = []
  try:
    yield starts
  finally:
    _local.starts = previous


def until(iteration, start_iter: int, before, after, operand, warm_up: bool = False):
  """``lax.cond(iteration < start_iter, before, after, operand)``; ``before(operand)``
  alone in a warm-up program (``warm_up``: the hook's ``ctx.warm_up``).

  Examples:
    >>> import jax.numpy as jnp
    >>> from ddp_jax import _phase
    >>> inc, dec = (lambda x: x + 1), (lambda x: x - 1)
    >>> int(_phase.until(jnp.int32(7), 5, inc, dec, 10))
    9
    >>> int(_phase.until(jnp.int32(7), 5, inc, dec, 10, warm_up=True))  # trusts the caller
    11
  """
  starts = getattr(_local, "starts", None)
  if starts is not None:
    starts.append(int(start_iter))
  if warm_up:
    with jax.named_scope(MARK):
      return before(operand)
  return lax.cond(iteration < start_iter, before, after, operand)


def _is_sync_state(x) -> bool:
  from ddp_jax._sync import SyncState
  return isinstance(x, SyncState)


def mark(tree, warm_up: bool = True):
  """``tree`` with every :class:`~ddp_jax.SyncState` in it marked ``warm_up`` (or not)."""
  return jax.tree.map(lambda x: dataclasses.replace(x, warm_up=warm_up)
                      if _is_sync_state(x) else x, tree, is_leaf=_is_sync_state)


def _subjaxprs(params):
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(v, "eqns"):
        yield v
      elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
        yield v.jaxpr


def in_loop(jaxpr, looping: bool = False) -> bool:
  """Whether a warm-up branch taken in ``jaxpr`` sits in a body that may run more than
  once per call."""
  for eqn in jaxpr.eqns:
    if looping and MARK in str(eqn.source_info.name_stack):
      return True
    inner = looping or eqn.primitive.name not in _ONCE
    if any(in_loop(sub, inner) for sub in _subjaxprs(eqn.params)):
      return True
  return False


def iterations(args) -> list:
  """The ``iter`` leaves of every :class:`~ddp_jax.SyncState`'s hook states in ``args``."""
  found = []
  for state in jax.tree.leaves(args, is_leaf=_is_sync_state):
    if _is_sync_state(state):
      for path, leaf in jax.tree_util.tree_leaves_with_path(state.hook_states):
        if path and getattr(path[-1], "name", None) == "iter":
          found.append(leaf)
  return found


def largest(leaves) -> int:
  """The largest value in ``leaves`` (waits for them): this process's replicas."""
  values = [-1]
  for x in leaves:
    if isinstance(x, jax.Array):
      values += [int(np.max(np.asarray(s.data))) for s in x.addressable_shards]
    else:
      values.append(int(np.max(np.asarray(x))))
  return max(values)
