"""Buckets stay buckets in the compiled program: each bucket's collective can start while
later gradients are still being computed (DDP's overlap), and the values are exact.

XLA's all-reduce combiner merges collectives that do not depend on each other; without a
dependency between buckets every bucket ends up in one all-reduce after the whole
backward pass on CPU (the control below). ``_sync._after`` chains bucket k+1 to bucket k's
result through a select that is false for every value. The chain is opt-in
(``DDP_JAX_BUCKET_CHAIN=1``; ``benchmarks/bench_overlap.py`` and ``bench_overlap_hlo.py``
for what it buys on CPU and GPU).
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ddp_jax
from ddp_jax import _axes, hooks
from ddp_jax.inspect import collectives
from tests.helpers import per_device_grads, shard_map_updates

WIDTH, LAYERS = 256, 5


def _loss(p, batch):
  x = batch
  for w, b in p:
    x = jnp.tanh(x @ w + b)
  return jnp.mean(x ** 2)


def _schedule(mesh, tx):
  """Where the compiled training step's all-reduces and dots sit in its entry
  computation, in the order XLA runs it (the module is scheduled)."""
  params = [(jnp.full((WIDTH, WIDTH), 0.01), jnp.zeros(WIDTH)) for _ in range(LAYERS)]
  state = ddp_jax.init_state(tx, params, mesh, "data")
  specs = ddp_jax.state_specs(state, "data")

  def step(p, s, x):
    g = ddp_jax.grad(_loss, "data")(p, x)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), specs, P("data")),
                            out_specs=(P(), specs)))
  params = jax.device_put(params, NamedSharding(mesh, P()))
  x = jax.device_put(jnp.ones((8 * mesh.size, WIDTH)), NamedSharding(mesh, P("data")))
  report = collectives(f, params, state, x)
  text = report.compiled_text
  assert "is_scheduled=true" in text
  lines = [line.strip() for line in text[text.index("\nENTRY"):].split("\n")[1:]]
  reduces, dots = _positions(lines)
  assert len(reduces) == report.compiled["all-reduce"].ops  # the project's own count agrees
  return reduces, dots


def _positions(lines):
  reduces = [i for i, line in enumerate(lines) if re.search(r"\ball-reduce(-start)?\(", line)]
  dots = [i for i, line in enumerate(lines) if "dot(" in line or "dot_general" in line]
  return reduces, dots


def _tx(pack="ravel"):
  # 64 KiB caps: one bucket per 256 x 256 weight (and its bias), five buckets.
  return optax.chain(ddp_jax.sync_gradients("data", bucket_cap_mb=0.25,
                                            first_bucket_cap_mb=0.25, pack=pack),
                     optax.sgd(0.1))


@pytest.fixture
def chained(monkeypatch):
  monkeypatch.setenv("DDP_JAX_BUCKET_CHAIN", "1")


def test_each_bucket_is_sent_inside_the_backward_pass(mesh8, chained):
  tx = _tx()
  plan = ddp_jax.plan_buckets(jax.eval_shape(lambda: [(jnp.zeros((WIDTH, WIDTH)),
                                                       jnp.zeros(WIDTH))] * LAYERS),
                              bucket_cap_mb=0.25, first_bucket_cap_mb=0.25)
  assert plan.num_buckets == LAYERS
  reduces, dots = _schedule(mesh8, tx)
  assert len(reduces) == plan.num_buckets, "one all-reduce per bucket (pack='ravel')"
  # The first buckets (the last layers' gradients) are sent before the backward pass ends.
  assert sum(r < dots[-1] for r in reduces) >= plan.num_buckets - 2, (reduces, dots)


@pytest.mark.parametrize("pack", ["auto", "variadic"])
def test_buckets_stay_apart_in_every_pack_mode(mesh8, chained, pack):
  reduces, dots = _schedule(mesh8, _tx(pack))
  assert len(reduces) >= LAYERS and reduces[0] < dots[-1], (reduces, dots)


@pytest.mark.parametrize("mode", [None, "0"], ids=["default", "off"])
def test_control_without_the_chain_xla_merges_every_bucket_after_the_backward(
    mesh8, monkeypatch, mode):
  """What the chain is for: without it (the default), one all-reduce after the last dot."""
  if mode is None:
    monkeypatch.delenv("DDP_JAX_BUCKET_CHAIN", raising=False)
  else:
    monkeypatch.setenv("DDP_JAX_BUCKET_CHAIN", mode)
  reduces, dots = _schedule(mesh8, _tx())
  assert len(reduces) == 1 and reduces[0] > dots[-1], (reduces, dots)


def _has_cuda() -> bool:
  return shutil.which("nvidia-smi") is not None and any(
      importlib.util.find_spec(m) is not None
      for m in ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_plugins.xla_cuda12"))


@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU and jax's CUDA plugin")
def test_gpu_schedule_puts_each_bucket_inside_the_backward_pass(tmp_path):
  """On a GPU (8 peers mocked on one device, compile only): every all-reduce is
  asynchronous and most start before a later GEMM, merged (the default) or chained; the
  chained buckets leave less to send after the last GEMM than XLA's own grouping
  (28 -> 8 MiB on the 24 x 1024 MLP, jax 0.11.2)."""
  root = Path(__file__).resolve().parents[1]
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  subprocess.run([sys.executable, str(root / "benchmarks" / "bench_overlap_hlo.py"),
                  "--platform", "gpu", "--layers", "24", "--width", "1024",
                  "--flag-sets", "default", "--out", str(tmp_path)],
                 env=env, check=True, timeout=600)
  run = json.loads((tmp_path / "overlap_hlo_gpu_24x1024.json").read_text())["runs"]["default"]
  m = run["methods"]
  for method in m.values():
    assert all(a["async"] for a in method["all_reduces"])
  chained, merged = m["sync_chained"], m["sync_merged"]
  assert [a["bytes"] for a in m["sync_default"]["all_reduces"]] == [
      a["bytes"] for a in merged["all_reduces"]]
  assert len(chained["all_reduces"]) == 5  # DDP's buckets: 1 MiB cap first, then 25 MiB
  for r in (chained, merged):
    hidden = sum(a["gemms_before_done"] > 0 for a in r["all_reduces"])
    assert hidden >= len(r["all_reduces"]) - 1, r["all_reduces"]
  assert chained["bytes_exposed"] < merged["bytes_exposed"]


def test_bad_chain_mode_is_refused(mesh8, monkeypatch):
  monkeypatch.setenv("DDP_JAX_BUCKET_CHAIN", "yes")
  with pytest.raises(ValueError, match="DDP_JAX_BUCKET_CHAIN must be one of"):
    _schedule(mesh8, _tx())


def _tree(complex_leaf):
  tree = {"a": jnp.zeros((64, 33)), "b": jnp.zeros((7,)), "c": jnp.zeros((40, 40)),
          "d": jnp.zeros((16,), jnp.bfloat16), "e": jnp.zeros((20, 20), jnp.bfloat16),
          "f": jnp.zeros((300,))}
  if complex_leaf:  # (lossy hooks take real gradients only)
    tree["z"] = jnp.zeros((5,), jnp.complex64)
  return tree


ALLREDUCE = hooks.allreduce()


@pytest.mark.parametrize("hook", [ALLREDUCE, hooks.fp16_compress(),
                                  hooks.powersgd(rank=2, start_iter=0)],
                         ids=["allreduce", "fp16", "powersgd"])
def test_the_chain_changes_no_value_nan_and_inf_included(mesh8, monkeypatch, hook):
  stacked = per_device_grads(_tree(hook is ALLREDUCE), 8, seed=3)
  # Every bucket's first elements, which the next bucket's select reads: NaN, Inf, -0.
  for key, value in (("a", np.nan), ("c", np.inf), ("f", -0.0), ("d", -np.inf)):
    leaf = stacked[key]
    stacked[key] = leaf.at[(slice(None),) + (0,) * (leaf.ndim - 1)].set(value)

  plan = ddp_jax.plan_buckets(stacked, bucket_cap_mb=0.005, first_bucket_cap_mb=0.005)
  assert plan.num_buckets >= 4

  def run():
    tx = ddp_jax.sync_gradients("data", hook=hook, bucket_cap_mb=0.005,
                                first_bucket_cap_mb=0.005)
    return shard_map_updates(tx, stacked, mesh8, "data", steps=2)

  monkeypatch.setenv("DDP_JAX_BUCKET_CHAIN", "1")
  chained, chained_state = run()
  monkeypatch.setenv("DDP_JAX_BUCKET_CHAIN", "0")
  merged, merged_state = run()
  for got, want in zip(jax.tree.leaves((chained, chained_state)),
                       jax.tree.leaves((merged, merged_state))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_control_optimization_barrier_does_not_keep_buckets_apart(mesh8):
  """Why the chain is a data dependency: psums chained by ``lax.optimization_barrier``
  lower to one all-reduce each, but XLA expands the barriers before its combiner and
  merges them into one all-reduce after the last dot."""
  def loss(p, x):
    for w in p:
      x = jnp.tanh(x @ w)
    return jnp.mean(x ** 2)

  def step(p, x):
    g = jax.grad(loss)(_axes.to_varying(p, "data"), x)  # per-replica gradients
    out, prev = [], None
    for gi in reversed(g):  # gradient-ready order
      if prev is not None:
        gi, prev = jax.lax.optimization_barrier((gi, prev))
      prev = jax.lax.psum(gi, "data")
      out.append(prev[None])
    return out

  f = jax.jit(jax.shard_map(step, mesh=mesh8, in_specs=(P(), P("data")), out_specs=P("data")))
  params = jax.device_put([jnp.full((WIDTH, WIDTH), 0.01)] * LAYERS, NamedSharding(mesh8, P()))
  x = jax.device_put(jnp.ones((8 * mesh8.size, WIDTH)), NamedSharding(mesh8, P("data")))
  report = collectives(f, params, x)
  assert report.lowered["all-reduce"].ops == LAYERS
  text = report.compiled_text
  reduces, dots = _positions(text[text.index("\nENTRY"):].split("\n")[1:])
  assert len(reduces) == 1 and reduces[0] > dots[-1], (reduces, dots)


def _bench_overlap_hlo():
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
  import bench_overlap_hlo
  return bench_overlap_hlo


ASYNC_MODULE = """HloModule m, is_scheduled=true

