"""Writes metrics/tests/fixtures/probing/sklearn_logistic.json: small probing problems and what
scikit-learn's LogisticRegression (the probe SAEBench's sparse probing fits) makes of them.

metrics/tests/probing.rs checks `LogisticProbe::fit` against the coefficients, intercepts and test
accuracies here, and `top_k_by_mean_difference` against numpy's choice of columns.

    .venv/bin/pip install scikit-learn   # 1.9.1 wrote the committed file
    .venv/bin/python scripts/probing_fixtures.py
"""

import json
import pathlib

import numpy as np
import sklearn
from sklearn.linear_model import LogisticRegression

OUT = pathlib.Path(__file__).resolve().parent.parent / "metrics/tests/fixtures/probing/sklearn_logistic.json"


def problem(rng, n_train, n_test, d, informative, zero_cols, scale, flip):
    n = n_train + n_test
    y = rng.random(n) < 0.45
    x = rng.normal(size=(n, d)) * scale
    w = np.zeros(d)
    w[:informative] = rng.normal(size=informative) * 1.5
    x[:, :informative] += np.outer(np.where(y, 1.0, -1.0), w[:informative]) * 0.3
    # Sparse, non-negative columns like mean-pooled SAE codes.
    x[:, informative:informative + 5] = np.maximum(x[:, informative:informative + 5], 0.0)
    x[:, d - zero_cols:] = 0.0
    y = np.where(rng.random(n) < flip, ~y, y)
    # Three decimals keep the file small; both sides read the same decimals into f32.
    return np.round(x, 3).astype(np.float32), y


def main():
    rng = np.random.default_rng(20261207)
    cases = []
    for name, n_train, n_test, d, inf, zc, scale, flip, c in [
        ("dense_c1", 120, 60, 24, 6, 3, 1.0, 0.1, 1.0),
        ("strong_l2", 120, 60, 24, 6, 3, 1.0, 0.1, 0.05),
        ("wide", 60, 40, 120, 10, 30, 0.5, 0.05, 1.0),
        ("one_feature", 100, 50, 1, 1, 0, 2.0, 0.2, 1.0),
    ]:
        x, y = problem(rng, n_train, n_test, d, inf, zc, scale, flip)
        xtr, ytr, xte, yte = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
        probe = LogisticRegression(C=c, max_iter=100000, tol=1e-12)
        probe.fit(xtr.astype(np.float64), ytr)
        diff = np.abs(xtr[ytr].astype(np.float64).mean(0) - xtr[~ytr].astype(np.float64).mean(0))
        # Stable sort of -diff: ties keep the lower index first, as the Rust side does.
        order = np.argsort(-diff, kind="stable")[: min(5, d)]
        cases.append({
            "name": name,
            "c": c,
            "d": d,
            "x_train": [round(float(v), 3) for v in xtr.ravel()],
            "y_train": ytr.tolist(),
            "x_test": [round(float(v), 3) for v in xte.ravel()],
            "y_test": yte.tolist(),
            "coef": probe.coef_[0].tolist(),
            "intercept": float(probe.intercept_[0]),
            "test_accuracy": float((probe.predict(xte.astype(np.float64)) == yte).mean()),
            "top5_by_mean_difference": order.tolist(),
        })
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"sklearn": sklearn.__version__, "cases": cases}))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, sklearn {sklearn.__version__})")


if __name__ == "__main__":
    main()
