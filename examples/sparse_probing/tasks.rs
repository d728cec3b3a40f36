//! The probing tasks made from the pinned corpora, and their windows: which document has which
//! class in each task, which documents are held out, and which token windows each split draws.
//! Shared by the `sparse_probing` and `scr` examples so that both read the same texts the same
//! way.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use activation_store::{CorpusName, Document, chunk_ranges, default_corpora_root, load_corpora};
use anyhow::{Context, bail};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use metrics::{HookedSplice, PooledFeatures, pooled_window_features};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use sae_core::SaeModel;
use transformer_hooks::{Model, Tokenizer, assets};

/// A task: documents with a class each.
pub struct Task {
    pub name: &'static str,
    pub about: &'static str,
    pub classes: Vec<String>,
    /// (index into the corpus documents, class)
    pub docs: Vec<(usize, usize)>,
}

/// The First Folio's grouping (Pericles, not in the Folio, with the comedies, as the late
/// romances are there; Troilus and Cymbeline with the tragedies, as the Folio prints them).
pub fn shakespeare_genre(work: &str) -> Option<&'static str> {
    const COMEDIES: [&str; 15] = [
        "alls_well_that_ends_well",
        "as_you_like_it",
        "comedy_of_errors",
        "loves_labours_lost",
        "measure_for_measure",
        "merchant_of_venice",
        "merry_wives_of_windsor",
        "midsummer_nights_dream",
        "much_ado_about_nothing",
        "pericles",
        "taming_of_the_shrew",
        "tempest",
        "twelfth_night",
        "two_gentlemen_of_verona",
        "winters_tale",
    ];
    const HISTORIES: [&str; 10] = [
        "henry_iv_part_1",
        "henry_iv_part_2",
        "henry_v",
        "henry_vi_part_1",
        "henry_vi_part_2",
        "henry_vi_part_3",
        "henry_viii",
        "john",
        "richard_ii",
        "richard_iii",
    ];
    const TRAGEDIES: [&str; 12] = [
        "antony_and_cleopatra",
        "coriolanus",
        "cymbeline",
        "hamlet",
        "julius_caesar",
        "lear",
        "macbeth",
        "othello",
        "romeo_and_juliet",
        "timon_of_athens",
        "tragedy_of_titus_andronicus",
        "troilus_and_cressida",
    ];
    if COMEDIES.contains(&work) {
        Some("comedy")
    } else if HISTORIES.contains(&work) {
        Some("history")
    } else if TRAGEDIES.contains(&work) {
        Some("tragedy")
    } else {
        None // the poems and sonnets
    }
}

/// `sotu/1790_george_washington_n` → (1790, "n").
fn sotu_year_party(id: &str) -> Option<(u32, &str)> {
    let stem = id.strip_prefix("sotu/")?;
    let year = stem.split('_').next()?.parse().ok()?;
    let party = stem.rsplit('_').next()?;
    Some((year, party))
}

/// The class of document `id` in `task`, or `None` when the task leaves it out.
pub fn class_of(task: &str, id: &str) -> Option<String> {
    let mut parts = id.split('/');
    let corpus = parts.next()?;
    match task {
        "source" => Some(corpus.to_string()),
        "austen_novel" if corpus == "austen" => parts.next().map(str::to_string),
        "shakespeare_genre" if corpus == "shakespeare" => {
            shakespeare_genre(parts.next()?).map(str::to_string)
        }
        "sotu_era" => {
            let (year, _) = sotu_year_party(id)?;
            Some(
                match year {
                    ..=1860 => "1790-1860",
                    1861..=1932 => "1861-1932",
                    _ => "1933-2021",
                }
                .to_string(),
            )
        }
        "sotu_party" => match sotu_year_party(id)?.1 {
            "d" => Some("democrat".into()),
            "r" => Some("republican".into()),
            _ => None,
        },
        _ => None,
    }
}

pub fn make_task(name: &'static str, docs: &[Document]) -> Task {
    let about = match name {
        "source" => "which corpus a window comes from",
        "austen_novel" => "which of Austen's six novels",
        "shakespeare_genre" => "comedy, history or tragedy (First Folio), on held-out plays",
        "sotu_era" => "the era of a State of the Union address",
        _ => "the party of the president giving a State of the Union address",
    };
    let labelled: Vec<(usize, String)> = docs
        .iter()
        .enumerate()
        .filter_map(|(i, d)| class_of(name, &d.id).map(|c| (i, c)))
        .collect();
    let mut classes: Vec<String> = labelled.iter().map(|(_, c)| c.clone()).collect();
    classes.sort();
    classes.dedup();
    let docs = labelled
        .into_iter()
        .map(|(i, c)| (i, classes.binary_search(&c).unwrap_or(0)))
        .collect();
    Task {
        name,
        about,
        classes,
        docs,
    }
}

