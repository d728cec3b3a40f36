//! The chat data: WordNet parsing against a hand-written file in the real format, exact answers
//! from hand-made material, and, when `assets/` has WordNet and the corpora, the real build:
//! determinism, no train/eval leakage, and answers checked against the source they came from.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::OnceLock;

use activation_store::Document;
use sft::Error;
use sft::conversations::{
    Conversation, FETCH_WORDNET, Material, Origin, Pos, Role, Sources, Split, Synset, Task,
    read_jsonl, read_wordnet, work_title, write_jsonl,
};

const HEADER: &str = "  1 This software and database is being provided to you, the LICENSEE, by  \n  2 Princeton University under the following license.  By obtaining, using  \n";

const NOUN: &str = "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04424418 n 0000 | that which is perceived or known or inferred to have its own distinct existence (living or nonliving)  \n\
00002137 03 n 02 abstraction 0 abstract_entity 0 002 @ 00001740 n 0000 + 00692347 v 0101 | a general concept formed by extracting common features from specific examples  \n";
const VERB: &str = "00205598 30 v 02 turn_around 0 pick_up 0 001 @ 00205046 v 0000 02 + 01 00 + 02 00 | improve significantly; go from bad to good; \"Her performance in school picked up\"  \n";
const ADJ: &str = "00019731 00 s 02 handy 0 ready_to_hand(p) 0 002 & 00019131 a 0000 + 04718999 n 0101 | easy to reach; \"found a handy spot for the can opener\"  \n";
const ADV: &str = "00014738 02 r 01 badly c 001 ! 00014616 r 0101 | without skill or in a displeasing manner; \"she writes badly\"; \"I think he paints very badly\"  \n";

fn write_wordnet(dir: &Path, noun: &str) {
    for (name, body) in [
        ("data.noun", noun),
        ("data.verb", VERB),
        ("data.adj", ADJ),
        ("data.adv", ADV),
    ] {
        std::fs::write(dir.join(name), format!("{HEADER}{body}")).unwrap();
    }
}

fn hand_made_synsets() -> Vec<Synset> {
    let dir = tempfile::tempdir().unwrap();
    write_wordnet(dir.path(), NOUN);
    read_wordnet(dir.path()).unwrap()
}

#[test]
fn hand_written_wordnet_parses_exactly() {
    let got = hand_made_synsets();
    let s =
        |offset, lex_filenum, pos, lemmas: &[&str], definition: &str, examples: &[&str]| Synset {
            offset,
            lex_filenum,
            pos,
            lemmas: lemmas.iter().map(|l| l.to_string()).collect(),
            definition: definition.into(),
            examples: examples.iter().map(|e| e.to_string()).collect(),
            hypernyms: Vec::new(),
        };
    let mut want = vec![
        s(
            1740,
            3,
            Pos::Noun,
            &["entity"],
            "that which is perceived or known or inferred to have its own distinct existence (living or nonliving)",
            &[],
        ),
        s(
            2137,
            3,
            Pos::Noun,
            &["abstraction", "abstract entity"],
            "a general concept formed by extracting common features from specific examples",
            &[],
        ),
        s(
            205598,
            30,
            Pos::Verb,
            &["turn around", "pick up"],
            "improve significantly; go from bad to good",
            &["Her performance in school picked up"],
        ),
        s(
            19731,
            0,
            Pos::AdjectiveSatellite,
            &["handy", "ready to hand"],
            "easy to reach",
            &["found a handy spot for the can opener"],
        ),
        s(
            14738,
            2,
            Pos::Adverb,
            &["badly"],
            "without skill or in a displeasing manner",
            &["she writes badly", "I think he paints very badly"],
        ),
    ];
    // `@` pointers are the broader senses; `~`, `+`, `&` and `!` are not.
    want[1].hypernyms = vec!["n00001740".into()];
    want[2].hypernyms = vec!["v00205046".into()];
    assert_eq!(got, want);
    assert_eq!(got[3].key(), "a00019731", "satellites live in data.adj");
    assert_eq!(got[2].key(), "v00205598");
}

#[test]
fn missing_wordnet_folder_names_the_path_and_the_fetch_command() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-wordnet-here");
    let err = read_wordnet(&missing).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::MissingAsset { .. }), "{msg}");
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
    assert!(
        msg.contains("python3 scripts/fetch_assets.py wordnet"),
        "{msg}"
    );
    assert_eq!(FETCH_WORDNET, "python3 scripts/fetch_assets.py wordnet");
}

