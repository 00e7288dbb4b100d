"""Per-replica state: its layout convention, its shard_map specs, and array placement.

Some optimizer state differs per replica (error-feedback residuals, locally
accumulated gradients). Such arrays carry a leading replica axis of local size
1: under ``jax.shard_map`` with ``P(axis)`` their global shape is
``(replicas, *local_shape)``; under ``jax.pmap`` every device holds ``(1, ...)``.
State classes declare which of their fields are per replica with
:func:`register_per_replica`; :func:`state_specs` then gives those ``P(axis)``
and everything else ``P()``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddp_jax import _faults
from ddp_jax._axes import check_axis_name
from ddp_jax._validate import check_int

# class -> (per-replica field names, whether the fields carry the leading replica axis)
_PER_REPLICA: dict[type, tuple[tuple[str, ...], bool]] = {}


def register_per_replica(cls: type, fields: tuple[str, ...], leading_axis: bool = True):
  """Declares ``fields`` of state class ``cls`` per replica (see module docstring)."""
  _PER_REPLICA[cls] = (tuple(fields), leading_axis)
  return cls


# States whose per-replica arrays resize_state may rebuild (hook states: residuals and
# replica-equal arrays); the others (local gradient sums) must be zero to resize.
RESIZABLE: set[type] = set()

# States of transformations that communicate (sync_gradients): a per-replica decision
# around them (optax.apply_if_finite) would run their collectives on some replicas only.
COMMUNICATING: set[type] = set()


def _check_collective_decisions(state: Any) -> None:
  is_guard = lambda x: isinstance(x, optax.ApplyIfFiniteState)  # noqa: E731
  for node in jax.tree.leaves(state, is_leaf=is_guard):
    if is_guard(node) and any(type(x) in COMMUNICATING for x in jax.tree.leaves(
        node.inner_state, is_leaf=lambda x: type(x) in COMMUNICATING)):
      raise ValueError(
          "optax.apply_if_finite wraps ddp_jax.sync_gradients: each replica would decide "
          "alone, from its own gradients, whether to run the sync, so a non-finite "
          "gradient on one replica skips the all-reduce there only (a type error under "
          "shard_map, a hang under pmap). Put the check after the sync, where every "
          "replica sees the same averaged gradients: optax.chain(ddp_jax.sync_gradients"
          "(axis, ...), optax.apply_if_finite(opt, max_consecutive_errors)).")


# optax.MultiSteps accumulates each replica's own gradients, without a replica axis.
register_per_replica(optax.MultiStepsState, ("acc_grads",), leading_axis=False)


def expand(tree):
  """Local per-replica state -> stored form (leading axis of size 1)."""
  return jax.tree.map(lambda x: jnp.expand_dims(x, 0), tree)


def squeeze(tree):
  """Stored per-replica state -> local form."""
  return jax.tree.map(lambda x: x[0], tree)


def state_specs(state: Any, axis_name) -> Any:
  """``PartitionSpec``s for an optimizer state under ``jax.shard_map``.

  Per-replica arrays (a :class:`~ddp_jax.SyncState`'s hook states, the local
  sums of :func:`~ddp_jax.accumulate` and of ``optax.MultiSteps``) get
  ``P(axis_name)``; everything else is replicated, ``P()``. Works on any optax
  state (chains, ``masked``, ``MultiSteps``) and on abstract states from
  ``jax.eval_shape``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, ddp_jax
    >>> tx = optax.chain(ddp_jax.sync_gradients("data"), optax.sgd(0.1))
    >>> specs = ddp_jax.state_specs(tx.init({"w": jnp.zeros(3)}), "data")
  """
  check_axis_name(axis_name)
  _check_collective_decisions(state)
  per_replica = P(axis_name)

  def field_spec(cls, name, value, leading_axis):
    def leaf(path, x):
      if not leading_axis and jnp.ndim(x) == 0:
        raise ValueError(
            f"state_specs: {cls.__name__}.{name}{jax.tree_util.keystr(path)} is a per-replica "
            "scalar with no axis to shard over; use ddp_jax.accumulate(tx, k) instead of "
            "optax.MultiSteps for trees with scalar leaves.")
      return per_replica
    return jax.tree_util.tree_map_with_path(leaf, value)

  def spec(node):
    cls = type(node)
    if cls in _PER_REPLICA:
      fields, leading_axis = _PER_REPLICA[cls]
      children = {}
      for name in _field_names(node):
        value = getattr(node, name)
        if name in fields:
          children[name] = field_spec(cls, name, value, leading_axis)
        else:
          children[name] = state_specs(value, axis_name)
      return _replace(node, children)
    return P()

  return jax.tree.map(spec, state, is_leaf=lambda x: type(x) in _PER_REPLICA)


def _field_names(node) -> tuple[str, ...]:
  if hasattr(node, "_fields"):  # NamedTuple
    return node._fields
  return tuple(f.name for f in node.__dataclass_fields__.values()
               if not f.metadata.get("static"))


def _replace(node, children):
  if hasattr(node, "_replace"):
    return node._replace(**children)
  import dataclasses
  return dataclasses.replace(node, **children)


def init_state(tx: optax.GradientTransformation | Any, params: Any, mesh: jax.sharding.Mesh,
               axis_name) -> Any:
  """Runs ``tx.init`` on every replica of ``mesh``; returns a state laid out for a
  ``jax.shard_map`` step with ``state_specs(state, axis_name)``.

  ``params`` are replicated (``P()``) across the mesh first. ``tx`` may also be any
  function ``init(params) -> state`` whose state holds optax states, e.g. flax NNX's
  ``lambda model: nnx.Optimizer(model, tx, wrt=nnx.Param)`` (per-replica hook state
  then gets its replica axis like any other).
  """
  init = tx.init if callable(getattr(tx, "init", None)) else tx
  if not callable(init):
    raise TypeError(f"init_state: tx must be an optax transformation or a function "
                    f"init(params) -> state, got {tx!r}.")
  if jax.process_count() > 1:  # the same tree on every process, before any collective
    _faults.agree("init_state", [_faults.tree_fingerprint(params)])
  specs = state_specs(jax.eval_shape(init, params), axis_name)
  fn = jax.shard_map(init, mesh=mesh, in_specs=(P(),), out_specs=specs)
  return jax.jit(fn)(replicate(params, mesh))


def place(tree: Any, shardings: Any) -> Any:
  """Puts every leaf of ``tree`` on its sharding (a tree of ``Sharding``s, or one).

  Arrays already placed so are kept; in one process this is ``jax.device_put``. Across
  processes, host values (numpy, uncommitted arrays) are placed from each process's
  own copy with ``jax.make_array_from_callback``: nothing crosses the network, where
  ``jax.device_put`` would gather every array from every process to check they are
  equal (N x the tree's bytes on every link). The equality check is kept, as
  digests: :func:`~ddp_jax.verify_replicas` with ``check_values`` (16 bytes a leaf).
  """
  import numpy as np
  multi = jax.process_count() > 1

  def from_host(x, sharding) -> bool:  # placed from this process's copy, no gather
    if not multi or sharding.is_fully_addressable:
      return False
    if isinstance(x, jax.Array) and (x.sharding.is_equivalent_to(sharding, x.ndim)
                                     or not x.is_fully_addressable):
      return False  # placed already, or a global array (resharded, nothing to check)
    return not (hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended))

  is_sharding = lambda s: isinstance(s, jax.sharding.Sharding)  # noqa: E731
  leaves, treedef = jax.tree.flatten(tree)
  per_leaf = treedef.flatten_up_to(jax.tree.map(
      lambda sharding, sub: jax.tree.map(lambda _: sharding, sub), shardings, tree,
      is_leaf=is_sharding))
  # One host copy per leaf placed from the host: checked by digest, then placed from.
  values = [np.asarray(x) if from_host(x, s) else None for x, s in zip(leaves, per_leaf)]
  if any(v is not None for v in values):  # the same values on every process
    from ddp_jax._distributed import verify_replicas
    verify_replicas(treedef.unflatten(values), check_values=True)

  def one(x, sharding, value):
    if value is not None:
      return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
      return x
    return jax.device_put(x, sharding)

  return treedef.unflatten([one(*z) for z in zip(leaves, per_leaf, values)])


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Every leaf fully replicated (``P()``) over ``mesh`` (see :func:`place`: across
  processes, from each process's own copy, checked equal by digest)."""
  return place(tree, NamedSharding(mesh, P()))


def shard(tree: Any, mesh: jax.sharding.Mesh, axis_name) -> Any:
  """Every leaf split along its leading axis over ``axis_name`` (each process must
  hold the same global array; see :func:`place`)."""
  return place(tree, NamedSharding(mesh, P(axis_name)))


def resize_state(state: Any, num_replicas: int) -> Any:
  """An optimizer state saved with N replicas, laid out for ``num_replicas``.

  For resuming a checkpoint on another number of devices. Per-replica arrays
  (leading replica axis) are rebuilt host-side: error-feedback residuals (any
  leaf whose path names ``residual``) become the mean of the saved ones on every
  new replica, which keeps what they add to the averaged gradient
  (``sum(r) / N``); every other per-replica array (PowerSGD's Q, step counters,
  keys) is replica 0's, which equals the others'. Locally accumulated gradients
  (:func:`accumulate`, ``optax.MultiSteps``) cannot be split: resize at an
  accumulation boundary (they are zero there). Replicated state is unchanged.

  Examples:
    >>> import jax.numpy as jnp, optax, ddp_jax
    >>> tx = ddp_jax.sync_gradients("data", hook=ddp_jax.hooks.topk(0.5))
    >>> state = ddp_jax.resize_state(tx.init({"w": jnp.zeros(4)}), 3)
    >>> state.hook_states[0].residual.shape
    (3, 4)
  """
  import numpy as np
  check_int(num_replicas, 1, "resize_state: num_replicas")

  def resized(cls, name, value, leading_axis):
    def leaf(path, x):
      where = f"{cls.__name__}.{name}{jax.tree_util.keystr(path)}"
      x = np.asarray(x)
      if not leading_axis or cls not in RESIZABLE:
        if np.any(x):
          raise ValueError(
              f"resize_state: {where} holds gradients accumulated on each replica, which "
              "cannot be split between another number of replicas; save and resize at an "
              "accumulation boundary (every k-th step), where it is zero.")
        if not leading_axis:
          return x
        return np.zeros((num_replicas, *x.shape[1:]), x.dtype)
      if x.ndim == 0:
        raise ValueError(f"resize_state: {where} has no replica axis.")
      if "residual" in jax.tree_util.keystr(path):
        mean = x.astype(np.float64).mean(axis=0) if x.dtype.kind == "f" else x[0]
        row = np.asarray(mean).astype(x.dtype)
      else:
        row = x[0]
      return np.broadcast_to(row, (num_replicas, *x.shape[1:])).copy()
    return jax.tree_util.tree_map_with_path(leaf, value)

  def node(x):
    cls = type(x)
    if cls not in _PER_REPLICA:
      return x
    fields, leading_axis = _PER_REPLICA[cls]
    children = {}
    for name in _field_names(x):
      value = getattr(x, name)
      children[name] = (resized(cls, name, value, leading_axis) if name in fields
                        else resize_state(value, num_replicas))
    return _replace(x, children)

  return jax.tree.map(node, state, is_leaf=lambda x: type(x) in _PER_REPLICA)