/// A window: document index and the start of its text tokens.
pub type WindowKey = (usize, usize);

/// Windows with their class.
pub type Labelled = Vec<(WindowKey, usize)>;

/// Per class and split, windows drawn round-robin over the class's documents (each document's
/// full windows in a seeded random order), so that no long document crowds out the rest.
/// Returns (train, test) lists of (window, class).
pub fn choose_windows(
    task: &Task,
    docs: &[Document],
    doc_windows: &HashMap<usize, Vec<usize>>,
    train_per_class: usize,
    test_per_class: usize,
) -> (Labelled, Labelled) {
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for class in 0..task.classes.len() {
        let mut members: Vec<usize> = task
            .docs
            .iter()
            .filter(|(_, c)| *c == class)
            .map(|(d, _)| *d)
            .collect();
        members.sort_by(|a, b| docs[*a].id.cmp(&docs[*b].id));
        // Every fourth document of the class, by id, is held out.
        let (held, kept): (Vec<_>, Vec<_>) = members
            .into_iter()
            .enumerate()
            .partition(|(i, _)| i % 4 == 3);
        for (split, list, want) in [
            (&kept, &mut train, train_per_class),
            (&held, &mut test, test_per_class),
        ] {
            let orders: Vec<(usize, &[usize])> = split
                .iter()
                .map(|&(_, d)| (d, doc_windows.get(&d).map_or(&[][..], Vec::as_slice)))
                .collect();
            let mut taken = 0;
            let mut round = 0;
            while taken < want {
                let mut any = false;
                for (d, starts) in &orders {
                    if let Some(&s) = starts.get(round) {
                        any = true;
                        if taken < want {
                            list.push(((*d, s), class));
                            taken += 1;
                        }
                    }
                }
                if !any {
                    break;
                }
                round += 1;
            }
        }
    }
    (train, test)
}

/// What both examples start from: the model, the SAEs (all of one hook, each fitting it) and
/// the BOS token that starts every window.
pub struct Setup {
    pub model: Model,
    pub model_path: PathBuf,
    pub saes: Vec<SaeModel>,
    /// Their names in the outputs: folder names, made unique.
    pub names: Vec<String>,
    pub hook: String,
    pub bos: Option<u32>,
}

impl Setup {
    /// Loads the SAEs of `--sae`, the model (default SmolLM2-135M-Instruct from the asset cache)
    /// on `device`, and checks that the SAEs share one hook (`hook`, or the one they name), that
    /// it fits them, and that windows of `context` tokens fit the model.
    ///
    /// # Errors
    /// Each named after the flag that caused it.
    pub fn load(
        sae_paths: &[PathBuf],
        model: Option<&Path>,
        hook: Option<&str>,
        device: &Device,
        context: usize,
    ) -> anyhow::Result<Self> {
        if context < 3 {
            bail!("--context {context}: a window needs BOS and at least two tokens");
        }
        let mut saes = Vec::new();
        for p in sae_paths {
            saes.push(SaeModel::load(p).with_context(|| format!("loading --sae {}", p.display()))?);
        }
        let first = saes.first().context("no --sae given")?;
        let hook = match (hook, first.hook_name()) {
            (Some(h), _) => h.to_string(),
            (None, Some(h)) => h.to_string(),
            (None, None) => bail!(
                "SAE {} names no hook (cfg.json metadata.hook_name): pass --hook",
                sae_paths[0].display()
            ),
        };
        for (s, p) in saes.iter().zip(sae_paths) {
            if let Some(h) = s.hook_name()
                && h != hook
            {
                bail!(
                    "--sae {} was trained on `{h}`, not `{hook}`: probe SAEs of one hook at a time",
                    p.display()
                );
            }
        }
        let model_path =
            model.map_or_else(|| assets::asset_path(assets::SMOLLM2), Path::to_path_buf);
        let model_path = std::fs::canonicalize(&model_path).unwrap_or(model_path);
        let model = Model::load(&model_path, device).with_context(|| {
            format!(
                "loading model {} (python3 scripts/fetch_assets.py smollm2)",
                model_path.display()
            )
        })?;
        let target = HookedSplice::new(&model, &hook)?;
        for (s, p) in saes.iter().zip(sae_paths) {
            target
                .check_sae(s)
                .with_context(|| format!("--sae {}", p.display()))?;
        }
        let n_ctx = model.config().n_ctx;
        if context > n_ctx {
            bail!("--context {context}: the model's context is {n_ctx} tokens");
        }
        let bos = model.tokenizer()?.bos_id().or(model.config().bos_token_id);
        Ok(Setup {
            names: sae_names(sae_paths),
            model,
            model_path,
            saes,
            hook,
            bos,
        })
    }

