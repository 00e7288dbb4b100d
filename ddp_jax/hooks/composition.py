"""Hooks made of hooks: ``schedule`` (switch by step) and ``by_path`` (per-leaf policy)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax

from ddp_jax._validate import check_int
from ddp_jax.hooks._collectives import as_varying
from ddp_jax.hooks._protocol import CommHook, check_hook, configured, to_leaves
from ddp_jax.hooks._wire import WireCost, wire_cost
from ddp_jax.hooks.default import allreduce


class ScheduleState(NamedTuple):
  """:func:`schedule`'s state: this bucket's update count and every stage's state."""

  step: Any
  stages: tuple


@configured
def schedule(stages: Mapping[int, CommHook]) -> CommHook:
  """Switches hooks on a step schedule inside one jitted step.

  ``schedule({0: allreduce(), 500: bf16_compress(), 2000: powersgd(rank=4)})`` runs the
  hook whose start step is the last one reached (a ``lax.switch``); every stage's state
  is kept (a later stage starts from its own init state). Counts this bucket's updates.
  Its static wire cost is the last stage's (steady state).

  Examples:
    >>> import ddp_jax.hooks as H
    >>> hook = schedule({0: H.allreduce(), 100: H.fp16_compress()})
  """
  if not stages:
    raise ValueError("schedule: give at least one stage, e.g. {0: allreduce()}.")
  starts = sorted(stages)
  for s in starts:
    if isinstance(s, bool) or not isinstance(s, int) or s < 0:
      raise ValueError(f"schedule: start steps must be ints >= 0, got {s!r}.")
    check_hook(stages[s], f"schedule: stage {s}")
  if starts[0] != 0:
    raise ValueError(f"schedule: the first stage must start at step 0, got {starts[0]}.")
  hooks = [stages[s] for s in starts]

  def init_fn(spec):
    return ScheduleState(jnp.zeros((), jnp.int32), tuple(h.init(spec) for h in hooks))

  def update_fn(bucket, state, ctx):
    bucket.buffer()  # ravel once, outside the branches

    def branch(i):
      def run(states):
        reduced, new = hooks[i].update(bucket, states[i], ctx)
        leaves = tuple(x.astype(bucket.dtype) for x in to_leaves(reduced, bucket))
        return leaves, as_varying(states[:i] + (new,) + states[i + 1:], ctx.axis_name)
      return run

    index = jnp.sum(state.step >= jnp.asarray(starts, jnp.int32)) - 1
    if len(hooks) == 1:
      leaves, new_states = branch(0)(state.stages)
    else:
      leaves, new_states = lax.switch(index, [branch(i) for i in range(len(hooks))],
                                      state.stages)
    return leaves, ScheduleState(state.step + 1, new_states)

  def wire_fn(spec, world):
    return wire_cost(hooks[-1], spec, world)

  return CommHook(init_fn, update_fn, wire_fn)


@configured
def by_path(rules: Mapping[str, CommHook], default: CommHook | None = None, *,
            small_below: int = 0, small: CommHook | None = None) -> CommHook:
  """Per-leaf policy: leaves whose path matches a pattern (``fnmatch``, first match wins)
  use that pattern's hook; other leaves with fewer than ``small_below`` elements use
  ``small`` (default ``allreduce()``); the rest use ``default`` (default ``allreduce()``).

  Each hook sees a sub-bucket of its leaves. Typical: keep biases and norms exact,
  compress the big kernels.

  Examples:
    >>> import ddp_jax.hooks as H
    >>> hook = by_path({"*bias*": H.allreduce(), "*scale*": H.allreduce()},
    ...                default=H.powersgd(rank=4), small_below=4096)
  """
  for pattern, hook in rules.items():
    if not isinstance(pattern, str):
      raise TypeError(f"by_path: patterns must be strings, got {pattern!r}.")
    check_hook(hook, f"by_path: the hook for {pattern!r}")
  check_int(small_below, 0, "by_path: small_below")
  routes = list(rules.values()) + [small or allreduce(), default or allreduce()]
  for i, hook in enumerate(routes[-2:]):
    check_hook(hook, "by_path: " + ("small" if i == 0 else "default"))
  patterns = list(rules)

  def route_of(path, length):
    for i, pattern in enumerate(patterns):
      if fnmatch.fnmatchcase(path, pattern):
        return i
    return len(patterns) if length < small_below else len(patterns) + 1

  def split(spec):
    """Static: (route, positions in the bucket, sub-spec) for every route used."""
    members = {}
    for pos, (path, length) in enumerate(zip(spec.paths, spec.lengths)):
      members.setdefault(route_of(path, length), []).append(pos)
    out = []
    for route in sorted(members):
      pos = members[route]
      out.append((route, tuple(pos), spec.subset(pos)))
    return out

  def init_fn(spec):
    return tuple(routes[r].init(sub) for r, _, sub in split(spec))

  def update_fn(bucket, state, ctx):
    out = [None] * len(bucket.leaves)
    new_states = []
    for (route, pos, sub), sub_state in zip(split(bucket.spec), state):
      sub_bucket = bucket.subset(pos, sub)
      reduced, new = routes[route].update(sub_bucket, sub_state, ctx)
      for p, leaf in zip(pos, to_leaves(reduced, sub_bucket)):
        out[p] = leaf.astype(bucket.dtype)
      new_states.append(new)
    return tuple(out), tuple(new_states)

  def wire_fn(spec, world):
    costs = [wire_cost(routes[r], sub, world) for r, _, sub in split(spec)]
    return WireCost(sum(c.bytes for c in costs), sum(c.collectives for c in costs))

  return CommHook(init_fn, update_fn, wire_fn)
