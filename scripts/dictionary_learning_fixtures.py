"""Fixtures for sae-core's dictionary_learning loader, written by that library's own classes.

dictionary_learning (Marks et al., `pip download dictionary-learning==0.1.0 --no-deps`, its wheel
unpacked in DL_ROOT) saves a trained SAE as `ae.pt` (a torch state dict) beside `config.json`
(`{"trainer": {"dict_class": ..., "activation_dim": ..., "dict_size": ..., "k": ..., "layer": ...,
"lm_name": ..., "submodule_name": ...}}`). For each class this writes such a folder for a random
tiny SAE (d_in 6, d_sae 10) and `expected.safetensors`: inputs `x` and the class's own
`encode(x)` (`feature_acts`) and `decode(feature_acts)` (`recon`).

    DL_ROOT=/tmp/dl .venv/bin/python scripts/dictionary_learning_fixtures.py

Only torch, safetensors and dictionary_learning's model files are imported (its package
`__init__` pulls in nnsight for the activation buffer, which the fixtures do not need).
"""
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import torch as t
from safetensors.torch import save_file

root = Path(os.environ.get("DL_ROOT", "/tmp/dl")) / "dictionary_learning"
out_root = Path(__file__).resolve().parent.parent / "tests/fixtures/dictionary_learning"

# The package without its __init__ (nnsight): a bare module object with the files we need.
pkg = types.ModuleType("dictionary_learning")
pkg.__path__ = [str(root)]
sys.modules["dictionary_learning"] = pkg
trainers = types.ModuleType("dictionary_learning.trainers")
trainers.__path__ = [str(root / "trainers")]
sys.modules["dictionary_learning.trainers"] = trainers


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


dictionary = load("dictionary_learning.dictionary", root / "dictionary.py")
top_k = load("dictionary_learning.trainers.top_k", root / "trainers/top_k.py")
batch_top_k = load("dictionary_learning.trainers.batch_top_k", root / "trainers/batch_top_k.py")

D_IN, D_SAE = 6, 10


def randomize(ae, gen):
    with t.no_grad():
        for name, p in ae.named_parameters():
            p.copy_(t.randn(p.shape, generator=gen) * (0.5 if "bias" in name or "b_" in name else 1.0))


def write(name, ae, dict_class, gen, extra=None, submodule="resid_post_layer_3", prepare=None):
    out = out_root / name
    out.mkdir(parents=True, exist_ok=True)
    trainer = {
        "trainer_class": "fixture",
        "dict_class": dict_class,
        "activation_dim": D_IN,
        "dict_size": D_SAE,
        "layer": 3,
        "lm_name": "tiny-fixture",
        "submodule_name": submodule,
    }
    trainer.update(extra or {})
    (out / "config.json").write_text(json.dumps({"trainer": trainer}, indent=4))
    x = t.randn(5, D_IN, generator=gen) * 2.0
    if prepare is not None:
        prepare(ae, x)
    t.save(ae.state_dict(), out / "ae.pt")
    with t.no_grad():
        acts = ae.encode(x)
        recon = ae.decode(acts)
    assert (acts != 0).any(), name
    save_file({"x": x, "feature_acts": acts.contiguous(), "recon": recon.contiguous()}, out / "expected.safetensors")
    print(f"{name}: {dict_class}, {int((acts != 0).sum())} active codes")


gen = t.Generator().manual_seed(7)

ae = dictionary.AutoEncoder(D_IN, D_SAE)
randomize(ae, gen)
write("standard", ae, "AutoEncoder", gen)

ae = top_k.AutoEncoderTopK(D_IN, D_SAE, k=3)
randomize(ae, gen)
write("topk", ae, "AutoEncoderTopK", gen, {"k": 3}, submodule="mlp_out_layer_3")

def median_threshold(ae, x):
    """The threshold at the median positive pre-activation of `x`: it removes half the codes a
    plain ReLU would keep, so a loader that drops it fails the fixture."""
    with t.no_grad():
        post = t.relu(ae.encoder(x - ae.b_dec))
        ae.threshold.fill_(post[post > 0].median().item())
        assert (ae.encode(x) != 0).sum() < (post > 0).sum()


ae = batch_top_k.BatchTopKSAE(D_IN, D_SAE, k=3)
randomize(ae, gen)
write("batchtopk", ae, "BatchTopKSAE", gen, {"k": 3}, prepare=median_threshold)

matryoshka = load(
    "dictionary_learning.trainers.matryoshka_batch_top_k", root / "trainers/matryoshka_batch_top_k.py"
)


def median_threshold_wenc(ae, x):
    with t.no_grad():
        post = t.relu((x - ae.b_dec) @ ae.W_enc + ae.b_enc)
        ae.threshold.fill_(post[post > 0].median().item())
        assert (ae.encode(x) != 0).sum() < (post > 0).sum()


ae = matryoshka.MatryoshkaBatchTopKSAE(D_IN, D_SAE, k=3, group_sizes=[2, 3, 5])
randomize(ae, gen)
write("matryoshka", ae, "MatryoshkaBatchTopKSAE", gen, {"k": 3}, prepare=median_threshold_wenc)

ae = dictionary.JumpReluAutoEncoder(D_IN, D_SAE)
randomize(ae, gen)
with t.no_grad():
    ae.threshold.copy_(t.rand(D_SAE, generator=gen) * 0.8)
write("jumprelu", ae, "JumpReluAutoEncoder", gen)

ae = dictionary.GatedAutoEncoder(D_IN, D_SAE)
randomize(ae, gen)
write("gated", ae, "GatedAutoEncoder", gen)