#[test]
fn malformed_data_line_names_file_and_line() {
    // Line 3 (after the two header lines) announces three pointers but has two.
    let bad = "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 | that which is perceived  \n";
    let dir = tempfile::tempdir().unwrap();
    write_wordnet(dir.path(), bad);
    let err = read_wordnet(dir.path()).unwrap_err();
    let msg = err.to_string();
    match &err {
        Error::Parse { path, line, .. } => {
            assert_eq!(*line, 3, "{msg}");
            assert_eq!(path, &dir.path().join("data.noun"), "{msg}");
        }
        other => panic!("expected a parse error, got {other}"),
    }
    assert!(msg.contains("data.noun:3:"), "{msg}");

    // A word count that is not hexadecimal, on line 4.
    let bad =
        format!("{NOUN}00002452 03 n zz thing 0 000 | a separate and self-contained entity  \n");
    write_wordnet(dir.path(), &bad);
    let err = read_wordnet(dir.path()).unwrap_err();
    assert!(
        matches!(err, Error::Parse { line: 5, .. }),
        "NOUN is two lines after the header, so the bad one is line 5: {err}"
    );
}

const EMMA: &str = "Emma Woodhouse lived with her father in a large house near the village.\n\
She was clever and rich, and she had very little in her life to worry about.\n\
Her mother had died many years ago, and a kind governess had taken her place.\n\
The governess was called Miss Taylor, and she loved both of the sisters dearly.\n\
Now Miss Taylor was married, and the house felt quiet and empty in the evenings.\n\
Emma sat alone by the fire and wondered what she would do with her days.\n\n\
Her father did not like change of any kind.";

