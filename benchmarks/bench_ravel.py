"""Raveling a bucket: ``jnp.concatenate`` against ``ddp_jax._pack.ravel``, same run.

    python benchmarks/bench_ravel.py            # CPU, the leaf lists below
    python benchmarks/bench_ravel.py --repeats 9

XLA's CPU compiler fuses a concatenate of at most 8 operands, and the fused loop runs
over the largest operand once per operand. ``_pack.ravel`` builds such lists, when an
operand is much smaller than the largest, as the largest padded with zeros and the
others written into it in place. Each case is compiled twice, the leaves as they are
(``leaves``) and as the product of an elementwise op (``x * 2``: a producer XLA may fuse
into the copy, as with gradients); the time is the best of ``--repeats`` calls.
Writes benchmarks/out/ravel.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ddp_jax import _pack

HERE = Path(__file__).resolve().parent
CASES = {
    "BERT-base embedding bucket (30522x768 + 3 x 768)": [(768,)] * 3 + [(30522, 768)],
    "PowerSGD result: 2304 + 30522x768": [(2304,), (30522, 768)],
    "ResNet-50 layer4 (3x3x512x512, 2048x512, 2048, 512)": [(3, 3, 512, 512), (2048, 512),
                                                            (2048,), (512,)],
    "BERT layer (3 x 768x768 + 3 x 768)": [(768, 768), (768,)] * 3,
    "two equal halves (2 x 15261x768)": [(15261, 768)] * 2,
    "9 operands (8 x 768 + 30522x768)": [(768,)] * 8 + [(30522, 768)],
}


def best_ms(fn, args, repeats):
  jax.block_until_ready(fn(args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(args))
    times.append(time.perf_counter() - t)
  return min(times) * 1e3


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default=str(HERE / "out"))
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  concat = lambda xs: jnp.concatenate([jnp.ravel(x) for x in xs])  # noqa: E731
  rows = []
  for name, shapes in CASES.items():
    leaves = [jnp.asarray(rng.standard_normal(s, np.float32)) for s in shapes]
    row = {"case": name, "MB": sum(x.nbytes for x in leaves) / 2**20}
    for label, prep in (("leaves", lambda xs: xs), ("x * 2", lambda xs: [x * 2 for x in xs])):
      for impl, fn in (("concatenate", concat), ("ravel", _pack.ravel)):
        row[f"{impl} ({label})"] = best_ms(jax.jit(lambda xs, fn=fn, prep=prep: fn(prep(xs))),
                                           leaves, args.repeats)
    rows.append(row)
    print(json.dumps(row), flush=True)
  cols = [k for k in rows[0] if k not in ("case", "MB")]
  lines = [f"jnp.concatenate vs ddp_jax._pack.ravel, {jax.devices()[0].platform}, "
           f"best of {args.repeats} calls, ms", "",
           "| leaves | MB | " + " | ".join(cols) + " |",
           "|---|---:|" + "---:|" * len(cols)]
  lines += [f"| {r['case']} | {r['MB']:.1f} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |"
            for r in rows]
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "ravel.json").write_text(json.dumps(rows, indent=1))
  (out / "ravel.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
