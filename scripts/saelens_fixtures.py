#!/usr/bin/env python3
"""Writes tiny SAEs with SAELens 6.x plus inputs and SAELens's own encode/decode outputs, for
sae-core's interop test (sae-core/tests/saelens_interop.rs). Also checks the other direction:
SAEs that sae-core saved (tests/fixtures/saelens/from_rust/, written by
`SAE_WRITE_FIXTURES=1 cargo test -p sae-core --test saelens_interop`) are loaded by SAELens and
must give sae-core's outputs.

Usage: .venv/bin/python scripts/saelens_fixtures.py [write|check-rust [DIR]|all]   (default: all)
(`check-rust DIR` loads the SAEs sae-core saved under DIR instead of the fixtures; sae-core's
`saelens_loads_what_we_save_now` test does that with freshly saved SAEs.)
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import sae_lens
from sae_lens import (
    SAE,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "saelens"
D_IN, D_SAE, N = 6, 10, 7


def randomize(sae, gen):
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.05)
            elif name == "r_mag":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def write_one(name, sae, gen, x=None):
    out = ROOT / name
    if out.exists():
        shutil.rmtree(out)
    sae.cfg.metadata.hook_name = "blocks.0.mlp.hook_post"
    sae.cfg.metadata.model_name = "tiny-fixture"
    sae.save_model(out)
    if x is None:
        x = torch.randn(N, D_IN, generator=gen)
    with torch.no_grad():
        acts = sae.encode(x)
        recon = sae.decode(acts)
    save_file(
        {"x": x.contiguous(), "feature_acts": acts.contiguous(), "recon": recon.contiguous()},
        out / "expected.safetensors",
    )
    print(f"{name}: L0 {(acts != 0).float().sum(-1).mean():.2f}")


def write():
    gen = torch.Generator().manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    randomize(sae, gen)
    write_one("standard", sae, gen)

    sae = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3))
    randomize(sae, gen)
    write_one("topk", sae, gen)

    sae = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3, rescale_acts_by_decoder_norm=True))
    randomize(sae, gen)
    write_one("topk_rescaled", sae, gen)

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))
    randomize(sae, gen)
    write_one("jumprelu", sae, gen)

    sae = GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE))
    randomize(sae, gen)
    write_one("gated", sae, gen)

    sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False))
    randomize(sae, gen)
    write_one("standard_no_b_dec_in", sae, gen)

    # An older, flat SAELens config (3.x style) with the standard weights.
    src = ROOT / "standard"
    out = ROOT / "legacy_flat_topk"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    sae = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    randomize(sae, gen)
    save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, out / "sae_weights.safetensors")
    legacy = {
        "model_name": "gpt2-small", "hook_point": "blocks.3.hook_resid_pre", "hook_point_layer": 3,
        "d_in": D_IN, "d_sae": D_SAE, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4},
        "normalize_activations": False, "apply_b_dec_to_input": True, "context_size": 128, "dtype": "float32",
        "dataset_path": "Skylion007/openwebtext", "sae_lens_training_version": "3.13.0",
        "some_old_key": [1, 2, 3],
    }
    (out / "cfg.json").write_text(json.dumps(legacy))
    x = torch.randn(N, D_IN, generator=gen)
    loaded = SAE.load_from_disk(out)
    with torch.no_grad():
        acts = loaded.encode(x)
        recon = loaded.decode(acts)
    save_file({"x": x, "feature_acts": acts.contiguous(), "recon": recon.contiguous()}, out / "expected.safetensors")
    print("legacy_flat_topk written (expected from SAELens's own loader)")

    # sparsify layout; expected outputs follow sparsify's code: relu(encoder(x - b_dec)) -> topk -> W_dec + b_dec.
    out = ROOT / "sparsify_topk"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    k = 3
    enc_w = torch.randn(D_SAE, D_IN, generator=gen) * 0.5
    enc_b = torch.randn(D_SAE, generator=gen) * 0.5
    w_dec = torch.randn(D_SAE, D_IN, generator=gen) * 0.5
    b_dec = torch.randn(D_IN, generator=gen) * 0.5
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": w_dec, "b_dec": b_dec}, out / "sae.safetensors")
    (out / "cfg.json").write_text(json.dumps({
        "expansion_factor": 2, "normalize_decoder": True, "num_latents": D_SAE, "k": k,
        "multi_topk": False, "skip_connection": False, "d_in": D_IN,
    }))
    x = torch.randn(N, D_IN, generator=gen)
    pre = torch.relu((x - b_dec) @ enc_w.T + enc_b)
    vals, idx = pre.topk(k, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, idx, vals)
    recon = acts @ w_dec + b_dec
    save_file({"x": x, "feature_acts": acts, "recon": recon}, out / "expected.safetensors")
    print("sparsify_topk written (expected from sparsify's formulas)")


def check_rust(base=None):
    base = Path(base) if base else ROOT / "from_rust"
    if not base.exists():
        print(f"{base} does not exist: run SAE_WRITE_FIXTURES=1 cargo test -p sae-core --test saelens_interop first")
        return 1
    worst = 0.0
    for d in sorted(p for p in base.iterdir() if p.is_dir()):
        sae = SAE.load_from_disk(d)
        exp = load_file(d / "expected.safetensors")
        with torch.no_grad():
            acts = sae.encode(exp["x"])
            recon = sae.decode(acts)
        da = (acts - exp["feature_acts"]).abs().max().item()
        dr = (recon - exp["recon"]).abs().max().item()
        worst = max(worst, da, dr)
        cfg = json.loads((d / "cfg.json").read_text())
        print(f"{d.name}: SAELens class {type(sae).__name__} (cfg architecture {cfg['architecture']}), "
              f"max |acts - ours| = {da:.2e}, max |recon - ours| = {dr:.2e}")
    print(f"sae_lens {sae_lens.__version__}: worst difference {worst:.2e} -> {'OK' if worst <= 1e-5 else 'MISMATCH'}")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    rc = 0
    if what in ("write", "all"):
        write()
    if what in ("check-rust", "all"):
        rc = check_rust(sys.argv[2] if len(sys.argv) > 2 else None)
    sys.exit(rc)