    /// Each window's mean activation at the hook and mean code of each SAE (BOS left out), with
    /// a progress bar: the forward passes, nearly all of an example's time.
    ///
    /// # Errors
    /// The model's and the SAEs' (see [`pooled_window_features`]).
    pub fn pooled_features(
        &self,
        windows: &[Vec<u32>],
        batch_size: usize,
    ) -> metrics::Result<(PooledFeatures, Vec<PooledFeatures>)> {
        let pb = ProgressBar::new(windows.len() as u64).with_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} windows, eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        pb.set_message("activations");
        let saes: Vec<&SaeModel> = self.saes.iter().collect();
        let out = pooled_window_features(
            &self.model,
            &self.hook,
            &saes,
            windows,
            batch_size,
            usize::from(self.bos.is_some()),
            Some(&pb),
        );
        pb.finish_and_clear();
        out
    }
}

/// Names for the SAEs: their folder names, made unique.
fn sae_names(paths: &[PathBuf]) -> Vec<String> {
    let mut names = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let base = p
            .file_name()
            .map_or_else(|| format!("sae{i}"), |n| n.to_string_lossy().into_owned());
        let name = if names.contains(&base) || base == "neurons" {
            format!("{base}#{i}")
        } else {
            base
        };
        names.push(name);
    }
    names
}

/// Every pinned corpus's documents.
///
/// # Errors
/// A corpus missing or unreadable, with the command that fetches them.
pub fn load_all_corpora() -> anyhow::Result<Vec<Document>> {
    let root = default_corpora_root();
    load_corpora(&root, &CorpusName::ALL).with_context(|| {
        format!(
            "reading the corpora in {} (python3 scripts/fetch_assets.py corpora)",
            root.display()
        )
    })
}

