//! Feature absorption (SAEBench's first-letter test) on a real model: does an SAE have latents
//! for "starts with S" that stay silent on some S-words because a token latent (" short") has
//! absorbed the letter?
//!
//! Every word of the tokenizer's vocabulary (ASCII letters, one optional leading space) is asked
//! about in a prompt of ten solved examples, `"... {word} has the first letter:"`, and the hook's
//! activation is read at the word's token. Words are split 80/20 into training and held-out sets
//! (the examples in a prompt come from the word's own set). A balanced logistic probe per letter
//! is the ground truth that the model knows the letter there; each SAE's main latents per letter
//! come from k-sparse probes on its codes; on every held-out word the probe reads correctly, the
//! projection on the probe is split into the latents' contributions
//! (`metrics::feature_absorption`, which has the details and SAEBench's thresholds).
//!
//! ```text
//! cargo run --release --example main_job -- --layer 8 --site hook_resid_post --pages 0 \
//!     --train-tokens 600000 --out runs/resid8          # residual-stream SAEs, as SAEBench uses
//! cargo run --release --example absorption -- \
//!     --sae runs/resid8/saes/topk_4608 --sae runs/resid8/saes/standard_4608
//! ```
//!
//! Writes `results.json` (per SAE SAEBench's `mean_absorption_fraction_score`,
//! `mean_full_absorption_score`, `mean_num_split_features` and their standard deviations, and
//! everything per letter), `absorption_fraction.png` and `full_absorption.png` (per letter) and
//! `report.html` (with the absorbed words and what their absorbing latents fire on) into `--out`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use metrics::plots::{Series, plot_lines};
use metrics::{
    Absorption, AbsorptionConfig, AbsorptionProbes, LabelledFeatures, PooledFeatures,
    feature_absorption, token_activations,
};
use sae_workbench::sae_core::{SaeModel, SparseCodes};
use sae_workbench::transformer_hooks::candle_core::{Device, Tensor};

mod spelling;
#[path = "../sparse_probing/tasks.rs"]
#[allow(dead_code)]
mod tasks;

use spelling::{SUFFIX, Word, prompt, vocabulary_words, word_position};
use tasks::Setup;

const LETTERS: &str = "abcdefghijklmnopqrstuvwxyz";
/// The longest prompt accepted (ten solved lines of one-token words take about 70 tokens).
const MAX_PROMPT: usize = 256;

#[derive(Parser, Debug)]
#[command(about = "Feature absorption: first-letter latents that token latents absorb")]
struct Args {
    /// SAE folder(s) (ours, SAELens, sparsify, dictionary_learning), all on one hook.
    #[arg(long, required = true)]
    sae: Vec<PathBuf>,
    /// Model file or folder; default SmolLM2-135M-Instruct from the asset cache.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Hook to read; defaults to the SAEs' `hook_name`.
    #[arg(long)]
    hook: Option<String>,
    /// Words drawn from the vocabulary (0: all of them, as SAEBench).
    #[arg(long, default_value_t = 8000)]
    words: usize,
    /// Share of the words that train the probes; the rest are held out.
    #[arg(long, value_parser = sae_workbench::cli::fraction, default_value_t = 0.8)]
    train_fraction: f64,
    /// Solved examples in each prompt (SAEBench: 10).
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 10)]
    icl: usize,
    /// Largest k of the k-sparse probes (SAEBench: 10).
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 10)]
    max_k: usize,
    /// Letters whose probe passes F1 0.6 needed for a summary (SAEBench: 20).
    #[arg(long, default_value_t = 20)]
    min_letters: usize,
    /// Prompts per forward pass.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 16)]
    batch_size: usize,
    /// Seed of the word draw, the split and the examples.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// `cpu`, or `cuda` (build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Output folder.
    #[arg(long, default_value = "runs/absorption")]
    out: PathBuf,
}

