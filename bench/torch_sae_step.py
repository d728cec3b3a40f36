#!/usr/bin/env python3
"""An SAE training step in plain PyTorch, written the way SAELens 6 trains (its `TopKTrainingSAE`,
`BatchTopKTrainingSAE` and `StandardTrainingSAE` with `SAETrainer._train_step`), for machines that
have PyTorch but not SAELens (the GPU machine: SAELens's dependencies do not fit what travels
there).

What it does, per step, as SAELens does it:
  * encode densely: `hidden_pre = (x - b_dec) @ W_enc + b_enc`, `[batch, d_sae]`;
  * topk: `torch.topk(hidden_pre, k)`, ReLU, scattered into a dense `[batch, d_sae]` matrix;
    batchtopk: `relu(hidden_pre)` flattened, `torch.topk` of its `k * batch` largest over the
    whole batch, scattered back (SAELens's `BatchTopK`);
    standard: `relu(hidden_pre)`;
  * decode densely: `acts @ W_dec + b_dec`; MSE summed over d_in, averaged over tokens;
  * topk, batchtopk: AuxK on features dead for `--dead-tokens` tokens (top `aux_k = d_in / 2` of their
    pre-activations, reconstructing the residual, scaled by `min(n_dead / aux_k, 1)`);
    standard: L1 of the activations weighted by decoder-row norms;
  * backward, gradient-norm clip to 1, Adam; unit-norm decoder rows for standard (the parallel
    gradient component removed, rows renormalised).

Prints one JSON line in bench_sae_train's shape, with `peak_device_bytes` from
`torch.cuda.max_memory_allocated` on CUDA.

    python bench/torch_sae_step.py --arch topk --d-in 2048 --d-sae 65536 --batch 4096 --device cuda
"""

import argparse
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="topk", choices=["topk", "batchtopk", "standard"])
    ap.add_argument("--d-in", type=int, default=2048)
    ap.add_argument("--d-sae", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--l1-coefficient", type=float, default=5.0)
    ap.add_argument("--dead-tokens", type=int, default=0,
                    help="tokens without firing before a feature counts as dead (0: all dead, "
                         "so AuxK runs every step, the costliest case)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tf32", action="store_true", help="TF32 tensor cores for f32 products")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 autocast for the products (f32 weights and Adam), as SAELens's autocast option")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    dev = torch.device(args.device)
    torch.manual_seed(0)
    d_in, d_sae, n = args.d_in, args.d_sae, args.batch
    w_dec = torch.randn(d_sae, d_in, device=dev)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    params = {
        "W_enc": torch.nn.Parameter(w_dec.t().clone().contiguous()),
        "b_enc": torch.nn.Parameter(torch.zeros(d_sae, device=dev)),
        "W_dec": torch.nn.Parameter(w_dec),
        "b_dec": torch.nn.Parameter(torch.zeros(d_in, device=dev)),
    }
    opt = torch.optim.Adam(params.values(), lr=4e-5, betas=(0.9, 0.999))
    batches = [torch.randn(n, d_in, device=dev) for _ in range(2)]
    since_fired = torch.zeros(d_sae, dtype=torch.long, device=dev)
    aux_k = d_in // 2

    def step(x):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            return step_inner(x)

    def step_inner(x):
        p = params
        hidden_pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        if args.arch == "topk":
            top = hidden_pre.topk(args.k, dim=-1)
            acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, top.values.relu())
        elif args.arch == "batchtopk":
            flat = hidden_pre.relu().flatten()
            top = flat.topk(args.k * hidden_pre.shape[0], dim=-1)
            acts = torch.zeros_like(flat).scatter(-1, top.indices, top.values)
            acts = acts.reshape(hidden_pre.shape)
        else:
            acts = hidden_pre.relu()
        x_hat = acts @ p["W_dec"] + p["b_dec"]
        mse = (x_hat - x).pow(2).sum(-1).mean()
        loss = mse
        with torch.no_grad():
            fired = (acts > 0).any(0)
            since_fired.add_(n)
            since_fired[fired] = 0
            dead = since_fired >= args.dead_tokens
        if args.arch in ("topk", "batchtopk"):
            n_dead = int(dead.sum())
            if n_dead > 0:
                k_aux = min(aux_k, n_dead)
                scale = min(n_dead / aux_k, 1.0)
                masked = torch.where(dead[None], hidden_pre, -torch.inf)
                atop = masked.topk(k_aux, dim=-1)
                aux_acts = torch.zeros_like(hidden_pre).scatter(-1, atop.indices, atop.values)
                recon = aux_acts @ p["W_dec"]
                residual = (x - x_hat).detach()
                loss = loss + scale * (recon - residual).pow(2).sum(-1).mean()
        else:
            loss = loss + args.l1_coefficient * (acts * p["W_dec"].norm(dim=1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.arch == "standard":
            with torch.no_grad():
                w, g = p["W_dec"], p["W_dec"].grad
                g -= (g * w).sum(-1, keepdim=True) * w
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        if args.arch == "standard":
            with torch.no_grad():
                p["W_dec"] /= p["W_dec"].norm(dim=1, keepdim=True)
        return (acts > 0).float().sum(-1).mean()

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    step(batches[0])
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    l0 = [step(batches[(s + 1) % 2]) for s in range(args.steps)]
    sync()
    secs = time.perf_counter() - t0
    tokens_per_s = n * args.steps / secs
    print(json.dumps({
        "bench": "sae_train_step",
        "impl": f"torch {torch.__version__} (SAELens-style dense step)",
        "path": "dense",
        "device": args.device,
        "dtype": "f32 (bf16 products)" if args.bf16 else "f32 (tf32 products)" if args.tf32 else "f32",
        "arch": args.arch,
        "d_in": d_in,
        "d_sae": d_sae,
        "batch": n,
        "k": args.k if args.arch != "standard" else None,
        "steps": args.steps,
        "dead_tokens": args.dead_tokens,
        "seconds_per_step": secs / args.steps,
        "tokens_per_s": tokens_per_s,
        "gflops": 12.0 * d_in * d_sae * tokens_per_s / 1e9,
        "l0": float(torch.stack(l0).mean()),
        "peak_device_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
    }))


if __name__ == "__main__":
    main()
