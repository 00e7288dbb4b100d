"""``sync_gradients``: plan -> pack -> hook -> unpack, as an optax transformation."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from ddp_jax import _axes, _faults, _pack, _replica
from ddp_jax._config import InvariantGrads, Order, Pack, SyncConfig
from ddp_jax._plan import BucketPlan, is_communicated, plan_buckets
from ddp_jax.hooks._protocol import CommHook, GradBucket, HookContext, hook_config
from ddp_jax.hooks._wire import allreduce_bytes, wire_cost
from ddp_jax.hooks.default import allreduce


class SyncStats(NamedTuple):
  """Per-step counters a training loop can log (replicated scalars).

  Bytes are what one replica sends per step under the ring algorithms (an
  all-reduce of B bytes sends 2 (N-1)/N B), as float32 (7 digits).
  """

  steps: jax.Array  # int32: updates synced so far
  participating: jax.Array  # int32: replicas that took part in the last step
  buckets: jax.Array  # int32
  collectives: jax.Array  # int32: collective calls per step
  bytes_sent: jax.Array  # float32: bytes one replica sends (ring algorithms)
  bytes_uncompressed: jax.Array  # float32: what an all-reduce of the buckets would send
  compression_ratio: jax.Array  # float32: uncompressed / sent (inf when nothing is sent)


@dataclasses.dataclass(frozen=True)
class SyncState:
  """State of :func:`sync_gradients`.

  Attributes:
    hook_states: one hook state per bucket. Every array in it is *per replica*
      and carries a leading axis of local size 1 (global size: the number of
      replicas under ``shard_map``); use :func:`state_specs` for its specs.
    signature: static ``(path, shape, dtype)`` of the gradient leaves seen at
      ``init`` (dtype ``None`` for leaves that are not communicated).
    tag: ``int32[buckets]``, a digest of the hook's configuration and each
      bucket's layout: a checkpointed state restored into another hook or
      layout is refused (at restore with ``flax.serialization``, at the first
      step otherwise) instead of being reused.
  """

  hook_states: tuple
  stats: SyncStats
  signature: tuple = dataclasses.field(default=(), metadata=dict(static=True))
  tag: Any = None  # int32[buckets]: which hook, configured how, made each bucket state
  # Static: set on the state data_parallel hands to its warm-up program (see ``_phase``);
  # part of the input's structure, so every jit cache keys on it. Updates keep it (a
  # cond's branches return the same structure); data_parallel clears it on the result.
  warm_up: bool = dataclasses.field(default=False, metadata=dict(static=True))


jax.tree_util.register_dataclass(
    SyncState, data_fields=["hook_states", "stats", "tag"],
    meta_fields=["signature", "warm_up"])
_replica.register_per_replica(SyncState, ("hook_states",))
_replica.COMMUNICATING.add(SyncState)
_replica.RESIZABLE.add(SyncState)


def _register_flax_serialization() -> None:
  """Lets ``flax.serialization`` (msgpack checkpoints) save and restore a SyncState, when
  flax is installed (it is optional: nothing else here needs it)."""
  try:
    from flax import serialization
  except ImportError:
    return

  def to_dict(state):
    return {"hook_states": serialization.to_state_dict(state.hook_states),
            "stats": serialization.to_state_dict(state.stats),
            "tag": serialization.to_state_dict(state.tag)}

  def from_dict(target, d):
    if "tag" in d and target.tag is not None:  # (checkpoints from before tags: no check)
      check_tag(np.asarray(d["tag"]), np.asarray(target.tag), "restoring a checkpoint")
    _check_replicas(d["hook_states"], target.hook_states)
    return SyncState(serialization.from_state_dict(target.hook_states, d["hook_states"]),
                     serialization.from_state_dict(target.stats, d["stats"]),
                     target.signature,
                     serialization.from_state_dict(target.tag, d.get("tag", target.tag)))

  serialization.register_serialization_state(SyncState, to_dict, from_dict, override=True)


_register_flax_serialization()


def _tag(plan: BucketPlan, hook: CommHook) -> np.ndarray:
  import hashlib
  config = hook_config(hook)
  return np.array([int.from_bytes(hashlib.blake2b(
      f"{config}|{b.dtype}|{b.size}|{list(b.leaf_indices)}".encode(), digest_size=4).digest(),
      "little", signed=True) for b in plan.buckets], np.int32)


def check_tag(saved: np.ndarray, expected: np.ndarray, when: str) -> None:
  """Raises if a state's tag is not the one this sync's hook and plan give."""
  saved = np.asarray(saved).reshape(-1, *np.shape(expected))  # pmap: one row per device
  if saved.shape[1:] != np.shape(expected) or not (saved == expected).all():
    raise ValueError(
        f"sync_gradients: {when}: the sync state was made by another hook, hook "
        f"configuration or bucket layout than this sync's ({len(np.ravel(expected))} "
        "buckets). Its error-feedback residuals or PowerSGD matrices would be reused by the "
        "wrong hook. Restore it into the transformation that saved it, or start this hook's "
        "state afresh from tx.init (or ddp_jax.init_state).")


def _check_replicas(saved_states, target_states) -> None:
  """A checkpoint saved with another number of replicas: say so, and how to resize."""
  from flax import serialization
  saved = jax.tree.leaves(saved_states)
  target = jax.tree.leaves(serialization.to_state_dict(target_states))
  for a, b in zip(saved, target):
    if np.ndim(a) and np.ndim(b) and np.shape(a)[1:] == np.shape(b)[1:] \
        and np.shape(a)[0] != np.shape(b)[0]:
      raise ValueError(
          f"sync_gradients: restoring a checkpoint: its hook state was saved with "
          f"{np.shape(a)[0]} replicas, this state has {np.shape(b)[0]}. Resize it first: "
          "state = ddp_jax.resize_state(saved_state, num_replicas) (error-feedback "
          "residuals keep their mean; other hook state comes from replica 0).")


def _signature(plan: BucketPlan) -> tuple:
  return tuple(
      (path, shape, dtype.name if is_communicated(jax.ShapeDtypeStruct(shape, dtype)) else None)
      for path, shape, dtype in zip(plan.leaf_paths, plan.leaf_shapes, plan.leaf_dtypes))


def fingerprint(plan: BucketPlan, hook: CommHook, axis_name, size, settings: dict) -> dict:
  """What a sync runs, as JSON-able text equal on processes that run the same thing:
  its settings, hook configuration, gradient leaves and bucket layout."""
  return {"axis": f"{axis_name!r}" + (f" ({size} replicas)" if size else ""),
          **{k: repr(v) for k, v in settings.items()}, "hook": hook_config(hook),
          "leaves": [f"{path} {dtype or 'not communicated'}{list(shape)}"
                     for path, shape, dtype in _signature(plan)],
          "buckets": [list(b.leaf_indices) for b in plan.buckets]}


def _hook_name(hook: CommHook) -> str:
  name = getattr(hook.update, "__qualname__", None) or repr(hook.update)
  return name.split(".<locals>")[0]


def _first_difference(seen: tuple, now: tuple) -> str:
  for i in range(max(len(seen), len(now))):
    a = seen[i] if i < len(seen) else None
    b = now[i] if i < len(now) else None
    if a != b:
      return (f"first difference at leaf {i}: at init {_describe(a)}, "
              f"at update {_describe(b)}")
  return "no difference"


def _describe(entry) -> str:
  if entry is None:
    return "no such leaf"
  path, shape, dtype = entry
  return f"{path} {dtype or 'not communicated'}{list(shape)}"


def _as_leaves(reduced, bucket: GradBucket, hook: CommHook, split: bool = True):
  """A hook's result checked: a flat bucket-shaped array (split into leaves, unless
  ``split`` is False) or one array per leaf."""
  where = f"hook {_hook_name(hook)} on bucket {bucket.index} ({bucket.paths[0]} ...)"
  if hasattr(reduced, "shape") and hasattr(reduced, "dtype"):
    if tuple(reduced.shape) != (bucket.size,) or reduced.dtype != bucket.dtype:
      raise ValueError(
          f"{where} returned an array of {reduced.dtype}{list(reduced.shape)}; a flat "
          f"result must be {bucket.dtype.name}[{bucket.size}] (the layout of "
          "bucket.buffer()).")
    return tuple(_pack.split(reduced, bucket.spec)) if split else reduced
  if not isinstance(reduced, (tuple, list)) or len(reduced) != len(bucket.leaves):
    raise ValueError(
        f"{where} returned {type(reduced).__name__}"
        f"{'' if not isinstance(reduced, (tuple, list)) else f' of {len(reduced)} items'}; "
        f"expected a 1-D array of {bucket.size} elements or a sequence of "
        f"{len(bucket.leaves)} arrays shaped like bucket.leaves.")
  for path, shape, out in zip(bucket.paths, bucket.shapes, reduced):
    if getattr(out, "shape", None) != shape or getattr(out, "dtype", None) != bucket.dtype:
      got = (f"{out.dtype}{list(out.shape)}" if hasattr(out, "shape")
             else type(out).__name__)
      raise ValueError(
          f"{where} returned {got} for leaf {path}; expected "
          f"{bucket.dtype.name}{list(shape)}.")
  return tuple(reduced)


def _check_restored(spec, hook_state, hook: CommHook) -> None:
  """The state given for a bucket must be what the hook's init makes for it."""
  want = jax.eval_shape(lambda: _replica.expand(hook.init(spec)))
  got_s = jax.tree.map(lambda x: (tuple(jnp.shape(x)), jnp.result_type(x)), hook_state)
  want_s = jax.tree.map(lambda x: (tuple(x.shape), x.dtype), want)
  if jax.tree.structure(hook_state) != jax.tree.structure(want) or got_s != want_s:
    raise ValueError(
        f"sync_gradients: the hook state of bucket {spec.index} ({spec.paths[0]} ...) does "
        f"not match this plan and hook {_hook_name(hook)}: expected {want_s}, got {got_s}. "
        "Was the state restored from another model or made with another hook?")


