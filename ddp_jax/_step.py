"""``data_parallel``: the jitted data-parallel step from a per-replica step function.

The ``shard_map`` ceremony of a DDP-style step, derived instead of written:
inputs get their specs from what :func:`~ddp_jax.state_specs` knows (replicated
parameters and optimizer state ``P()``, per-replica hook state ``P(axis)``) and
from ``batch_argnums`` (split over the axis); outputs get theirs from the types
``shard_map`` gives them (invariant: ``P()``; per-replica state: ``P(axis)``),
read once per input signature by tracing the step abstractly. Arguments are
placed on the mesh as needed (host arrays included), so the step takes what a
training loop has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import jaxpr_as_fun
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddp_jax import _axes, _compile, _faults, _phase
from ddp_jax._plan import path_str
from ddp_jax._replica import place, state_specs


def _is_spec(x) -> bool:
  return isinstance(x, P)


class DataParallelStep:
  """A jitted ``shard_map`` of a per-replica step over one mesh axis (see
  :func:`data_parallel`). Call it like the step; :meth:`specs` shows the specs it
  uses for given arguments and :meth:`lower` lowers it (for
  :func:`ddp_jax.inspect.collectives`); ``last_program`` says whether the last call
  ran the warm-up program (hooks before their ``start_iter``) or the full one."""

  def __init__(self, step_fn: Callable, mesh: jax.sharding.Mesh, axis_name,
               batch_argnums: tuple[int, ...], out_specs, donate_argnums: tuple[int, ...]):
    self.step_fn = step_fn
    self.mesh = mesh
    self.axis_name = axis_name
    self.batch_argnums = batch_argnums
    self.out_specs = out_specs
    self.donate_argnums = donate_argnums
    self._built: dict = {}  # key -> (in_specs, out_specs, jitted)
    self._probed: dict = {}  # key -> out_specs, read from the probe
    self._fingerprints: dict = {}  # key -> the syncs' fingerprints, from tracing
    self._agreed: set = set()
    self._bodies: dict = {}  # key -> (jaxpr, out tree) of the step, from the probe
    self._compiled: dict = {}  # key -> executable shared across processes
    # Warm-up programs (see ``_phase``): key -> None (no hook switches) or (first
    # start_iter, syncs per call; None when unbounded); key -> (bound on the hooks'
    # iteration, the iter arrays it holds for).
    self._phases: dict = {}
    self._bound: dict = {}
    self._switched: set = set()  # keys that run the full program from now on
    self._marked: set = set()  # full programs replaying a warm-up trace (no switch in it)
    self.last_program: str | None = None  # "warm-up" or "full": what the last call ran

  def __repr__(self) -> str:
    name = getattr(self.step_fn, "__name__", repr(self.step_fn))
    return (f"DataParallelStep({name}, axis={self.axis_name!r}, "
            f"batch_argnums={self.batch_argnums})")

  def _in_specs(self, args) -> tuple:
    specs = []
    for i, arg in enumerate(args):
      if i in self.batch_argnums:
        specs.append(jax.tree.map(lambda _: P(self.axis_name), arg))
      else:
        specs.append(state_specs(arg, self.axis_name))
    return tuple(specs)

  def _out_specs(self, args, in_specs, key):
    """Reads the outputs' types from a trace of the step, and keeps that trace.

    The step's Python runs once per input signature: here, recording its jaxpr (and
    the syncs' fingerprints), which the jitted program then replays instead of
    tracing the step again (tracing a large model's step is seconds)."""
    seen = {}
    axis = self.axis_name

    def probe(*local_args):
      with _faults.collecting() as records, _phase.recording() as starts:
        closed, shapes = jax.make_jaxpr(self.step_fn, return_shape=True)(*local_args)
      self._fingerprints[key] = records
      # Where the step's hooks switch, if a warm-up program can be exact: a sync's update
      # moves each bucket's iteration by one, so a call moves any by at most the syncs
      # traced (each bucket's switch is one of ``starts``).
      per_call = None if _phase.in_loop(closed.jaxpr) else len(records) or len(starts)
      self._phases[key] = (min(starts), per_call) if starts else None
      out_tree = jax.tree.structure(shapes)
      seen["body"] = (closed, out_tree)
      out = jax.tree.unflatten(out_tree, jaxpr_as_fun(closed)(*jax.tree.leaves(local_args)))
      checked = _axes.checks_vma(axis)
      seen["out"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
                                 out)
      seen["varying"] = jax.tree.map(
          lambda x: checked and not _axes.invariant_over(x, axis), out)
      return jax.tree.map(lambda x: jnp.expand_dims(x, 0), out)

    fn = jax.shard_map(probe, mesh=self.mesh, in_specs=in_specs, out_specs=P(axis))
    jax.eval_shape(fn, *_abstract(args, in_specs, self.mesh))
    self._bodies[key] = seen["body"]
    per_replica = state_specs(seen["out"], axis)
    flat, treedef = jax.tree_util.tree_flatten_with_path(per_replica, is_leaf=_is_spec)
    varying = jax.tree.leaves(seen["varying"])
    specs = []
    for (path, spec), is_varying in zip(flat, varying):
      if spec == P() and is_varying:
        where = path_str(path)
        raise ValueError(
            f"data_parallel: output {where} of {self!r} differs per replica (it is varying "
            f"over {axis!r}) and is not per-replica optimizer state, so it has no "
            f"replicated value to return. Reduce it in the step (e.g. "
            f"jax.lax.pmean(loss, {axis!r}) for a metric; parameters must come out of "
            f"sync_gradients' averaged updates), or pass out_specs=... to data_parallel "
            f"(e.g. P({axis!r}) to concatenate per-replica results along their first axis).")
      specs.append(spec)
    return jax.tree_util.tree_unflatten(treedef, specs)

  @staticmethod
  def _key(args):
    return tuple((jax.tree.structure(a), tuple((jnp.shape(x), jnp.result_type(x))
                                              for x in jax.tree.leaves(a))) for a in args)

  def _build(self, args, key=None):
    key = self._key(args) if key is None else key
    if key not in self._built:
      in_specs = self._in_specs(args)
      self._check_shapes(args, in_specs)
      if self.out_specs is not None:
        out_specs = self.out_specs
      elif key not in self._probed:
        out_specs = self._probed[key] = self._out_specs(args, in_specs, key)
      else:
        out_specs = self._probed[key]

      def traced(*local_args, key=key):
        if key in self._bodies:  # replay the probe's trace
          closed, out_tree = self._bodies[key]
          return jax.tree.unflatten(out_tree,
                                    jaxpr_as_fun(closed)(*jax.tree.leaves(local_args)))
        with _faults.collecting() as records:
          out = self.step_fn(*local_args)
        self._fingerprints[key] = records
        return out

      fn = jax.shard_map(traced, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)
      self._built[key] = (in_specs, out_specs,
                          jax.jit(fn, donate_argnums=self.donate_argnums))
    return self._built[key]

  def _warm(self, args, key):
    """The arguments and key of the warm-up program, if this call may run it: every hook
    state's iteration, plus the syncs one call runs, stays at or below the first
    ``start_iter`` (see ``_phase``); else None."""
    if self.out_specs is not None or not _phase.enabled() or key in self._switched:
      return None
    iters = _phase.iterations(args)
    if not iters:  # no hook state counts iterations: nothing switches
      self._switched.add(key)
      return None
    warm_args = _phase.mark(args)
    warm_key = self._key(warm_args)
    if warm_key not in self._probed:  # the warm-up trace finds the switches
      self._build(warm_args, warm_key)
      if self._phases[warm_key] is None and key not in self._probed:  # the same program
        for seen in (self._probed, self._bodies, self._fingerprints):
          seen[key] = seen[warm_key]
        self._marked.add(key)
    start, per_call = self._phases.get(warm_key) or (None, None)
    if per_call is None:  # nothing switches, or unbounded updates per call (a loop)
      self._switched.add(key)
      return None
    bound, last = self._bound.get(key, (None, ()))
    chained = (bound is not None and len(iters) == len(last)
               and all(a is b for a, b in zip(iters, last)))
    if not chained or bound + per_call > start:  # read it (waits for the last step)
      bound = _phase.largest(iters)
    if bound + per_call > start:  # the full program from now on (it is always exact)
      self._switched.add(key)
      return None
    self._bound[key] = (bound + per_call, ())
    return warm_args, warm_key

  def specs(self, *args) -> tuple[Any, Any]:
    """``(in_specs, out_specs)`` this step uses for ``args``."""
    in_specs, out_specs, _ = self._build(args)
    return in_specs, out_specs

  def _check_shapes(self, args, in_specs) -> None:
    n = _axes.axis_size_of(self.mesh, self.axis_name)
    for i, (arg, specs) in enumerate(zip(args, in_specs)):
      def check(path, spec, x, i=i):
        shape = tuple(jnp.shape(x))
        if spec != P() and (not shape or shape[0] % n):
          kind = "batch" if i in self.batch_argnums else "per-replica state"
          raise ValueError(
              f"data_parallel: argument {i} leaf {path_str(path)} is {kind} split over "
              f"{self.axis_name!r} ({n} replicas), but its shape {shape} has no leading "
              f"axis divisible by {n}."
              + (" Per-replica optimizer state needs one entry per replica: make it with "
                 "ddp_jax.init_state(tx, params, mesh, axis) rather than tx.init(params)."
                 if kind != "batch" else " Use a global batch divisible by the replicas."))
      jax.tree_util.tree_map_with_path(check, specs, arg, is_leaf=_is_spec)

  def _placed(self, args, in_specs):
    return tuple(place(arg, jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), specs,
                                         is_leaf=_is_spec))
                 for specs, arg in zip(in_specs, args))

  def __call__(self, *args):
    key = self._key(args)  # once per call: it walks every leaf
    warm = self._warm(args, key)
    call_args, call_key = warm or (args, key)
    in_specs, _, fn = self._build(call_args, call_key)
    placed = self._placed(call_args, in_specs)
    if call_key not in self._agreed:  # host-side checks, once per program
      if call_key not in self._fingerprints:
        fn.trace(*placed)
      records = self._fingerprints.get(call_key, [])
      # A restored hook state made by another hook or layout (orbax, hand-built trees).
      from ddp_jax._sync import SyncState, check_state_tags
      states = [x for x in jax.tree.leaves(args, is_leaf=lambda x: isinstance(x, SyncState))
                if isinstance(x, SyncState)]
      check_state_tags(states, records)
      # Before the first collective of a new program: every process runs the same syncs
      # (and the same program: warm-up or full).
      _faults.agree("data_parallel", records + [
          {"warm-up program (DDP_JAX_WARMUP_PROGRAM)": warm is not None}])
      self._agreed.add(call_key)
      if jax.process_count() > 1 and _compile.enabled():
        # One compile for all processes (process 0's, loaded by the others).
        self._compiled[call_key] = _compile.compile_shared(
            fn.lower(*placed), list(self.mesh.devices.flat), "data_parallel")
    compiled = self._compiled.get(call_key)
    out = (compiled or fn)(*placed)
    self.last_program = "warm-up" if warm else "full"
    if warm or call_key in self._marked:  # its outputs carry the marks of its inputs
      out = _phase.mark(out, False)
    if warm:  # the next call's bound holds for the states this one returns
      self._bound[key] = (self._bound[key][0], tuple(_phase.iterations(out)))
    return out

  def lower(self, *args, warm_up: bool = False):
    """The jitted step lowered for ``args`` (``.compile()``, ``.as_text()``): the full
    program, or with ``warm_up=True`` the one run while no hook can reach its
    ``start_iter`` yet (the same when no hook switches)."""
    if warm_up:
      args = _phase.mark(args)
    in_specs, _, fn = self._build(args)
    return fn.lower(*self._placed(args, in_specs))


