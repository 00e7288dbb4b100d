"""Bucket assignment and the static ``BucketPlan``.

Shapes and dtypes only: nothing here traces or copies an array. The plan is
computed from a gradient pytree (arrays or ``jax.ShapeDtypeStruct``) at trace
time, is hashable, and is the single description of which leaf travels in
which bucket, at which offset.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

MiB = 1024 * 1024
Order = Literal["reverse", "forward"]  # "reverse": gradient-ready order, DDP's
ORDERS = get_args(Order)


def _nbytes(leaf: Any) -> int:
  return int(math.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize


def compute_bucket_assignment_by_size(
    leaves: Sequence[Any],
    bucket_size_limits: Sequence[int],
    tensor_indices: Sequence[int] | None = None,
) -> tuple[list[list[int]], list[int]]:
  """Groups leaves into buckets by dtype and byte limits, exactly as DDP does.

  A port of ``compute_bucket_assignment_by_size`` in PyTorch's
  ``reducer.cpp``: leaves are grouped by dtype; within a dtype a bucket closes
  as soon as its byte size reaches the current limit, and the next bucket of
  that dtype uses the next limit (the last limit repeats). Unfinished buckets
  are appended. Without ``tensor_indices`` the buckets are sorted by their
  smallest leaf index; with them, the leaves are taken to be in gradient-ready
  order, ``leaves[i]`` is leaf number ``tensor_indices[i]``, and the order of
  closing is kept (leftover buckets follow in order of their dtype's first
  appearance; PyTorch leaves that order to a hash map).

  Args:
    leaves: arrays or ``jax.ShapeDtypeStruct`` (anything with shape, dtype).
    bucket_size_limits: byte limits, e.g. ``[1 MiB, 25 MiB]``.
    tensor_indices: optional leaf numbers of ``leaves``, in ready order.

  Returns:
    ``(bucket_indices, per_bucket_size_limits)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> leaves = [jax.ShapeDtypeStruct((256,), jnp.float32)] * 3
    >>> compute_bucket_assignment_by_size(leaves, [1024, 2048])
    ([[0], [1, 2]], [1024, 2048])
  """
  if not len(leaves):
    raise ValueError("compute_bucket_assignment_by_size: `leaves` is empty.")
  limits = [int(x) for x in bucket_size_limits]
  if not limits:
    raise ValueError("compute_bucket_assignment_by_size: `bucket_size_limits` is empty.")
  if tensor_indices is not None:
    tensor_indices = [int(i) for i in tensor_indices]
    if len(tensor_indices) != len(leaves):
      raise ValueError(
          f"compute_bucket_assignment_by_size: tensor_indices has "
          f"{len(tensor_indices)} entries for {len(leaves)} leaves.")
  result: list[tuple[list[int], int]] = []
  open_buckets: dict[np.dtype, list] = {}  # dtype -> [indices, size, limit]
  limit_pos: dict[np.dtype, int] = {}
  for i, leaf in enumerate(leaves):
    index = i if tensor_indices is None else tensor_indices[i]
    key = np.dtype(leaf.dtype)
    bucket = open_buckets.setdefault(key, [[], 0, 0])
    bucket[0].append(index)
    bucket[1] += _nbytes(leaf)
    pos = limit_pos.setdefault(key, 0)
    bucket[2] = limits[pos]
    if bucket[1] >= bucket[2]:
      result.append((bucket[0], bucket[2]))
      open_buckets[key] = [[], 0, 0]
      limit_pos[key] = min(pos + 1, len(limits) - 1)
  for indices, _, limit in open_buckets.values():
    if indices:
      result.append((indices, limit))
  if tensor_indices is None:
    result.sort(key=lambda r: min(r[0]))
  return [r[0] for r in result], [r[1] for r in result]


@dataclasses.dataclass(frozen=True)
class BucketSpec:
  """Static description of one bucket: which leaves, where, how big."""

  index: int
  dtype: np.dtype
  leaf_indices: tuple[int, ...]  # positions in the flattened gradient tree
  paths: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  size_limit: int  # the byte cap this bucket was closed against

  @property
  def lengths(self) -> tuple[int, ...]:
    return tuple(int(math.prod(s)) for s in self.shapes)

  @property
  def offsets(self) -> tuple[int, ...]:
    return tuple(int(x) for x in np.cumsum((0,) + self.lengths[:-1]))

  @property
  def size(self) -> int:
    """Number of elements in the raveled bucket."""
    return sum(self.lengths)

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  @property
  def num_leaves(self) -> int:
    return len(self.leaf_indices)

  def subset(self, positions) -> BucketSpec:
    """The spec of the leaves at ``positions`` (within this bucket), in that order: for
    hooks that treat part of a bucket apart (``by_path``'s routes, ``adasum``'s raveled
    small leaves)."""
    pick = lambda xs: tuple(xs[i] for i in positions)  # noqa: E731
    return dataclasses.replace(self, leaf_indices=pick(self.leaf_indices),
                               paths=pick(self.paths), shapes=pick(self.shapes))


def is_communicated(leaf: Any) -> bool:
  """True for leaves that carry a gradient: non-empty floating/complex arrays."""
  dtype = getattr(leaf, "dtype", None)
  if dtype is None or dtype == jax.dtypes.float0:
    return False
  return bool(jnp.issubdtype(dtype, jnp.inexact)) and math.prod(leaf.shape) > 0


def _against_allreduce(sent: float, base: float) -> str:
  """How a hook's bytes compare with an all-reduce of the same buckets, in words."""
  if not sent or not base:
    return ""
  ratio = base / sent
  if f"{ratio:.1f}" == "1.0":
    return ", as many bytes as all-reducing the buckets"
  if ratio > 1:
    return f", {ratio:.1f}x fewer bytes than all-reducing the buckets"
  return f", {1 / ratio:.1f}x the bytes of all-reducing the buckets"


