#!/usr/bin/env python3
"""Runs sae-core's training-step benchmark and SAELens's on the same shapes and batch, one after
the other in one invocation (timings here swing ~30% between runs: compare the ratio taken
together), printing each side's JSON line and one ratio line per architecture.

    python3 bench/sae_train_side_by_side.py [--archs topk,standard,batchtopk] [--d-in 1536] [--d-sae 12288]
                                           [--batch 4096] [--steps 3] [--k 32] [--target-l0 32]

Needs `cargo` and the venv of bench/setup_venv.sh (override with --python).
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def line(cmd):
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
    row = [json.loads(l) for l in out.splitlines() if l.startswith("{")][-1]
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="topk,standard")
    ap.add_argument("--d-in", type=int, default=1536)
    ap.add_argument("--d-sae", type=int, default=12288)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--l1-coefficient", type=float, default=5.0)
    ap.add_argument("--target-l0", type=int, default=32)
    ap.add_argument("--python", default=os.path.join(ROOT, ".venv/bin/python"))
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--example", "bench_sae_train"], cwd=ROOT, check=True)
    for arch in args.archs.split(","):
        common = ["--arch", arch, "--d-in", str(args.d_in), "--d-sae", str(args.d_sae),
                  "--batch", str(args.batch), "--steps", str(args.steps), "--k", str(args.k),
                  "--l1-coefficient", str(args.l1_coefficient), "--target-l0", str(args.target_l0)]
        ours = line(["cargo", "run", "--release", "--quiet", "--example", "bench_sae_train", "--"] + common)
        theirs = line([args.python, os.path.join(ROOT, "bench/saelens_train_step.py")] + common)
        print(json.dumps({
            "bench": "sae_train_step", "arch": arch,
            "ratio": "sae-core / sae-lens tokens_per_s",
            "ours_tokens_per_s": round(ours["tokens_per_s"], 1),
            "saelens_tokens_per_s": round(theirs["tokens_per_s"], 1),
            "ours_l0": round(ours["l0"], 1), "saelens_l0": round(theirs["l0"], 1),
            "speedup": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
        }), flush=True)


if __name__ == "__main__":
    main()