/// The words of one split, as asked about: prompt tokens, the word's position, its letter.
struct Split {
    words: Vec<Word>,
    sequences: Vec<Vec<u32>>,
    positions: Vec<usize>,
}

impl Split {
    fn labels(&self) -> Vec<usize> {
        self.words.iter().map(|w| w.letter).collect()
    }
}

/// Prompts for `words` with examples from the same words; words whose token does not survive in
/// context are dropped (and counted).
fn build_split(
    words: &[Word],
    tok: &sae_workbench::transformer_hooks::Tokenizer,
    bos: Option<u32>,
    icl: usize,
    rng: &mut ChaCha8Rng,
) -> anyhow::Result<(Split, usize)> {
    if words.len() <= icl {
        bail!(
            "{} words in a split cannot give {icl} examples besides the word: raise --words",
            words.len()
        );
    }
    let suffix = tok.encode(SUFFIX, false)?;
    let texts: Vec<&str> = words.iter().map(|w| w.text.as_str()).collect();
    let mut split = Split {
        words: Vec::new(),
        sequences: Vec::new(),
        positions: Vec::new(),
    };
    let mut dropped = 0;
    for w in words {
        let mut ids: Vec<u32> = bos.into_iter().collect();
        ids.extend(tok.encode(&prompt(&w.text, &texts, icl, rng), false)?);
        match word_position(&ids, &suffix, w.id) {
            Some(p) if ids.len() <= MAX_PROMPT => {
                split.words.push(w.clone());
                split.sequences.push(ids);
                split.positions.push(p);
            }
            _ => dropped += 1,
        }
    }
    Ok((split, dropped))
}

fn progress(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}, eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn encode(sae: &SaeModel, acts: &PooledFeatures) -> anyhow::Result<SparseCodes> {
    let n = acts.rows.len() / acts.d.max(1);
    let x = Tensor::from_slice(&acts.rows, (n, acts.d), &Device::Cpu)?;
    Ok(sae.encode_sparse(&x)?)
}

#[derive(Serialize)]
struct LetterProbe {
    letter: char,
    n_train: usize,
    n_test: usize,
    f1: f64,
    precision: f64,
    recall: f64,
}

/// A fully absorbed word, for people.
#[derive(Serialize)]
struct AbsorbedWord {
    word: String,
    letter: char,
    absorbing_latent: usize,
    cos_with_probe: f64,
    share_of_projection: f64,
    main_latents: Vec<usize>,
}

#[derive(Serialize)]
struct SaeResult {
    absorption: Absorption,
    absorbed: Vec<AbsorbedWord>,
    /// For each absorbing latent, the words (of both splits) it fires on most.
    absorbing_latents: BTreeMap<usize, Vec<(String, f32)>>,
    seconds: f64,
}

#[derive(Serialize)]
struct Results {
    model: String,
    hook: String,
    vocabulary_words: usize,
    train_words: usize,
    test_words: usize,
    dropped_words: usize,
    config: AbsorptionConfig,
    probes: Vec<LetterProbe>,
    saes: BTreeMap<String, SaeResult>,
    seconds: f64,
}