fn normalise(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The number in a `count` answer.
fn number_in(answer: &str) -> usize {
    answer
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no number in {answer:?}"))
}

#[test]
fn hand_made_material_gives_exact_answers() {
    let docs = vec![Document {
        id: "austen/emma/chapter-01".into(),
        text: EMMA.into(),
    }];
    let material = Material::from_parts(hand_made_synsets(), docs);
    let mut defines: HashMap<&str, Vec<String>> = HashMap::new();
    let base = |w: &str, rest: &str| format!("\"{w}\" is {rest}.");
    let entity = base(
        "entity",
        "a noun meaning that which is perceived or known or inferred to have its own distinct existence (living or nonliving)",
    );
    defines.insert("entity", vec![entity]);
    let concept = "a general concept formed by extracting common features from specific examples";
    defines.insert(
        "abstraction",
        vec![base("abstraction", &format!("a noun meaning {concept}"))],
    );
    defines.insert(
        "abstract entity",
        vec![base(
            "abstract entity",
            &format!("a noun meaning {concept}"),
        )],
    );
    let better = "a verb meaning to improve significantly; go from bad to good";
    defines.insert("turn around", vec![base("turn around", better)]);
    defines.insert(
        "pick up",
        vec![
            base("pick up", better),
            format!(
                "{} For example: \"Her performance in school picked up.\"",
                base("pick up", better)
            ),
        ],
    );
    defines.insert(
        "handy",
        vec![base("handy", "an adjective meaning easy to reach")],
    );
    defines.insert(
        "ready to hand",
        vec![base("ready to hand", "an adjective meaning easy to reach")],
    );
    let badly = base(
        "badly",
        "an adverb meaning without skill or in a displeasing manner",
    );
    defines.insert(
        "badly",
        vec![
            badly.clone(),
            format!("{badly} For example: \"I think he paints very badly.\""),
        ],
    );

    let mut seen_tasks = HashSet::new();
    for split in [Split::Train, Split::Eval] {
        let usable = material.pool_sizes(split).iter().any(|&(_, n)| n > 0);
        let result = material.build(split, 12, 7);
        if !usable {
            assert!(result.is_err(), "{split}: nothing usable must be an error");
            continue;
        }
        let convs = result.unwrap();
        assert_eq!(convs.len(), 12);
        for c in &convs {
            c.validate().unwrap();
            for (k, task) in c.tasks().enumerate() {
                seen_tasks.insert(task.to_string());
                let q = &c.messages[2 * k].content;
                let a = &c.messages[2 * k + 1].content;
                let quoted = q.split('"').nth(1).unwrap_or("");
                match task {
                    "define" => {
                        let want = &defines[quoted];
                        assert!(want.contains(a), "{q} -> {a}; expected one of {want:?}");
                    }
                    "synonym" => {
                        let pairs = [
                            ("abstraction", "abstract entity", concept.to_string()),
                            ("abstract entity", "abstraction", concept.to_string()),
                            (
                                "turn around",
                                "pick up",
                                "to improve significantly; go from bad to good".to_string(),
                            ),
                            (
                                "pick up",
                                "turn around",
                                "to improve significantly; go from bad to good".to_string(),
                            ),
                            ("handy", "ready to hand", "easy to reach".to_string()),
                            ("ready to hand", "handy", "easy to reach".to_string()),
                        ];
                        let (_, b, meaning) = pairs
                            .iter()
                            .find(|(a, _, _)| *a == quoted)
                            .unwrap_or_else(|| panic!("synonym asked for {quoted:?}"));
                        assert!(
                            a == &format!("\"{b}\" is a synonym: both mean {meaning}.")
                                || a == &format!(
                                    "You could say \"{b}\". Both words mean {meaning}."
                                ),
                            "{q} -> {a}"
                        );
                    }
                    "sentence" => match quoted {
                        "pick up" => assert_eq!(a, "Her performance in school picked up."),
                        "badly" => assert_eq!(a, "I think he paints very badly."),
                        other => panic!("no usable example for {other:?}, yet asked: {q}"),
                    },
                    "source" => {
                        assert_eq!(a, "This passage is from Emma by Jane Austen.");
                        let passage = q.split_once("\n\n").unwrap().1;
                        assert!(normalise(EMMA).contains(passage), "{passage}");
                        let words = passage.split_whitespace().count();
                        assert!((40..=90).contains(&words), "{words} words: {passage}");
                    }
                    "continue" => {
                        let context = q.split_once("\n\n").unwrap().1;
                        assert!(
                            normalise(EMMA).contains(&format!("{context} {a}")),
                            "{context} || {a}"
                        );
                    }
                    "count" => {
                        let sentence = q.split_once("\n\n").unwrap().1;
                        assert_eq!(
                            number_in(a),
                            sentence.split_whitespace().count(),
                            "{q} -> {a}"
                        );
                    }
                    other => panic!("unknown task {other}"),
                }
            }
        }
    }
    assert!(seen_tasks.len() >= 3, "only {seen_tasks:?}");
}

#[test]
fn jsonl_round_trips_and_names_bad_lines() {
    let material = Material::from_parts(
        hand_made_synsets(),
        vec![Document {
            id: "austen/emma/chapter-01".into(),
            text: EMMA.into(),
        }],
    );
    let split = if material
        .pool_sizes(Split::Train)
        .iter()
        .any(|&(_, n)| n > 0)
    {
        Split::Train
    } else {
        Split::Eval
    };
    let convs = material.build(split, 10, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.jsonl");
    write_jsonl(&path, &convs).unwrap();
    assert!(!dir.path().join("chat.jsonl.tmp").exists());
    assert_eq!(read_jsonl(&path).unwrap(), convs);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"role\":\"user\"") && text.contains("\"role\":\"assistant\""));

    let mut lines: Vec<&str> = text.lines().collect();
    lines[2] = "{\"id\": \"broken\"";
    std::fs::write(&path, lines.join("\n")).unwrap();
    let err = read_jsonl(&path).unwrap_err();
    assert!(matches!(err, Error::Parse { line: 3, .. }), "{err}");
    assert!(err.to_string().contains("chat.jsonl:3:"), "{err}");
}

// ---- the real assets ----

fn real() -> Option<&'static Material> {
    static MATERIAL: OnceLock<Option<Material>> = OnceLock::new();
    MATERIAL
        .get_or_init(|| {
            let sources = Sources::default();
            if !sources.wordnet.join("data.noun").exists() {
                println!(
                    "skipping: {} is missing (run `{FETCH_WORDNET}`)",
                    sources.wordnet.display()
                );
                return None;
            }
            if !sources.corpora.join(".complete").exists() {
                println!(
                    "skipping: {} is missing (run `python3 scripts/fetch_assets.py corpora`)",
                    sources.corpora.display()
                );
                return None;
            }
            Some(Material::load(&sources).unwrap())
        })
        .as_ref()
}

const TRAIN_N: usize = 3000;
const EVAL_N: usize = 600;