def _check_state(old, new, hook: CommHook, index: int) -> None:
  old_s = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), old)
  new_s = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), new)
  if jax.tree.structure(old) != jax.tree.structure(new) or old_s != new_s:
    raise ValueError(
        f"hook {_hook_name(hook)} on bucket {index} returned a state that does not "
        f"match the one it was given: {new_s} vs {old_s}. A hook must keep its "
        "state's structure, shapes and dtypes.")


def _checked_tag(tag, expected: np.ndarray):
  """The state's tag, carried along. Compared on the host, not here: at restore by
  ``flax.serialization``, and by the ``data_parallel`` step on its first call (a check
  inside the program would need a host callback, and jax does not cache programs with
  one in its persistent compilation cache)."""
  if tag is None or np.shape(tag) != expected.shape:
    raise ValueError(
        "sync_gradients: the state has no tag for this plan's "
        f"{expected.size} buckets; it was not made by this sync's init.")
  return tag


def _check_participating(participating):
  """This replica's weight (int32 >= 0) from a bool flag or an integer weight."""
  flag = jnp.asarray(participating)
  if flag.shape != () or not (flag.dtype == jnp.bool_ or jnp.issubdtype(flag.dtype, jnp.integer)):
    raise ValueError(
        f"sync_gradients: participating must be this replica's scalar flag (a bool, True "
        f"while it still has data) or integer weight, got {flag.dtype}{list(flag.shape)}. "
        "Inside shard_map, pass the local element, e.g. has_data[0] of a P(axis)-sharded "
        "array.")
  return jnp.maximum(flag.astype(jnp.int32), 0)