fn main() -> anyhow::Result<()> {
    sae_workbench::transformer_hooks::retain_freed_memory();
    let args = Args::parse();
    let t0 = Instant::now();
    let device = sae_workbench::cli::device(&args.device)
        .with_context(|| format!("--device {}", args.device))?;
    let setup = Setup::load(
        &args.sae,
        args.model.as_deref(),
        args.hook.as_deref(),
        &device,
        MAX_PROMPT,
    )?;
    let tok = setup.model.tokenizer()?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut words = vocabulary_words(tok)?;
    let vocabulary = words.len();
    words.shuffle(&mut rng);
    if args.words > 0 {
        words.truncate(args.words);
    }
    let n_train = ((words.len() as f64) * args.train_fraction).round() as usize;
    let (train_words, test_words) = words.split_at(n_train);
    let (train, dropped_train) = build_split(train_words, tok, setup.bos, args.icl, &mut rng)?;
    let (test, dropped_test) = build_split(test_words, tok, setup.bos, args.icl, &mut rng)?;
    eprintln!(
        "{vocabulary} words in the vocabulary; {} training and {} held-out prompts \
         ({} words dropped: their token merges with its neighbours in context)",
        train.words.len(),
        test.words.len(),
        dropped_train + dropped_test
    );

    let n = train.words.len() + test.words.len();
    let pb = progress(n, &format!("activations at {}", setup.hook));
    let model = &setup.model;
    let acts_train = token_activations(
        model,
        &setup.hook,
        &train.sequences,
        &train.positions,
        args.batch_size,
        Some(&pb),
    )?;
    let acts_test = token_activations(
        model,
        &setup.hook,
        &test.sequences,
        &test.positions,
        args.batch_size,
        Some(&pb),
    )?;
    pb.finish_and_clear();
    let (ltr, lte) = (train.labels(), test.labels());
    let train_lf = LabelledFeatures {
        x: &acts_train.rows,
        d: acts_train.d,
        labels: &ltr,
    };
    let test_lf = LabelledFeatures {
        x: &acts_test.rows,
        d: acts_test.d,
        labels: &lte,
    };
    let cfg = AbsorptionConfig {
        max_k: args.max_k,
        min_classes: args.min_letters,
        ..AbsorptionConfig::default()
    };
    let pb = progress(26, "letter probes");
    let probes = AbsorptionProbes::fit(train_lf, test_lf, 26, cfg.c, Some(&pb))
        .context("fitting the letter probes (a letter without training words: raise --words)")?;
    pb.finish_and_clear();
    let letters: Vec<char> = LETTERS.chars().collect();
    let probe_rows: Vec<LetterProbe> = (0..26)
        .map(|l| LetterProbe {
            letter: letters[l],
            n_train: ltr.iter().filter(|&&x| x == l).count(),
            n_test: lte.iter().filter(|&&x| x == l).count(),
            f1: probes.test[l].f1,
            precision: probes.test[l].precision,
            recall: probes.test[l].recall,
        })
        .collect();
    let passing = probe_rows
        .iter()
        .filter(|p| p.f1 > cfg.min_probe_f1)
        .count();
    eprintln!(
        "letter probes: {passing} of 26 above F1 {}",
        cfg.min_probe_f1
    );

    let mut saes = BTreeMap::new();
    for (sae, name) in setup.saes.iter().zip(&setup.names) {
        let t = Instant::now();
        let codes_train = encode(sae, &acts_train)?;
        let codes_test = encode(sae, &acts_test)?;
        let absorption =
            feature_absorption(sae, &probes, &codes_train, &ltr, test_lf, &codes_test, &cfg)
                .with_context(|| format!("absorption of {name}"))?;
        let absorbed = absorbed_words(&absorption, &test.words, &letters);
        let absorbing_latents = top_words(
            absorbed.iter().map(|a| a.absorbing_latent),
            [(&codes_train, &train.words), (&codes_test, &test.words)],
        );
        match &absorption.summary {
            Some(s) => eprintln!(
                "{name}: mean absorption fraction {:.4} ± {:.4}, full absorption {:.4} ± {:.4}, \
                 main latents per letter {:.2} ({} letters)",
                s.mean_absorption_fraction_score,
                s.std_dev_absorption_fraction_score,
                s.mean_full_absorption_score,
                s.std_dev_full_absorption_score,
                s.mean_num_split_features,
                s.n_classes_evaluated
            ),
            None => eprintln!(
                "{name}: only {passing} letters have a probe above F1 {}, fewer than \
                 --min-letters {}: no summary (per-letter results are in results.json)",
                cfg.min_probe_f1, cfg.min_classes
            ),
        }
        saes.insert(
            name.clone(),
            SaeResult {
                absorption,
                absorbed,
                absorbing_latents,
                seconds: t.elapsed().as_secs_f64(),
            },
        );
    }

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating --out {}", args.out.display()))?;
    let results = Results {
        model: setup.model_path.display().to_string(),
        hook: setup.hook.clone(),
        vocabulary_words: vocabulary,
        train_words: train.words.len(),
        test_words: test.words.len(),
        dropped_words: dropped_train + dropped_test,
        config: cfg,
        probes: probe_rows,
        saes,
        seconds: t0.elapsed().as_secs_f64(),
    };
    let json = args.out.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("writing {}", json.display()))?;
    plot_by_letter(&results, &args.out)?;
    let html = args.out.join("report.html");
    std::fs::write(&html, report(&results))
        .with_context(|| format!("writing {}", html.display()))?;
    eprintln!(
        "wrote {}, {} and the plots ({:.0} s)",
        json.display(),
        html.display(),
        results.seconds
    );
    Ok(())
}