def path_str(path) -> str:
  """``['layer']['kernel']``: a leaf's path as jax prints it. A trailing ``.value`` (the
  box of a flax ``nnx.Variable``) is left out, so a parameter has one name whether
  it comes boxed (``nnx.state(model)``) or pure (``nnx.as_pure``)."""
  path = tuple(path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  return jax.tree_util.keystr(path) or "<root>"


@dataclasses.dataclass(frozen=True)
class BucketPlan:
  """Which gradient leaf travels in which bucket. Static and hashable.

  Build it with :func:`plan_buckets`. Leaves that carry no gradient (integer,
  ``float0``, zero-size) are not bucketed and pass through the sync untouched.
  """

  treedef: Any
  leaf_paths: tuple[str, ...]
  leaf_shapes: tuple[tuple[int, ...], ...]
  leaf_dtypes: tuple[np.dtype, ...]
  buckets: tuple[BucketSpec, ...]

  @property
  def num_buckets(self) -> int:
    return len(self.buckets)

  @property
  def nbytes(self) -> int:
    return sum(b.nbytes for b in self.buckets)

  @property
  def passthrough(self) -> tuple[int, ...]:
    """Leaf positions that are not communicated."""
    used = {i for b in self.buckets for i in b.leaf_indices}
    return tuple(i for i in range(len(self.leaf_paths)) if i not in used)

  def summary(self, wire=None) -> str:
    """A readable table of the buckets.

    ``wire``: optional per-bucket ``(bytes sent, collective calls, bytes an
    all-reduce of the bucket would send)`` for a hook (see ``ddp_jax.describe``),
    shown as extra columns.
    """
    head = ("bucket", "dtype", "leaves", "elements", "bytes", "first leaf", "last leaf")
    rows = [head if wire is None else head[:5] + ("sent", "ratio", "calls") + head[5:]]
    for k, b in enumerate(self.buckets):
      row = (str(b.index), b.dtype.name, str(b.num_leaves), f"{b.size:,}", _human(b.nbytes))
      if wire is not None:
        sent, calls, baseline = wire[k]
        row += (_human(sent), f"{baseline / sent:.1f}x" if sent else "-", str(calls))
      rows.append(row + (b.paths[0], b.paths[-1]))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    skipped = len(self.passthrough)
    lines.append(
        f"{self.num_buckets} buckets, {_human(self.nbytes)} in "
        f"{len(self.leaf_paths) - skipped} leaves; {skipped} leaves not communicated.")
    if wire is not None:
      sent, base = sum(w[0] for w in wire), sum(w[2] for w in wire)
      calls = sum(w[1] for w in wire)
      lines.append(f"per step and replica: {_human(sent)} sent in {calls} collective "
                   f"call{'' if calls == 1 else 's'}{_against_allreduce(sent, base)}")
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.summary()


def _human(n: float) -> str:
  n = float(n)
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024
  raise AssertionError("unreachable: GiB is the last unit")


def _check_cap(name: str, value: float) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise TypeError(f"{name} must be a number of MiB, got {value!r}.")
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"{name} must be a positive finite number of MiB, got {value!r}.")


def bucket_limits(bucket_cap_mb: float = 25, first_bucket_cap_mb: float = 1,
                  bucket_caps_mb: Sequence[float] | None = None) -> tuple[int, ...]:
  """Validated byte limits: ``bucket_caps_mb`` if given, else (first, rest)."""
  if bucket_caps_mb is not None:
    caps = list(bucket_caps_mb)
    if not caps:
      raise ValueError("bucket_caps_mb must list at least one cap.")
    names = [f"bucket_caps_mb[{i}]" for i in range(len(caps))]
  else:
    caps = [first_bucket_cap_mb, bucket_cap_mb]
    names = ["first_bucket_cap_mb", "bucket_cap_mb"]
  for name, cap in zip(names, caps):
    _check_cap(name, cap)
  return tuple(max(1, int(c * MiB)) for c in caps)


