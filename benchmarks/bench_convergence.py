"""Convergence per hook: the digits MLP of examples/train_cpu_mesh.py trained with each
hook for the same steps on 8 CPU devices; test accuracy, bytes per step, compression.

    python benchmarks/bench_convergence.py            # every hook below, 400 steps
    python benchmarks/bench_convergence.py --steps 200 --hooks allreduce "topk(0.1)"

Writes benchmarks/out/convergence.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOOKS = [
    "allreduce()",
    "fp16_compress()",
    "bf16_compress()",
    "allgather_then_aggregate()",
    "quantize_per_tensor()",
    "quantize_per_channel()",
    "int8_allreduce()",
    "powersgd(rank=2, start_iter=50)",
    "powersgd(rank=1, start_iter=50)",
    "batched_powersgd(rank=2, start_iter=50)",
    "batched_powersgd(rank=2, start_iter=50, use_error_feedback=False)",
    "fp16_compress_wrapper(powersgd(rank=2, start_iter=50))",
    "by_path({'*bias*': allreduce()}, default=powersgd(rank=2, start_iter=50))",
    "schedule({0: allreduce(), 100: int8_allreduce(), 200: powersgd(rank=2, start_iter=0)})",
    "topk(0.1)",
    "sign_compress()",
    "error_feedback(fp16_compress())",
    "adasum()",
]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--hooks", nargs="+", default=HOOKS)
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--out", default=str(HERE / "out"))
  args = p.parse_args(argv)
  sys.path.insert(0, str(HERE.parent / "examples"))
  import train_cpu_mesh as example
  example.set_devices(args.devices)
  rows = []
  for expr in args.hooks:
    r = example.train(expr, steps=args.steps, progress=False)
    r.pop("plan")
    rows.append(r)
    print(f"{expr:70} acc {r['accuracy']:.4f}  {r['bytes_sent'] / 1024:8.1f} KiB/step  "
          f"{r['seconds']:.1f} s", flush=True)
  base = next((r for r in rows if r["hook"] in ("allreduce()", "allreduce")), rows[0])
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "convergence.json").write_text(json.dumps(rows, indent=1))
  lines = [f"Digits MLP, {rows[0]['devices']} CPU devices, {args.steps} steps, adam 3e-3, "
           "global batch 128; bytes one replica sends per step (ring algorithms).", "",
           "| hook | test accuracy | vs allreduce (pp) | KiB sent / step | less than all-reduce |",
           "|---|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| `{r['hook']}` | {r['accuracy']:.4f} | "
                 f"{100 * (r['accuracy'] - base['accuracy']):+.2f} | "
                 f"{r['bytes_sent'] / 1024:.1f} | "
                 f"{r['bytes_uncompressed'] / max(r['bytes_sent'], 1):.1f}x |")
  md = "\n".join(lines) + "\n"
  (out / "convergence.md").write_text(md)
  print(md)
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
  except ImportError:
    return
  fig, ax = plt.subplots(figsize=(8, 4.5))
  for r in rows:
    smooth = np.convolve(r["losses"], np.ones(10) / 10, mode="valid")
    ax.plot(smooth, lw=1, label=f"{r['hook'][:40]} ({r['accuracy']:.3f})")
  ax.set(xlabel="step", ylabel="training loss (10-step mean)", yscale="log",
         title="digits MLP: loss per hook")
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(out / "convergence.png", dpi=110)


if __name__ == "__main__":
  main()