/// Every fully absorbed held-out word, in letter order.
fn absorbed_words(a: &Absorption, test: &[Word], letters: &[char]) -> Vec<AbsorbedWord> {
    let mut out = Vec::new();
    for c in a.classes.iter().filter(|c| c.evaluated) {
        for w in c.words.iter().filter(|w| w.full_absorption) {
            let Some(f) = w.top_feature else { continue };
            out.push(AbsorbedWord {
                word: test[w.row].text.clone(),
                letter: letters[c.class],
                absorbing_latent: f,
                cos_with_probe: w.top_cos,
                share_of_projection: w.top_projection / w.probe_projection,
                main_latents: c.split_features.clone(),
            });
        }
    }
    out
}

/// The six words each latent of `latents` fires on most, over both splits.
fn top_words<'a>(
    latents: impl Iterator<Item = usize>,
    splits: [(&'a SparseCodes, &'a [Word]); 2],
) -> BTreeMap<usize, Vec<(String, f32)>> {
    let mut out: BTreeMap<usize, Vec<(String, f32)>> = latents.map(|l| (l, Vec::new())).collect();
    for (codes, words) in splits {
        for (row, w) in words.iter().enumerate() {
            let (fs, vs) = codes.row(row);
            for (&f, &v) in fs.iter().zip(vs) {
                if let Some(list) = out.get_mut(&(f as usize)) {
                    list.push((w.text.clone(), v));
                }
            }
        }
    }
    for list in out.values_mut() {
        list.sort_by(|a, b| b.1.total_cmp(&a.1));
        list.truncate(6);
    }
    out
}