fn real_built() -> Option<&'static (Vec<Conversation>, Vec<Conversation>)> {
    static BUILT: OnceLock<Option<(Vec<Conversation>, Vec<Conversation>)>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let m = real()?;
            Some((
                m.build(Split::Train, TRAIN_N, 42).unwrap(),
                m.build(Split::Eval, EVAL_N, 42).unwrap(),
            ))
        })
        .as_ref()
}

/// FNV-1a written out again here, so the split rule is checked against its definition and not
/// against the code under test.
fn expected_split(key: &str) -> Split {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    if h.is_multiple_of(10) {
        Split::Eval
    } else {
        Split::Train
    }
}

#[test]
fn real_build_is_deterministic_and_sized() {
    let (Some(m), Some((train, eval))) = (real(), real_built()) else {
        return;
    };
    assert_eq!(train.len(), TRAIN_N);
    assert_eq!(eval.len(), EVAL_N);
    assert_eq!(&m.build(Split::Train, TRAIN_N, 42).unwrap(), train);
    assert_eq!(&m.build(Split::Eval, EVAL_N, 42).unwrap(), eval);
    assert_eq!(m.build(Split::Train, 100, 42).unwrap(), train[..100]);
    assert_ne!(m.build(Split::Train, 100, 43).unwrap(), train[..100]);
    for convs in [train, eval] {
        let ids: HashSet<&str> = convs.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids.len(), convs.len(), "ids repeat");
        let contents: HashSet<Vec<&str>> = convs
            .iter()
            .map(|c| c.messages.iter().map(|m| m.content.as_str()).collect())
            .collect();
        assert_eq!(contents.len(), convs.len(), "conversations repeat");
        for c in convs {
            c.validate().unwrap();
            assert_eq!(c.messages[0].role, Role::User);
        }
    }
}

#[test]
fn real_splits_do_not_leak() {
    let (Some(m), Some((train, eval))) = (real(), real_built()) else {
        return;
    };
    let counts = m.split_counts();
    println!("{counts:?}");
    let eval_share =
        counts.eval_synsets as f64 / (counts.eval_synsets + counts.train_synsets) as f64;
    assert!(
        (0.08..0.12).contains(&eval_share),
        "eval synset share {eval_share}"
    );
    assert!(counts.eval_documents > 0 && counts.train_documents > 5 * counts.eval_documents);

    let mut train_items = HashSet::new();
    for (convs, split) in [(train, Split::Train), (eval, Split::Eval)] {
        for c in convs {
            for o in &c.origins {
                let key = match o {
                    Origin::Synset(k) | Origin::Document(k) => k,
                };
                assert_eq!(
                    expected_split(key),
                    split,
                    "{o:?} used in {split}: {}",
                    c.id
                );
                if split == Split::Train {
                    train_items.insert(o.clone());
                } else {
                    assert!(!train_items.contains(o), "{o:?} in both splits");
                }
            }
        }
    }
    // Eval synsets really are absent from train: no train question names an eval-only lemma's
    // synset, checked through the origins of every exchange above; and eval does use items.
    let eval_items: HashSet<&Origin> = eval.iter().flat_map(|c| &c.origins).collect();
    assert!(eval_items.len() > EVAL_N / 2);
    assert!(eval_items.iter().all(|o| !train_items.contains(*o)));
}

