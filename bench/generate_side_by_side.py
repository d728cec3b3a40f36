#!/usr/bin/env python3
"""Greedy generation with one SAE feature clamped, ours (KV cache) and HF transformers' `generate`
(forward hook with the same arithmetic), on the same GGUF file and the same SAE, at each batch
size, one after the other in one invocation (timings here swing ~30% between runs: compare the
ratios taken together). Prints each side's JSON line and one ratio line per batch size.

    python3 bench/generate_side_by_side.py [--batches 1,8] [--prompt 64] [--new 128] [--sae DIR]

Without --sae, `bench_generate` writes a random TopK SAE (8x, k = 32) at blocks.15.hook_resid_post
and both sides load it. Needs `cargo` and the venv of bench/setup_venv.sh (override: --python).
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
    rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    print(json.dumps(rows[-1]), flush=True)
    return rows[-1]


def main():
    assets = os.environ.get("SAE_ASSETS", os.path.join(ROOT, "assets"))
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(assets, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--sae", default=None)
    ap.add_argument("--feature", type=int, default=0)
    ap.add_argument("--value", type=float, default=10.0)
    ap.add_argument("--python", default=os.path.join(ROOT, ".venv/bin/python"))
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--example", "bench_generate"], cwd=ROOT, check=True)
    sae = args.sae or os.path.join(ROOT, "target/bench_generate_sae")
    for b in [int(x) for x in args.batches.split(",")]:
        common = ["--model", args.model, "--batch", str(b), "--prompt", str(args.prompt),
                  "--new", str(args.new), "--feature", str(args.feature), "--value", str(args.value)]
        ours_cmd = ["cargo", "run", "--release", "--quiet", "--example", "bench_generate", "--"] + common
        ours_cmd += ["--sae", sae] if args.sae else ["--random-sae-dir", sae]
        ours = line(ours_cmd)
        hf = line([args.python, os.path.join(ROOT, "bench/hf_generate.py"), "--sae", sae] + common)
        print(json.dumps({
            "bench": "generate",
            "batch": b,
            "ratio": "transformer-hooks / hf-transformers new_tokens_per_s",
            "ours_new_tokens_per_s": round(ours["new_tokens_per_s"], 2),
            "hf_new_tokens_per_s": round(hf["new_tokens_per_s"], 2),
            "speedup": round(ours["new_tokens_per_s"] / hf["new_tokens_per_s"], 3),
        }), flush=True)


if __name__ == "__main__":
    main()
