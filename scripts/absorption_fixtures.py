"""Writes metrics/tests/fixtures/absorption/saebench.json: words judged by SAEBench's own absorption
calculator, and scikit-learn's balanced logistic regressions (the k-sparse probes of SAEBench's
absorption test).

The words: a random dictionary (decoder rows of norms 0.5-3, some aligned with the probe), random
sparse codes in which the two main latents fire on half the words, and activations made from them.
SAEBench's `FeatureAbsorptionCalculator.calculate_absorption` (sae-bench 0.6.0, unchanged from its
repository) judges every word, run on stand-ins for the model and the SAE that hand it these
activations and codes. SAEBench scores a latent as activation x cosine with the probe, which is
its projection for unit-norm decoder rows; the stand-in SAE is given unit rows and codes scaled by
the rows' norms (the same reconstruction), so its figures are what `metrics::feature_absorption`
must give on the original rows and codes. `metrics/src/absorption.rs` checks every word and
`LogisticProbe::fit_balanced` against these figures.

    .venv/bin/pip install --no-deps sae-bench==0.6.0   # and torch, numpy, scikit-learn, tqdm
    .venv/bin/python scripts/absorption_fixtures.py
"""

import json
import pathlib
import sys
import types

import numpy as np
import sklearn
import torch
from sklearn.linear_model import LogisticRegression

# The calculator imports these two only to name types; stand-ins keep their dependencies out.
for module, name in [("sae_lens", "SAE"), ("transformer_lens", "HookedTransformer")]:
    stub = types.ModuleType(module)
    setattr(stub, name, object)
    sys.modules[module] = stub

from sae_bench.evals.absorption.feature_absorption_calculator import (  # noqa: E402
    FeatureAbsorptionCalculator,
)

OUT = pathlib.Path(__file__).resolve().parent.parent / "metrics/tests/fixtures/absorption/saebench.json"
HOOK = "blocks.0.hook_resid_post"


class Model:
    """Hands the calculator each prompt's word activation (a sequence of one position)."""

    def __init__(self, acts, words):
        self.acts = acts
        self.index = {w: i for i, w in enumerate(words)}
        self.last = []

    def to_tokens(self, text):
        return torch.zeros((1, 4))

    def run_with_cache(self, prompts, names_filter):
        # The prompt's last line is "{word}:".
        self.last = [self.index[p.rsplit("\n", 1)[-1][:-1]] for p in prompts]
        return None, {HOOK: torch.tensor(self.acts[self.last])[:, None, :]}


class Sae:
    """Unit decoder rows; codes scaled by the rows' norms."""

    device = torch.device("cpu")

    def __init__(self, w_dec, codes, model):
        norms = np.linalg.norm(w_dec, axis=1)
        self.W_dec = torch.tensor(w_dec / norms[:, None])
        self.codes = codes * norms[None, :]
        self.model = model

    def encode(self, x):
        return torch.tensor(self.codes[self.model.last])


def words_problem(seed):
    rng = np.random.default_rng(seed)
    d_in, d_sae, n = 16, 40, 80
    p = rng.normal(size=d_in)
    p_hat = p / np.linalg.norm(p)
    w_dec = rng.normal(size=(d_sae, d_in)) / np.sqrt(d_in)
    # The first twelve latents lean towards the probe, by different amounts.
    for f in range(12):
        w_dec[f] = rng.uniform(0.0, 1.2) * p_hat + w_dec[f] * rng.uniform(0.3, 1.0)
    w_dec *= rng.uniform(0.5, 3.0, size=(d_sae, 1))
    w_dec = w_dec.astype(np.float32).astype(np.float64)
    main = [3, 7]
    codes = np.zeros((n, d_sae))
    for i in range(n):
        for m in main:
            if rng.random() < 0.5:
                codes[i, m] = rng.uniform(0.5, 3.0)
        others = [f for f in range(d_sae) if f not in main]
        for f in rng.choice(others, size=rng.integers(2, 7), replace=False):
            codes[i, f] = rng.uniform(0.1, 3.0)
    codes = codes.astype(np.float32).astype(np.float64)
    acts = codes @ w_dec + 0.3 * rng.normal(size=(n, d_in)) + 1.0 * p_hat
    acts = acts.astype(np.float32).astype(np.float64)
    words = [f"w{i}" for i in range(n)]
    model = Model(acts, words)
    sae = Sae(w_dec, codes, model)
    calc = FeatureAbsorptionCalculator(
        model=model,
        icl_word_list=words,
        max_icl_examples=3,
        word_token_pos=-1,
        batch_size=16,
    )
    res = calc.calculate_absorption(
        sae, words, probe_direction=torch.tensor(p), main_feature_ids=main, layer=0,
        show_progress=False,
    )
    out = []
    for w in res.word_results:
        top = w.top_projection_feature_scores[0]
        out.append({
            "absorption_fraction": float(w.absorption_fraction),
            "full_absorption": bool(w.is_full_absorption),
            "probe_projection": float(w.probe_projection),
            "top_feature": int(top.feature_id),
            "top_projection": float(top.probe_projection),
        })
    return {
        "d_in": d_in,
        "d_sae": d_sae,
        "probe": p.tolist(),
        "w_dec": w_dec.ravel().tolist(),
        "acts": acts.ravel().tolist(),
        "codes": codes.ravel().tolist(),
        "main": main,
        "words": out,
    }


def balanced_problem(seed, n, d, positive_share):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < positive_share
    x = rng.normal(size=(n, d)) + np.outer(y, rng.normal(size=d)) * 0.8
    x = np.maximum(x, 0.0) if seed % 2 else x  # codes are non-negative
    x = x.astype(np.float32)
    lr = LogisticRegression(C=1.0, class_weight="balanced", tol=1e-10, max_iter=100_000)
    lr.fit(x.astype(np.float64), y)
    return {
        "d": d,
        "x": x.astype(np.float64).ravel().tolist(),
        "y": y.tolist(),
        "coef": lr.coef_[0].tolist(),
        "intercept": float(lr.intercept_[0]),
    }


def main():
    fixture = {
        "sae_bench": "0.6.0",
        "sklearn": sklearn.__version__,
        "words": [words_problem(s) for s in (1, 2)],
        "balanced": [
            balanced_problem(3, 150, 4, 0.15),
            balanced_problem(4, 200, 6, 0.08),
            balanced_problem(5, 120, 3, 0.3),
        ],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(fixture))
    for w in fixture["words"]:
        v = w["words"]
        print(
            f"{len(v)} words: {sum(x['full_absorption'] for x in v)} fully absorbed, "
            f"{sum(0 < x['absorption_fraction'] < 1 for x in v)} partly, "
            f"{sum(x['absorption_fraction'] == 1 for x in v)} with fraction 1"
        )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
