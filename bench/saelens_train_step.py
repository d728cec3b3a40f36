#!/usr/bin/env python3
"""Times SAELens 6.x's training step, f32, Gaussian inputs: `training_forward_pass`, `backward`,
gradient-norm clip to 1.0 and an Adam step, as `SAETrainer._train_step` does it (the dead-feature
bookkeeping included). On the CPU by default; `--device cuda` (with `--tf32` for TF32 products)
on a GPU, as `scripts/gpu_check.sh` runs it where SAELens is installed. Prints one JSON line in
bench_sae_train's shape.

For `standard` the encoder bias is set, after one warm-up step, so that each feature fires on
target_l0/d_sae of the batch (L0 ~ target_l0), as bench_sae_train does, so that both sides time
the sparse regime a trained SAE is in. (SAELens's step costs the same at any L0: it is dense.)

    .venv/bin/python bench/saelens_train_step.py --arch topk --d-in 1536 --d-sae 12288 --batch 4096 --steps 3
"""

import argparse
import json
import time

import torch
import sae_lens
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="topk", choices=["standard", "topk", "batchtopk"])
    ap.add_argument("--d-in", type=int, default=1536)
    ap.add_argument("--d-sae", type=int, default=12288)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--l1-coefficient", type=float, default=5.0)
    ap.add_argument("--target-l0", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tf32", action="store_true", help="TF32 tensor cores for f32 products")
    ap.add_argument("--dead-tokens", type=int, default=10_000_000 * 4096,
                    help="tokens without firing before a feature counts as dead for AuxK "
                         "(0: every feature, AuxK at every step)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=args.k))
        coefficients = {}
    elif args.arch == "batchtopk":
        sae = BatchTopKTrainingSAE(
            BatchTopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=args.k))
        coefficients = {}
    else:
        sae = StandardTrainingSAE(
            StandardTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, l1_coefficient=args.l1_coefficient))
        coefficients = {"l1": args.l1_coefficient}
    sae.to(dev)
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=4e-5, betas=(0.9, 0.999))
    batches = [torch.randn(args.batch, args.d_in, device=dev) for _ in range(2)]
    since_fired = torch.zeros(args.d_sae, dtype=torch.long, device=dev)
    n_fired = torch.zeros(args.d_sae, device=dev)

    def step(x, i):
        out = sae.training_forward_pass(TrainStepInput(
            sae_in=x, coefficients=coefficients, dead_neuron_mask=(since_fired >= args.dead_tokens),
            n_training_steps=i, is_logging_step=False))
        with torch.no_grad():
            firing = out.feature_acts.bool().float()
            did_fire = firing.sum(-2).bool()
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
            n_fired.add_(firing.sum(0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return (out.feature_acts != 0).float().sum(-1).mean().item()

    l0_first = step(batches[0], 0)
    if args.arch == "standard" and args.target_l0 > 0:
        with torch.no_grad():
            x = batches[1]
            pre = (x - sae.b_dec) @ sae.W_enc
            q = 1.0 - args.target_l0 / args.d_sae
            thr = torch.quantile(pre[: min(2048, args.batch)], q, dim=0)
            sae.b_enc.sub_(thr - 1e-6)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    l0 = 0.0
    sync()
    t0 = time.perf_counter()
    for s in range(args.steps):
        l0 += step(batches[(s + 1) % 2], s + 1)
    sync()
    secs = time.perf_counter() - t0
    tps = args.batch * args.steps / secs
    print(json.dumps({
        "bench": "sae_train_step", "impl": f"sae-lens {sae_lens.__version__} (torch {torch.__version__})",
        "device": args.device, "dtype": "f32 (tf32 products)" if args.tf32 else "f32",
        "arch": args.arch, "dead_tokens": args.dead_tokens, "d_in": args.d_in, "d_sae": args.d_sae,
        "batch": args.batch, "k": args.k if args.arch != "standard" else None,
        "target_l0": args.target_l0 if args.arch == "standard" else None,
        "threads": torch.get_num_threads(), "steps": args.steps, "seconds_per_step": secs / args.steps,
        "tokens_per_s": tps, "gflops": 12.0 * args.d_in * args.d_sae * tps / 1e9,
        "l0": l0 / args.steps, "l0_first_step": l0_first,
        "peak_device_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
    }), flush=True)


if __name__ == "__main__":
    main()
