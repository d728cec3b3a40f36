#!/usr/bin/env python3
"""HF transformers' greedy `generate` throughput with one SAE feature clamped at every step, measured
as `examples/bench_generate` measures ours: `--batch` random prompts of `--prompt` tokens (same
seeded ids are not needed: greedy cost does not depend on them), exactly `--new` new tokens each,
a forward hook on decoder layer L's output (`blocks.L.hook_resid_post`) doing the same arithmetic:

    a = TopK(ReLU((x - b_dec) @ W_enc + b_enc));  x += (v - a[..., i]) * W_dec[i]

One JSON line. The model is loaded from the same GGUF file, dequantized to float32.

    .venv/bin/python bench/hf_generate.py --model assets/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --sae target/bench_generate_sae --batch 1 --prompt 64 --new 128
"""

import argparse
import json
import os
import re
import statistics
import time

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--sae", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--feature", type=int, default=0)
    ap.add_argument("--value", type=float, default=10.0)
    ap.add_argument("--no-clamp", action="store_true")
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()

    d, f = os.path.split(os.path.abspath(args.model))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    cfg = json.load(open(os.path.join(args.sae, "cfg.json")))
    w = load_file(os.path.join(args.sae, "sae_weights.safetensors"))
    W_enc, b_enc, W_dec, b_dec = w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"]
    k = int(cfg.get("k") or cfg.get("activation_fn_kwargs", {}).get("k", 32))
    hook_name = cfg.get("metadata", {}).get("hook_name") or cfg.get("hook_name")
    layer = int(re.match(r"blocks\.(\d+)\.hook_resid_post", hook_name).group(1))
    i, v = args.feature, args.value

    def clamp(_module, _inputs, output):
        x = output[0] if isinstance(output, tuple) else output
        pre = torch.relu((x - b_dec) @ W_enc + b_enc)
        top = torch.topk(pre, k, dim=-1)
        acts = torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
        x = x + (v - acts[..., i : i + 1]) * W_dec[i]
        return (x,) + tuple(output[1:]) if isinstance(output, tuple) else x

    if not args.no_clamp:
        model.model.layers[layer].register_forward_hook(clamp)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), generator=g)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
              pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        secs = []
        for _ in range(max(1, args.reps)):
            t = time.time()
            out = model.generate(ids, **kw)
            secs.append(time.time() - t)
    assert out.shape[1] == args.prompt + args.new, out.shape
    s = statistics.median(secs)
    print(json.dumps({
        "bench": "generate",
        "impl": f"hf-transformers {__import__('transformers').__version__} (torch {torch.__version__}, threads {torch.get_num_threads()})",
        "batch": args.batch, "prompt": args.prompt, "new": args.new,
        "clamp": None if args.no_clamp else {"hook": hook_name, "feature": i, "value": v},
        "seconds": s,
        "new_tokens_per_s": args.batch * args.new / s,
    }), flush=True)


if __name__ == "__main__":
    main()
