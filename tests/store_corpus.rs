//! The real corpora (skipped when `scripts/fetch_assets.py` has not fetched them): document
//! counts, clean texts, stable ids and a split that keeps documents whole.

use std::collections::{BTreeMap, HashSet};

use sae_workbench::activation_store::{CorpusName, SplitSpec, default_corpora_root, load_corpus};

fn root_or_skip() -> Option<std::path::PathBuf> {
    let root = default_corpora_root();
    if root.join("austen/Rdata.rdb").exists() && root.join("sotu").is_dir() {
        Some(root)
    } else {
        eprintln!(
            "skipping: corpora not found under {} (run `python3 scripts/fetch_assets.py`)",
            root.display()
        );
        None
    }
}

#[test]
fn corpora_have_the_expected_documents() {
    let Some(root) = root_or_skip() else { return };
    let mut ids = HashSet::new();
    let mut per_corpus = BTreeMap::new();
    for corpus in CorpusName::ALL {
        let docs = load_corpus(&root, corpus).unwrap();
        per_corpus.insert(corpus.as_str(), docs.len());
        for d in &docs {
            assert!(ids.insert(d.id.clone()), "duplicate id {}", d.id);
            assert!(d.id.starts_with(corpus.as_str()), "{}", d.id);
            assert!(
                d.text.len() > 200,
                "{} has only {} bytes",
                d.id,
                d.text.len()
            );
            assert!(!d.text.contains("Project Gutenberg"), "{}", d.id);
            assert!(
                !d.text.contains("\r") && !d.text.contains("\n\n\n"),
                "{}",
                d.id
            );
            assert!(
                d.text.trim() == d.text,
                "{} has surrounding whitespace",
                d.id
            );
        }
        match corpus {
            CorpusName::Sotu => {
                assert_eq!(docs.len(), 233);
                assert!(docs[0].id == "sotu/1790_george_washington_n");
                assert!(
                    docs[0].text.starts_with("Fellow-Citizens of the Senate"),
                    "{:?}",
                    docs[0].text.get(..60)
                );
            }
            CorpusName::MobyDick => {
                assert_eq!(docs.len(), 135);
                assert!(
                    docs[0]
                        .text
                        .starts_with("CHAPTER 1. Loomings.\n\nCall me Ishmael.")
                );
                assert!(docs[134].text.starts_with("CHAPTER 135."));
            }
            CorpusName::Shakespeare => {
                assert_eq!(docs.len(), 42);
                let hamlet = docs.iter().find(|d| d.id == "shakespeare/hamlet").unwrap();
                assert!(hamlet.text.contains("To be, or not to be"));
            }
            CorpusName::Austen => {
                // Emma 55, Mansfield Park 48, Northanger Abbey 31, Persuasion 24,
                // Pride and Prejudice 61, Sense and Sensibility 50 chapters.
                let mut novels: BTreeMap<&str, usize> = BTreeMap::new();
                for d in &docs {
                    *novels.entry(d.id.split('/').nth(1).unwrap()).or_default() += 1;
                }
                let want = [
                    ("emma", 55),
                    ("mansfieldpark", 48),
                    ("northangerabbey", 31),
                    ("persuasion", 24),
                    ("prideprejudice", 61),
                    ("sensesensibility", 50),
                ];
                assert_eq!(novels, want.into_iter().collect::<BTreeMap<_, _>>());
                let pp = docs
                    .iter()
                    .find(|d| d.id == "austen/prideprejudice/chapter-01")
                    .unwrap();
                assert!(
                    pp.text.contains("It is a truth universally acknowledged"),
                    "{:?}",
                    pp.text.get(..200)
                );
            }
        }
    }
    // Held-out splits get a share of documents near their targets.
    let spec = SplitSpec::default();
    let n = ids.len() as f64;
    let held: usize = ids
        .iter()
        .filter(|id| spec.split_of(id) != sae_workbench::activation_store::Split::Train)
        .count();
    assert!(
        (held as f64 / n - 0.10).abs() < 0.04,
        "{held} of {n} documents held out"
    );
    eprintln!("{per_corpus:?}");
}
