#!/usr/bin/env python3
"""Loads an SAE folder with SAELens 6.x and saves it again with SAELens's own `save_model`, so
that `eval_sae` can be shown to read what SAELens writes, on a real model and hook:

    .venv/bin/python scripts/saelens_resave.py runs/main/saes/topk_12288 runs/topk_by_saelens
    cargo run --release --example eval_sae -- --model assets/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --sae runs/topk_by_saelens --text-file assets/corpora/moby-dick/data.txt

Prints one JSON line: the architecture and hook SAELens read, and the tensors it wrote.
"""
import json
import sys

import sae_lens
from sae_lens import SAE


def main():
    src, dst = sys.argv[1], sys.argv[2]
    sae = SAE.load_from_disk(src, device="cpu")
    weights, cfg = sae.save_model(dst)
    print(json.dumps({
        "sae_lens": sae_lens.__version__,
        "architecture": sae.cfg.architecture(),
        "hook_name": sae.cfg.metadata.hook_name,
        "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
        "tensors": sorted(k for k in sae.state_dict()),
        "wrote": [str(weights), str(cfg)],
    }))


if __name__ == "__main__":
    main()
