"""One compile for all processes: process 0 compiles a step, the others load its binary.

Every process of a data-parallel run lowers the same program. Compiling it N times
costs N compiles of CPU time, all at once when a host runs several processes
(``ddp-jax-run --nproc-per-node 8``: eight compiles sharing the host's cores), and a
restart pays them again on processes 1..N-1: jax's persistent compilation cache is
written by process 0 only and, on CPU, keyed per process. Here process 0 compiles
and publishes the serialized executable in the coordination service's key-value
store; the others check that they lowered the same program for the same kind of
host (a digest of the program text, the devices, and on CPU the host's instruction
set) and load it. A process whose digest differs (another CPU model, or a step that
bakes ``jax.process_index()`` into its program) compiles its own.

With jax's persistent cache directory set (``ddp-jax-run`` sets one), process 0 also
keeps the executable there (``ddp_jax-<digest>.bin``) and a restart loads it instead
of compiling. It keeps its own file because an executable jax loads from its cache
cannot be serialized again on CPU (its kernels are missing from the copy), so it
cannot be shared. jax offers sharing for GPU/TPU (``jax_share_binary_between_hosts``)
but keys it by the persistent cache's key, which differs between CPU processes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import jax

from ddp_jax import _faults

_CHUNK = 1 << 20  # bytes per key-value entry
# A compile option with its default value: it gives process 0's compile its own key in
# jax's persistent cache, so it is never answered by an entry a plain jit wrote (which
# could not be shared, see above).
_OWN_KEY = {"xla_dump_max_hlo_modules": -1}
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_state = {"seq": 0, "hits": 0, "listening": False}


def enabled() -> bool:
  """Whether to share compiles (``DDP_JAX_SHARE_COMPILE=0`` turns it off)."""
  return os.environ.get("DDP_JAX_SHARE_COMPILE", "1") not in ("0", "false", "off")


def _host_isa() -> str:
  """What a CPU executable depends on: the host's CPU model and instruction set."""
  try:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    import platform
    return platform.processor() + platform.machine()
  keep = ("model name", "flags", "Features", "CPU part")
  return "\n".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in keep}))


def digest(lowered, devices) -> str:
  """Names a compiled program: same digest, same executable on any process."""
  h = hashlib.sha256(lowered.as_text().encode())
  for d in devices:
    h.update(f"{d.id}:{d.platform}:{d.device_kind};".encode())
  h.update(f"{jax.__version__} {os.environ.get('XLA_FLAGS', '')}".encode())
  if devices and devices[0].platform == "cpu":
    h.update(_host_isa().encode())
  return h.hexdigest()


def _count_hits(event: str, **_) -> None:
  if event == _CACHE_HIT:
    _state["hits"] += 1


def _cache_file(key: str) -> Path | None:
  root = getattr(jax.config, "jax_compilation_cache_dir", None)
  return Path(root) / f"ddp_jax-{key}.bin" if root else None


def _serialize(compiled) -> bytes:
  from jax.experimental import serialize_executable
  try:
    return serialize_executable.serialize(compiled)[0]
  except (ValueError, NotImplementedError):  # not serializable: each process compiles
    return b""


def _load(blob: bytes, lowered, devices):
  from jax.experimental import serialize_executable
  in_tree = jax.tree_util.tree_flatten(lowered.args_info)[1]
  return serialize_executable.deserialize_and_load(blob, in_tree, lowered.out_tree,
                                                   execution_devices=list(devices))


def _compile_fresh(lowered, devices, key: str):
  """Process 0: the executable (from our cache file, or compiled) and its bytes."""
  path = _cache_file(key)
  if path is not None and path.is_file():
    blob = path.read_bytes()
    try:
      return _load(blob, lowered, devices), blob
    except Exception:  # a stale or truncated file: compile again
      pass
  if not _state["listening"]:
    jax.monitoring.register_event_listener(_count_hits)
    _state["listening"] = True
  hits = _state["hits"]
  compiled = lowered.compile(compiler_options=dict(_OWN_KEY))
  if _state["hits"] != hits:  # loaded from jax's cache: its copy cannot be shared
    return compiled, b""
  blob = _serialize(compiled)
  if path is not None and blob:
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ddp_jax-")
      with os.fdopen(fd, "wb") as f:
        f.write(blob)
      os.replace(tmp, path)
    except OSError:  # a read-only cache: share without keeping
      pass
  return compiled, blob


def compile_shared(lowered, devices, what: str = "data_parallel"):
  """``lowered.compile()``, done once by process 0 and loaded by the others.

  Collective over processes: each calls it for the same programs in the same order.
  ``devices``: the executable's devices in the mesh's order.
  """
  devices = list(devices)
  client = _faults._client()
  if jax.process_count() == 1 or client is None or not enabled():
    return lowered.compile()
  _state["seq"] += 1
  slot = f"{_faults._ROOT}/compile/{_state['seq']}"
  key = digest(lowered, devices)
  if jax.process_index() == 0:
    client.key_value_set(f"{slot}/digest", key)
    compiled, blob = _compile_fresh(lowered, devices, key)
    chunks = [blob[i:i + _CHUNK] for i in range(0, len(blob), _CHUNK)]
    for i, chunk in enumerate(chunks):
      client.key_value_set_bytes(f"{slot}/exe/{i}", chunk)
    client.key_value_set(f"{slot}/chunks", str(len(chunks)))
    return compiled
  wait_ms = int(1000 * (_faults._state["timeout_s"] or _faults.DEFAULT_COLLECTIVE_TIMEOUT_S))
  try:
    theirs = client.blocking_key_value_get(f"{slot}/digest", wait_ms)
  except Exception:  # process 0 compiles another program (or none): compile our own
    return lowered.compile()
  if theirs != key:
    return lowered.compile()
  share_ms = int(getattr(jax.config, "jax_share_binary_between_hosts_timeout_ms", 20 * 60 * 1000))
  try:
    n = int(client.blocking_key_value_get(f"{slot}/chunks", share_ms))
  except Exception as e:
    raise RuntimeError(
        f"{what}: process 0 did not finish compiling this step within {share_ms / 1000:.0f} s "
        f"(jax_share_binary_between_hosts_timeout_ms; process {jax.process_index()} waits "
        f"for its executable). Is process 0 stuck? ({e})") from None
  if n == 0:
    return lowered.compile()
  blob = b"".join(client.blocking_key_value_get_bytes(f"{slot}/exe/{i}", wait_ms)
                  for i in range(n))
  return _load(blob, lowered, devices)
