//! A reader for the small part of R's serialization format that Debian's `r-cran-janeaustenr`
//! needs: a lazy-load database (`Rdata.rdx` index + `Rdata.rdb` objects) holding one character
//! vector per novel.
//!
//! `Rdata.rdx` is a gzip file holding a serialized list whose `variables` element maps each object
//! name to `c(offset, length)` in `Rdata.rdb`. At that offset the `.rdb` holds a 4-byte big-endian
//! uncompressed length followed by a zlib stream, which inflates to an XDR serialization
//! (`X\n`, version 2 or 3) of the object. Only the types these files use are read (lists,
//! pairlists, symbols, references, character, integer, logical and double vectors); anything else
//! is an error naming the type code, never a silent skip.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// An R value, reduced to what the janeaustenr files contain.
#[derive(Debug, Clone, PartialEq)]
pub enum RValue {
    Null,
    /// A character vector; `None` is `NA_character_`.
    Strings(Vec<Option<String>>),
    Ints(Vec<i32>),
    Logicals(Vec<i32>),
    Doubles(Vec<f64>),
    /// A generic vector (`list()`), with its `names` attribute when it has one.
    List {
        items: Vec<RValue>,
        names: Option<Vec<String>>,
    },
    /// A pairlist as (tag, value) pairs.
    Pairs(Vec<(Option<String>, RValue)>),
    Symbol(String),
}

const NILSXP: u32 = 0;
const SYMSXP: u32 = 1;
const LISTSXP: u32 = 2;
const CHARSXP: u32 = 9;
const LGLSXP: u32 = 10;
const INTSXP: u32 = 13;
const REALSXP: u32 = 14;
const STRSXP: u32 = 16;
const VECSXP: u32 = 19;
const REFSXP: u32 = 255;
const NILVALUE_SXP: u32 = 254;

/// Deepest nesting of lists read: a corpus is a list of a few levels; a file nesting deeper is
/// malformed, and reading it recursively would overflow the stack.
const MAX_DEPTH: usize = 64;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    refs: Vec<RValue>,
    what: &'a str,
    depth: usize,
}