#[test]
fn real_answers_follow_from_their_sources() {
    let (Some(m), Some((train, eval))) = (real(), real_built()) else {
        return;
    };
    let synsets: HashMap<String, &Synset> = m.synsets().iter().map(|s| (s.key(), s)).collect();
    let docs: HashMap<&str, String> = m
        .documents()
        .iter()
        .map(|d| (d.id.as_str(), normalise(&d.text)))
        .collect();
    let mut per_task: HashMap<String, usize> = HashMap::new();
    let mut exchanges = 0;
    let mut long = 0;
    for c in train.iter().chain(eval) {
        for (k, (task, origin)) in c.tasks().zip(&c.origins).enumerate() {
            exchanges += 1;
            *per_task.entry(task.to_string()).or_default() += 1;
            let q = &c.messages[2 * k].content;
            let a = &c.messages[2 * k + 1].content;
            assert!(a.ends_with('.') || a.ends_with(".\""), "{a}");
            if a.split_whitespace().count() > 60 {
                long += 1;
            }
            match origin {
                Origin::Synset(key) => {
                    let s = synsets[key];
                    let quoted = q.split('"').nth(1).unwrap();
                    assert!(s.lemmas.iter().any(|l| l == quoted), "{q} not about {s:?}");
                    match task {
                        "define" => {
                            assert!(a.contains(&s.definition), "{a} lacks {:?}", s.definition);
                            assert!(a.contains(s.pos.name()), "{a}");
                        }
                        "synonym" => {
                            let b = a.split('"').nth(1).unwrap();
                            assert_ne!(b, quoted);
                            assert!(s.lemmas.iter().any(|l| l == b), "{b} not in {s:?}");
                            assert!(a.contains(&s.definition), "{a}");
                        }
                        "sentence" => {
                            let body = a.strip_suffix('.').unwrap().to_lowercase();
                            assert!(
                                s.examples
                                    .iter()
                                    .any(|e| e.trim_end_matches('.').to_lowercase() == body),
                                "{a} is not an example of {s:?}"
                            );
                        }
                        other => panic!("{other} from a synset"),
                    }
                }
                Origin::Document(id) => {
                    let text = &docs[id.as_str()];
                    let body = q.split_once("\n\n").unwrap().1;
                    assert!(text.contains(body), "{id}: {body}");
                    match task {
                        "source" => {
                            let corpus = id.split('/').next().unwrap();
                            let author = match corpus {
                                "austen" => "by Jane Austen",
                                "moby-dick" => "Moby-Dick by Herman Melville",
                                "shakespeare" => "by William Shakespeare",
                                "sotu" => "by ",
                                other => panic!("unknown corpus {other}"),
                            };
                            // The passage is a substring of document `id` (checked above),
                            // and the answer names exactly that document's work.
                            let work = work_title(id).unwrap();
                            assert_eq!(a, &format!("This passage is from {work}."));
                            assert!(a.contains(author), "{id}: {a}");
                            if corpus == "sotu" {
                                let year = &id["sotu/".len().."sotu/".len() + 4];
                                assert!(
                                    a.contains(&format!("State of the Union address of {year} by")),
                                    "{id}: {a}"
                                );
                            }
                            let words = body.split_whitespace().count();
                            assert!((40..=90).contains(&words), "{words} words: {body}");
                        }
                        "continue" => {
                            assert!(text.contains(&format!("{body} {a}")), "{id}: {body} || {a}");
                        }
                        "count" => {
                            assert_eq!(number_in(a), body.split_whitespace().count(), "{body}");
                        }
                        other => panic!("{other} from a document"),
                    }
                }
            }
        }
    }
    println!("exchanges per task: {per_task:?}");
    for t in Task::ALL {
        let share = per_task.get(t.as_str()).copied().unwrap_or(0) as f64 / exchanges as f64;
        assert!((0.10..0.25).contains(&share), "{t}: {share}");
    }
    assert!(
        long * 50 < exchanges,
        "{long} of {exchanges} answers over 60 words"
    );
    let two = train.iter().filter(|c| c.messages.len() == 4).count();
    let share = two as f64 / train.len() as f64;
    println!("two-exchange share (train): {share:.3}");
    assert!((0.05..=0.30).contains(&share), "{share}");
}

#[test]
fn real_work_titles_are_exact() {
    let Some(m) = real() else { return };
    for (id, want) in [
        (
            "austen/prideprejudice/chapter-01",
            "Pride and Prejudice by Jane Austen",
        ),
        ("moby-dick/chapter-001", "Moby-Dick by Herman Melville"),
        ("shakespeare/lear", "King Lear by William Shakespeare"),
        (
            "shakespeare/winters_tale",
            "The Winter's Tale by William Shakespeare",
        ),
        (
            "sotu/1790_george_washington_n",
            "the State of the Union address of 1790 by George Washington",
        ),
        (
            "sotu/1961_john_f_kennedy_d",
            "the State of the Union address of 1961 by John F. Kennedy",
        ),
    ] {
        assert!(m.documents().iter().any(|d| d.id == id), "no document {id}");
        assert_eq!(work_title(id).as_deref(), Some(want), "{id}");
    }
    let untitled: Vec<&str> = m
        .documents()
        .iter()
        .filter(|d| work_title(&d.id).is_none())
        .map(|d| d.id.as_str())
        .collect();
    assert!(untitled.is_empty(), "no title for {untitled:?}");
}