/// Joins a text's lines (and runs of spaces) with single spaces, so that nothing but its words
/// is left to tell it from another: no verse lines, paragraph breaks or double spaces.
pub fn flatten_whitespace(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The tokens of documents `needed` (no BOS), flattened first when asked.
///
/// # Errors
/// The tokenizer's.
pub fn tokenize_documents(
    tok: &Tokenizer,
    docs: &[Document],
    needed: &[usize],
    flatten: bool,
) -> transformer_hooks::Result<HashMap<usize, Vec<u32>>> {
    needed
        .par_iter()
        .map(|&d| {
            let text = &docs[d].text;
            let ids = if flatten {
                tok.encode(&flatten_whitespace(text), false)?
            } else {
                tok.encode(text, false)?
            };
            Ok((d, ids))
        })
        .collect()
}

/// Each document's full windows of `context` tokens (BOS included when `bos`), as start offsets in
/// an order seeded by `seed` and the document's id.
pub fn window_orders(
    tokens: &HashMap<usize, Vec<u32>>,
    docs: &[Document],
    context: usize,
    bos: bool,
    seed: u64,
) -> HashMap<usize, Vec<usize>> {
    let skip = usize::from(bos);
    tokens
        .iter()
        .map(|(&d, ids)| {
            let mut starts: Vec<usize> = chunk_ranges(ids.len(), context, bos)
                .filter(|r| r.len() + skip == context)
                .map(|r| r.start)
                .collect();
            let h = docs[d].id.bytes().fold(seed, |h, b| {
                h.wrapping_mul(0x100_0000_01B3).wrapping_add(u64::from(b))
            });
            starts.shuffle(&mut ChaCha8Rng::seed_from_u64(h));
            (d, starts)
        })
        .collect()
}

/// The token ids of every window of `index` (window → row), BOS first when there is one.
pub fn window_tokens(
    index: &BTreeMap<WindowKey, usize>,
    tokens: &HashMap<usize, Vec<u32>>,
    bos: Option<u32>,
    context: usize,
) -> Vec<Vec<u32>> {
    let skip = usize::from(bos.is_some());
    let mut windows = vec![Vec::new(); index.len()];
    for (&(d, s), &i) in index {
        let mut w = Vec::with_capacity(context);
        w.extend(bos);
        w.extend_from_slice(&tokens[&d][s..s + context - skip]);
        windows[i] = w;
    }
    windows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_get_the_classes_of_each_task() {
        let cases = [
            ("source", "moby-dick/chapter-001", Some("moby-dick")),
            ("austen_novel", "austen/emma/chapter-01", Some("emma")),
            ("austen_novel", "sotu/1790_george_washington_n", None),
            ("shakespeare_genre", "shakespeare/hamlet", Some("tragedy")),
            ("shakespeare_genre", "shakespeare/henry_v", Some("history")),
            ("shakespeare_genre", "shakespeare/tempest", Some("comedy")),
            ("shakespeare_genre", "shakespeare/sonnets", None),
            ("sotu_era", "sotu/1860_james_buchanan_d", Some("1790-1860")),
            ("sotu_era", "sotu/1861_abraham_lincoln_r", Some("1861-1932")),
            ("sotu_era", "sotu/2021_joseph_r_biden_d", Some("1933-2021")),
            ("sotu_era", "moby-dick/chapter-001", None),
            (
                "sotu_party",
                "sotu/1861_abraham_lincoln_r",
                Some("republican"),
            ),
            ("sotu_party", "sotu/2021_joseph_r_biden_d", Some("democrat")),
            ("sotu_party", "sotu/1790_george_washington_n", None),
        ];
        for (task, id, want) in cases {
            assert_eq!(class_of(task, id).as_deref(), want, "{task} {id}");
        }
    }

    /// Every work of the pinned Shakespeare corpus is a play with a genre or one of its five
    /// poems (a misspelt name in the tables would silently drop a play).
    #[test]
    fn every_play_in_the_corpus_has_its_genre() {
        let root = default_corpora_root();
        let Ok(docs) = activation_store::load_corpus(&root, CorpusName::Shakespeare) else {
            eprintln!("skipping: corpora not fetched (python3 scripts/fetch_assets.py corpora)");
            return;
        };
        let works: Vec<&str> = docs.iter().map(|d| &d.id["shakespeare/".len()..]).collect();
        let poems = [
            "lovers_complaint",
            "passionate_pilgrim",
            "phoenix_and_the_turtle",
            "rape_of_lucrece",
            "sonnets",
        ];
        assert_eq!(works.len(), 42);
        for w in works {
            assert_eq!(shakespeare_genre(w).is_none(), poems.contains(&w), "{w}");
        }
        let task = make_task("shakespeare_genre", &docs);
        let per_class: Vec<usize> = (0..3)
            .map(|c| task.docs.iter().filter(|d| d.1 == c).count())
            .collect();
        assert_eq!(task.classes, ["comedy", "history", "tragedy"]);
        assert_eq!(per_class, [15, 10, 12]);
    }

    #[test]
    fn windows_are_held_out_by_document_and_spread_over_documents() {
        let docs: Vec<Document> = (0..12)
            .map(|i| Document {
                id: format!("c/{i:02}"),
                text: String::new(),
            })
            .collect();
        // Documents 0-7 are class 0, 8-11 class 1; each has three windows.
        let task = Task {
            name: "t",
            about: "",
            classes: vec!["a".into(), "b".into()],
            docs: (0..12).map(|d| (d, usize::from(d >= 8))).collect(),
        };
        let doc_windows: HashMap<usize, Vec<usize>> =
            (0..12).map(|d| (d, vec![200, 100, 0])).collect();
        let (train, test) = choose_windows(&task, &docs, &doc_windows, 5, 4);
        let docs_of = |l: &Labelled, c: usize| -> Vec<usize> {
            l.iter().filter(|w| w.1 == c).map(|w| w.0.0).collect()
        };
        // Class 0: documents 3 and 7 (every fourth by id) are held out.
        assert_eq!(
            docs_of(&train, 0),
            vec![0, 1, 2, 4, 5],
            "one window from each of five documents first"
        );
        assert!(
            train.iter().filter(|w| w.1 == 0).all(|w| w.0.1 == 200),
            "each document's first window in its order"
        );
        assert_eq!(docs_of(&test, 0), vec![3, 7, 3, 7]);
        // Class 1: document 11 held out, its three windows all that the test split can have.
        assert_eq!(docs_of(&train, 1), vec![8, 9, 10, 8, 9]);
        assert_eq!(docs_of(&test, 1), vec![11, 11, 11]);
        for (tr, _) in &train {
            assert!(
                !test.iter().any(|(te, _)| te.0 == tr.0),
                "document {} in both splits",
                tr.0
            );
        }
    }
}