impl Reader<'_> {
    fn err(&self, msg: impl std::fmt::Display) -> String {
        format!("{}: {msg} at byte {}", self.what, self.pos)
    }

    fn bytes(&mut self, n: usize) -> std::result::Result<&[u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(format!("truncated (wanted {n} more bytes)"))),
        }
    }

    fn int(&mut self) -> std::result::Result<i32, String> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn length(&mut self) -> std::result::Result<usize, String> {
        let n = self.int()?;
        let n = if n == -1 {
            let hi = self.int()? as u32 as u64;
            let lo = self.int()? as u32 as u64;
            (hi << 32) | lo
        } else if n < 0 {
            return Err(self.err(format!("negative vector length {n}")));
        } else {
            n as u64
        };
        // Every element takes at least one byte, so a longer vector means a corrupt stream.
        if n as usize > self.buf.len() {
            return Err(self.err(format!("vector length {n} exceeds the data")));
        }
        Ok(n as usize)
    }

    fn header(&mut self) -> std::result::Result<(), String> {
        let magic = self.bytes(2)?.to_vec();
        if magic != b"X\n" {
            return Err(self.err(format!(
                "not an XDR R serialization (magic {magic:?}, expected \"X\\n\")"
            )));
        }
        let version = self.int()?;
        let _writer = self.int()?;
        let _min_reader = self.int()?;
        match version {
            2 => {}
            3 => {
                let n = self.int()?;
                if n < 0 {
                    return Err(self.err("negative native-encoding length"));
                }
                self.bytes(n as usize)?;
            }
            v => return Err(self.err(format!("unsupported serialization version {v}"))),
        }
        Ok(())
    }

    fn charsxp(&mut self) -> std::result::Result<Option<String>, String> {
        let flags = self.int()? as u32;
        if flags & 0xff != CHARSXP {
            return Err(self.err(format!("expected CHARSXP, found type {}", flags & 0xff)));
        }
        let n = self.int()?;
        if n == -1 {
            return Ok(None);
        }
        if n < 0 {
            return Err(self.err(format!("negative string length {n}")));
        }
        let levels = flags >> 12;
        let bytes = self.bytes(n as usize)?;
        // LATIN1_MASK: the janeaustenr strings are UTF-8/ASCII, but decode Latin-1 correctly too.
        if levels & (1 << 2) != 0 {
            Ok(Some(bytes.iter().map(|&b| b as char).collect()))
        } else {
            String::from_utf8(bytes.to_vec())
                .map(Some)
                .map_err(|_| self.err("string is not valid UTF-8"))
        }
    }

    fn attributes(&mut self, flags: u32) -> std::result::Result<Option<RValue>, String> {
        if flags & (1 << 9) != 0 {
            Ok(Some(self.item()?))
        } else {
            Ok(None)
        }
    }

    fn item(&mut self) -> std::result::Result<RValue, String> {
        if self.depth >= MAX_DEPTH {
            return Err(self.err(format!("objects nested more than {MAX_DEPTH} deep")));
        }
        self.depth += 1;
        let value = self.item_at_depth();
        self.depth -= 1;
        value
    }

    fn item_at_depth(&mut self) -> std::result::Result<RValue, String> {
        let flags = self.int()? as u32;
        let ty = flags & 0xff;
        match ty {
            NILVALUE_SXP | NILSXP => Ok(RValue::Null),
            REFSXP => {
                let mut index = (flags >> 8) as usize;
                if index == 0 {
                    index = self.int()? as usize;
                }
                self.refs
                    .get(index.wrapping_sub(1))
                    .cloned()
                    .ok_or_else(|| self.err(format!("reference {index} to an unknown object")))
            }
            SYMSXP => {
                let name = self.charsxp()?.unwrap_or_default();
                let sym = RValue::Symbol(name);
                self.refs.push(sym.clone());
                Ok(sym)
            }
            LISTSXP => {
                let mut pairs = Vec::new();
                let mut flags = flags;
                loop {
                    self.attributes(flags)?;
                    let tag = if flags & (1 << 10) != 0 {
                        match self.item()? {
                            RValue::Symbol(s) => Some(s),
                            other => return Err(self.err(format!("pairlist tag {other:?}"))),
                        }
                    } else {
                        None
                    };
                    let car = self.item()?;
                    pairs.push((tag, car));
                    // The cdr is another pairlist cell or the end marker; read it iteratively.
                    let next = self.int()? as u32;
                    match next & 0xff {
                        LISTSXP => flags = next,
                        NILVALUE_SXP | NILSXP => break,
                        t => return Err(self.err(format!("pairlist cdr of type {t}"))),
                    }
                }
                Ok(RValue::Pairs(pairs))
            }
            STRSXP => {
                let n = self.length()?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.charsxp()?);
                }
                self.attributes(flags)?;
                Ok(RValue::Strings(v))
            }
            INTSXP | LGLSXP => {
                let n = self.length()?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.int()?);
                }
                self.attributes(flags)?;
                Ok(if ty == INTSXP {
                    RValue::Ints(v)
                } else {
                    RValue::Logicals(v)
                })
            }
            REALSXP => {
                let n = self.length()?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let b = self.bytes(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    v.push(f64::from_be_bytes(a));
                }
                self.attributes(flags)?;
                Ok(RValue::Doubles(v))
            }
            VECSXP => {
                let n = self.length()?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.item()?);
                }
                let names = match self.attributes(flags)? {
                    Some(RValue::Pairs(attrs)) => {
                        attrs
                            .into_iter()
                            .find_map(|(tag, v)| match (tag.as_deref(), v) {
                                (Some("names"), RValue::Strings(s)) => {
                                    Some(s.into_iter().map(Option::unwrap_or_default).collect())
                                }
                                _ => None,
                            })
                    }
                    _ => None,
                };
                Ok(RValue::List { items, names })
            }
            t => Err(self.err(format!("unsupported R type code {t}"))),
        }
    }
}

/// Parses an uncompressed XDR R serialization (starting with `X\n`).
pub fn unserialize(bytes: &[u8], what: &str) -> std::result::Result<RValue, String> {
    let mut r = Reader {
        buf: bytes,
        pos: 0,
        refs: Vec::new(),
        what,
        depth: 0,
    };
    r.header()?;
    r.item()
}