def _abstract(args, in_specs, mesh):
  def one(spec, x):
    return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x),
                                sharding=NamedSharding(mesh, spec))
  return tuple(jax.tree.map(one, specs, arg, is_leaf=_is_spec)
               for specs, arg in zip(in_specs, args))


def data_parallel(step_fn: Callable, mesh: jax.sharding.Mesh, axis_name="data", *,
                  batch_argnums: int | Sequence[int], out_specs: Any = None,
                  donate_argnums: int | Sequence[int] = ()) -> DataParallelStep:
  """The jitted data-parallel step: ``step_fn`` runs once per replica on its slice.

  DDP's ``DistributedDataParallel(model)`` for a JAX step: ``step_fn`` is written
  for one replica (gradients from :func:`ddp_jax.value_and_grad`, averaged by a
  ``sync_gradients`` in its optax chain), and ``data_parallel`` maps it over
  ``axis_name`` of ``mesh`` with ``jax.shard_map`` and jits it. Specs are
  derived: arguments in ``batch_argnums`` are split along their first axis; the
  others get :func:`~ddp_jax.state_specs` (replicated, except per-replica hook
  state); outputs are ``P()`` when replicated and ``P(axis)`` when per-replica
  optimizer state, read from their ``shard_map`` types. Host arrays are placed
  on the mesh (a global batch on every process, in multi-process runs; or build
  it with :func:`ddp_jax.global_batch`). The explicit route (``shard_map`` with
  :func:`~ddp_jax.state_specs`) stays available for anything else. Hooks that switch
  at an iteration (PowerSGD's ``start_iter``) run a *warm-up program* without the
  later branch until a call could reach it, then the full program (exact; see
  *Warm-up programs* in the docs; ``DDP_JAX_WARMUP_PROGRAM=0`` turns it off).

  Args:
    step_fn: ``step_fn(*args) -> outputs``, per replica.
    mesh: the device mesh.
    axis_name: the data-parallel axis of ``mesh`` (or a tuple of axes).
    batch_argnums: positions of the arguments to split over the replicas.
    out_specs: explicit output specs (skips the derivation), e.g. for
      per-replica outputs.
    donate_argnums: as in ``jax.jit`` (e.g. ``(0, 1)`` for params and state).

  Returns:
    A :class:`DataParallelStep`, called like ``step_fn``.

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, ddp_jax
    >>> mesh = jax.make_mesh((8,), ("data",))
    >>> tx = optax.chain(ddp_jax.sync_gradients("data"), optax.sgd(0.5))
    >>> def loss_fn(w, x, y):
    ...   return jnp.mean((x @ w - y) ** 2)
    >>> def train_step(w, opt_state, x, y):
    ...   loss, grads = ddp_jax.value_and_grad(loss_fn, "data")(w, x, y)
    ...   updates, opt_state = tx.update(grads, opt_state, w)
    ...   return optax.apply_updates(w, updates), opt_state, jax.lax.pmean(loss, "data")
    >>> step = ddp_jax.data_parallel(train_step, mesh, "data", batch_argnums=(2, 3))
    >>> w = jnp.zeros(3)
    >>> opt_state = ddp_jax.init_state(tx, w, mesh, "data")
    >>> x, y = np.eye(16, 3, dtype=np.float32), np.ones(16, np.float32)
    >>> w, opt_state, loss = step(w, opt_state, x, y)
    >>> print(float(loss), w)   # = one SGD step on the whole batch
    1.0 [0.0625 0.0625 0.0625]
  """
  _axes.check_axis_name(axis_name)
  for name in _axes.axis_names(axis_name):
    if name not in mesh.axis_names:
      raise ValueError(f"data_parallel: axis {name!r} is not an axis of the mesh "
                       f"{dict(mesh.shape)}.")
  if not callable(step_fn):
    raise TypeError(f"data_parallel: step_fn must be callable, got {step_fn!r}.")
  nums = (batch_argnums,) if isinstance(batch_argnums, int) else tuple(batch_argnums)
  if not nums or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in nums):
    raise ValueError(
        f"data_parallel: batch_argnums must name the positions (ints >= 0) of the "
        f"arguments to split over the replicas, e.g. (2, 3) for step(params, opt_state, "
        f"x, y); got {batch_argnums!r}.")
  donate = (donate_argnums,) if isinstance(donate_argnums, int) else tuple(donate_argnums)
  return DataParallelStep(step_fn, mesh, axis_name, nums, out_specs, donate)