def _per_replica(leaves: list, plan: BucketPlan, axis_name, size: int, invariant_grads: str,
                 participating) -> list:
  """Under shard_map with check_vma: gradients must vary over the axis (see _axes).

  An invariant leaf was already reduced by autodiff (jax.grad of a replicated
  parameter sums over the axis): reducing it again would give N times the mean.
  """
  if not _axes.checks_vma(axis_name):
    return leaves  # pmap, vmap, check_vma=False: no types to read
  bad = {i: _axes.invariant_over(leaves[i], axis_name)
         for b in plan.buckets for i in b.leaf_indices}
  bad = {i: axes for i, axes in bad.items() if axes}
  if not bad:
    return leaves
  names = [plan.leaf_paths[i] for i in sorted(bad)]
  listed = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
  axes = sorted({a for v in bad.values() for a in v})
  if invariant_grads == "error":
    raise ValueError(
        f"sync_gradients: {len(names)} gradient leaves are not per replica over "
        f"{', '.join(map(repr, axes))}: {listed}. They are typed invariant (the same on "
        "every replica), which is what jax.grad of a replicated (P()) parameter against "
        "per-replica data returns under shard_map: autodiff has already summed it over "
        "the axis, so averaging it again would give N times the gradient (and the compiled "
        "step would all-reduce it twice). Differentiate per-replica copies instead: "
        f"loss, grads = ddp_jax.value_and_grad(loss_fn, {axis_name!r})(params, batch) "
        f"(or jax.grad(loss_fn)(jax.lax.pcast(params, {axis_name!r}, to='varying'), "
        "batch)). If these leaves really are sums over the replicas, pass "
        "sync_gradients(..., invariant_grads='summed').")
  partial = [plan.leaf_paths[i] for i, a in bad.items()
             if len(a) != len(_axes.axis_names(axis_name))]
  if partial:
    raise ValueError(
        f"sync_gradients: leaf {partial[0]} varies over some of the axes "
        f"{axis_name!r} but not all; invariant_grads='summed' takes a leaf invariant over "
        "every axis as a sum over all of them. Differentiate per-replica copies "
        f"(ddp_jax.value_and_grad(loss_fn, {axis_name!r})).")
  if participating is not None:
    raise ValueError(
        f"sync_gradients: invariant_grads='summed' cannot honour participating=: leaves "
        f"{listed} were summed by autodiff over every replica, idle ones included. "
        f"Differentiate per-replica copies (ddp_jax.value_and_grad(loss_fn, {axis_name!r})).")
  out = list(leaves)
  for i in bad:  # the mean of the replicas' gradients, as a per-replica value
    out[i] = _axes.to_varying(leaves[i] / jnp.asarray(size, leaves[i].dtype), axis_name)
  return out


