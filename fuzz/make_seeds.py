"""Writes the seed corpora of the fuzz targets (fuzz/seeds/<target>/) from the repository's
fixtures: tiny GGUF models, HF configs, tokenizers, SAE configs and weights, R serializations.
The cache seeds are written by `tests/fuzz_smoke.rs` (SAEW_FUZZ_SEEDS=fuzz/seeds).

    .venv/bin/python fuzz/make_seeds.py      # needs numpy, safetensors and gguf
"""
import gzip
import json
import os
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "seeds"
TINY = ROOT / "transformer-hooks" / "tests" / "fixtures" / "tiny"


def out(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def gguf_name(hf):
    m = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in m:
        return m[hf]
    _, _, layer, *rest = hf.split(".")
    local = ".".join(rest)
    local = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
        "pre_feedforward_layernorm.weight": "ffn_norm.weight",
        "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    }.get(local, local)
    if hf.endswith("post_attention_layernorm.weight") and "gemma" in str(CURRENT):
        local = "post_attention_norm.weight"
    return f"blk.{layer}.{local}"


CURRENT = None


def tiny_gguf(family, arch, tokenizer, name=None):
    global CURRENT
    CURRENT = family
    cfg = json.loads((TINY / family / "config.json").read_text())
    tensors = load_file(str(TINY / family / "model.safetensors"))
    path = SEEDS / "gguf" / f"{name or 'tiny_' + family}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    if arch == "gemma3":
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
        w.add_sliding_window(cfg.get("sliding_window", 16))
    if tokenizer == "spm":
        # 128 SentencePiece pieces as Gemma's GGUF stores them: no merges, a score per piece
        # (merges come from the scores), control tokens, one user-defined run of spaces, bytes.
        toks = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "  ", "▁"]
        toks += [chr(c) for c in range(ord("a"), ord("z") + 1)]
        toks += ["▁t", "he", "▁the", "in", "▁a", "an", "▁an", "er", "on", "at"]
        toks += [f"<0x{b:02X}>" for b in range(128 - len(toks))]
        types = [3, 3, 3, 3, 3, 3, 4] + [1] * (len(toks) - 7)
        types = [6 if t.startswith("<0x") else ty for t, ty in zip(toks, types)]
        scores = [-1000.0] * 7 + [-float(i) for i in range(len(toks) - 7)]
        w.add_tokenizer_model("llama")
        w.add_token_list(toks)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_add_space_prefix(False)
    if tokenizer == "bpe":
        # 128 tokens: the printable bytes in GPT-2's byte-level spelling, then merges of them.
        chars = [chr(c) for c in range(33, 127)]
        toks = chars + ["Ġ"] + [a + b for a, b in zip("thaeinos", "heentrnt")]
        toks += [f"<extra_{i}>" for i in range(128 - len(toks))]
        merges = [f"{a} {b}" for a, b in zip("thaeinos", "heentrnt")]
        w.add_tokenizer_model("gpt2")
        w.add_token_list(toks)
        w.add_token_merges(merges)
        w.add_token_types([1] * len(toks))
        w.add_bos_token_id(120)
        w.add_eos_token_id(121)
    for name, t in sorted(tensors.items()):
        w.add_tensor(gguf_name(name), t.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    if SEEDS.exists():
        for t in ["gguf", "hf_config", "tokenizer_json", "sae_cfg", "sae_weights", "sae_torch_state", "rdata"]:
            shutil.rmtree(SEEDS / t, ignore_errors=True)
    tiny_gguf("llama", "llama", "bpe")
    tiny_gguf("gemma3", "gemma3", "bpe")
    tiny_gguf("gemma3", "gemma3", "spm", name="tiny_gemma3_sentencepiece")
    for fam in ["gemma3", "llama", "qwen2", "gpt2"]:
        out("hf_config", f"{fam}.json", (TINY / fam / "config.json").read_bytes())
    # A word-level tokenizer with Gemma's special tokens, and a tiny byte-level BPE.
    words = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "user", "\n",
             "What", "is", "a", "cat", "?"]
    added = [{"id": i, "content": w, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, w in enumerate(words[:5])]
    word = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"String": " "}, "behavior": "Removed",
                 "invert": False},
                {"type": "Split", "pattern": {"Regex": "[?.\n]"}, "behavior": "Isolated",
                 "invert": False}]},
            "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words)},
                      "unk_token": "<pad>"}}
    out("tokenizer_json", "word_level.json", json.dumps(word).encode())
    vocab = {chr(c): i for i, c in enumerate(range(33, 127))}
    vocab["Ġ"] = len(vocab)
    for m in ["a t", "c at", "Ġ cat"]:
        vocab["".join(m.split())] = len(vocab)
    bpe = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
           "normalizer": None,
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                             "use_regex": True},
           "post_processor": None,
           "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                       "use_regex": True},
           "model": {"type": "BPE", "dropout": None, "unk_token": None,
                     "continuing_subword_prefix": None, "end_of_word_suffix": None,
                     "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                     "merges": ["a t", "c at", "Ġ cat"]}}
    out("tokenizer_json", "byte_level_bpe.json", json.dumps(bpe).encode())
    fx = ROOT / "tests" / "fixtures" / "saelens"
    for d in sorted(p for p in fx.rglob("cfg.json")):
        dialect = b"\x01" if (d.parent / "sae.safetensors").exists() else b"\x00"
        name = str(d.parent.relative_to(fx)).replace("/", "_")
        out("sae_cfg", f"{name}.json", dialect + d.read_bytes())
    out("sae_weights", "topk.safetensors", (fx / "topk" / "sae_weights.safetensors").read_bytes())
    dl = ROOT / "tests" / "fixtures" / "dictionary_learning"
    out("sae_torch_state", "topk.pt", b"\x00" + (dl / "topk" / "ae.pt").read_bytes())
    out("sae_torch_state", "gated.pt", b"\x01" + (dl / "gated" / "ae.pt").read_bytes())
    # R: the hand-built sample of rdata.rs's tests and the decompressed index of a real corpus.
    def be(i):
        return struct.pack(">i", i)

    def charsxp(s):
        return be(9 | (1 << 15) * 0) + be(len(s)) + s.encode()

    sample = (b"X\n" + be(3) + be(0x00040201) + be(0x00030500) + be(5) + b"UTF-8"
              + be(19 | (1 << 9)) + be(2) + be(16) + be(2) + charsxp("x") + be(9) + be(-1)
              + be(13) + be(1) + be(7) + be(2 | (1 << 10)) + be(1) + charsxp("names")
              + be(16) + be(2) + charsxp("a") + charsxp("b") + be(254))
    out("rdata", "sample.bin", sample)
    rdx = ROOT / "assets" / "corpora" / "austen" / "Rdata.rdx"
    if rdx.exists():
        out("rdata", "austen_index.bin", gzip.decompress(rdx.read_bytes()))
    print("seeds written to", SEEDS)
    for t in sorted(os.listdir(SEEDS)):
        print(t, sorted(os.listdir(SEEDS / t)))


if __name__ == "__main__":
    main()
