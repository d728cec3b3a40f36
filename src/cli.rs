//! Value parsers for the examples' flags, so that clap refuses a bad number at parse time with a
//! message naming the flag (`invalid value '0' for '--batch <BATCH>': must be at least 1`) before
//! any model is loaded, rather than each program dividing by it or allocating from it later.

/// A count that must be at least 1 (`--batch`, `--samples`, `--max-new-tokens` ...).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("not a whole number: {e}")),
    }
}

/// A finite number (a clamp value, a steering coefficient): NaN and infinities are refused.
pub fn finite_f32(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(v) => Err(format!("must be a finite number, not {v}")),
        Err(e) => Err(format!("not a number: {e}")),
    }
}

/// A sampling temperature: finite and not negative (0 is greedy).
pub fn temperature(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Ok(v) => Err(format!("must be 0 (greedy) or a positive number, not {v}")),
        Err(e) => Err(format!("not a number: {e}")),
    }
}

/// A rate in (0, 1] (`--max-firing-rate`).
pub fn fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        Ok(v) => Err(format!("must be in (0, 1], not {v}")),
        Err(e) => Err(format!("not a number: {e}")),
    }
}

/// A finite number above 0 (`--merge-overlap`, where values past 1 switch merging off).
pub fn positive(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(v) => Err(format!("must be a finite number above 0, not {v}")),
        Err(e) => Err(format!("not a number: {e}")),
    }
}

/// Test support for the examples: requires that `base` parses as `P`, and that `base` plus each
/// `flag=value` is refused with a message naming the flag and the offending value (the last
/// element of a comma-separated list). Panics otherwise, as a test should.
pub fn assert_refused<P: clap::Parser>(base: &[&str], cases: &[(&str, &str)]) {
    if let Err(e) = P::try_parse_from(base) {
        panic!("the base arguments must parse: {e}");
    }
    for &(flag, value) in cases {
        let arg = format!("{flag}={value}");
        let mut argv = base.to_vec();
        argv.push(&arg);
        let Err(e) = P::try_parse_from(&argv) else {
            panic!("{flag} {value} was accepted");
        };
        let msg = e.to_string();
        let bad = value.rsplit(',').next().unwrap_or(value);
        assert!(
            msg.contains(flag) && msg.contains(bad),
            "{flag} {value}: {msg}"
        );
    }
}

/// `cpu` or `cuda` (the first GPU) as a candle device; `cuda` needs a build with
/// `--features cuda`, and says so when the build has none.
pub fn device(name: &str) -> candle_core::Result<candle_core::Device> {
    match name {
        "cuda" => candle_core::Device::new_cuda(0),
        "cpu" => Ok(candle_core::Device::Cpu),
        other => Err(candle_core::Error::Msg(format!(
            "device {other}: expected cpu or cuda"
        ))),
    }
}

/// Peak resident memory of this process in MiB (Linux's VmHWM; NaN elsewhere). On the CPU it is
/// what a step's tensors took at their largest, which is how a device step's footprint is
/// measured without the device.
pub fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Resets the peak resident memory to the current one (Linux `clear_refs` value 5), so that
/// [`peak_rss_mb`] measures what follows.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers_refuse_what_the_programs_cannot_use() {
        assert_eq!(at_least_one("3"), Ok(3));
        assert!(at_least_one("0").unwrap_err().contains("at least 1"));
        assert!(at_least_one("-2").unwrap_err().contains("whole number"));
        assert_eq!(finite_f32("-2.5"), Ok(-2.5));
        for bad in ["NaN", "inf", "-inf", "1e39"] {
            assert!(finite_f32(bad).is_err(), "{bad}");
        }
        assert_eq!(temperature("0"), Ok(0.0));
        assert!(temperature("-0.1").is_err());
        assert!(temperature("nan").is_err());
        assert_eq!(fraction("1"), Ok(1.0));
        for bad in ["0", "1.5", "nan", "-0.2"] {
            assert!(fraction(bad).is_err(), "{bad}");
        }
    }
}