def _all_finite(leaves) -> jax.Array:
  """No NaN or Inf in any leaf. (``sum(x * 0) == 0`` is exact too and compiles in a third
  of the time on XLA:CPU, but kept top-k's bucket alive 1x longer, on the hook's input
  and on its result alike.)"""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _bucket_finite(bucket) -> jax.Array:
  if "_buffer" in vars(bucket):  # the hook raveled the bucket: check that, once
    try:
      return _all_finite([bucket.buffer()])
    except jax.errors.UnexpectedTracerError:  # raveled inside a cond or loop of its own
      pass
  return _all_finite(bucket.leaves)


def _never(reduced, spec, groups) -> jax.Array | None:
  """A scalar bool that reads one element of each operand of a bucket's result and is
  False for every value they can hold (NaN and Inf included): a popcount sum above the
  total bit width. None for a result without elements."""
  if isinstance(reduced, tuple):
    picks = [reduced[g[0]].reshape(-1)[:1] for g in groups]
  else:
    picks = [lax.dynamic_slice_in_dim(reduced, spec.offsets[g[0]], 1) for g in groups]
  picks = [jnp.real(x) if jnp.iscomplexobj(x) else x for x in picks if x.size]
  if not picks:
    return None
  count = jnp.zeros((), jnp.uint32)
  for x in picks:
    bits = lax.bitcast_convert_type(x[0], jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    count = count + lax.population_count(bits).astype(jnp.uint32)
  return count > sum(8 * x.dtype.itemsize for x in picks)


def _after(leaves: list, groups, never) -> list:
  """``leaves`` unchanged, but computed after ``never`` (from the previous bucket's result).

  Without a data dependency XLA merges the all-reduces of every bucket into one variadic
  all-reduce (its all-reduce combiner merges collectives that do not depend on each
  other) and schedules it after the whole backward pass, so no bucket could be sent
  while later gradients are still being computed. Here one element of one leaf per
  operand goes through ``select(never, 0, x)``: the values stay exact, and the bucket's
  collectives can start as soon as its own gradients and the previous bucket's
  collectives are done (DDP's bucket order).
  """
  out = list(leaves)
  for group in groups:
    sized = [j for j in group if out[j].size]
    if not sized:
      continue
    j = min(sized, key=lambda j: out[j].size)
    leaf = out[j]
    corner = lax.slice(leaf, (0,) * leaf.ndim, (1,) * leaf.ndim)
    out[j] = lax.dynamic_update_slice(
        leaf, jnp.where(never, jnp.zeros_like(corner), corner), (0,) * leaf.ndim)
  return out


def _nonfinite_policy(finite, old_state, new_state, reduced):
  """A step whose gradients held a NaN or Inf on any replica (``finite`` is False on every
  replica alike) leaves the hook state exactly as it was: an error-feedback residual,
  PowerSGD's Q, counters and keys are not poisoned, and later steps equal a run that
  never saw this one. The result stays non-finite, as DDP's all-reduce propagates it (so
  ``optax.apply_if_finite`` and loss scaling see it): a hook whose output came out all
  finite anyway (a quantizer, a sparsifier that did not pick the NaN) returns NaN."""
  state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, old_state)
  flat = not isinstance(reduced, tuple)  # one check and one select for a flat result
  hid = jnp.logical_and(jnp.logical_not(finite), _all_finite([reduced] if flat else reduced))
  nan = lambda x: jnp.where(hid, jnp.asarray(jnp.nan, x.dtype), x)  # noqa: E731
  return state, (nan(reduced) if flat else tuple(map(nan, reduced)))


