"""Communication hooks: how a bucket of gradients is reduced across replicas.

A hook is a ``CommHook(init, update, wire=None)`` of pure functions; its state lives in
the sync transformation's optax state. One file per hook family.
"""

# The hook-author toolkit: the protocol, error feedback, collectives, segments, costs.
from ddp_jax.hooks._collectives import all_gather, as_varying, divide, sum_16bit
from ddp_jax.hooks._feedback import (
    FeedbackState,
    correct,
    next_residual,
    quality,
    residual_state,
)
from ddp_jax.hooks._protocol import (
    CommHook,
    EmptyState,
    GradBucket,
    HookContext,
    InitFn,
    UpdateFn,
    check_hook,
    check_real,
    init_empty,
)
from ddp_jax.hooks._segments import segment_ids, segment_spread, segment_sum
from ddp_jax.hooks._wire import (
    WireCost,
    allgather_bytes,
    allreduce_bytes,
    reduce_scatter_bytes,
    wire_cost,
)
from ddp_jax.hooks.adasum import adasum
from ddp_jax.hooks.composition import ScheduleState, by_path, schedule
from ddp_jax.hooks.compression import (
  bf16_compress,
  bf16_compress_wrapper,
  compress_wrapper,
  fp16_compress,
  fp16_compress_wrapper,
)
from ddp_jax.hooks.default import allgather_then_aggregate, allreduce, noop
from ddp_jax.hooks.error_feedback import ErrorFeedbackState, error_feedback
from ddp_jax.hooks.hierarchical import hierarchical
from ddp_jax.hooks.local_sgd import LocalSGDState, post_local_sgd
from ddp_jax.hooks.powersgd import (
    BatchedPowerSGDState,
    PowerSGDState,
    batched_powersgd,
    powersgd,
)
from ddp_jax.hooks.quantization import int8_allreduce, quantize_per_channel, quantize_per_tensor
from ddp_jax.hooks.sparsification import sign_compress, topk

__all__ = [
    "adasum", "by_path", "hierarchical", "post_local_sgd", "schedule", "sign_compress", "topk",
    "CommHook", "GradBucket", "HookContext", "WireCost", "allgather_bytes",
    "allgather_then_aggregate", "allreduce", "allreduce_bytes", "batched_powersgd", "bf16_compress",
    "bf16_compress_wrapper", "compress_wrapper", "error_feedback", "fp16_compress",
    "fp16_compress_wrapper", "int8_allreduce", "noop", "powersgd", "quantize_per_channel",
    "quantize_per_tensor", "reduce_scatter_bytes", "segment_ids", "segment_spread", "segment_sum",
    "wire_bytes", "wire_cost", "parse",
    # hook-author toolkit
    "EmptyState", "InitFn", "UpdateFn", "init_empty", "check_hook", "check_real", "all_gather",
    "as_varying", "divide", "sum_16bit", "correct", "next_residual", "quality", "residual_state",
    # hook states
    "FeedbackState", "ErrorFeedbackState", "PowerSGDState", "BatchedPowerSGDState",
    "LocalSGDState", "ScheduleState",
]


# The hook factories a command line may name (parse); nothing else is reachable from it.
FACTORIES = (
    "adasum", "allgather_then_aggregate", "allreduce", "batched_powersgd", "bf16_compress",
    "bf16_compress_wrapper", "by_path", "compress_wrapper", "error_feedback", "fp16_compress",
    "fp16_compress_wrapper", "hierarchical", "int8_allreduce", "noop", "post_local_sgd",
    "powersgd", "quantize_per_channel", "quantize_per_tensor", "schedule", "sign_compress",
    "topk",
)


def parse(expr: str) -> CommHook:
  """A hook from a string, for command lines: ``parse("powersgd(rank=2)")``; a bare name
  is called with no arguments (``parse("fp16_compress")``).

  A small parser, not ``eval``: calls of this module's hook factories (nested:
  ``fp16_compress_wrapper(powersgd(rank=2))``) whose arguments are literals (numbers,
  strings, ``True``/``False``/``None``, lists, tuples, dicts) or such calls. Attributes,
  subscripts, operators and every other name are refused, so a command line cannot run
  code.

  Examples:
    >>> parse("topk(0.1)").wire is not None
    True
    >>> parse("by_path({'*bias*': allreduce()}, default=powersgd(rank=2))").wire is not None
    True
  """
  import ast

  text = expr.strip()
  if text.isidentifier():
    text += "()"
  try:
    tree = ast.parse(text, mode="eval")
  except SyntaxError as e:
    raise ValueError(f"hooks.parse: {expr!r} is not a hook expression: {e.msg}.") from None

  def value(node):
    if isinstance(node, ast.Call):
      if not isinstance(node.func, ast.Name) or node.func.id not in FACTORIES:
        what = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
        raise ValueError(f"hooks.parse: {what!r} in {expr!r} is not a hook; hooks are "
                         f"{', '.join(FACTORIES)}.")
      args = [value(a) for a in node.args]
      kwargs = {k.arg: value(k.value) for k in node.keywords if k.arg is not None}
      if len(kwargs) != len(node.keywords):
        raise ValueError(f"hooks.parse: ** arguments are not allowed in {expr!r}.")
      try:
        return globals()[node.func.id](*args, **kwargs)
      except (TypeError, ValueError) as e:
        raise ValueError(f"hooks.parse: {ast.unparse(node)}: {e}") from None
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(
        node.value, (bool, int, float, str))):
      return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
      inner = value(node.operand)
      if isinstance(inner, (int, float)) and not isinstance(inner, bool):
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, (ast.List, ast.Tuple)):
      items = [value(x) for x in node.elts]
      return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict) and None not in node.keys:
      return {value(k): value(v) for k, v in zip(node.keys, node.values)}
    raise ValueError(f"hooks.parse: {ast.unparse(node)!r} in {expr!r} is not allowed: only "
                     "hook calls and literal arguments.")

  hook = value(tree.body)
  if not isinstance(hook, CommHook):
    raise ValueError(f"hooks.parse: {expr!r} is not a hook.")
  return hook


def wire_bytes(hook: CommHook, plan, world_size: int) -> list[WireCost]:
  """Per bucket of ``plan``: the bytes one replica sends and the collective calls
  ``hook`` makes per step, from shapes alone (nothing runs)."""
  return [wire_cost(hook, spec, world_size) for spec in plan.buckets]