%fused (p: f32[4,4], q: f32[4,4]) -> f32[4,4] {
  %p = f32[4,4]{1,0} parameter(0)
  %q = f32[4,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,4]{1,0} dot(%p, %q), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%cb (c: f32[4,4]) -> f32[4,4] {
  %c = f32[4,4]{1,0} parameter(0)
  ROOT %custom-call.7 = f32[4,4]{1,0} custom-call(%c, %c), custom_call_target="__cublas$gemm"
}

ENTRY %main (a: f32[4,4], b: f32[8]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  %b = f32[8]{0} parameter(1)
  %custom-call.5 = f32[4,4]{1,0} custom-call(%a, %a), custom_call_target="__cublas$gemm"
  %all-reduce-start = (f32[4,4]{1,0}, f32[4,4]{1,0}) all-reduce-start(%custom-call.5), to_apply=%add
  %gemm_fusion_dot.2 = f32[4,4]{1,0} fusion(%a, %a), kind=kCustom, calls=%fused
  %loop_multiply_fusion = f32[4,4]{1,0} fusion(%gemm_fusion_dot.2), kind=kLoop, calls=%other
  %call = f32[4,4]{1,0} call(%a), to_apply=%cb
  %all-reduce-done = f32[4,4]{1,0} all-reduce-done(%all-reduce-start)
  ROOT %all-reduce = (f32[4,4]{1,0}, f32[8]{0}) all-reduce(f32[4,4]{1,0} %all-reduce-done, f32[8]{0} %b), to_apply=%add
}
"""


def test_bench_overlap_hlo_reads_an_async_schedule():
  """The GPU evidence's parser on a hand-written scheduled module: operand bytes (not the
  start's doubled tuple), GEMMs as custom calls, fusions over a dot and inside called
  command-buffer computations, but not an elementwise fusion fed by a GEMM."""
  r = _bench_overlap_hlo().analyze(ASYNC_MODULE)
  rows = [(a["name"], a["async"], a["bytes"], a["gemms_before_done"])
          for a in r["all_reduces"]]
  assert rows == [("all-reduce-start", True, 64, 2), ("all-reduce", False, 96, 0)]
  assert r["gemms"] == 3 and r["bytes_exposed"] == 96


def test_bench_overlap_hlo_on_cpu(tmp_path):
  """The benchmark end to end on this CPU mesh: the default merges every bucket into one
  all-reduce after the last GEMM (all bytes exposed); chained, one per bucket, most of
  them started inside the backward pass."""
  bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_overlap_hlo.py"
  env = {k: v for k, v in os.environ.items() if k != "DDP_JAX_BUCKET_CHAIN"}
  subprocess.run([sys.executable, str(bench), "--layers", "24", "--width", "1024", "--batch",
                  "8", "--out", str(tmp_path)], env=env, check=True, timeout=300,
                 capture_output=True)
  report = json.loads((tmp_path / "overlap_hlo_cpu_24x1024.json").read_text())
  m = report["runs"]["default"]["methods"]
  for method in ("pmean", "sync_default", "sync_merged"):
    assert len(m[method]["all_reduces"]) == 1
    assert m[method]["bytes_exposed"] == m[method]["bytes"] > 24 * 1024 * 1024 * 4
  chained = m["sync_chained"]
  # 4 MiB layers: the first bucket (1 MiB cap) holds one, then 7 per 25 MiB bucket, then 2.
  mib = [round(a["bytes"] / 2**20) for a in chained["all_reduces"]]
  assert mib == [4, 28, 28, 28, 8], mib
  assert chained["bytes_exposed"] == chained["all_reduces"][-1]["bytes"]
  assert "| default | sync_chained | 5 (sync) |" in (
      tmp_path / "overlap_hlo_cpu_24x1024.md").read_text()