def _stats(plan: BucketPlan, hook: CommHook, world: int, steps, participating) -> SyncStats:
  costs = [wire_cost(hook, spec, world) for spec in plan.buckets]
  sent = float(sum(c.bytes for c in costs))
  raw = float(sum(allreduce_bytes(spec.nbytes, world) for spec in plan.buckets))
  return SyncStats(
      steps=jnp.asarray(steps, jnp.int32),
      participating=jnp.asarray(participating, jnp.int32),
      buckets=jnp.asarray(plan.num_buckets, jnp.int32),
      collectives=jnp.asarray(sum(c.collectives for c in costs), jnp.int32),
      bytes_sent=jnp.asarray(sent, jnp.float32),
      bytes_uncompressed=jnp.asarray(raw, jnp.float32),
      compression_ratio=jnp.asarray(raw / sent if sent else np.inf, jnp.float32))


_LOGGED: set = set()


CHAIN_MODES = ("0", "1")


def _chained() -> bool:
  """Whether bucket k+1 is sent after bucket k's result (``_after``), read at trace time
  from ``DDP_JAX_BUCKET_CHAIN``: ``"0"`` (default) merged, XLA's all-reduce combiner
  groups the buckets as it likes; ``"1"`` chained, one collective group per DDP bucket.

  Measured (docs, *Overlap with the backward pass*): on CPU chaining did not pay
  (``benchmarks/bench_overlap.py``: overhead / communication 0.96-0.97 chained vs
  0.98-0.99 merged at 1 Gbit/s; XLA:CPU runs a collective inline on the thread that
  readied it; 1.28x ``pmean`` in one process with 8 devices). On GPU
  (``benchmarks/bench_overlap_hlo.py``, jax 0.11.2, 8 H100s mocked) XLA overlaps either
  way (asynchronous all-reduces between the backward GEMMs); chained, DDP's bucket order
  leaves 8 instead of 28 MiB after the last GEMM of a 24 x 1024 MLP, for 1-5 s more
  compile time and 0.06-0.15 ms more device time a step (ResNet-50, GPT-2 small on one
  H100): worth it where the link is slow, not measured on several GPUs."""
  mode = os.environ.get("DDP_JAX_BUCKET_CHAIN", "0")
  if mode not in CHAIN_MODES:
    raise ValueError(
        f"DDP_JAX_BUCKET_CHAIN must be one of {CHAIN_MODES}, got {mode!r}.")
  return mode == "1"


def _run_settings(config: SyncConfig) -> dict:
  """The config's settings plus what this process's environment decides at trace time
  (the bucket chain; the "auto" pack threshold, which follows host-memory reuse), so
  processes started differently fail the cross-process check instead of sending
  different operands."""
  return dict(config.settings, bucket_chain=_chained(), auto_pack=_pack.auto_rule())


def _debug_log(plan: BucketPlan, hook: CommHook, axis_name, world: int) -> None:
  """With DDP_JAX_DEBUG=1, prints each new plan once, at trace time."""
  if os.environ.get("DDP_JAX_DEBUG", "") in ("", "0") or (plan, axis_name) in _LOGGED:
    return
  _LOGGED.add((plan, axis_name))
  print(f"[ddp_jax] sync over {axis_name!r} ({world} replicas), hook "
        f"{_hook_name(hook)}:\n{plan.summary(wire=_wire_rows(plan, hook, world))}",
        file=sys.stderr)


def _wire_rows(plan: BucketPlan, hook: CommHook, world: int) -> list[tuple]:
  return [tuple(wire_cost(hook, spec, world)) + (allreduce_bytes(spec.nbytes, world),)
          for spec in plan.buckets]


