"""Tests for dllm.corpus. No network, no apt: the R lazy-load database and the
SWORD zText module are built byte by byte here from their format descriptions
(R's serialize.c, SWORD's zverse.cpp), independently of the parsers."""

import gzip
import json
import lzma
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from dllm import corpus

# --------------------------------------------------------------------------- #
# A tiny R lazy-load database, written the way R writes one
# --------------------------------------------------------------------------- #

UTF8, LATIN1 = 1 << 3 << 12, 1 << 2 << 12  # CHARSXP encoding bits, already shifted into the flag word
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10


def r_int(*values):
    return struct.pack(f">{len(values)}i", *values)


def r_charsxp(text, encoding="utf-8"):
    if text is None:
        return r_int(9, -1)  # NA_STRING
    raw = text.encode(encoding)
    return r_int(9 | (LATIN1 if encoding == "latin-1" else UTF8), len(raw)) + raw


def r_strsxp(strings, encoding="utf-8", attributes=b""):
    body = b"".join(r_charsxp(s, encoding) for s in strings)
    return r_int(16 | (HAS_ATTR if attributes else 0), len(strings)) + body + attributes


def r_names_attribute(names, first_use):
    # pairlist(names = <chr>): LISTSXP with tag; the symbol `names` is written in
    # full the first time and as a back-reference (REFSXP, index 1) afterwards.
    symbol = r_int(1) + r_charsxp("names") if first_use else r_int((1 << 8) | 255)
    return r_int(2 | HAS_TAG) + symbol + r_strsxp(names) + r_int(254)


def r_serialize(item):
    return b"X\n" + r_int(3, 0x040201, 0x030500, 5) + b"UTF-8" + item


def write_lazyload_db(folder: Path, variables: dict[str, bytes], compression: int = 1):
    """variables: name -> serialized item (without header). compression 1 = zlib, 3 = xz."""
    folder.mkdir(parents=True)
    rdb, positions = b"", []
    for item in variables.values():
        payload = r_serialize(item)
        if compression == 1:
            blob = struct.pack(">I", len(payload)) + zlib.compress(payload)
        else:
            blob = struct.pack(">I", len(payload)) + b"X" + lzma.compress(payload)
        positions.append((len(rdb), len(blob)))
        rdb += blob
    (folder / "Rdata.rdb").write_bytes(rdb)
    variables_list = (
        r_int(19 | HAS_ATTR, len(positions))
        + b"".join(r_int(13, 2, offset, length) for offset, length in positions)
        + r_names_attribute(list(variables), first_use=True)
    )
    index = (
        r_int(19 | HAS_ATTR, 3)
        + variables_list
        + r_int(19, 0)  # references: list()
        + r_int(10, 1, compression)  # compressed: TRUE (1) or 3
        + r_names_attribute(["variables", "references", "compressed"], first_use=False)
    )
    (folder / "Rdata.rdx").write_bytes(gzip.compress(r_serialize(index)))


AUSTEN_LINES = {
    "emma": ["EMMA", "", "Emma Woodhouse, handsome, clever, and rich.", None, "Café au lait."],
    "persuasion": ["PERSUASION", "", "Sir Walter Elliot, of Kellynch Hall."],
}


def make_austen_package(root: Path, compression=1) -> Path:
    data = root / "usr/lib/R/site-library/janeaustenr/data"
    write_lazyload_db(
        data,
        {
            "emma": r_strsxp(AUSTEN_LINES["emma"]),
            "persuasion": r_strsxp(AUSTEN_LINES["persuasion"], encoding="latin-1"),
            "not_text": r_int(13, 3, 1, 2, 3),  # an integer vector: not a book
        },
        compression,
    )
    return root


