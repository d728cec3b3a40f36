//! The probe against scikit-learn's `LogisticRegression`, the one SAEBench's sparse probing fits
//! (fixtures written by `scripts/probing_fixtures.py`).

use metrics::{LogisticProbe, top_k_by_mean_difference};
use serde_json::Value;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn bools(v: &Value) -> Vec<bool> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_bool().unwrap())
        .collect()
}

#[test]
fn probes_match_sklearn() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/probing/sklearn_logistic.json"
    );
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let d = case["d"].as_u64().unwrap() as usize;
        let c = case["c"].as_f64().unwrap();
        let (xtr, ytr) = (floats(&case["x_train"]), bools(&case["y_train"]));
        let (xte, yte) = (floats(&case["x_test"]), bools(&case["y_test"]));
        let probe = LogisticProbe::fit(&xtr, d, &ytr, c).unwrap();
        assert!(probe.converged, "{name}: {} iterations", probe.iterations);
        let coef: Vec<f64> = case["coef"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let scale = coef.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        for (j, (ours, theirs)) in probe.weights.iter().zip(&coef).enumerate() {
            assert!(
                (ours - theirs).abs() < 1e-4 * scale,
                "{name}: weight {j}: ours {ours}, sklearn {theirs}"
            );
        }
        let b = case["intercept"].as_f64().unwrap();
        assert!(
            (probe.bias - b).abs() < 1e-4 * scale,
            "{name}: intercept {} vs {b}",
            probe.bias
        );
        let acc = case["test_accuracy"].as_f64().unwrap();
        assert_eq!(probe.accuracy(&xte, &yte), acc, "{name}: test accuracy");
        let want: Vec<usize> = case["top5_by_mean_difference"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(
            top_k_by_mean_difference(&xtr, d, &ytr, 5),
            want,
            "{name}: columns chosen"
        );
    }
}