/// Reads every object of an R lazy-load database, in the order the index lists them.
///
/// # Errors
/// [`Error::CorpusFormat`] naming the file when the index or an object cannot be decoded.
pub fn read_lazy_load_db(rdx: &Path, rdb: &Path) -> Result<Vec<(String, RValue)>> {
    let fmt = |path: &Path, what: String| Error::CorpusFormat {
        path: path.to_path_buf(),
        what,
    };
    let raw = std::fs::read(rdx).at("read", rdx)?;
    let mut index = Vec::new();
    flate2::read::GzDecoder::new(&raw[..])
        .read_to_end(&mut index)
        .map_err(|e| fmt(rdx, format!("not a gzip stream: {e}")))?;
    let index = unserialize(&index, "index").map_err(|e| fmt(rdx, e))?;
    let RValue::List { items, names } = index else {
        return Err(fmt(rdx, "index is not a list".into()));
    };
    let names = names.unwrap_or_default();
    let pos = names.iter().position(|n| n == "variables");
    let Some(RValue::List {
        items: vars,
        names: Some(var_names),
    }) = pos.and_then(|p| items.get(p))
    else {
        return Err(fmt(rdx, "index has no named `variables` list".into()));
    };
    let db = std::fs::read(rdb).at("read", rdb)?;
    let mut out = Vec::with_capacity(vars.len());
    for (name, loc) in var_names.iter().zip(vars) {
        let (offset, len) = match loc {
            RValue::Ints(v) if v.len() == 2 && v[0] >= 0 && v[1] >= 4 => {
                (v[0] as usize, v[1] as usize)
            }
            RValue::Doubles(v) if v.len() == 2 && v[0] >= 0.0 && v[1] >= 4.0 => {
                (v[0] as usize, v[1] as usize)
            }
            other => {
                return Err(fmt(
                    rdx,
                    format!("`{name}` has location {other:?}, expected c(offset, length)"),
                ));
            }
        };
        let Some(blob) = db.get(offset..offset.saturating_add(len)) else {
            return Err(fmt(
                rdb,
                format!(
                    "object `{name}` at {offset}+{len} lies past the end ({} bytes): truncated",
                    db.len()
                ),
            ));
        };
        let expect = u32::from_be_bytes([blob[0], blob[1], blob[2], blob[3]]) as usize;
        let mut data = Vec::with_capacity(expect);
        flate2::read::ZlibDecoder::new(&blob[4..])
            .read_to_end(&mut data)
            .map_err(|e| fmt(rdb, format!("object `{name}`: bad zlib stream: {e}")))?;
        if data.len() != expect {
            return Err(fmt(
                rdb,
                format!(
                    "object `{name}` inflates to {} bytes, its header says {expect}",
                    data.len()
                ),
            ));
        }
        let value = unserialize(&data, name).map_err(|e| fmt(rdb, e))?;
        out.push((name.clone(), value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be(v: i32) -> [u8; 4] {
        v.to_be_bytes()
    }

    fn charsxp(s: &str) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(be(0x0004_0009)); // UTF8 level bit + CHARSXP
        v.extend(be(s.len() as i32));
        v.extend(s.as_bytes());
        v
    }

    /// Serializes `list(a = c("x", NA), b = 7L)` by hand, as R's `serialize(xdr = TRUE)` lays it out.
    fn sample() -> Vec<u8> {
        let mut v = b"X\n".to_vec();
        v.extend(be(3));
        v.extend(be(0x0004_0201));
        v.extend(be(0x0003_0500));
        v.extend(be(5));
        v.extend(b"UTF-8");
        v.extend(be(VECSXP as i32 | (1 << 9)));
        v.extend(be(2));
        v.extend(be(STRSXP as i32));
        v.extend(be(2));
        v.extend(charsxp("x"));
        v.extend(be(CHARSXP as i32));
        v.extend(be(-1));
        v.extend(be(INTSXP as i32));
        v.extend(be(1));
        v.extend(be(7));
        // attributes: pairlist(names = c("a", "b"))
        v.extend(be(LISTSXP as i32 | (1 << 10)));
        v.extend(be(SYMSXP as i32));
        v.extend(charsxp("names"));
        v.extend(be(STRSXP as i32));
        v.extend(be(2));
        v.extend(charsxp("a"));
        v.extend(charsxp("b"));
        v.extend(be(NILVALUE_SXP as i32));
        v
    }

    #[test]
    fn parses_named_list_with_na() {
        let value = unserialize(&sample(), "sample").unwrap();
        assert_eq!(
            value,
            RValue::List {
                items: vec![
                    RValue::Strings(vec![Some("x".into()), None]),
                    RValue::Ints(vec![7])
                ],
                names: Some(vec!["a".into(), "b".into()]),
            }
        );
    }

    #[test]
    fn truncation_is_an_error_at_every_cut() {
        let full = sample();
        for cut in 0..full.len() {
            let err = unserialize(&full[..cut], "sample").unwrap_err();
            assert!(err.contains("sample"), "{err}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let mut v = sample();
        v.truncate(2 + 4 * 4 + 5);
        for _ in 0..1_000_000 {
            v.extend(be(VECSXP as i32));
            v.extend(be(1));
        }
        v.extend(be(NILVALUE_SXP as i32));
        let err = unserialize(&v, "sample").unwrap_err();
        assert!(err.contains("nested more than 64"), "{err}");
    }

    #[test]
    fn unknown_type_is_named() {
        let mut v = sample();
        v.truncate(2 + 4 * 4 + 5);
        v.extend(be(25)); // S4SXP
        let err = unserialize(&v, "sample").unwrap_err();
        assert!(err.contains("type code 25"), "{err}");
    }
}