fn plot_by_letter(r: &Results, out: &Path) -> anyhow::Result<()> {
    for (file, title, value) in [
        (
            "absorption_fraction.png",
            "Mean absorption fraction per letter",
            (|c: &metrics::ClassAbsorption| c.mean_absorption_fraction)
                as fn(&metrics::ClassAbsorption) -> f64,
        ),
        (
            "full_absorption.png",
            "Full absorption rate per letter",
            |c: &metrics::ClassAbsorption| c.full_absorption_rate,
        ),
    ] {
        let series: Vec<Series> = r
            .saes
            .iter()
            .map(|(name, s)| Series {
                name: name.clone(),
                points: s
                    .absorption
                    .classes
                    .iter()
                    .filter(|c| c.evaluated)
                    .map(|c| {
                        let v = value(c);
                        (c.class as f64, v, v, v)
                    })
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        if series.is_empty() {
            continue;
        }
        plot_lines(
            &series,
            &format!("{title}, {}", r.hook),
            "letter (0 = a ... 25 = z; letters whose probe passes F1 0.6)",
            "mean over the words the probe reads",
            false,
            &out.join(file),
        )?;
    }
    Ok(())
}

fn report(r: &Results) -> String {
    use metrics::html::escape_html as esc;
    let mut h = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Absorption: {hook}</title>\
         <style>body{{font-family:sans-serif;max-width:72em;margin:2em auto}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}\
         td.l,th.l{{text-align:left}}code{{background:#f4f4f4}}</style></head><body>\
         <h1>Feature absorption at <code>{hook}</code></h1><p>Model <code>{model}</code>. \
         {train} training and {test} held-out words of the vocabulary ({vocab} in all), each \
         read at its token in a prompt of solved first-letter examples. A balanced logistic \
         probe per letter is the ground truth; each SAE's main latents for a letter are those \
         its k-sparse probes add while F1 rises by more than {jump}. On each held-out word the \
         probe reads correctly, the <em>absorption fraction</em> is the share of the probe \
         projection that up to {absorbers} other latents aligned with the probe (cosine ≥ \
         {cos}) supply instead of the main latents; a word is <em>fully absorbed</em> when its \
         main latents are silent and one latent carries ≥ {share:.0}% of the projection.</p>",
        hook = esc(&r.hook),
        model = esc(&r.model),
        train = r.train_words,
        test = r.test_words,
        vocab = r.vocabulary_words,
        jump = r.config.f1_jump_threshold,
        absorbers = r.config.max_absorbers,
        cos = r.config.absorber_cos,
        share = r.config.projection_share * 100.0,
    );
    h += "<h2>Summary</h2><table><tr><th class=l>SAE</th><th>letters</th>\
          <th>mean absorption fraction</th><th>full absorption</th><th>main latents per letter</th></tr>";
    for (name, s) in &r.saes {
        match &s.absorption.summary {
            Some(m) => {
                h += &format!(
                    "<tr><td class=l>{}</td><td>{}</td><td>{:.4} ± {:.4}</td><td>{:.4} ± {:.4}</td>\
                     <td>{:.2} ± {:.2}</td></tr>",
                    esc(name),
                    m.n_classes_evaluated,
                    m.mean_absorption_fraction_score,
                    m.std_dev_absorption_fraction_score,
                    m.mean_full_absorption_score,
                    m.std_dev_full_absorption_score,
                    m.mean_num_split_features,
                    m.std_dev_num_split_features
                )
            }
            None => {
                h += &format!(
                    "<tr><td class=l>{}</td><td colspan=4>too few letters read by the probes</td></tr>",
                    esc(name)
                )
            }
        }
    }
    h += "</table><img src=\"absorption_fraction.png\" width=\"640\">\
          <img src=\"full_absorption.png\" width=\"640\">";
    h += "<h2>Per letter</h2><table><tr><th class=l>letter</th><th>words (train / test)</th>\
          <th>probe F1</th>";
    for name in r.saes.keys() {
        h += &format!(
            "<th>{n}: main latents</th><th>{n}: absorption fraction / full</th>",
            n = esc(name)
        );
    }
    h += "</tr>";
    for (l, p) in r.probes.iter().enumerate() {
        h += &format!(
            "<tr><td class=l>{}</td><td>{} / {}</td><td>{:.3}</td>",
            p.letter, p.n_train, p.n_test, p.f1
        );
        for s in r.saes.values() {
            let c = &s.absorption.classes[l];
            if c.evaluated {
                let ids: Vec<String> = c.split_features.iter().map(|f| format!("#{f}")).collect();
                h += &format!(
                    "<td class=l>{}</td><td>{:.3} / {:.3}</td>",
                    ids.join(" "),
                    c.mean_absorption_fraction,
                    c.full_absorption_rate
                );
            } else {
                h += "<td class=l>–</td><td>–</td>";
            }
        }
        h += "</tr>";
    }
    h += "</table>";
    for (name, s) in &r.saes {
        h += &format!(
            "<h2>{}: fully absorbed words ({})</h2><table><tr><th class=l>word</th>\
             <th class=l>letter</th><th class=l>main latents (silent)</th><th>absorbing latent</th>\
             <th>cos with probe</th><th>share of projection</th><th class=l>the latent's top words</th></tr>",
            esc(name),
            s.absorbed.len()
        );
        for a in s.absorbed.iter().take(60) {
            let tops: Vec<String> = s.absorbing_latents[&a.absorbing_latent]
                .iter()
                .map(|(w, v)| format!("<code>{}</code> {v:.1}", esc(w)))
                .collect();
            let main: Vec<String> = a.main_latents.iter().map(|f| format!("#{f}")).collect();
            h += &format!(
                "<tr><td class=l><code>{}</code></td><td class=l>{}</td><td class=l>{}</td>\
                 <td>#{}</td><td>{:.3}</td><td>{:.2}</td><td class=l>{}</td></tr>",
                esc(&a.word),
                a.letter,
                main.join(" "),
                a.absorbing_latent,
                a.cos_with_probe,
                a.share_of_projection,
                tops.join(", ")
            );
        }
        h += "</table>";
    }
    h + "</body></html>"
}

#[cfg(test)]
mod tests {
    use super::*;
    use sae_workbench::transformer_hooks::{Model, assets};

    /// The model knows a word's first letter at the word's token, and not at the newline just
    /// before it (which has not seen the word): the probes read where the prompt says.
    #[test]
    fn the_model_knows_the_first_letter_at_the_words_token_and_not_before_it() {
        let Some(path) = assets::asset_or_skip(assets::SMOLLM2) else {
            return;
        };
        let model = Model::load(&path, &Device::Cpu).unwrap();
        let tok = model.tokenizer().unwrap();
        let bos = tok.bos_id().or(model.config().bos_token_id);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        // Five common letters, whole words with a leading space.
        let keep = [b'c', b'm', b'p', b's', b't'].map(|c| (c - b'a') as usize);
        let mut words: Vec<Word> = vocabulary_words(tok)
            .unwrap()
            .into_iter()
            .filter(|w| w.text.starts_with(' ') && w.text.len() >= 5 && keep.contains(&w.letter))
            .map(|w| Word {
                letter: keep.iter().position(|&l| l == w.letter).unwrap(),
                ..w
            })
            .collect();
        words.shuffle(&mut rng);
        words.truncate(600);
        let (tr, te) = words.split_at(450);
        let (train, dropped) = build_split(tr, tok, bos, 10, &mut rng).unwrap();
        let (test, _) = build_split(te, tok, bos, 10, &mut rng).unwrap();
        assert!(dropped < 10, "{dropped} of 450 words lost their token");
        let hook = "blocks.4.hook_resid_post";
        let (ltr, lte) = (train.labels(), test.labels());
        let mean_f1 = |shift: usize| {
            let read = |s: &Split| {
                let at: Vec<usize> = s.positions.iter().map(|p| p - shift).collect();
                token_activations(&model, hook, &s.sequences, &at, 16, None).unwrap()
            };
            let (a, b) = (read(&train), read(&test));
            let probes = AbsorptionProbes::fit(
                LabelledFeatures {
                    x: &a.rows,
                    d: a.d,
                    labels: &ltr,
                },
                LabelledFeatures {
                    x: &b.rows,
                    d: b.d,
                    labels: &lte,
                },
                5,
                1.0,
                None,
            )
            .unwrap();
            probes.test.iter().map(|s| s.f1).sum::<f64>() / 5.0
        };
        let at_word = mean_f1(0);
        let before = mean_f1(1);
        eprintln!("mean F1 at the word's token {at_word:.3}, at the newline before it {before:.3}");
        assert!(at_word > 0.7, "F1 {at_word:.3} at the word's token");
        assert!(before < 0.45, "F1 {before:.3} at the newline before it");
    }

    #[test]
    fn bad_numbers_are_refused_naming_the_flag() {
        sae_workbench::cli::assert_refused::<Args>(
            &["absorption", "--sae", "x"],
            &[
                ("--train-fraction", "1.5"),
                ("--max-k", "0"),
                ("--batch-size", "0"),
                ("--icl", "0"),
            ],
        );
    }
}
