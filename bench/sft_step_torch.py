#!/usr/bin/env python3
"""One chat fine-tuning optimizer step in PyTorch with HF transformers, timed, on an HF folder and
token ids written by `bench_sft --save-hf DIR --dump-tokens FILE`: forward, loss on the second
half of each window, backward, gradient clipping, AdamW; the embedding frozen unless --mode
embeddings (as `bench_sft`'s modes). Prints one JSON line like `bench_sft`'s.
"""

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mode", default="full", choices=["full", "embeddings"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = torch.tensor(json.load(open(args.tokens)), dtype=torch.long)
    batch, seq = ids.shape
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
    model.train()
    model.get_input_embeddings().weight.requires_grad_(args.mode == "embeddings")
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": no_decay, "weight_decay": 0.0}], lr=5e-5)
    times, losses = [], []
    for s in range(args.steps + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if s > 0:
            times.append(dt)
    times.sort()
    med = times[len(times) // 2]
    print(json.dumps({
        "bench": "sft_step", "impl": "pytorch", "torch": torch.__version__, "mode": args.mode,
        "batch": batch, "seq": seq, "trainable_params": sum(p.numel() for p in params),
        "first_loss": losses[0], "losses": losses, "step_s": med,
        "tokens_per_s": batch * seq / med, "threads": args.threads,
    }), flush=True)


if __name__ == "__main__":
    main()