def sync_gradients(
    axis_name,
    *,
    hook: CommHook | None = None,
    bucket_cap_mb: float = 25,
    first_bucket_cap_mb: float = 1,
    order: Order = "reverse",
    bucket_indices: Sequence[Sequence[int]] | None = None,
    bucket_caps_mb: Sequence[float] | None = None,
    pack: Pack = "auto",
    ravel_below_bytes: int | None = None,
    reduce_dtype: Any = None,
    gradient_predivide_factor: float | None = None,
    invariant_grads: InvariantGrads = "error",
) -> SyncGradients:
  """Averages gradients across ``axis_name`` in DDP-style buckets.

  The gradient tree is planned into buckets by dtype and byte cap
  (:func:`plan_buckets`), each bucket is packed and handed to ``hook``
  (default :func:`ddp_jax.hooks.allreduce`), and the results are unpacked into
  a tree like the input. Use it inside ``jax.shard_map`` or ``jax.pmap``, first
  in an optax chain, on gradients from :func:`ddp_jax.value_and_grad` (per
  replica: under ``shard_map``, ``jax.grad`` of a replicated parameter is
  already summed over the axis, and such gradients are refused, see
  ``invariant_grads``). ``update`` takes the extra argument ``participating``
  (this replica's bool; DDP ``Join``): replicas without data pass False, add
  zeros, and the mean divides by the number of participating replicas. An
  integer weight ``w >= 0`` instead of the bool gives ``sum(g) / sum(w)`` over
  the replicas (gradients summed over ``w`` micro-batches; what
  :func:`ddp_jax.accumulate` passes).

  Args:
    axis_name: the mapped axis (or tuple of mesh axes) to average over.
    hook: a :class:`~ddp_jax.hooks.CommHook`; default ``allreduce()``.
    bucket_cap_mb: cap of each bucket after the first, in MiB.
    first_bucket_cap_mb: cap of the first bucket, in MiB.
    order: ``"reverse"`` (gradient-ready order, DDP's default) or ``"forward"``.
    bucket_indices: explicit buckets (lists of flattened leaf indices).
    bucket_caps_mb: list of per-bucket caps in MiB (DDP ``bucket_cap_mb_list``).
    pack: how a bucket becomes collective operands: ``"ravel"`` (one
      contiguous buffer), ``"variadic"`` (one operand per leaf, no copies) or
      ``"auto"`` (leaves under ``ravel_below_bytes`` share one buffer, larger
      ones go alone; see ``ddp_jax._pack``).
    ravel_below_bytes: the ``"auto"`` threshold; default 64 KiB in a single
      process, 1 MiB across processes (measured, see the docs: Performance).
    reduce_dtype: reduce floating gradients in this dtype and cast the result
      back (DDP ``_MixedPrecision.reduce_dtype``), e.g. ``jnp.float32`` for
      bf16 gradients.
    gradient_predivide_factor: Horovod's f: divide by f before the sum and by
      ``world / f`` after it (against f16 overflow and underflow).
    invariant_grads: what to do, under ``shard_map`` with ``check_vma``, with a
      gradient leaf that is invariant over the axis (identical on every
      replica), i.e. already reduced: ``"error"`` (default) raises, naming the
      leaves and the fix; ``"summed"`` takes it as the sum over the replicas
      that ``jax.grad`` of a replicated parameter returns and divides it by the
      number of replicas (the hook then reduces identical values: correct, but
      the step keeps autodiff's all-reduce besides the hook's).

  Returns:
    An optax ``GradientTransformationExtraArgs``; its state is a
    :class:`SyncState` (see :func:`state_specs` for shard_map).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, ddp_jax
    >>> tx = optax.chain(ddp_jax.sync_gradients("i"), optax.sgd(1.0))
    >>> params = {"w": jnp.zeros((4, 2))}
    >>> grads = {"w": jnp.arange(4.0)[:, None] * jnp.ones((4, 2))}
    >>> def step(p, g):
    ...   updates, _ = tx.update(g, tx.init(p), p)
    ...   return optax.apply_updates(p, updates)
    >>> print(jax.vmap(step, axis_name="i")(params, grads)["w"][0])
    [-1.5 -1.5]
  """
  config = SyncConfig(
      axis_name, allreduce() if hook is None else hook, bucket_cap_mb=bucket_cap_mb,
      first_bucket_cap_mb=first_bucket_cap_mb, order=order, bucket_indices=bucket_indices,
      bucket_caps_mb=bucket_caps_mb, pack=pack, ravel_below_bytes=ravel_below_bytes,
      reduce_dtype=reduce_dtype, gradient_predivide_factor=gradient_predivide_factor,
      invariant_grads=invariant_grads)
  return SyncGradients.of(config)


class SyncGradients(optax.GradientTransformationExtraArgs):
  """The transformation :func:`sync_gradients` returns: an optax
  ``GradientTransformationExtraArgs`` (``init``, ``update``) that also carries its
  :class:`SyncConfig` as ``.config`` (read by :func:`describe` and :func:`verify_sync`).

  Examples:
    >>> import optax, ddp_jax
    >>> sync = ddp_jax.sync_gradients("data")
    >>> isinstance(sync, optax.GradientTransformationExtraArgs), sync.config.order
    (True, 'reverse')
  """

  config: SyncConfig

  @classmethod
  def of(cls, config: SyncConfig) -> SyncGradients:
    init_fn, update_fn = _transformation(config)
    tx = cls(init_fn, update_fn)
    tx.config = config
    return tx


