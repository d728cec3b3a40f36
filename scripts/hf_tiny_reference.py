#!/usr/bin/env python3
"""Tiny random checkpoints in the HF layout, with HF transformers' outputs on them.

No GPT-2 (or small Qwen2/Llama/Gemma-3 safetensors) weights can be downloaded here, so HF
transformers itself makes small random models of each family, saves them as `config.json` +
`model.safetensors`, and records what its own forward pass computes:

  * logits at every position for a batch of two sequences,
  * `hidden_states` (= `blocks.{L}.hook_resid_pre` for every layer),
  * logits for the same sequences left-padded to a longer batch, with an attention mask and
    explicit position ids (positions count real tokens only, as transformer-hooks does).

Weights are redrawn with a larger spread than HF's init (std 0.02 gives near-uniform logits that
would hide mistakes); Gemma's sliding window is 4 so that 12-token sequences exercise it.

    .venv/bin/python scripts/hf_tiny_reference.py [--out transformer-hooks/tests/fixtures/tiny]

Checked by transformer-hooks/tests/hf_tiny.rs. Each folder is ~100 KB.
"""

import argparse
import json
import os

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
)

VOCAB = 128


def rounded(t):
    """A tensor as nested lists, rounded to 1e-6 (far below the tolerance the tests use)."""
    return t.double().mul(1e6).round().div(1e6).tolist()
SEQ = 12


def configs():
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return {
        "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                           activation_function="gelu_new", bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        "llama": LlamaConfig(**common, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True),
        "qwen2": Qwen2Config(**common, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False),
        "gemma3": Gemma3TextConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
            query_pre_attn_scalar=16, sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_theta=1000000.0, rope_local_base_freq=10000.0, rms_norm_eps=1e-6,
            final_logit_softcapping=None, attn_logit_softcapping=None,
        ),
    }


def redraw(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln" in name):
                # Gemma stores w and applies 1 + w; others apply w directly.
                centre = 0.0 if isinstance(model.config, Gemma3TextConfig) else 1.0
                p.copy_(centre + 0.3 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if "wte" not in name and "wpe" not in name else 8
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="transformer-hooks/tests/fixtures/tiny")
    args = ap.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    lens = [SEQ, SEQ - 5]
    pad = 3
    for key, cfg in configs().items():
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
        redraw(model)
        out_dir = os.path.join(args.out, key)
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        for extra in ["generation_config.json"]:
            p = os.path.join(out_dir, extra)
            if os.path.exists(p):
                os.remove(p)
        with torch.no_grad():
            o = model(ids, output_hidden_states=True)
            # Left-padded batch: row r holds ids[r, :lens[r]] after (SEQ + pad - lens[r]) pads.
            width = SEQ + pad
            padded = torch.zeros((2, width), dtype=torch.long)
            mask = torch.zeros((2, width), dtype=torch.long)
            for r, n in enumerate(lens):
                padded[r, width - n:] = ids[r, :n]
                mask[r, width - n:] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            op = model(padded, attention_mask=mask, position_ids=pos)
        ref = {
            "generator": "scripts/hf_tiny_reference.py",
            "transformers": transformers.__version__,
            "ids": ids.tolist(),
            "logits": rounded(o.logits),
            # hidden_states[l] is the input of layer l; the last one is after the final norm.
            "resid_pre": [rounded(h) for h in o.hidden_states[: cfg.num_hidden_layers]],
            "padded_ids": padded.tolist(),
            "padded_mask": mask.tolist(),
            "padded_logits": rounded(op.logits),
        }
        with open(os.path.join(out_dir, "reference.json"), "w") as fh:
            json.dump(ref, fh, separators=(",", ":"))
        print(key, "->", out_dir, sorted(os.listdir(out_dir)))


if __name__ == "__main__":
    main()
