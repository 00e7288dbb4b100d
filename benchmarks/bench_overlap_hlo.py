"""Where XLA schedules the gradient sync's all-reduces in a compiled training step: the
HLO evidence for overlap with the backward pass, on CPU or on a (mock) multi-GPU mesh.

    python benchmarks/bench_overlap_hlo.py                    # 8 CPU devices
    python benchmarks/bench_overlap_hlo.py --platform gpu     # 8 GPUs mocked on one GPU

It compiles (never runs) ``bench_overlap.py``'s MLP step (``--layers`` x ``--width`` tanh
layers, batch ``--batch`` per device) over ``--devices`` devices four ways: plain
``lax.pmean`` of the gradients, and ``sync_gradients`` as it is by default, with XLA free
to merge the buckets (``DDP_JAX_BUCKET_CHAIN=0``) and with each bucket chained to the
previous one's result (``=1``); each under every XLA flag set of the platform (a process
per flag set: XLA reads its flags once). From the scheduled module
(``compiled.as_text()``: the entry computation's instruction order is the order XLA runs
it; ``call``s into command-buffer computations are expanded in place) it reports each
all-reduce: its bytes, whether it is asynchronous (``all-reduce-start`` / ``-done``), how
many matrix products (``dot``, a GEMM custom call or fusion) are scheduled after its start
and how many between its start and its done (the backward work it can hide behind), and
the bytes started after the last GEMM (exposed). One GPU can compile for eight:
``mock_num_gpu_processes`` builds a client with mocked peers (compile only). Writes
benchmarks/out/overlap_hlo_<platform>_<layers>x<width>.{json,md} and ``.schedule.txt``
(every compiled step's collectives and GEMMs in schedule order).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_peer import write_report  # noqa: E402

sys.path.insert(0, str(HERE.parent))
from ddp_jax import inspect  # noqa: E402

LHS = "--xla_gpu_enable_latency_hiding_scheduler=true"
FLAG_SETS = {
    "cpu": {"default": ""},
    "gpu": {"default": "",
            "no_lhs": "--xla_gpu_enable_latency_hiding_scheduler=false",
            "lhs": LHS,
            "lhs_combine_1mib": f"{LHS} --xla_gpu_all_reduce_combine_threshold_bytes=1048576"},
}
METHODS = ("pmean", "sync_default", "sync_merged", "sync_chained")

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?(%?[\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_GEMM_TARGET = re.compile(r"gemm|cublas|matmul", re.I)


def computations(text: str) -> tuple[dict, str]:
  """``{name: [instruction lines]}`` of an HLO module's text, and the entry's name."""
  comps, entry, cur = {}, None, None
  for line in text.split("\n"):
    head = re.match(r"^(ENTRY\s+)?(%?[\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      cur = head.group(2).lstrip("%")
      comps[cur] = []
      if head.group(1):
        entry = cur
    elif line.startswith("}"):
      cur = None
    elif cur is not None and line.strip():
      comps[cur].append(line.strip())
  return comps, entry


def _called(line: str) -> list[str]:
  return [m.lstrip("%") for m in re.findall(r"(?:calls|to_apply)=(%?[\w.\-]+)", line)]


def _shape_bytes(shapes: list) -> int:
  """Bytes of ``(dtype, dims)`` pairs as ``ddp_jax.inspect`` reads them from HLO text."""
  return sum(inspect._shape_bytes(dtype, dims) for dtype, dims in shapes)


def _opcode(line: str) -> str | None:
  m = _INSTR.match(line)
  return m.group(3) if m else None


def _is_gemm(line: str, comps: dict, depth: int = 0) -> bool:
  """A matrix product: ``dot``, a GEMM/matmul custom call (cuBLAS, oneDNN), or a fusion
  (XLA:GPU's Triton GEMM fusions, XLA:CPU's YNNPACK fusions) whose body holds one."""
  opcode = _opcode(line)
  if opcode == "dot":
    return True
  if opcode == "custom-call":
    target = re.search(r'custom_call_target="([^"]*)"', line)
    return bool(target and _GEMM_TARGET.search(target.group(1)))
  if opcode == "fusion" and depth < 4:
    return any(_is_gemm(inner, comps, depth + 1)
               for name in _called(line) for inner in comps.get(name, ()))
  return False


def schedule(text: str) -> list[tuple[str, str, str, int]]:
  """The entry computation in execution order as ``(kind, name, line, bytes)``; ``call``s (XLA:GPU
  outlines command buffers into called computations) are expanded in place. Kinds:
  ``ar`` (a synchronous all-reduce), ``ar-start``, ``ar-done``, ``gemm``, ``op``; bytes
  all-reduced for ``ar`` and ``ar-start``."""
  comps, entry = computations(text)
  out = []
  shapes = {}

  def walk(name, depth=0):
    for line in comps[name]:
      m = _INSTR.match(line)
      if not m:
        continue
      iname, opcode = m.group(1).lstrip("%"), m.group(3)
      shapes[iname] = m.group(2)
      if opcode == "call" and depth < 4:
        for inner in _called(line):
          if inner in comps:
            walk(inner, depth + 1)
        continue
      if opcode in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
        continue
      kind = {"all-reduce": "ar", "all-reduce-start": "ar-start",
              "all-reduce-done": "ar-done"}.get(opcode)
      if kind is None:
        kind = "gemm" if _is_gemm(line, comps) else "op"
      out.append((kind, iname, line,
                  _nbytes(line, shapes) if kind in ("ar", "ar-start") else 0))

  walk(entry)
  return out


def _nbytes(line: str, types: dict) -> int:
  """Bytes all-reduced: its operands' shapes (an async start's own type is an (operands,
  results) tuple; ``ddp_jax.inspect`` reads them the same way)."""
  m = _INSTR.match(line)
  return _shape_bytes(inspect._start_operands(m.group(4), types)
                      or inspect._SHAPE.findall(m.group(2)))


def analyze(text: str) -> dict:
  """Per all-reduce in schedule order: bytes, async, GEMMs after its start and between its
  start and done; the bytes started before the last GEMM and after it (exposed: nothing
  left to hide behind); the schedule's GEMM count and an excerpt."""
  sched = schedule(text)
  gemm_at = [i for i, (k, *_) in enumerate(sched) if k == "gemm"]
  rows = []
  for i, (kind, name, _, nbytes) in enumerate(sched):
    if kind not in ("ar", "ar-start"):
      continue
    done = i
    if kind == "ar-start":
      done = next((j for j in range(i + 1, len(sched)) if sched[j][0] == "ar-done"
                   and re.search(rf"%?{re.escape(name)}\b", sched[j][2].split("=", 1)[1])),
                  len(sched))
    rows.append({"name": name, "async": kind == "ar-start", "bytes": nbytes,
                 "position": i, "gemms_after_start": sum(g > i for g in gemm_at),
                 "gemms_before_done": sum(i < g < done for g in gemm_at),
                 "ops_before_done": done - i - 1})
  last = gemm_at[-1] if gemm_at else -1
  early = sum(r["bytes"] for r in rows if r["position"] < last)
  total = sum(r["bytes"] for r in rows)
  return {"all_reduces": rows, "gemms": len(gemm_at), "instructions": len(sched),
          "bytes": total, "bytes_started_before_last_gemm": early,
          "bytes_exposed": total - early,
          "excerpt": [f"{i:5d} {k:8s} {n}" + (f"  ({b / 2**20:.2f} MiB)" if b else "")
                      for i, (k, n, _, b) in enumerate(sched) if k != "op"]}