def _transformation(config: SyncConfig):
  """The pure ``init`` and ``update`` functions of a sync configured by ``config``."""
  hook, axis_name = config.hook, config.axis_name

  def init_fn(params):
    plan = config.plan(params)
    states = tuple(_replica.expand(hook.init(spec)) for spec in plan.buckets)
    return SyncState(states, _stats(plan, hook, 1, 0, 0), _signature(plan),
                     jnp.asarray(_tag(plan, hook)))

  def update_fn(updates, state, params=None, participating=None, **extra_args):
    del params, extra_args
    if not isinstance(state, SyncState):
      raise TypeError(
          f"sync_gradients: state must be the SyncState made by init, got "
          f"{type(state).__name__}.")
    original = jax.tree_util.tree_leaves(updates)
    updates = config.cast(updates)
    plan = plan_buckets(updates, **config.plan_kwargs)
    if _signature(plan) != state.signature:
      raise ValueError(
          "sync_gradients: the gradient tree differs from the tree seen at init "
          f"({_first_difference(state.signature, _signature(plan))}). Call init "
          "with params shaped like the gradients.")
    size = _axes.axis_size(axis_name, "sync_gradients")
    _debug_log(plan, hook, axis_name, size)
    chain = _chained()
    _faults.record(dict(fingerprint(plan, hook, axis_name, size, _run_settings(config)),
                        tag=_tag(plan, hook).tolist()))
    if len(state.hook_states) != plan.num_buckets:
      raise ValueError(
          f"sync_gradients: the state holds {len(state.hook_states)} bucket states, the plan "
          f"has {plan.num_buckets} buckets. Was it made with other bucket settings?")
    leaves = _per_replica(jax.tree_util.tree_leaves(updates), plan, axis_name, size,
                          config.invariant_grads, participating)
    sent = [i for spec in plan.buckets for i in spec.leaf_indices]
    # Participation, replica-wide, in one collective: [took part, weight].
    facts = []
    flag = weight = None
    if participating is not None:
      weight = _check_participating(participating)
      flag = weight > 0
      for i in sent:  # an idle replica adds zeros (and nothing non-finite)
        leaves[i] = jnp.where(flag, leaves[i], jnp.zeros_like(leaves[i]))
      facts += [flag.astype(jnp.int32), weight]
    facts = list(lax.psum(jnp.stack(facts), axis_name)) if facts else []
    count = total = None
    if participating is not None:
      count, total = facts
    ctx = HookContext(axis_name, size, flag,
                      None if total is None else jnp.maximum(total, 1),
                      None if config.gradient_predivide_factor is None
                      else float(config.gradient_predivide_factor), weight, state.warm_up)
    out = list(original)
    never = None  # the previous bucket's result, read (see _after)
    done = []  # per bucket: (spec, bucket, old local state, new local state, result)
    for spec, hook_state in zip(plan.buckets, state.hook_states):
      _check_restored(spec, hook_state, hook)
      groups = config.operand_groups(spec)
      mine = [leaves[i] for i in spec.leaf_indices]
      if never is not None and chain:
        mine = _after(mine, groups, never)
      bucket = GradBucket(spec, mine, groups, (config.pack, config.ravel_below_bytes))
      local = _replica.squeeze(hook_state)
      with jax.named_scope(f"ddp_bucket{spec.index}"):
        reduced, new_local = hook.update(bucket, local, ctx)
      _check_state(local, new_local, hook, spec.index)
      reduced = _as_leaves(reduced, bucket, hook, split=False)
      never = _never(reduced, spec, groups) if chain else None
      done.append((spec, bucket, local, new_local, reduced))
    # Stateful hooks: did any replica's gradients hold a NaN or Inf? One collective of
    # one fact, checked on each bucket's raveled buffer when the hook made one (one
    # check per bucket; a check per leaf is a compiled kernel per leaf), else per leaf.
    # The fact's collective waits for every bucket's result (``_never``: always False):
    # with only the inputs to wait for, XLA:CPU's runtime may start it while a bucket's
    # collectives are still to come, in another order on each process (gloo then aborts:
    # "Received data size doesn't match expected size").
    finite = None
    if any(jax.tree.leaves(s) for s in state.hook_states) and sent:
      with jax.named_scope("nonfinite_check"):
        bad = [jnp.logical_not(_bucket_finite(bucket)) for _, bucket, *_ in done]
        bad += [x for x in (_never(reduced, spec, bucket.groups)
                            for spec, bucket, _, _, reduced in done) if x is not None]
        finite = lax.psum(jnp.any(jnp.stack(bad)).astype(jnp.int32), axis_name) == 0
    new_states = []
    for spec, bucket, local, new_local, reduced in done:
      if finite is not None:
        with jax.named_scope("nonfinite_policy"):
          new_local, reduced = _nonfinite_policy(finite, local, new_local, reduced)
      if not isinstance(reduced, tuple):
        reduced = tuple(_pack.split(reduced, bucket.spec))
      for i, leaf in zip(spec.leaf_indices, reduced):
        out[i] = leaf.astype(original[i].dtype)
      new_states.append(_replica.expand(new_local))
    stats = _stats(plan, hook, size, state.stats.steps + 1, size if count is None else count)
    tag = _checked_tag(state.tag, _tag(plan, hook))
    return (jax.tree_util.tree_unflatten(plan.treedef, out),
            SyncState(tuple(new_states), stats, state.signature, tag, state.warm_up))

  return init_fn, update_fn