def plan_buckets(
    tree,
    *,
    bucket_cap_mb: float = 25,
    first_bucket_cap_mb: float = 1,
    order: Order = "reverse",
    bucket_indices: Sequence[Sequence[int]] | None = None,
    bucket_caps_mb: Sequence[float] | None = None,
) -> BucketPlan:
  """Plans DDP-style buckets for a gradient pytree (shapes and dtypes only).

  Args:
    tree: pytree of arrays or ``jax.ShapeDtypeStruct``.
    bucket_cap_mb: byte cap of every bucket after the first, in MiB.
    first_bucket_cap_mb: cap of the first bucket, in MiB (DDP: 1).
    order: ``"reverse"`` walks the leaves in reverse tree-flatten order, the
      approximate order in which backward produces gradients (DDP's rebuilt
      buckets); ``"forward"`` in flatten order.
    bucket_indices: explicit buckets as lists of flattened leaf indices (of
      the communicated leaves' positions in the full flattened tree); overrides
      everything else. Each bucket must hold leaves of one dtype.
    bucket_caps_mb: explicit list of caps in MiB (DDP ``bucket_cap_mb_list``);
      overrides ``first_bucket_cap_mb`` and ``bucket_cap_mb``.

  Returns:
    A :class:`BucketPlan`.

  Examples:
    >>> import jax.numpy as jnp
    >>> plan = plan_buckets({"w": jnp.zeros((512, 1024)), "b": jnp.zeros(1024)})
    >>> [b.paths for b in plan.buckets]
    [("['w']",), ("['b']",)]
  """
  if order not in ORDERS:
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}.")
  limits = bucket_limits(bucket_cap_mb, first_bucket_cap_mb, bucket_caps_mb)
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  leaves = [leaf for _, leaf in with_path]
  for path, leaf in with_path:
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      raise TypeError(
          f"gradient leaf {path_str(path)} is a {type(leaf).__name__}, not an "
          "array; gradients must be arrays (or None for no gradient).")
  indices = None if bucket_indices is None else tuple(tuple(int(i) for i in b) for b in bucket_indices)
  return _plan_cached(
      treedef,
      tuple(path_str(p) for p, _ in with_path),
      tuple(tuple(int(d) for d in x.shape) for x in leaves),
      tuple(np.dtype(x.dtype) for x in leaves),
      limits,
      order,
      indices,
  )


@functools.lru_cache(maxsize=256)
def _plan_cached(treedef, paths, shapes, dtypes, limits, order, bucket_indices) -> BucketPlan:
  structs = [jax.ShapeDtypeStruct(s, d) for s, d in zip(shapes, dtypes)]
  comm = [i for i, x in enumerate(structs) if is_communicated(x)]
  if bucket_indices is not None:
    assignment, per_limit = _check_explicit(bucket_indices, comm, paths, dtypes)
  elif not comm:
    assignment, per_limit = [], []
  elif order == "reverse":
    ready = comm[::-1]
    assignment, per_limit = compute_bucket_assignment_by_size(
        [structs[i] for i in ready], limits, tensor_indices=ready)
  else:
    sub, per_limit = compute_bucket_assignment_by_size([structs[i] for i in comm], limits)
    assignment = [[comm[j] for j in b] for b in sub]
  buckets = tuple(
      BucketSpec(
          index=k,
          dtype=dtypes[b[0]],
          leaf_indices=tuple(b),
          paths=tuple(paths[i] for i in b),
          shapes=tuple(shapes[i] for i in b),
          size_limit=int(limit),
      ) for k, (b, limit) in enumerate(zip(assignment, per_limit)))
  return BucketPlan(treedef, paths, shapes, dtypes, buckets)


def _check_explicit(bucket_indices, comm, paths, dtypes):
  seen: dict[int, int] = {}
  comm_set = set(comm)
  for k, bucket in enumerate(bucket_indices):
    if not bucket:
      raise ValueError(f"bucket_indices[{k}] is empty.")
    for i in bucket:
      if i not in comm_set:
        what = (f"leaf {paths[i]} carries no gradient (dtype {dtypes[i].name} or zero-size)"
                if 0 <= i < len(paths) else f"there are only {len(paths)} leaves")
        raise ValueError(f"bucket_indices[{k}] names leaf {i}, but {what}.")
      if i in seen:
        raise ValueError(f"leaf {i} ({paths[i]}) is in bucket_indices[{seen[i]}] and [{k}].")
      seen[i] = k
    kinds = {dtypes[i] for i in bucket}
    if len(kinds) > 1:
      raise ValueError(
          f"bucket_indices[{k}] mixes dtypes {sorted(d.name for d in kinds)}; "
          "a bucket holds one dtype (split it).")
  missing = [i for i in comm if i not in seen]
  if missing:
    raise ValueError(
        f"bucket_indices leaves out leaf {missing[0]} ({paths[missing[0]]}); every "
        "gradient leaf must be in exactly one bucket.")
  return [list(b) for b in bucket_indices], [0] * len(bucket_indices)