def devices(platform: str, n: int):
  import jax
  if platform == "gpu":  # n processes of one GPU each, peers mocked (compile only)
    jax.config.update("mock_num_gpu_processes", n)
  devs = jax.devices()
  if len(devs) != n:
    raise SystemExit(f"bench_overlap_hlo: wanted {n} {platform} devices, got {len(devs)}: "
                     f"{devs[:3]}...")
  return devs


def compile_one(method: str, mesh, args) -> tuple[str, float]:
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import ddp_jax
  chain = {"sync_merged": "0", "sync_chained": "1"}.get(method)
  if chain is None:  # pmean, and ddp_jax's default ("auto")
    os.environ.pop("DDP_JAX_BUCKET_CHAIN", None)
  else:
    os.environ["DDP_JAX_BUCKET_CHAIN"] = chain
  f32 = jnp.float32
  params = [(jax.ShapeDtypeStruct((args.width, args.width), f32),
             jax.ShapeDtypeStruct((args.width,), f32)) for _ in range(args.layers)]

  def loss(p, batch):
    x, y = batch
    for w, b in p:
      x = jnp.tanh(x @ w + b)
    return jnp.mean((x - y) ** 2)

  sync = (optax.identity() if method == "pmean" else ddp_jax.sync_gradients("data"))
  tx = optax.chain(sync, optax.sgd(0.1))
  state = jax.eval_shape(tx.init, params)
  specs = ddp_jax.state_specs(state, "data")
  state = jax.eval_shape(jax.shard_map(tx.init, mesh=mesh, in_specs=(P(),), out_specs=specs),
                         params)

  def step(p, s, batch):
    g = ddp_jax.grad(loss, "data")(p, batch)
    if method == "pmean":
      g = jax.lax.pmean(g, "data")
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), specs, P("data")),
                             out_specs=(P(), specs)))

  def placed(tree, spec):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=NamedSharding(mesh, s)), tree, spec)

  rows = args.batch * mesh.size
  batch = (jax.ShapeDtypeStruct((rows, args.width), f32),) * 2
  start = time.perf_counter()
  lowered = fn.lower(placed(params, jax.tree.map(lambda _: P(), params)),
                     placed(state, specs), placed(batch, (P("data"), P("data"))))
  text = lowered.compile().as_text()
  return text, time.perf_counter() - start


