#!/usr/bin/env python3
"""Runs our forward benchmark and HF transformers' on the same model and shapes, one after the
other in one invocation (timings on these machines swing ~30% between runs, so compare ratios
taken together), and prints each side's JSON lines plus one ratio line per measurement.

    python3 bench/forward_side_by_side.py [--model PATH] [--layer 15] [--batch 8] [--ctx 256] [--reps 3]

Needs `cargo` and the venv of bench/setup_venv.sh (override with --python).
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lines(cmd):
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
    rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    for r in rows:
        print(json.dumps(r), flush=True)
    return {r["bench"]: r for r in rows}


def main():
    assets = os.environ.get("SAE_ASSETS", os.path.join(ROOT, "assets"))
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(assets, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--python", default=os.path.join(ROOT, ".venv/bin/python"))
    args = ap.parse_args()
    common = ["--model", args.model, "--layer", str(args.layer), "--batch", str(args.batch),
              "--ctx", str(args.ctx), "--reps", str(args.reps)]
    subprocess.run(["cargo", "build", "--release", "--example", "bench_forward"], cwd=ROOT, check=True)
    ours = lines(["cargo", "run", "--release", "--quiet", "--example", "bench_forward", "--"] + common)
    hf = lines([args.python, os.path.join(ROOT, "bench/hf_forward.py")] + common)
    for bench in ours:
        if bench in hf:
            print(json.dumps({
                "bench": bench,
                "ratio": "transformer-hooks / hf-transformers tokens_per_s",
                "ours_tokens_per_s": round(ours[bench]["tokens_per_s"], 1),
                "hf_tokens_per_s": round(hf[bench]["tokens_per_s"], 1),
                "speedup": round(ours[bench]["tokens_per_s"] / hf[bench]["tokens_per_s"], 3),
            }), flush=True)


if __name__ == "__main__":
    main()