def describe(plan_or_tx, grads=None, *, hook: CommHook | None = None,
             world_size: int | None = None) -> str:
  """A human table of what a sync sends: buckets, bytes, hook traffic.

  Returns the table as a string (it displays as the table in a REPL; ``print`` it in
  a script).

  Args:
    plan_or_tx: a :class:`BucketPlan`, or the transformation made by
      :func:`sync_gradients` (then ``grads``, a tree of arrays or
      ``jax.ShapeDtypeStruct``, is planned with its settings and hook).
    grads: the gradient tree (for a transformation).
    hook: for a plan, the hook whose traffic to show (default ``allreduce()``).
    world_size: replicas, for hooks whose traffic depends on it (default: all
      devices).

  Examples:
    >>> import jax.numpy as jnp, ddp_jax
    >>> tx = ddp_jax.sync_gradients("data")
    >>> ddp_jax.describe(tx, {"w": jnp.zeros((8, 8))}, world_size=8)
    sync over 'data' with 8 replicas, hook allreduce
    bucket  dtype    leaves  elements  bytes  sent   ratio  calls  first leaf  last leaf
    ...
    per step and replica: 448 B sent in 1 collective call, as many bytes as all-reducing the buckets
  """
  world = jax.device_count() if world_size is None else int(world_size)
  if isinstance(plan_or_tx, BucketPlan):
    plan, hook = plan_or_tx, hook or allreduce()
    head = f"{world} replicas, hook {_hook_name(hook)}\n"
  else:
    if not isinstance(plan_or_tx, SyncGradients):
      raise TypeError(
          "describe: pass a BucketPlan or the transformation returned by "
          f"ddp_jax.sync_gradients (not a chain around it); got {type(plan_or_tx).__name__}.")
    if grads is None:
      raise ValueError("describe: a transformation needs the gradient tree (grads=...).")
    config = plan_or_tx.config
    plan, hook = config.plan(grads), config.hook
    head = (f"sync over {config.axis_name!r} with {world} replicas, hook "
            f"{_hook_name(hook)}\n")
  return Table(head + plan.summary(wire=_wire_rows(plan, hook, world)))


class Table(str):
  """Text that a REPL displays as itself (not as a quoted string with ``\\n``)."""

  def __repr__(self) -> str:
    return str(self)


def verify_sync(tx, grads) -> None:
  """Checks every process plans the same sync: settings, hook, leaves, buckets.

  Collective over processes (call it on all, before the first step). The
  :func:`data_parallel` step does this by itself on its first call; call this
  one when you jit your own ``shard_map`` step. Host-side (the coordination
  service), so a mismatch raises on every process, naming the field and the
  process, instead of hanging or aborting inside a collective.

  Args:
    tx: the transformation made by :func:`sync_gradients`.
    grads: the gradient tree (arrays or ``jax.ShapeDtypeStruct``), e.g. the params.

  Examples:
    >>> import jax.numpy as jnp, ddp_jax
    >>> ddp_jax.verify_sync(ddp_jax.sync_gradients("data"), {"w": jnp.zeros(3)})
  """
  if not isinstance(tx, SyncGradients):
    raise TypeError(
        "verify_sync: pass the transformation returned by ddp_jax.sync_gradients (not a "
        f"chain around it); got {type(tx).__name__}.")
  config = tx.config
  _faults.agree("verify_sync", [fingerprint(config.plan(grads), config.hook, config.axis_name,
                                            None, _run_settings(config))])


def check_state_tags(states: list, records: list) -> None:
  """Host side: each SyncState given to a step was made by the sync that traced there
  (``records``: the syncs' fingerprints, in trace order, with their expected tags)."""
  if len(states) != len(records):
    return  # states not passed in one-to-one (built inside the step, say): nothing to pair
  for state, record in zip(states, records):
    tag = state.tag
    if tag is None or "tag" not in record:
      continue
    if isinstance(tag, jax.Array) and not tag.is_fully_addressable:
      tag = tag.addressable_data(0)
    check_tag(np.asarray(tag), np.asarray(record["tag"], np.int32), "the step's first call")
