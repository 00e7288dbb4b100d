"""``sync_gradients``: plan -> pack -> hook -> unpack, as an optax transformation."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from ddp_jax import _pack
from ddp_jax._plan import ORDERS, BucketPlan, bucket_limits, is_communicated, plan_buckets
from ddp_jax.hooks._base import CommHook, GradBucket, HookContext
from ddp_jax.hooks.default import allreduce


@dataclasses.dataclass(frozen=True)
class SyncState:
  """State of :func:`sync_gradients`.

  Attributes:
    hook_states: one hook state per bucket. Every array in it is *per replica*
      and carries a leading axis of local size 1 (global size: the number of
      replicas under ``shard_map``); use :func:`state_specs` for its specs.
    signature: static ``(path, shape, dtype)`` of the gradient leaves seen at
      ``init`` (dtype ``None`` for leaves that are not communicated).
  """

  hook_states: tuple
  signature: tuple = dataclasses.field(default=(), metadata=dict(static=True))


jax.tree_util.register_dataclass(
    SyncState, data_fields=["hook_states"], meta_fields=["signature"])


def _signature(plan: BucketPlan) -> tuple:
  return tuple(
      (path, shape, dtype.name if is_communicated(jax.ShapeDtypeStruct(shape, dtype)) else None)
      for path, shape, dtype in zip(plan.leaf_paths, plan.leaf_shapes, plan.leaf_dtypes))


def _hook_name(hook: CommHook) -> str:
  name = getattr(hook.update, "__qualname__", None) or repr(hook.update)
  return name.split(".<locals>")[0]


def _axis_size(axis_name) -> int:
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  size = 1
  for name in names:
    try:
      size *= lax.axis_size(name)
    except NameError:
      raise ValueError(
          f"sync_gradients: axis {name!r} is not bound here. The update must run "
          f"inside a mapped function that names it, e.g. "
          f"jax.shard_map(step, mesh=mesh, in_specs=..., out_specs=...) over a "
          f"Mesh with axis {name!r}, or jax.pmap(step, axis_name={name!r}). "
          f"If the step already runs mapped, check the axis name for a typo."
      ) from None
  return size


def _check_axis_name(axis_name) -> None:
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  if not names or any(not isinstance(n, str) or not n for n in names):
    raise TypeError(
        f"axis_name must be a mesh axis name or a tuple of them, got {axis_name!r}.")


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


def _per_replica(state):
  return jax.tree.map(lambda x: jnp.expand_dims(x, 0), state)


def _local(state):
  return jax.tree.map(lambda x: x[0], state)


def _as_leaves(reduced, bucket: GradBucket, hook: CommHook) -> tuple:
  where = f"hook {_hook_name(hook)} on bucket {bucket.index} ({bucket.paths[0]} ...)"
  if hasattr(reduced, "shape") and hasattr(reduced, "dtype"):
    if tuple(reduced.shape) != (bucket.size,) or reduced.dtype != bucket.dtype:
      raise ValueError(
          f"{where} returned an array of {reduced.dtype}{list(reduced.shape)}; a flat "
          f"result must be {bucket.dtype.name}[{bucket.size}] (the layout of "
          "bucket.buffer()).")
    return tuple(_pack.split(reduced, bucket.spec))
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


def _check_state(old, new, hook: CommHook, index: int) -> None:
  old_s = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), old)
  new_s = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), new)
  if jax.tree.structure(old) != jax.tree.structure(new) or old_s != new_s:
    raise ValueError(
        f"hook {_hook_name(hook)} on bucket {index} returned a state that does not "
        f"match the one it was given: {new_s} vs {old_s}. A hook must keep its "
        "state's structure, shapes and dtypes.")


def sync_gradients(
    axis_name,
    *,
    hook: CommHook | None = None,
    bucket_cap_mb: float = 25,
    first_bucket_cap_mb: float = 1,
    order: str = "reverse",
    bucket_indices: Sequence[Sequence[int]] | None = None,
    bucket_caps_mb: Sequence[float] | None = None,
    pack: str = "auto",
    ravel_below_bytes: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Averages gradients across ``axis_name`` in DDP-style buckets.

  The gradient tree is planned into buckets by dtype and byte cap
  (:func:`plan_buckets`), each bucket is packed and handed to ``hook``
  (default :func:`ddp_jax.hooks.allreduce`: divide by world size, ``psum``),
  and the results are unpacked into a tree like the input. Use it inside
  ``jax.shard_map`` or ``jax.pmap``, first in an optax chain.

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
      process, 1 MiB across processes (measured, see the README).

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
  _check_axis_name(axis_name)
  hook = allreduce() if hook is None else hook
  if not (isinstance(hook, tuple) and len(hook) == 2 and all(map(callable, hook))):
    raise TypeError(
        f"hook must be a CommHook(init, update), e.g. ddp_jax.hooks.allreduce(); "
        f"got {hook!r}.")
  if order not in ORDERS:
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}.")
  if pack not in _pack.PACK_MODES:
    raise ValueError(f"pack must be one of {_pack.PACK_MODES}, got {pack!r}.")
  if ravel_below_bytes is not None and (
      not isinstance(ravel_below_bytes, int) or ravel_below_bytes < 0):
    raise ValueError(
        f"ravel_below_bytes must be a non-negative int, got {ravel_below_bytes!r}.")
  bucket_limits(bucket_cap_mb, first_bucket_cap_mb, bucket_caps_mb)  # validates the caps
  plan_kwargs = dict(bucket_cap_mb=bucket_cap_mb, first_bucket_cap_mb=first_bucket_cap_mb,
                     order=order, bucket_indices=bucket_indices, bucket_caps_mb=bucket_caps_mb)

  def init_fn(params):
    plan = plan_buckets(params, **plan_kwargs)
    states = tuple(_per_replica(hook.init(spec)) for spec in plan.buckets)
    return SyncState(states, _signature(plan))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    if not isinstance(state, SyncState):
      raise TypeError(
          f"sync_gradients: state must be the SyncState made by init, got "
          f"{type(state).__name__}.")
    plan = plan_buckets(updates, **plan_kwargs)
    if _signature(plan) != state.signature:
      raise ValueError(
          "sync_gradients: the gradient tree differs from the tree seen at init "
          f"({_first_difference(state.signature, _signature(plan))}). Call init "
          "with params shaped like the gradients.")
    size = _axis_size(axis_name)
    ctx = HookContext(axis_name=axis_name, axis_size=size)
    leaves = jax.tree_util.tree_leaves(updates)
    out = list(leaves)
    new_states = []
    for spec, hook_state in zip(plan.buckets, state.hook_states):
      bucket = GradBucket(spec, [leaves[i] for i in spec.leaf_indices],
                          _pack.operand_groups(spec, pack, ravel_below_bytes),
                          spec.index == plan.num_buckets - 1)
      local = _local(hook_state)
      with jax.named_scope(f"ddp_bucket{spec.index}"):
        reduced, new_local = hook.update(bucket, local, ctx)
      _check_state(local, new_local, hook, spec.index)
      for i, leaf in zip(spec.leaf_indices, _as_leaves(reduced, bucket, hook)):
        out[i] = leaf
      new_states.append(_per_replica(new_local))
    return (jax.tree_util.tree_unflatten(plan.treedef, out),
            SyncState(tuple(new_states), state.signature))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def state_specs(state: Any, axis_name) -> Any:
  """``PartitionSpec``s for an optimizer state under ``jax.shard_map``.

  Per-replica arrays (inside a :class:`SyncState`'s hook states) get
  ``P(axis_name)`` on their leading axis; everything else is replicated,
  ``P()``. Works on any optax state that contains ``SyncState``s (chains,
  ``MultiSteps``, ``masked``) and on abstract states from ``jax.eval_shape``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, ddp_jax
    >>> tx = optax.chain(ddp_jax.sync_gradients("data"), optax.sgd(0.1))
    >>> specs = ddp_jax.state_specs(tx.init({"w": jnp.zeros(3)}), "data")
  """
  _check_axis_name(axis_name)
  per_replica = P(axis_name)

  def spec(node):
    if isinstance(node, SyncState):
      return SyncState(jax.tree.map(lambda _: per_replica, node.hook_states), node.signature)
    return P()

  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, SyncState))


def init_state(tx: optax.GradientTransformation, params: Any, mesh: jax.sharding.Mesh,
               axis_name) -> Any:
  """Runs ``tx.init`` on every replica of ``mesh`` and returns a state laid out
  for a ``jax.shard_map`` step with ``state_specs(state, axis_name)``.

  ``params`` are replicated (``P()``) across the mesh.
  """
  specs = state_specs(jax.eval_shape(tx.init, params), axis_name)
  params = replicate(params, mesh)
  fn = jax.shard_map(tx.init, mesh=mesh, in_specs=(P(),), out_specs=specs)
  return jax.jit(fn)(params)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """``device_put`` every leaf fully replicated (``P()``) over ``mesh``."""
  return jax.device_put(tree, jax.sharding.NamedSharding(mesh, P()))


def shard(tree: Any, mesh: jax.sharding.Mesh, axis_name) -> Any:
  """``device_put`` every leaf split along its leading axis over ``axis_name``."""
  return jax.device_put(tree, jax.sharding.NamedSharding(mesh, P(axis_name)))
