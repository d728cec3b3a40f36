//! Self-contained HTML pages for the feature-ablation study, in the style of Towards
//! Monosemanticity's feature browser.
//!
//! Every token of a context is a `<span>`: its background is orange in proportion to the
//! feature's activation on it (relative to the feature's maximum activation), and it is
//! underlined blue when ablating the feature *at the previous positions* lowered the model's
//! log-likelihood of this token (the feature helped predict it) and red when it raised it; the
//! underline's opacity scales with the size of the change. The exact numbers are in each token's
//! `title`, shown on hover. Pages carry their CSS inline and load nothing, so a report folder can
//! be zipped and opened anywhere. All token text is HTML-escaped.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// One context shown on a feature page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextExample {
    /// Where the context comes from, e.g. `"window 812, tokens 40..80"`.
    pub source: String,
    /// Decoded text of each token (escaped when rendered).
    pub tokens: Vec<String>,
    /// The feature's activation at each token.
    pub activations: Vec<f32>,
    /// Change in log p(token_i | tokens_<i) when the feature is ablated, per token;
    /// `None` where it is not known (the first token of the forward pass).
    pub logprob_delta: Vec<Option<f32>>,
    /// Index of the token the example was selected for (its activation is the example's key).
    pub focus: usize,
}

/// Tokens whose logits the feature's decoder direction raises or lowers most, read through the
/// unembedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogitEffects {
    /// (token text, logit change per unit of feature activation), largest first.
    pub raised: Vec<(String, f32)>,
    /// (token text, logit change), most negative first.
    pub lowered: Vec<(String, f32)>,
    /// What the approximation leaves out (shown on the page).
    pub caveat: String,
}

/// A group of contexts sampled from one interval of the feature's nonzero activations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntervalSamples {
    /// Lower and upper activation of the interval.
    pub low: f32,
    pub high: f32,
    /// E.g. "decile 3 (30-40%)".
    pub label: String,
    pub examples: Vec<ContextExample>,
}

/// Everything one feature page shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeaturePage {
    /// Title line, e.g. the SAE and hook it belongs to.
    pub sae_name: String,
    pub hook: String,
    pub feature: usize,
    /// Short automatic label (e.g. the top tokens).
    pub label: String,
    /// Firing rate over the tokens scanned.
    pub density: f64,
    /// Largest activation seen; the orange scale's 100%.
    pub max_activation: f32,
    pub top_examples: Vec<ContextExample>,
    pub interval_examples: Vec<IntervalSamples>,
    /// Histogram of nonzero activations: `bin_edges.len() == counts.len() + 1`.
    pub histogram_edges: Vec<f32>,
    pub histogram_counts: Vec<u64>,
    pub logit_effects: Option<LogitEffects>,
}

/// One row of the index page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub feature: usize,
    pub density: f64,
    pub max_activation: f32,
    pub label: String,
    /// Relative link to the feature's page.
    pub href: String,
}

/// Escapes text for HTML element content and double- or single-quoted attribute values.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// Makes whitespace-only and control characters in a token visible, then escapes it.
fn token_display(s: &str) -> String {
    let mut shown = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' => shown.push('⏎'),
            '\t' => shown.push('⇥'),
            '\r' => shown.push('␍'),
            c if c.is_control() => shown.push('�'),
            c => shown.push(c),
        }
    }
    escape_html(&shown)
}

