#!/usr/bin/env python3
"""Runs `bench_sft` (Rust) and the same chat fine-tuning step in PyTorch (bench/sft_step_torch.py)
on the same dequantized Gemma-3-270M weights, batch and sequence length, one after the other in
one invocation (timings swing ~30% between runs: compare the ratio), printing each side's JSON line
and a ratio line. The Rust side first writes the model as an HF folder, which the Python side
loads: the two first losses agreeing also checks that folder.

    python3 bench/sft_side_by_side.py [--batch 4] [--seq 256] [--steps 3] [--mode full]

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
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mode", default="full", choices=["full", "embeddings"])
    ap.add_argument("--hf-dir", default=os.path.join(ROOT, "target/bench_sft/gemma-3-270m-hf"))
    ap.add_argument("--python", default=os.path.join(ROOT, ".venv/bin/python"))
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--example", "bench_sft"], cwd=ROOT, check=True)
    tokens = os.path.join(os.path.dirname(args.hf_dir), "tokens.json")
    common = ["--steps", str(args.steps), "--mode", args.mode]
    ours = line([os.path.join(ROOT, "target/release/examples/bench_sft"), "--batch", str(args.batch),
                 "--seq", str(args.seq), "--save-hf", args.hf_dir, "--dump-tokens", tokens] + common)
    theirs = line([args.python, os.path.join(ROOT, "bench/sft_step_torch.py"), "--model", args.hf_dir,
                   "--tokens", tokens] + common)
    print(json.dumps({
        "bench": "sft_step", "mode": args.mode, "batch": args.batch, "seq": args.seq,
        "ratio": "rust / pytorch tokens_per_s",
        "ours_tokens_per_s": round(ours["tokens_per_s"], 1),
        "pytorch_tokens_per_s": round(theirs["tokens_per_s"], 1),
        "ours_first_loss": round(ours["first_loss"], 4), "pytorch_first_loss": round(theirs["first_loss"], 4),
        "speedup": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
    }), flush=True)


if __name__ == "__main__":
    main()