/// Prints one conversation of each task (run with `--nocapture` to see real examples).
#[test]
fn real_examples_print() {
    let Some((train, _)) = real_built() else {
        return;
    };
    for t in Task::ALL {
        if let Some(c) = train.iter().find(|c| c.task == t.as_str()) {
            println!("{}", serde_json::to_string_pretty(c).unwrap());
        }
    }
    if let Some(c) = train.iter().find(|c| c.messages.len() == 4) {
        println!("{}", serde_json::to_string_pretty(c).unwrap());
    }
}

/// On Gemma 3's own tokenizer (SentencePiece-style, from the GGUF), the tokens marked `User` and
/// `Model` spell exactly the messages' contents, and everything else is markup.
#[test]
fn real_token_kinds_spell_the_messages() {
    use sft::{TokenKind, encode_conversation_kinds};
    let gguf = transformer_hooks::assets::asset_path("models/gemma-3-270m-q4_k_m.gguf");
    let Some((_, eval)) = real_built() else {
        return;
    };
    if !gguf.exists() {
        println!("skipping: {} is missing", gguf.display());
        return;
    }
    let tok = transformer_hooks::Tokenizer::load(&gguf).unwrap();
    let mut counts = [0usize; 3];
    for c in eval.iter().take(200) {
        let (e, kinds) = encode_conversation_kinds(&tok, &c.messages).unwrap();
        assert_eq!(kinds.len(), e.tokens.len());
        let text = |kind: TokenKind| -> String {
            let ids: Vec<u32> = e
                .tokens
                .iter()
                .zip(&kinds)
                .filter(|(_, k)| **k == kind)
                .map(|(&t, _)| t)
                .collect();
            tok.decode(&ids).unwrap()
        };
        let squash = |s: &str| s.split_whitespace().collect::<String>();
        for (kind, role) in [
            (TokenKind::User, Role::User),
            (TokenKind::Model, Role::Assistant),
        ] {
            let want: String = c
                .messages
                .iter()
                .filter(|m| m.role == role)
                .map(|m| squash(&m.content))
                .collect();
            assert_eq!(squash(&text(kind)), want, "{kind:?} in {}", c.id);
        }
        let mut markup = text(TokenKind::Template);
        for m in ["<bos>", "<start_of_turn>", "<end_of_turn>", "user", "model"] {
            markup = markup.replace(m, "");
        }
        assert!(
            markup.trim().is_empty(),
            "{markup:?} counted as template in {}",
            c.id
        );
        for (i, k) in TokenKind::ALL.iter().enumerate() {
            counts[i] += kinds.iter().filter(|x| *x == k).count();
        }
    }
    println!("template/user/model tokens: {counts:?}");
    assert!(counts.iter().all(|&n| n > 0));
}

#[test]
fn wordnet_index_lists_senses_in_order_and_names_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let index = |body: &str| format!("{HEADER}{body}");
    // "abstraction" has two senses, listed most frequent first; pointers are skipped.
    std::fs::write(
        dir.path().join("index.noun"),
        index("abstract_entity n 1 1 @ 1 0 00002137  \nabstraction n 2 2 @ ~ 2 1 00002137 00001740  \n"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("index.verb"),
        index("pick_up v 1 1 @ 1 1 00205598  \n"),
    )
    .unwrap();
    std::fs::write(dir.path().join("index.adj"), index("")).unwrap();
    let err = sft::conversations::read_wordnet_index(dir.path()).unwrap_err();
    assert!(matches!(err, Error::MissingAsset { .. }), "{err}");
    assert!(err.to_string().contains("index.adv"), "{err}");
    std::fs::write(
        dir.path().join("index.adv"),
        index("badly r 1 0 1 1 00014738  \n"),
    )
    .unwrap();
    let got = sft::conversations::read_wordnet_index(dir.path()).unwrap();
    let keys = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        got,
        vec![
            ("abstract entity".to_string(), keys(&["n00002137"])),
            ("abstraction".to_string(), keys(&["n00002137", "n00001740"])),
            ("pick up".to_string(), keys(&["v00205598"])),
            ("badly".to_string(), keys(&["r00014738"])),
        ]
    );
    // Two synsets announced, one given: the file and line are named.
    std::fs::write(
        dir.path().join("index.adv"),
        index("badly r 2 0 1 1 00014738  \n"),
    )
    .unwrap();
    match sft::conversations::read_wordnet_index(dir.path()).unwrap_err() {
        Error::Parse {
            path,
            line,
            message,
        } => {
            assert!(path.ends_with("index.adv"));
            assert_eq!(line, 3);
            assert!(message.contains("synset offset"), "{message}");
        }
        other => panic!("{other}"),
    }
}