const CSS: &str = r#"
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; line-height: 1.45; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.meta { color: #555; } .note { color: #555; font-size: 0.9em; }
.ctx { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 13px; padding: 6px 8px; margin: 4px 0; border: 1px solid #eee; border-radius: 4px; white-space: pre-wrap; word-break: break-word; }
.ctx .src { color: #888; font-size: 11px; display: block; margin-bottom: 2px; font-family: sans-serif; }
.t { border-bottom: 3px solid transparent; padding: 1px 0; }
.t.focus { outline: 1px solid #c60; }
.legend span { padding: 1px 6px; margin-right: 10px; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.cols { display: flex; gap: 40px; flex-wrap: wrap; }
.logits td:first-child { font-family: monospace; white-space: pre; }
"#;

fn page_head(title: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{}</style></head><body>\n",
        escape_html(title),
        CSS
    )
}

/// Renders one context as a row of coloured tokens.
///
/// `max_activation` is the feature's maximum (the orange scale's 100%); `max_abs_delta` sets the
/// underline scale (pass the largest |Δ log p| across the page so examples are comparable).
pub fn render_context(ex: &ContextExample, max_activation: f32, max_abs_delta: f32) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<div class=\"ctx\"><span class=\"src\">{}</span>",
        escape_html(&ex.source)
    );
    for (i, tok) in ex.tokens.iter().enumerate() {
        let act = ex.activations.get(i).copied().unwrap_or(0.0);
        let delta = ex.logprob_delta.get(i).copied().flatten();
        let a = if max_activation > 0.0 {
            (act / max_activation).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let mut style = String::new();
        if a > 0.0 {
            let _ = write!(style, "background: rgba(255,140,0,{a:.3});");
        }
        let mut title = format!("activation {act:.3}");
        if let Some(d) = delta {
            let w = if max_abs_delta > 0.0 {
                (d.abs() / max_abs_delta).clamp(0.0, 1.0)
            } else {
                0.0
            };
            // Blue: ablation made this token less likely (the feature helped predict it).
            let (r, g, b) = if d < 0.0 {
                (30, 90, 230)
            } else {
                (220, 30, 30)
            };
            if w > 0.02 {
                let _ = write!(style, "border-bottom-color: rgba({r},{g},{b},{w:.3});");
            }
            let _ = write!(title, "; ablation \u{0394} log p(this token) {d:+.4}");
        }
        let class = if i == ex.focus { "t focus" } else { "t" };
        let _ = write!(
            s,
            "<span class=\"{class}\" style=\"{style}\" title=\"{}\">{}</span>",
            escape_html(&title),
            token_display(tok)
        );
    }
    s.push_str("</div>\n");
    s
}

/// An inline SVG bar chart of a histogram (no external files).
pub fn svg_histogram(edges: &[f32], counts: &[u64], width: u32, height: u32) -> String {
    if counts.is_empty() || edges.len() != counts.len() + 1 {
        return String::from("<p class=\"note\">(no activations to histogram)</p>");
    }
    let (pad_l, pad_b, pad_t) = (50.0, 28.0, 8.0);
    let w = f64::from(width) - pad_l - 10.0;
    let h = f64::from(height) - pad_b - pad_t;
    let maxc = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    let bw = w / counts.len() as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" role=\"img\" aria-label=\"activation histogram\">"
    );
    for (i, &c) in counts.iter().enumerate() {
        let bh = c as f64 / maxc * h;
        let _ = write!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#f08c00\"><title>{:.3} to {:.3}: {c}</title></rect>",
            pad_l + i as f64 * bw,
            pad_t + h - bh,
            (bw - 1.0).max(0.5),
            bh,
            edges[i],
            edges[i + 1]
        );
    }
    let base = pad_t + h;
    let _ = write!(
        s,
        "<line x1=\"{pad_l}\" y1=\"{base}\" x2=\"{:.1}\" y2=\"{base}\" stroke=\"#444\"/>\
         <text x=\"{pad_l}\" y=\"{:.1}\" font-size=\"11\" font-family=\"sans-serif\">{:.2}</text>\
         <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" font-family=\"sans-serif\" text-anchor=\"end\">{:.2}</text>\
         <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" font-family=\"sans-serif\" text-anchor=\"end\">{}</text>\
         <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" font-family=\"sans-serif\" text-anchor=\"middle\">activation</text>",
        pad_l + w,
        base + 16.0,
        edges[0],
        pad_l + w,
        base + 16.0,
        edges[edges.len() - 1],
        pad_l - 4.0,
        pad_t + 10.0,
        maxc as u64,
        pad_l + w / 2.0,
        base + 16.0,
    );
    s.push_str("</svg>");
    s
}

fn max_abs_delta(page: &FeaturePage) -> f32 {
    page.top_examples
        .iter()
        .chain(
            page.interval_examples
                .iter()
                .flat_map(|g| g.examples.iter()),
        )
        .flat_map(|e| e.logprob_delta.iter().flatten())
        .fold(0.0f32, |m, d| m.max(d.abs()))
}

/// Renders a feature page as a complete HTML document.
pub fn render_feature_page(page: &FeaturePage) -> String {
    let title = format!("{} feature {}", page.sae_name, page.feature);
    let mut s = page_head(&title);
    let mad = max_abs_delta(page);
    let _ = write!(
        s,
        "<p><a href=\"index.html\">&larr; all features</a></p><h1>Feature {} <span class=\"meta\">&mdash; {}</span></h1>\
         <p class=\"meta\">{} &middot; hook <code>{}</code> &middot; density {:.3e} ({:.4}% of tokens) &middot; max activation {:.3}</p>",
        page.feature,
        escape_html(&page.label),
        escape_html(&page.sae_name),
        escape_html(&page.hook),
        page.density,
        page.density * 100.0,
        page.max_activation
    );
    s.push_str(
        "<p class=\"legend note\"><span style=\"background: rgba(255,140,0,0.8)\">token</span> background: the feature's activation on the token \
         (relative to its maximum) &middot; \
         <span style=\"border-bottom: 3px solid rgb(30,90,230)\">blue underline</span>: ablating the feature made this token less likely \
         (the feature helped predict it) &middot; \
         <span style=\"border-bottom: 3px solid rgb(220,30,30)\">red underline</span>: ablating it made this token more likely. \
         Hover a token for the numbers. The outlined token is the one the example was chosen for.</p>\n",
    );
    let _ = write!(
        s,
        "<p class=\"note\">Ablation: at every position the feature's activation times its decoder direction is subtracted \
         from the hook's activations and the forward pass is finished; \u{0394} log p is ablated minus clean. \
         Underline scale: full colour at |\u{0394} log p| = {mad:.3} nats.</p>"
    );

    s.push_str("<div class=\"cols\"><div><h2>Activation histogram</h2>");
    s.push_str(&svg_histogram(
        &page.histogram_edges,
        &page.histogram_counts,
        460,
        200,
    ));
    s.push_str("<p class=\"note\">Nonzero activations only.</p></div>");
    if let Some(le) = &page.logit_effects {
        s.push_str("<div><h2>Logit effects</h2><div class=\"cols\">");
        for (name, rows) in [("raised", &le.raised), ("lowered", &le.lowered)] {
            let _ = write!(
                s,
                "<table class=\"logits\"><tr><th>{name}</th><th class=\"num\">logit</th></tr>"
            );
            for (tok, v) in rows {
                let _ = write!(
                    s,
                    "<tr><td>{}</td><td class=\"num\">{v:+.3}</td></tr>",
                    token_display(tok)
                );
            }
            s.push_str("</table>");
        }
        let _ = write!(
            s,
            "</div><p class=\"note\">{}</p></div>",
            escape_html(&le.caveat)
        );
    }
    s.push_str("</div>\n<h2>Top activations</h2>\n");
    if page.top_examples.is_empty() {
        s.push_str("<p class=\"note\">The feature never fired on the scanned tokens.</p>");
    }
    for ex in &page.top_examples {
        s.push_str(&render_context(ex, page.max_activation, mad));
    }
    if !page.interval_examples.is_empty() {
        s.push_str(
            "<h2>Samples across activation intervals</h2><p class=\"note\">Contexts sampled uniformly from each decile interval of the \
             feature's nonzero activations, so the weak activations that top examples never show are seen too.</p>\n",
        );
        for g in &page.interval_examples {
            let _ = write!(
                s,
                "<h3>{} <span class=\"meta\">(activation {:.3} to {:.3})</span></h3>",
                escape_html(&g.label),
                g.low,
                g.high
            );
            for ex in &g.examples {
                s.push_str(&render_context(ex, page.max_activation, mad));
            }
        }
    }
    s.push_str("</body></html>\n");
    s
}

/// Renders the index page: every feature with its density, maximum activation and label.
pub fn render_index(title: &str, intro: &str, entries: &[IndexEntry]) -> String {
    let mut s = page_head(title);
    let _ = write!(
        s,
        "<h1>{}</h1><p class=\"meta\">{}</p>\n<table><tr><th class=\"num\">feature</th><th class=\"num\">density</th>\
         <th class=\"num\">max act</th><th>label (top tokens)</th></tr>\n",
        escape_html(title),
        escape_html(intro)
    );
    for e in entries {
        let _ = writeln!(
            s,
            "<tr><td class=\"num\"><a href=\"{}\">{}</a></td><td class=\"num\">{:.2e}</td><td class=\"num\">{:.3}</td><td>{}</td></tr>",
            escape_html(&e.href),
            e.feature,
            e.density,
            e.max_activation,
            token_display(&e.label)
        );
    }
    s.push_str("</table></body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_in_tokens_and_attributes() {
        assert_eq!(
            escape_html("<script>a&b\"'</script>"),
            "&lt;script&gt;a&amp;b&quot;&#39;&lt;/script&gt;"
        );
        let ex = ContextExample {
            source: "<src>".into(),
            tokens: vec!["<b>".into(), " \"x\"\n".into(), "&".into()],
            activations: vec![0.0, 2.0, 1.0],
            logprob_delta: vec![None, Some(-0.5), Some(0.25)],
            focus: 1,
        };
        let html = render_context(&ex, 2.0, 0.5);
        assert!(!html.contains("<b>"), "{html}");
        assert!(html.contains("&lt;b&gt;"));
        assert!(html.contains("&quot;x&quot;⏎"));
        assert!(html.contains("&lt;src&gt;"));
        // Full orange on the max-activating token, blue underline where Δ < 0, red where Δ > 0.
        assert!(html.contains("rgba(255,140,0,1.000)"));
        assert!(html.contains("rgba(30,90,230,1.000)"));
        assert!(html.contains("rgba(220,30,30,0.500)"));
        assert!(html.contains("-0.5000"));
    }

    #[test]
    fn feature_page_is_a_complete_document() {
        let ex = ContextExample {
            source: "window 1".into(),
            tokens: vec!["a".into(), "b".into()],
            activations: vec![0.5, 1.0],
            logprob_delta: vec![None, Some(-0.1)],
            focus: 1,
        };
        let page = FeaturePage {
            sae_name: "sae".into(),
            hook: "blocks.15.mlp.hook_post".into(),
            feature: 7,
            label: "</h1>".into(),
            density: 0.01,
            max_activation: 1.0,
            top_examples: vec![ex.clone()],
            interval_examples: vec![IntervalSamples {
                low: 0.1,
                high: 0.2,
                label: "decile 1".into(),
                examples: vec![ex],
            }],
            histogram_edges: vec![0.0, 0.5, 1.0],
            histogram_counts: vec![3, 1],
            logit_effects: Some(LogitEffects {
                raised: vec![("<x>".into(), 1.0)],
                lowered: vec![("y".into(), -1.0)],
                caveat: "ignores later layers".into(),
            }),
        };
        let html = render_feature_page(&page);
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.ends_with("</html>\n"));
        assert!(html.contains("&lt;/h1&gt;"));
        assert!(html.contains("&lt;x&gt;"));
        assert!(html.contains("<svg"));
        assert!(html.contains("ignores later layers"));
        let idx = render_index(
            "SAE",
            "intro",
            &[IndexEntry {
                feature: 7,
                density: 0.01,
                max_activation: 1.0,
                label: "a<b".into(),
                href: "feature_7.html".into(),
            }],
        );
        assert!(idx.contains("a&lt;b"));
        assert!(idx.contains("href=\"feature_7.html\""));
    }
}
