"""Collectives in a function's HLO: counts, operands and bytes.

``collectives(fn, *args)`` lowers ``fn`` (jitting it if needed), reads the HLO
before XLA's passes (``lowered``) and after them (``compiled``), and counts
each collective kind. JAX lowers a multi-operand ``psum`` to one all-reduce per
operand; XLA's combiner then merges them into variadic ops. ``calls`` counts
the collectives issued per ``ddp_jax`` bucket (one group per bucket and kind)
plus any collective outside a bucket.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["Counts", "Report", "collectives", "count_collectives"]

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_LINE = re.compile(
    r"=\s*(?P<type>\([^=]*?\)|[\w\[\]{},:\d]+)\s+"
    r"(?P<kind>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(?P<start>-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?[^=]*\{\s*$")
_CALLS = re.compile(r"(?:to_apply|calls|body|condition|true_computation|false_computation)"
                    r"=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRUE_FALSE = re.compile(r"(?:true|false)_computation=%?([\w.\-]+)")
_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_COMMENT = re.compile(r"/\*.*?\*/")
_BUCKET = re.compile(r"ddp_bucket(\d+)")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^=]*?\)|[\w\[\]{},:\d]+)\s")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
             "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
             "c128": 16}


@dataclasses.dataclass
class Counts:
  """One collective kind in one HLO module."""

  ops: int = 0  # HLO instructions
  operands: int = 0  # arrays summed/gathered, over all ops
  bytes: int = 0  # bytes of the results, per device
  calls: int = 0  # distinct (bucket, kind) groups plus ops outside buckets
  in_conditional: int = 0  # ops inside a branch of a conditional (lax.cond / lax.switch)
  bytes_by_group_size: dict = dataclasses.field(default_factory=dict)  # replicas per group -> bytes
  bytes_by_dtype: dict = dataclasses.field(default_factory=dict)  # HLO element type -> bytes


@dataclasses.dataclass
class Report:
  lowered: dict[str, Counts]
  compiled: dict[str, Counts]
  lowered_text: str = dataclasses.field(repr=False, default="")
  compiled_text: str = dataclasses.field(repr=False, default="")

  def summary(self) -> str:
    lines = ["stage     kind                ops  operands  calls        bytes"]
    for stage, counts in (("lowered", self.lowered), ("compiled", self.compiled)):
      for kind, c in counts.items():
        lines.append(f"{stage:9} {kind:18} {c.ops:4} {c.operands:9} {c.calls:6} {c.bytes:12,}")
    return "\n".join(lines)


def _itemsize(dtype: str) -> int:
  if dtype in _ITEMSIZE:
    return _ITEMSIZE[dtype]
  bits = re.findall(r"\d+", dtype)
  return max(1, int(bits[0]) // 8) if bits else 1


def _shape_bytes(dtype: str, dims: str) -> int:
  """Bytes of one array type as read from HLO text (``f32``, ``"2048,1000"``)."""
  n = 1
  for d in filter(None, dims.split(",")):
    n *= int(d)
  return n * _itemsize(dtype)


def _group_size(line: str) -> int:
  """Replicas in each replica group of a collective (0 when the line does not say)."""
  m = _GROUPS.search(line)
  if m:
    return len([x for x in m.group(1).split(",") if x])
  m = _IOTA_GROUPS.search(line)
  return int(m.group(2)) if m else 0


def _top_level(args: str) -> list:
  """The operands of a call's argument list (``args`` starts after its ``(``): split at
  the commas outside ``[]``/``{}``/``()``, up to the ``)`` that closes it."""
  parts, depth, current = [], 0, []
  for ch in args:
    if ch in "[{(":
      depth += 1
    elif ch in "]})":
      if depth == 0:
        break
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append("".join(current))
      current = []
      continue
    current.append(ch)
  parts.append("".join(current))
  return parts


def _start_operands(args: str, types: dict) -> list:
  """The (dtype, dims) of an async all-reduce's operands: their shapes as printed in the
  call, or their defining instructions' types. The start's own type is not the sum's:
  XLA:GPU prints it as an (operands, results) tuple, sometimes with context scalars, which
  read as twice the bytes and operands."""
  shapes = []
  for arg in _top_level(args):
    inline = _SHAPE.findall(arg)
    name = arg.strip().split(" ")[-1].lstrip("%")
    found = inline or _SHAPE.findall(types.get(name, ""))
    if not found:
      return []
    shapes += found
  return shapes


def count_collectives(hlo_text: str) -> dict[str, Counts]:
  """Counts collectives in HLO text (``*-done`` halves of async pairs are skipped)."""
  out: dict[str, Counts] = {}
  groups: dict[str, set] = {}
  edges: dict[str, set] = {}
  branches: set = set()
  where: list = []  # (kind, computation) of each op
  types: dict[str, str] = {}  # instruction -> its type, in the current computation
  computation = ""
  for line in hlo_text.splitlines():
    line = _COMMENT.sub("", line)
    header = _HEADER.match(line)
    if header and " = " not in line:
      computation, types = header.group(1), {}
      continue
    d = _DEF.match(line)
    if d:
      types[d.group(1)] = d.group(2)
    edges.setdefault(computation, set()).update(_CALLS.findall(line))
    for group in _BRANCHES.findall(line):
      names = [n.strip().lstrip("%") for n in group.split(",") if n.strip()]
      branches.update(names)
      edges[computation].update(names)
    if " conditional(" in line:
      branches.update(_TRUE_FALSE.findall(line))
    m = _LINE.search(line)
    if not m:
      continue
    kind = m.group("kind")
    where.append((kind, computation))
    c = out.setdefault(kind, Counts())
    shapes = _SHAPE.findall(m.group("type"))
    if kind == "all-reduce" and m.group("start"):
      shapes = _start_operands(line[m.end():], types) or shapes
      c.operands += len(shapes)
    else:
      c.operands += max(1, len(shapes) if m.group("type").startswith("(") else 1)
    c.ops += 1
    nbytes = 0
    for dtype, dims in shapes:
      size = _shape_bytes(dtype, dims)
      nbytes += size
      c.bytes_by_dtype[dtype] = c.bytes_by_dtype.get(dtype, 0) + size
    c.bytes += nbytes
    group = _group_size(line)
    c.bytes_by_group_size[group] = c.bytes_by_group_size.get(group, 0) + nbytes
    bucket = _BUCKET.search(line)
    groups.setdefault(kind, set()).add(bucket.group(1) if bucket else ("op", c.ops))
  for kind, c in out.items():
    c.calls = len(groups[kind])
  inside, todo = set(), list(branches)
  while todo:  # everything a branch calls, transitively
    name = todo.pop()
    if name not in inside:
      inside.add(name)
      todo.extend(edges.get(name, ()))
  for kind, comp in where:
    if comp in inside:
      out[kind].in_conditional += 1
  return out


def collectives(fn: Callable | jax.stages.Lowered, *args: Any, **kwargs: Any) -> Report:
  """Lowers and compiles ``fn(*args, **kwargs)`` and counts its collectives; ``fn`` may
  also be a program already lowered (``step.lower(*args)``), given without arguments.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from ddp_jax.inspect import collectives
    >>> f = jax.pmap(lambda x: jax.lax.psum(x, "i"), axis_name="i")
    >>> r = collectives(f, jnp.ones((jax.device_count(), 3)))
    >>> r.lowered["all-reduce"].ops
    1
  """
  if isinstance(fn, jax.stages.Lowered):
    if args or kwargs:
      raise TypeError("inspect.collectives: a lowered program takes no arguments; pass the "
                      "function and its arguments, or only the lowered program.")
    lowered = fn
  else:
    lowered = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args, **kwargs)
  low_text = lowered.as_text(dialect="hlo", debug_info=True)
  compiled_text = lowered.compile().as_text()
  return Report(count_collectives(low_text), count_collectives(compiled_text),
                low_text, compiled_text)