def child(args) -> int:
  import jax
  import numpy as np
  mesh = jax.sharding.Mesh(np.array(devices(args.platform, args.devices)), ("data",))
  out = {"platform": args.platform, "flags": os.environ.get("XLA_FLAGS", ""),
         "jax": jax.__version__, "device_kind": mesh.devices.flat[0].device_kind,
         "methods": {}}
  for method in METHODS:
    text, seconds = compile_one(method, mesh, args)
    out["methods"][method] = {**analyze(text), "compile_s": seconds,
                              "scheduled": "is_scheduled=true" in text}
  Path(args.child).write_text(json.dumps(out))
  return 0


def row(flags: str, method: str, r: dict) -> str:
  ars = r["all_reduces"]
  mib = ", ".join(f"{a['bytes'] / 2**20:.1f}" for a in ars)
  hidden = sum(a["gemms_before_done"] > 0 for a in ars)
  early = sum(a["gemms_after_start"] > 0 for a in ars)
  kind = "async" if ars and all(a["async"] for a in ars) else "sync"
  share = r["bytes_started_before_last_gemm"] / max(r["bytes"], 1)
  return (f"| {flags} | {method} | {len(ars)} ({kind}) | {mib} | {early} of {len(ars)} | "
          f"{100 * share:.0f}% | {r['bytes_exposed'] / 2**20:.1f} | {hidden} of {len(ars)} | "
          f"{', '.join(str(a['gemms_before_done']) for a in ars)} | {r['gemms']} | "
          f"{r['compile_s']:.1f} |")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--platform", default="cpu", choices=("cpu", "gpu"))
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--layers", type=int, default=6)
  p.add_argument("--width", type=int, default=2048)
  p.add_argument("--batch", type=int, default=256, help="per device")
  p.add_argument("--flag-sets", nargs="+", default=None,
                 help="names from the platform's flag sets (default: all)")
  p.add_argument("--timeout", type=int, default=300, help="seconds per flag set")
  p.add_argument("--out", default=str(HERE / "out"))
  p.add_argument("--child", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    return child(args)
  os.makedirs(args.out, exist_ok=True)
  stem = Path(args.out) / f"overlap_hlo_{args.platform}_{args.layers}x{args.width}"
  sets = FLAG_SETS[args.platform]
  report = {"platform": args.platform, "devices": args.devices, "layers": args.layers,
            "width": args.width, "batch": args.batch, "runs": {}}
  lines, excerpts = [], []
  for name in args.flag_sets or list(sets):
    flags = sets[name]
    env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    if args.platform == "cpu":
      env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={args.devices}"
      env["JAX_PLATFORMS"] = "cpu"
    else:
      env["XLA_FLAGS"] += " --xla_gpu_shard_autotuning=false"
    tmp = Path(f"{stem}.{name}.tmp")
    cmd = [sys.executable, __file__, "--platform", args.platform, "--devices",
           str(args.devices), "--layers", str(args.layers), "--width", str(args.width),
           "--batch", str(args.batch), "--child", str(tmp)]
    try:
      done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
      print(f"{name}: did not compile in {args.timeout} s", flush=True)
      continue
    if done.returncode:
      print(f"{name} ({flags!r}) failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
      continue
    run = json.loads(tmp.read_text())
    tmp.unlink()
    report["runs"][name] = run
    excerpts += [f"## {name}: XLA_FLAGS={run['flags']!r}, {run['device_kind']}, "
                 f"jax {run['jax']}", ""]
    for method, r in run["methods"].items():
      excerpts += [f"{method} (position in the schedule, kind, instruction):",
                   *r.pop("excerpt"), ""]
    for method, r in run["methods"].items():
      lines.append(row(name, method, r))
      print(lines[-1], flush=True)
  if not report["runs"]:
    return 1
  Path(f"{stem}.schedule.txt").write_text("\n".join(excerpts))
  some = next(iter(report["runs"].values()))
  n_params = args.layers * (args.width + 1) * args.width
  head = [f"Compiled schedule of the MLP step ({args.layers} x {args.width}, "
          f"{n_params / 1e6:.1f}M parameters, batch {args.batch} per device) over "
          f"{args.devices} {some['device_kind']} devices"
          f"{' (mocked peers, compile only)' if args.platform == 'gpu' else ''}, "
          f"jax {some['jax']}. Flag sets: "
          + "; ".join(f"{n}: `{FLAG_SETS[args.platform][n] or '(none)'}`"
                      for n in report["runs"]), "",
          "| flags | gradients | all-reduces | MiB each | started before a later GEMM | "
          "bytes started before the last GEMM | MiB started after it (exposed) | "
          "with GEMMs between start and done | GEMMs between start and done (each) | "
          "GEMMs | compile s |", "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|"]
  return write_report(stem, report, head + lines)


if __name__ == "__main__":
  sys.exit(main())
