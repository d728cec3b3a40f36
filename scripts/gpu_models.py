#!/usr/bin/env python3
"""Randomly initialised checkpoints of SmolLM2-135M's and Gemma-3-270M's shapes, in the HF layout
(`config.json` + `model.safetensors`), made by HF transformers from a config.

For machines where no model of ours can travel (the GPU machine takes at most 64 MiB): the
forward-parity check (`examples/parity`) loads them on the CPU and on the GPU and compares. The
shapes are the real models' (layers, widths, heads, vocabularies, Gemma's sliding window and its
five-local-one-global layer pattern); the weights are HF's own initialisation, seeded, with the
(tied) embedding redrawn at std 0.05 instead of 0.02, so that the logits are far from uniform and a
wrong kernel shows in the log-probabilities.

    python scripts/gpu_models.py --out /tmp/models      # writes /tmp/models/{smollm2,gemma3}
"""

import argparse
import os

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig


def configs():
    return {
        # HuggingFaceTB/SmolLM2-135M-Instruct: llama, 30 layers, d_model 576, 9 heads / 3 KV.
        "smollm2": LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
            rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2,
        ),
        # google/gemma-3-270m: 18 layers, d_model 640, 4 heads / 1 KV of 256, window 512.
        "gemma3": Gemma3TextConfig(
            vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
            num_attention_heads=4, num_key_value_heads=1, head_dim=256,
            max_position_embeddings=32768, query_pre_attn_scalar=256, sliding_window=512,
            layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                         for i in range(18)],
            rope_theta=1000000.0, rope_local_base_freq=10000.0, rms_norm_eps=1e-6,
            final_logit_softcapping=None, attn_logit_softcapping=None, tie_word_embeddings=True,
        ),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", choices=["smollm2", "gemma3"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for name, cfg in configs().items():
        if args.only and name != args.only:
            continue
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, 0.05)
        path = os.path.join(args.out, name)
        model.save_pretrained(path, safe_serialization=True)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name}: {n / 1e6:.1f}M parameters -> {path}", flush=True)


if __name__ == "__main__":
    main()
