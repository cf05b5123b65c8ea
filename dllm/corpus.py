"""Offline pretraining corpus and byte-level BPE tokenizer for small dLLMs.

Everything here works without a model or dataset hub: the text comes from
three Debian packages (downloaded with ``apt-get download``, unpacked with
``dpkg-deb -x``, never installed) and from the running interpreter's
standard library.

=============  ======================  =============================================
source         Debian package          what it is
=============  ======================  =============================================
``austen``     r-cran-janeaustenr      six Jane Austen novels, one document per book
``bible``      sword-text-web          World English Bible, one document per book
``python_docs``  python3.11-doc        reST sources of the Python docs, one per file
``stdlib``     (the interpreter)       standard-library ``.py`` files, one per file
=============  ======================  =============================================

Pipeline (``python -m dllm.corpus --cache DIR --out DIR`` runs all of it)::

    fetch_debian_sources(cache)            # cache/<package>/ = dpkg-deb -x tree
    build_corpus(cache, out)               # out/train.txt, val.txt, stats.json
    train_bpe_tokenizer(out/train.txt, out_path=out/tokenizer.json)
    encode_corpus(out/tokenizer.json, out/train.txt, out/train.npy)

Text files hold documents separated by ``DOCUMENT_SEPARATOR``
(``"\\n<|endoftext|>\\n"``), so document boundaries survive a round trip through
plain text. ``encode_corpus`` puts the ``<|endoftext|>`` id exactly where the
separator was; the tokenizer never sees the separator text as training data.

Every file this module writes is written atomically: to a temporary file in
the same folder, then ``os.replace``.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import dataclasses
import glob
import gzip
import html
import io
import json
import lzma
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
import tokenize
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, MASK_TOKEN)  # ids 0, 1, 2 in this order

DOCUMENT_SEPARATOR = f"\n{EOS_TOKEN}\n"
"""Separator between documents in train.txt / val.txt."""

SOURCES = ("austen", "bible", "python_docs", "stdlib")
SOURCE_PACKAGES = {
    "austen": "r-cran-janeaustenr",
    "bible": "sword-text-web",
    "python_docs": "python3.11-doc",
}
DEBIAN_PACKAGES = tuple(SOURCE_PACKAGES.values())

_STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"})


# --------------------------------------------------------------------------- #
# Atomic writes
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[io.IOBase]:
    """Opens a temporary file next to `path`; on success it replaces `path`.

    On any exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _write_text_atomic(path: Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


# --------------------------------------------------------------------------- #
# 1. Debian packages
# --------------------------------------------------------------------------- #


def _run(command: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(command), cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:  # apt-get / dpkg-deb not installed
        return subprocess.CompletedProcess(list(command), 127, "", str(e))


def _command_error(package: str, result: subprocess.CompletedProcess, hint: str = "") -> RuntimeError:
    output = (result.stderr or result.stdout or "").strip()[-2000:]
    return RuntimeError(
        f"could not fetch Debian package {package!r}: `{' '.join(result.args)}` "
        f"exited with status {result.returncode}.{hint}\n{output}"
    )


def fetch_debian_sources(cache_dir: str | Path, packages: Sequence[str] = DEBIAN_PACKAGES) -> dict[str, Path]:
    """Downloads and unpacks the corpus packages; returns {package: unpacked root}.

    `apt-get download` puts ``<package>_<version>_<arch>.deb`` in `cache_dir`
    (skipped when such a file is already there; if the download fails, one
    `apt-get update` is tried before giving up). Each .deb is unpacked with
    `dpkg-deb -x` into its own folder ``cache_dir/<package>`` (skipped when that
    folder holds the ``.unpacked`` marker), so each reader gets a root that holds
    only its own package. Nothing is installed.

    Raises RuntimeError naming the package and the failed command.
    """
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    roots: dict[str, Path] = {}
    updated = False
    for package in packages:
        debs = sorted(cache_dir.glob(f"{glob.escape(package)}_*.deb"))
        if not debs:
            command = ["apt-get", "download", package]
            result = _run(command, cache_dir)
            if result.returncode != 0 and not updated:
                update = _run(["apt-get", "update"], cache_dir)
                updated = True
                if update.returncode != 0:
                    raise _command_error(package, update, f" (tried after `{' '.join(command)}` failed)")
                result = _run(command, cache_dir)
            debs = sorted(cache_dir.glob(f"{glob.escape(package)}_*.deb"))
            if result.returncode != 0 or not debs:
                raise _command_error(package, result, " Is this a Debian/Ubuntu host with apt sources?")
        root = cache_dir / package
        if not (root / ".unpacked").exists():
            staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{package}.", suffix=".tmp"))
            try:
                result = _run(["dpkg-deb", "-x", str(debs[-1]), str(staging)], cache_dir)
                if result.returncode != 0:
                    raise _command_error(package, result)
                (staging / ".unpacked").write_text(debs[-1].name + "\n")
                shutil.rmtree(root, ignore_errors=True)
                os.replace(staging, root)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        roots[package] = root
    return roots


# --------------------------------------------------------------------------- #
# 2a. Austen: R lazy-load database (.rdx index + .rdb objects)
# --------------------------------------------------------------------------- #

# SEXP type codes and the serialization pseudo-types (R: src/main/serialize.c).
_SYMSXP, _LISTSXP, _CLOSXP, _ENVSXP, _PROMSXP, _LANGSXP = 1, 2, 3, 4, 5, 6
_SPECIALSXP, _BUILTINSXP, _CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _CPLXSXP = 7, 8, 9, 10, 13, 14, 15
_STRSXP, _DOTSXP, _VECSXP, _EXPRSXP = 16, 17, 19, 20  # 21, BCODESXP (compiled code), is not supported
_EXTPTRSXP, _WEAKREFSXP, _RAWSXP, _S4SXP = 22, 23, 24, 25
_REFSXP, _NILVALUE_SXP, _PERSISTSXP, _PACKAGESXP, _NAMESPACESXP = 255, 254, 247, 248, 249
_ATTRLANGSXP, _ATTRLISTSXP, _ALTREP_SXP = 240, 239, 238
_SINGLETON_SXPS = frozenset({253, 252, 251, 250, 242, 241})  # global/base/empty env, unbound, missing
_PAIRLIST_TYPES = frozenset({_LISTSXP, _LANGSXP, _CLOSXP, _PROMSXP, _DOTSXP, _ATTRLANGSXP, _ATTRLISTSXP})
_LATIN1_MASK = 1 << 2  # CHARSXP encoding bit in `levels`; UTF-8, ASCII and native are read as UTF-8


@dataclasses.dataclass
class RObject:
    """An unserialized R value: `value` is a Python list for vectors (None = NA),
    a list of (tag, value) pairs for pairlists, a str for symbols."""

    sexptype: int
    value: Any
    attributes: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def names(self) -> list[str] | None:
        names = self.attributes.get("names")
        return names.value if isinstance(names, RObject) else None


class _XdrReader:
    """Walks R's XDR (big-endian) serialization format, version 2 or 3."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError(f"not an R XDR serialization (header {data[:2]!r}); only format 'X' is supported")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # writer R version, minimal reader R version
        if version == 3:
            n = self.int()
            self.pos += n  # skip the native encoding name
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def length(self) -> int:
        n = self.int()
        return n if n != -1 else (self.int() << 32) + (self.int() & 0xFFFFFFFF)

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        if len(chunk) != n:
            raise ValueError("truncated R serialization")
        self.pos += n
        return chunk

    def string_vector(self) -> list:
        self.int()  # always 0
        return [self.item() for _ in range(self.int())]

    def item(self) -> Any:
        flags = self.int()
        sexptype, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))

        if sexptype == _NILVALUE_SXP or sexptype in _SINGLETON_SXPS:
            return None
        if sexptype == _REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if sexptype in (_PERSISTSXP, _PACKAGESXP, _NAMESPACESXP):
            obj = RObject(sexptype, self.string_vector())
            self.refs.append(obj)
            return obj
        if sexptype == _SYMSXP:
            name = self.item()  # a CHARSXP
            self.refs.append(name)
            return name
        if sexptype == _ENVSXP:
            self.int()  # locked
            env = RObject(_ENVSXP, None)
            self.refs.append(env)
            enclosure, frame, hashtab, attributes = self.item(), self.item(), self.item(), self.item()
            env.value = {"enclosure": enclosure, "frame": frame, "hashtab": hashtab}
            env.attributes = _pairlist_dict(attributes)
            return env
        if sexptype in _PAIRLIST_TYPES:
            return self._pairlist(flags)
        if sexptype == _ALTREP_SXP:
            info, state, attributes = self.item(), self.item(), self.item()
            return _expand_altrep(info, state, _pairlist_dict(attributes))
        if sexptype in (_EXTPTRSXP, _WEAKREFSXP):
            obj = RObject(sexptype, None)
            self.refs.append(obj)
            if sexptype == _EXTPTRSXP:
                obj.value = (self.item(), self.item())  # protected value, tag
        elif sexptype in (_SPECIALSXP, _BUILTINSXP):
            obj = RObject(sexptype, self.take(self.int()).decode("latin-1"))
        elif sexptype == _CHARSXP:
            n = self.int()
            if n == -1:
                value = None  # NA_character_
            else:
                raw = self.take(n)
                value = raw.decode("latin-1") if levels & _LATIN1_MASK else raw.decode("utf-8", errors="replace")
            if has_attr:  # written by very old R versions only; read and drop
                self.item()
            return value
        elif sexptype in (_LGLSXP, _INTSXP):
            n = self.length()
            values = struct.unpack_from(f">{n}i", self.data, self.pos)
            self.pos += 4 * n
            obj = RObject(sexptype, [None if v == -(2**31) else v for v in values])
        elif sexptype == _REALSXP:
            n = self.length()
            obj = RObject(sexptype, list(struct.unpack_from(f">{n}d", self.data, self.pos)))
            self.pos += 8 * n
        elif sexptype == _CPLXSXP:
            n = self.length()
            parts = struct.unpack_from(f">{2 * n}d", self.data, self.pos)
            self.pos += 16 * n
            obj = RObject(sexptype, [complex(re_, im) for re_, im in zip(parts[::2], parts[1::2])])
        elif sexptype == _RAWSXP:
            obj = RObject(sexptype, self.take(self.length()))
        elif sexptype in (_STRSXP, _VECSXP, _EXPRSXP):
            obj = RObject(sexptype, [self.item() for _ in range(self.length())])
        elif sexptype == _S4SXP:
            obj = RObject(sexptype, None)
        else:  # BCODESXP (compiled closures) and anything newer: not needed for data
            raise ValueError(f"R serialization: unsupported SEXP type {sexptype} at byte {self.pos - 4}")
        if has_attr:
            obj.attributes = _pairlist_dict(self.item())
        return obj

    def _pairlist(self, flags: int) -> RObject:
        # A pairlist's cdr is itself a pairlist item; read the chain iteratively.
        head = RObject(flags & 0xFF, [])
        while True:
            sexptype = flags & 0xFF
            attributes = self.item() if flags & (1 << 9) else None
            tag = self.item() if flags & (1 << 10) else None
            car = self.item()
            head.value.append((tag, car))
            if attributes is not None and len(head.value) == 1:
                head.attributes = _pairlist_dict(attributes)
            if sexptype == _CLOSXP or sexptype == _PROMSXP:
                head.value.append((None, self.item()))  # closure body / promise expression
                return head
            flags = self.int()
            if flags & 0xFF not in _PAIRLIST_TYPES:
                self.pos -= 4
                tail = self.item()
                if tail is not None:
                    head.value.append((None, tail))
                return head


def _pairlist_dict(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, RObject) or obj.sexptype not in _PAIRLIST_TYPES:
        return {}
    return {tag: value for tag, value in obj.value if isinstance(tag, str)}


def _expand_altrep(info: Any, state: Any, attributes: dict) -> Any:
    """Materializes the ALTREP classes R writes for plain vectors."""
    class_name = info.value[0][1] if isinstance(info, RObject) and info.value else None
    if class_name in ("compact_intseq", "compact_realseq") and isinstance(state, RObject):
        n, start, step = state.value[:3]
        sexptype = _INTSXP if class_name == "compact_intseq" else _REALSXP
        cast = int if sexptype == _INTSXP else float
        return RObject(sexptype, [cast(start + i * step) for i in range(int(n))], attributes)
    if class_name and class_name.startswith("wrap_") and isinstance(state, RObject):
        inner = state.value[0]
        if isinstance(inner, RObject):
            return RObject(inner.sexptype, inner.value, attributes or inner.attributes)
    if isinstance(state, RObject):
        return RObject(state.sexptype, state.value, attributes)
    raise ValueError(f"R serialization: unsupported ALTREP class {class_name!r}")


def unserialize_r(data: bytes) -> Any:
    """Decodes one XDR-serialized R object (the payload of an .rds or .rdb entry)."""
    return _XdrReader(data).item()


def _decompress_rdb_entry(blob: bytes, compressed: int) -> bytes:
    """An .rdb entry: 4-byte big-endian uncompressed length, then the payload.

    compress=1 (TRUE): zlib stream. compress=2/3: one type byte first,
    'Z' zlib, '2' bzip2, 'X' xz, '0' stored.
    """
    (size,) = struct.unpack_from(">I", blob, 0)
    if compressed in (2, 3):
        kind, payload = blob[4:5], blob[5:]
        decoders = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
        if kind not in decoders:
            raise ValueError(f"unknown .rdb compression type {kind!r}")
        data = decoders[kind](payload)
    else:
        data = zlib.decompress(blob[4:])
    if len(data) != size:
        raise ValueError(f".rdb entry: expected {size} bytes after decompression, got {len(data)}")
    return data


def _read_rds_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if raw[:3] == b"BZh":
        return bz2.decompress(raw)
    if raw[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(raw)
    if raw[:2] == b"X\n":
        return raw
    return _decompress_rdb_entry(raw, 1)  # length-prefixed zlib, like an .rdb entry


def read_lazyload_db(rdx_path: str | Path) -> dict[str, Any]:
    """Reads every variable of an R lazy-load database (``x.rdx`` + ``x.rdb``)."""
    rdx_path = Path(rdx_path)
    index = unserialize_r(_read_rds_bytes(rdx_path))
    fields = dict(zip(index.names or [], index.value))
    variables, compressed = fields.get("variables"), fields.get("compressed")
    if not isinstance(variables, RObject):
        raise ValueError(f"{rdx_path}: no 'variables' entry in the lazy-load index")
    compression = int(compressed.value[0]) if isinstance(compressed, RObject) else 1
    rdb = rdx_path.with_suffix(".rdb").read_bytes()
    out = {}
    for name, position in zip(variables.names or [], variables.value):
        offset, length = (int(v) for v in position.value[:2])
        out[name] = unserialize_r(_decompress_rdb_entry(rdb[offset : offset + length], compression))
    return out


def read_austen(root: str | Path) -> list[str]:
    """The Austen novels in `root` (an unpacked r-cran-janeaustenr), one per book.

    Reads every lazy-load database of the package (``data/Rdata.rdx``, where
    janeaustenr keeps its datasets, and ``R/sysdata.rdx`` if present) and
    returns each character vector, lines joined with newlines, in index order.
    """
    root = Path(root)
    indexes = sorted(root.rglob("Rdata.rdx")) + sorted(root.rglob("sysdata.rdx"))
    documents = []
    for rdx in indexes:
        for value in read_lazyload_db(rdx).values():
            if isinstance(value, RObject) and value.sexptype == _STRSXP:
                text = "\n".join("" if line is None else line for line in value.value).strip()
                if text:
                    documents.append(text)
    return documents


# --------------------------------------------------------------------------- #
# 2b. Bible: SWORD zText module
# --------------------------------------------------------------------------- #

_NOTE_GAP = "\x00"  # where a footnote was, until we know whether a space belongs there
_PARAGRAPH = "\x01"  # a paragraph break (blank line); a plain "\n" is a line break (poetry)
_OSIS_RULES = [  # (pattern, replacement), applied in order
    (re.compile(r"<note\b[^>]*/>|<note\b.*?</note>", re.S), _NOTE_GAP),  # footnotes, cross references
    (re.compile(r'<milestone\b[^>]*/>|<div\b[^>]*type="x-milestone"[^>]*>'), ""),  # running heads, toc
    (re.compile(r"</?title\b[^>]*>|<chapter\b[^>]*>|<div\b[^>]*>|</?(?:lg|p|list)\b[^>]*>"), _PARAGRAPH),
    (re.compile(r"</?l\b[^>]*>|<lb\b[^>]*>|</?(?:item|speaker)\b[^>]*>"), "\n"),
    (re.compile(r"<[^>]*>"), ""),  # every other tag (w, q, seg, name, ...): keep its text
    # The module writes notes with no space around them ("Yahweh's<note>..</note><w>word"):
    # a removed note becomes a space unless punctuation or a space follows.
    (re.compile(_NOTE_GAP + r"+(?=[\s,.;:!?\u2019\u201d)\]" + _PARAGRAPH + r"]|$)"), ""),
    (re.compile(_NOTE_GAP + "+"), " "),
    (re.compile(r"[^\S\n]+"), " "),
    (re.compile(r" ?[\n" + _PARAGRAPH + r"][\s" + _PARAGRAPH + r"]*"), lambda m: "\n\n" if _PARAGRAPH in m.group() else "\n"),
]
_BOOK_START = re.compile(r'<div\b(?=[^>]*\btype="book")(?=[^>]*\bsID=)[^>]*>')


def osis_to_text(markup: str) -> str:
    """Strips OSIS markup to plain text: drops notes and tags; titles,
    chapters and paragraphs end with a blank line, poetry lines with a newline."""
    markup = markup.replace(_NOTE_GAP, "").replace(_PARAGRAPH, "")
    for pattern, replacement in _OSIS_RULES:
        markup = pattern.sub(replacement, markup)
    return html.unescape(markup).strip()


def read_ztext_testament(index_path: str | Path) -> str:
    """The OSIS markup of one testament (``ot.bzs`` / ``nt.bzs``) of a zText module.

    ``.bzs``: 12 bytes per block, little-endian (offset, compressed size,
    uncompressed size) into ``.bzz``, each block zlib-compressed. ``.bzv``:
    10 bytes per verse slot in versification order, little-endian (block,
    offset in the uncompressed block, size). Blocks may hold stale copies of
    verses that were rewritten while the module was built, so when the
    ``.bzv`` exists the text is assembled verse by verse from it (each stored
    entry once, linked verses share one), joined with spaces; without it the
    blocks are concatenated.
    """
    index_path = Path(index_path)
    index = index_path.read_bytes()
    data = index_path.with_suffix(".bzz").read_bytes()
    blocks = []
    for i in range(0, len(index) - len(index) % 12, 12):
        offset, size, full_size = struct.unpack_from("<III", index, i)
        block = zlib.decompress(data[offset : offset + size]) if size else b""
        if len(block) != full_size:
            raise ValueError(f"{index_path}: block {i // 12} is {len(block)} bytes, index says {full_size}")
        blocks.append(block)
    verse_index = index_path.with_suffix(".bzv")
    if not verse_index.exists():
        return " ".join(b.decode("utf-8", errors="replace") for b in blocks)
    raw, seen, verses = verse_index.read_bytes(), set(), []
    for i in range(0, len(raw) - len(raw) % 10, 10):
        block, start, size = struct.unpack_from("<IIH", raw, i)
        if size == 0 or (block, start) in seen:
            continue
        if block >= len(blocks) or start + size > len(blocks[block]):
            raise ValueError(f"{verse_index}: entry {i // 10} points outside block {block}")
        seen.add((block, start))
        verses.append(blocks[block][start : start + size].decode("utf-8", errors="replace"))
    return " ".join(verses)


def read_bible(root: str | Path) -> list[str]:
    """The World English Bible in `root` (an unpacked sword-text-web), one
    document per book (split at the OSIS ``<div type="book">`` starts; front
    matter before the first book is a document of its own), Old Testament
    first."""
    root = Path(root)
    documents = []
    for module in sorted({p.parent for p in root.rglob("*.bzs")}):
        for testament in ("ot", "nt"):
            if (module / f"{testament}.bzs").exists():
                markup = read_ztext_testament(module / f"{testament}.bzs")
                cuts = [0, *(m.start() for m in _BOOK_START.finditer(markup)), len(markup)]
                for a, b in zip(cuts, cuts[1:]):
                    text = osis_to_text(markup[a:b])
                    if text:
                        documents.append(text)
    return documents


# --------------------------------------------------------------------------- #
# 2c. Python docs and standard library
# --------------------------------------------------------------------------- #


def _read_source_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        encoding = "utf-8"
        if path.suffix == ".py":
            with contextlib.suppress(SyntaxError, LookupError):
                encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        text = raw.decode(encoding, errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")


def read_python_docs(root: str | Path) -> list[str]:
    """``html/_sources/**/*.rst.txt`` under `root` (an unpacked python3.x-doc),
    one document per file, in sorted path order."""
    files = sorted(p for p in Path(root).rglob("*.rst.txt") if "_sources" in p.parts)
    return [text for text in (_read_source_text(p).strip() for p in files) if text]


def python_stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def read_python_stdlib(root: str | Path | None = None) -> list[str]:
    """Standard-library ``.py`` files (default: this interpreter's), one per
    file, without ``test``/``tests``/``idlelib``/``site-packages`` folders."""
    root = Path(root) if root is not None else python_stdlib_dir()
    files = sorted(
        p for p in root.rglob("*.py")
        if not _STDLIB_EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    return [text for text in (_read_source_text(p).strip("\n") for p in files) if text.strip()]


def source_root(source: str, cache_dir: str | Path) -> Path:
    """Where `build_corpus` reads `source` from."""
    if source == "stdlib":
        return python_stdlib_dir()
    if source not in SOURCE_PACKAGES:
        raise ValueError(f"unknown corpus source {source!r}; choose from {SOURCES}")
    return Path(cache_dir) / SOURCE_PACKAGES[source]


READERS: dict[str, Callable[[Path], list[str]]] = {
    "austen": read_austen,
    "bible": read_bible,
    "python_docs": read_python_docs,
    "stdlib": read_python_stdlib,
}


# --------------------------------------------------------------------------- #
# 3. Corpus build
# --------------------------------------------------------------------------- #


def split_documents(text: str) -> list[str]:
    """Inverse of joining documents with DOCUMENT_SEPARATOR."""
    return text.split(DOCUMENT_SEPARATOR) if text else []


def build_corpus(
    cache_dir: str | Path,
    out_dir: str | Path,
    sources: Sequence[str] = SOURCES,
    val_fraction: float = 0.01,
    seed: int = 0,
) -> dict[str, Any]:
    """Writes ``train.txt``, ``val.txt`` and ``stats.json`` to `out_dir`.

    Reads the unpacked packages in ``cache_dir/<package>`` (run
    `fetch_debian_sources` first; the CLI does) and the interpreter's stdlib.

    Split: per source, ``ceil(val_fraction * n_documents)`` whole documents go
    to validation (at least one when the source has two or more documents, so
    every source is represented; none when val_fraction is 0). Which ones is
    decided by a permutation from ``np.random.default_rng(seed)``; then all
    train (and all val) documents are shuffled together with the same
    generator. Documents are joined with DOCUMENT_SEPARATOR; a literal
    ``<|endoftext|>`` inside a document is removed so the separator stays
    unambiguous. Returns the stats written to stats.json.

    Raises ValueError if a source yields no text (naming the source and path).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    unknown = [s for s in sources if s not in READERS]
    if unknown or not sources:
        raise ValueError(f"sources must be a non-empty subset of {SOURCES}, got {tuple(sources)}")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
    per_source: dict[str, Any] = {}
    for source in sources:
        root = source_root(source, cache_dir)
        documents = [d.replace(EOS_TOKEN, "") for d in READERS[source](root)] if root.exists() else []
        documents = [d for d in documents if d.strip()]
        if not documents:
            raise ValueError(
                f"corpus source {source!r} yielded no text from {root}"
                + ("" if root.exists() else " (path does not exist; run fetch_debian_sources first)")
            )
        n_val = 0 if val_fraction == 0 or len(documents) < 2 else min(
            len(documents) - 1, max(1, math.ceil(val_fraction * len(documents)))
        )
        order = rng.permutation(len(documents))
        held_out = set(order[:n_val].tolist())
        per_source[source] = {"path": str(root)}
        for split in ("train", "val"):
            chosen = [d for i, d in enumerate(documents) if (i in held_out) == (split == "val")]
            splits[split] += [(source, d) for d in chosen]
            per_source[source][split] = _counts(chosen)

    stats: dict[str, Any] = {
        "separator": DOCUMENT_SEPARATOR,
        "seed": seed,
        "val_fraction": val_fraction,
        "sources": per_source,
    }
    for split, tagged in splits.items():
        tagged = [tagged[i] for i in rng.permutation(len(tagged))]
        text = DOCUMENT_SEPARATOR.join(d for _, d in tagged)
        _write_text_atomic(out_dir / f"{split}.txt", text)
        stats[split] = {**_counts([d for _, d in tagged]), "file_bytes": len(text.encode("utf-8"))}
    _write_text_atomic(out_dir / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


def _counts(documents: Sequence[str]) -> dict[str, int]:
    return {"documents": len(documents), "bytes": sum(len(d.encode("utf-8")) for d in documents)}


# --------------------------------------------------------------------------- #
# 4. Byte-level BPE tokenizer
# --------------------------------------------------------------------------- #


def _text_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Expands files/folders (a folder means its ``*.txt``); raises ValueError
    naming any path that holds no text."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = []
    for path in map(Path, paths):
        found = sorted(path.rglob("*.txt")) if path.is_dir() else [path] if path.is_file() else []
        found = [f for f in found if f.stat().st_size > 0 and f.read_text("utf-8", errors="replace").strip()]
        if not found:
            raise ValueError(f"no text found at {path}")
        files += found
    if not files:
        raise ValueError("train_bpe_tokenizer: no text files given")
    return files


def _iter_documents(files: Sequence[Path]) -> Iterator[str]:
    for file in files:
        for document in split_documents(file.read_text(encoding="utf-8")):
            if document:
                yield document


def train_bpe_tokenizer(
    text_files: str | Path | Iterable[str | Path],
    vocab_size: int = 8192,
    *,
    out_path: str | Path,
    min_frequency: int = 2,
) -> Path:
    """Trains a byte-level BPE (GPT-2 style) and saves it as HF ``tokenizer.json``.

    `text_files`: files or folders (a folder means every ``*.txt`` under it);
    files may hold several documents joined with DOCUMENT_SEPARATOR, which is
    split off and never trained on. Special tokens ``<|pad|>``,
    ``<|endoftext|>``, ``<|mask|>`` get ids 0, 1, 2; then the 256 byte symbols,
    then merges. No normalizer, so decode(encode(text)) == text for any text.
    `out_path`: a ``.json`` file, or else a folder to write ``tokenizer.json``
    into. Returns the path written.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    n_reserved = len(SPECIAL_TOKENS) + 256
    if vocab_size <= n_reserved:
        raise ValueError(f"vocab_size must be > {n_reserved} (3 specials + 256 bytes), got {vocab_size}")
    files = _text_files(text_files)
    out_path = Path(out_path)
    if out_path.is_dir() or out_path.suffix != ".json":
        out_path = out_path / "tokenizer.json"

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_iter_documents(files), trainer=trainer)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != token_id:
            raise RuntimeError(f"special token {token} got id {tokenizer.token_to_id(token)}, expected {token_id}")
    with atomic_open(out_path, "w", encoding="utf-8") as f:
        f.write(tokenizer.to_str(pretty=True))
    return out_path


# --------------------------------------------------------------------------- #
# 5. Encoding
# --------------------------------------------------------------------------- #


def encode_corpus(
    tokenizer_path: str | Path, text_path: str | Path, out_path: str | Path, batch_documents: int = 256
) -> Path:
    """Tokenizes `text_path` into a flat ``.npy`` of token ids.

    The ``<|endoftext|>`` id goes exactly where the text had
    DOCUMENT_SEPARATOR, i.e. between documents (none after the last). dtype is
    uint16 when the vocabulary fits, else uint32. Returns `out_path`.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise ValueError(f"{tokenizer_path} has no {EOS_TOKEN} token")
    dtype = np.uint16 if tokenizer.get_vocab_size(with_added_tokens=True) <= 2**16 else np.uint32
    documents = split_documents(Path(text_path).read_text(encoding="utf-8"))
    pieces: list[np.ndarray] = []
    eos = np.array([eos_id], dtype=dtype)
    for start in range(0, len(documents), batch_documents):
        batch = documents[start : start + batch_documents]
        for i, encoding in enumerate(tokenizer.encode_batch(batch, add_special_tokens=False)):
            if pieces or i:
                pieces.append(eos)
            pieces.append(np.asarray(encoding.ids, dtype=dtype))
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    out_path = Path(out_path)
    with atomic_open(out_path, "wb") as f:
        np.save(f, ids)
    return out_path


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m dllm.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True, type=Path, help="folder for the .deb files and their unpacked trees")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--val-fraction", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    packages = [SOURCE_PACKAGES[s] for s in args.sources if s in SOURCE_PACKAGES]
    t0 = time.perf_counter()
    fetch_debian_sources(args.cache, packages)
    t1 = time.perf_counter()
    stats = build_corpus(args.cache, args.out, args.sources, args.val_fraction, args.seed)
    t2 = time.perf_counter()
    tokenizer_path = train_bpe_tokenizer(args.out / "train.txt", args.vocab_size, out_path=args.out / "tokenizer.json")
    t3 = time.perf_counter()
    tokens = {}
    for split in ("train", "val"):
        path = encode_corpus(tokenizer_path, args.out / f"{split}.txt", args.out / f"{split}.npy")
        tokens[split] = int(np.load(path, mmap_mode="r").shape[0])
    t4 = time.perf_counter()
    stats["tokenizer"] = {"path": str(tokenizer_path), "vocab_size": args.vocab_size, "train_seconds": round(t3 - t2, 2)}
    stats["tokens"] = tokens
    stats["seconds"] = {"fetch": round(t1 - t0, 2), "build": round(t2 - t1, 2), "tokenizer": round(t3 - t2, 2), "encode": round(t4 - t3, 2)}
    _write_text_atomic(args.out / "stats.json", json.dumps(stats, indent=2) + "\n")

    print(f"{'source':<12} {'train docs':>10} {'train MB':>9} {'val docs':>9} {'val MB':>7}")
    for source, s in stats["sources"].items():
        print(f"{source:<12} {s['train']['documents']:>10} {s['train']['bytes'] / 1e6:>9.2f} "
              f"{s['val']['documents']:>9} {s['val']['bytes'] / 1e6:>7.2f}")
    print(f"train.txt {stats['train']['file_bytes'] / 1e6:.2f} MB, val.txt {stats['val']['file_bytes'] / 1e6:.2f} MB")
    print(f"tokens: train {tokens['train']:,}, val {tokens['val']:,}; tokenizer trained in {t3 - t2:.1f} s")
    return stats


if __name__ == "__main__":
    main(sys.argv[1:])
