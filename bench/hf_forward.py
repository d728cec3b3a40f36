#!/usr/bin/env python3
"""HF transformers' forward-pass throughput, measured exactly as `examples/bench_forward` measures
ours: (a) a full pass with logits at every position, (b) a pass that stops after
`blocks.L.mlp.hook_post` (the input of layer L's `down_proj`) and keeps it. One JSON line each.

    .venv/bin/python bench/hf_forward.py --model assets/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --layer 15 --batch 8 --ctx 256

The model is loaded from the same GGUF file, dequantized to float32, eager attention, no grad.
"""

import argparse
import json
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM


class Stop(Exception):
    pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--attn", default="eager", help="eager or sdpa")
    args = ap.parse_args()

    d, f = os.path.split(os.path.abspath(args.model))
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, attn_implementation=args.attn)
    model.eval()
    load_s = time.time() - t0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.ctx), generator=g)
    n_tokens = args.batch * args.ctx
    captured = {}

    def grab(_module, inputs):
        captured["mlp_post"] = inputs[0]
        raise Stop

    def full():
        with torch.no_grad():
            return model(ids).logits

    def stopped():
        h = model.model.layers[args.layer].mlp.down_proj.register_forward_pre_hook(grab)
        try:
            with torch.no_grad():
                model(ids)
        except Stop:
            pass
        finally:
            h.remove()
        return captured["mlp_post"]

    for bench, fn, hook in [
        ("forward_full_logits", full, None),
        ("forward_stop_at_mlp_post", stopped, f"blocks.{args.layer}.mlp.hook_post"),
    ]:
        fn()
        secs = []
        for _ in range(max(1, args.reps)):
            t = time.time()
            fn()
            secs.append(time.time() - t)
        s = statistics.median(secs)
        print(
            json.dumps(
                {
                    "bench": bench,
                    "impl": f"hf-transformers {__import__('transformers').__version__} (torch {torch.__version__}, {args.attn})",
                    "model": f,
                    "hook": hook,
                    "device": "cpu",
                    "threads": torch.get_num_threads(),
                    "dtype": "f32",
                    "batch": args.batch,
                    "ctx": args.ctx,
                    "reps": len(secs),
                    "seconds_median": s,
                    "seconds_all": secs,
                    "tokens_per_s": n_tokens / s,
                    "load_s": load_s,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