@pytest.mark.parametrize("compression", [1, 3])
def test_read_austen_parses_handbuilt_lazyload_db(tmp_path, compression):
    root = make_austen_package(tmp_path / "r-cran-janeaustenr", compression)
    assert corpus.read_austen(root) == [
        "EMMA\n\nEmma Woodhouse, handsome, clever, and rich.\n\nCafé au lait.",
        "PERSUASION\n\nSir Walter Elliot, of Kellynch Hall.",
    ]
    values = corpus.read_lazyload_db(root / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx")
    assert values["not_text"].value == [1, 2, 3]
    assert values["emma"].value[3] is None  # NA_character_


# --------------------------------------------------------------------------- #
# A tiny SWORD zText module
# --------------------------------------------------------------------------- #

GENESIS = [  # verse slots: book intro, chapter heading, verses
    '<div osisID="Gen" sID="b1" type="book"/><milestone n="Gen" type="x-usfm-h"/><title type="main">Genesis</title>',
    '<chapter osisID="Gen.1" sID="Gen.1"/><w lemma="strong:H7225">In</w> <w>the</w> <w>beginning</w>',
    'God created<note placement="foot"><reference>1:1 </reference>or, made</note>the heavens<note>x</note>.',
    '<lg sID="a"/><l sID="l1"/>Line one,<l eID="l1"/> <l sID="l2"/>line two.<l eID="l2"/><lg eID="a"/>',
]
EXODUS = [
    '<div osisID="Exod" sID="b2" type="book"/><title>Exodus</title>',
    "These are the names &amp; deeds.",
]
MATTHEW = ['<div osisID="Matt" sID="b3" type="book"/><title>Matthew</title>', "The book of the genealogy."]
EXPECTED_BIBLE = [
    "Genesis\n\nIn the beginning God created the heavens.\n\nLine one,\nline two.",
    "Exodus\n\nThese are the names & deeds.",
    "Matthew\n\nThe book of the genealogy.",
]


def write_ztext(folder: Path, testament: str, books: list[list[str]], stale: str | None = None):
    """One zlib block per book (BlockType=BOOK); slot 0 is the module header.
    `stale`: an extra block no verse points to (what osis2mod leaves behind)."""
    header = '<milestone type="x-importer" n="test"/>'.encode()
    blocks, slots = [header], [(0, 0, 0), (0, 0, len(header))]
    for book in books:
        if stale is not None:
            blocks.append(stale.encode())
        block, number = b"", len(blocks)
        for verse in map(str.encode, book):
            slots.append((number, len(block), len(verse)))
            block += verse
        blocks.append(block)
    slots.append(slots[-1])  # a linked verse: a second slot pointing at the same text
    slots.append((0, 0, 0))  # an empty slot
    bzs, bzz = b"", b""
    for block in blocks:
        compressed = zlib.compress(block)
        bzs += struct.pack("<III", len(bzz), len(compressed), len(block))
        bzz += compressed
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{testament}.bzs").write_bytes(bzs)
    (folder / f"{testament}.bzz").write_bytes(bzz)
    (folder / f"{testament}.bzv").write_bytes(b"".join(struct.pack("<IIH", *s) for s in slots))


def make_bible_package(root: Path) -> Path:
    module = root / "usr/share/sword/modules/texts/ztext/engweb"
    write_ztext(module, "ot", [GENESIS, EXODUS], stale="STALE COPY")
    write_ztext(module, "nt", [MATTHEW])
    return root


def test_read_bible_parses_handbuilt_ztext_module(tmp_path):
    root = make_bible_package(tmp_path / "sword-text-web")
    documents = corpus.read_bible(root)
    assert documents == EXPECTED_BIBLE
    assert not any("STALE" in d for d in documents)


def test_osis_note_between_words_becomes_a_space():
    assert corpus.osis_to_text("<w>Yahweh’s</w><note>a</note><w>word</w>") == "Yahweh’s word"
    assert corpus.osis_to_text("Christ<note>a</note>, the son") == "Christ, the son"


# --------------------------------------------------------------------------- #
# Python docs and stdlib readers
# --------------------------------------------------------------------------- #


def test_read_python_docs_and_stdlib(tmp_path):
    sources = tmp_path / "doc/html/_sources/library"
    sources.mkdir(parents=True)
    (sources / "os.rst.txt").write_text(":mod:`os`\n=========\n")
    (sources.parent / "index.html").write_text("<html>not a source</html>")
    assert corpus.read_python_docs(tmp_path / "doc") == [":mod:`os`\n========="]

    lib = tmp_path / "lib"
    for name in ["os.py", "json/__init__.py", "test/test_os.py", "idlelib/run.py",
                 "site-packages/x.py", "ctypes/test/t.py", "empty.py"]:
        (lib / name).parent.mkdir(parents=True, exist_ok=True)
        (lib / name).write_text("" if name == "empty.py" else f"# {name}\nx = 1\n")
    assert corpus.read_python_stdlib(lib) == ["# json/__init__.py\nx = 1", "# os.py\nx = 1"]
    assert len(corpus.read_python_stdlib()) > 100  # the running interpreter's stdlib


# --------------------------------------------------------------------------- #
# build_corpus, atomic writes, errors
# --------------------------------------------------------------------------- #


def make_cache(tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    make_austen_package(cache / "r-cran-janeaustenr")
    make_bible_package(cache / "sword-text-web")
    return cache


def leftover_temp_files(folder: Path):
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_build_corpus_splits_whole_documents_deterministically(tmp_path):
    cache = make_cache(tmp_path)
    stats = corpus.build_corpus(cache, tmp_path / "a", sources=("austen", "bible"), val_fraction=0.1, seed=3)
    corpus.build_corpus(cache, tmp_path / "b", sources=("austen", "bible"), val_fraction=0.1, seed=3)
    for name in ("train.txt", "val.txt", "stats.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert leftover_temp_files(tmp_path / "a") == []

    train = corpus.split_documents((tmp_path / "a/train.txt").read_text("utf-8"))
    val = corpus.split_documents((tmp_path / "a/val.txt").read_text("utf-8"))
    every = corpus.read_austen(cache / "r-cran-janeaustenr") + EXPECTED_BIBLE
    assert sorted(train + val) == sorted(every)  # whole documents, none lost or cut
    assert len(val) == 2  # one per source: ceil(0.1 * 2) and ceil(0.1 * 3)
    assert stats == json.loads((tmp_path / "a/stats.json").read_text())
    assert stats["sources"]["bible"]["val"]["documents"] == 1
    assert stats["train"]["documents"] + stats["val"]["documents"] == 5
    assert stats["train"]["bytes"] == sum(len(d.encode()) for d in train)


def test_empty_source_raises_naming_source_and_path(tmp_path):
    with pytest.raises(ValueError, match=r"'austen'.*r-cran-janeaustenr"):
        corpus.build_corpus(tmp_path / "cache", tmp_path / "out", sources=("austen",))
    empty_root = tmp_path / "cache2/sword-text-web"
    empty_root.mkdir(parents=True)
    with pytest.raises(ValueError, match=f"'bible'.*{empty_root}"):
        corpus.build_corpus(tmp_path / "cache2", tmp_path / "out", sources=("bible",))
    assert not (tmp_path / "out/train.txt").exists()


def test_atomic_open_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "data.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with corpus.atomic_open(target, "w") as f:
            f.write("half-written")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert leftover_temp_files(tmp_path) == []


def test_fetch_reports_package_and_command_when_apt_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no apt-get, no dpkg-deb: nothing runs
    with pytest.raises(RuntimeError, match=r"sword-text-web.*apt-get"):
        corpus.fetch_debian_sources(tmp_path / "cache", ["sword-text-web"])


# --------------------------------------------------------------------------- #
# Tokenizer and encoding
# --------------------------------------------------------------------------- #

SAMPLE = "def add(a, b):\n    return a + b  # Émile’s ünïcode 🙂\n\n\tTabs and   spaces.\n"


def make_text_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    prose = "The quick brown fox jumps over the lazy dog. She said, “Indeed.”\n" * 40
    code = "for i in range(10):\n    print(i, i * i)\n" * 40
    (folder / "prose.txt").write_text(prose + corpus.DOCUMENT_SEPARATOR + prose.upper())
    (folder / "code.txt").write_text(code)
    (folder / "notes.md").write_text("ignored: not a .txt file")
    return folder


def test_bpe_trainer_round_trip_and_special_ids(tmp_path):
    from tokenizers import Tokenizer

    folder = make_text_folder(tmp_path / "texts")
    path = corpus.train_bpe_tokenizer(folder, vocab_size=320, out_path=tmp_path / "tok")
    assert path == tmp_path / "tok/tokenizer.json"
    assert leftover_temp_files(path.parent) == []
    tokenizer = Tokenizer.from_file(str(path))
    assert [tokenizer.token_to_id(t) for t in ("<|pad|>", "<|endoftext|>", "<|mask|>")] == [0, 1, 2]
    assert tokenizer.get_vocab_size() == 320
    for text in (SAMPLE, "the quick brown fox", "    print(i)\n"):
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids) == text
    assert len(tokenizer.encode("the quick brown fox").ids) < len("the quick brown fox")  # merges learned
    assert tokenizer.encode("a<|mask|>b").ids[1] == 2  # specials stay atomic
    # the separator is not training data: no merge contains the marker text
    assert not any("endoftext" in token for token in tokenizer.get_vocab() if not token.startswith("<|"))
    config = json.loads(path.read_text())
    assert config["pre_tokenizer"]["type"] == "ByteLevel" and config["decoder"]["type"] == "ByteLevel"


def test_bpe_trainer_raises_for_path_without_text(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match=str(empty)):
        corpus.train_bpe_tokenizer(empty, vocab_size=300, out_path=tmp_path / "t.json")
    with pytest.raises(ValueError, match="missing.txt"):
        corpus.train_bpe_tokenizer(tmp_path / "missing.txt", vocab_size=300, out_path=tmp_path / "t.json")
    with pytest.raises(ValueError, match="vocab_size"):
        corpus.train_bpe_tokenizer(make_text_folder(tmp_path / "t"), vocab_size=100, out_path=tmp_path / "t.json")


def test_encode_corpus_puts_eos_between_documents(tmp_path):
    from tokenizers import Tokenizer

    cache = make_cache(tmp_path)
    out = tmp_path / "out"
    corpus.build_corpus(cache, out, sources=("austen", "bible"), val_fraction=0.0)
    tok = corpus.train_bpe_tokenizer(out / "train.txt", vocab_size=300, out_path=out / "tokenizer.json")
    corpus.encode_corpus(tok, out / "train.txt", out / "train.npy")
    assert leftover_temp_files(out) == []
    ids = np.load(out / "train.npy")
    assert ids.dtype == np.uint16 and ids.ndim == 1
    documents = corpus.split_documents((out / "train.txt").read_text("utf-8"))
    assert int((ids == 1).sum()) == len(documents) - 1 == 4
    tokenizer = Tokenizer.from_file(str(tok))
    pieces = np.split(ids, np.flatnonzero(ids == 1))
    decoded = [tokenizer.decode(p[p != 1].tolist()) for p in pieces]
    assert decoded == documents
