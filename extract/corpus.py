"""The project's one corpus reader: which files a corpus is, how each file parses into documents,
the stable id of every document, and how documents are cut into windows.

A corpus is a sorted list of files of one kind (parquet, JSON/JSONL, CSV, .txt, or the arrow
shards of a saved `datasets` folder), given as a file, a folder, a glob, or any fsspec URL
(s3://, gs://). A document's id is (file index in that sorted list, row in the file); its global
id is the rows of the files before it plus its row. Empty rows keep their row number (they make
no windows), so ids, masks and block ids are pure functions of the corpus, whoever reads it and in
whatever order. Rule for .txt: one file is one document (a book or an article stays whole;
corpora of many short documents belong in JSONL, CSV or parquet, one row per document).

The Ray job reads files on the workers through extract/source.py; `iter_documents` reads a
local corpus in-process (MLM pretraining, tests) with the same parsing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from maria_extract.datasets_compat import saved_dataset_shards
from maria_storage.format import StoreAccessError
from maria_storage.location import access_error, check_url, resolve_storage_options

KINDS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv", ".txt": "text", ".arrow": "arrow"}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".lz4", ".br")  # Ray Data (and fsspec) decompress these by suffix
DATASETS_MARKERS = ("dataset_dict.json", "state.json")


class CorpusError(ValueError):
    """A corpus the job cannot use; the message names the fix."""


@dataclass(frozen=True)
class Corpus:
    """The driver's view of a corpus: its files and how to reach them, never its documents."""

    source: str  # what the user passed
    kind: str  # parquet | json | csv | text | arrow
    files: tuple[str, ...]  # sorted full paths or URLs; the index is the file id
    storage_options: dict = field(default_factory=dict)

    @property
    def remote(self) -> bool:
        return "://" in self.source and not self.source.startswith("file://")


def _kind(name: str) -> str | None:
    base = name.lower()
    for c in COMPRESSIONS:
        if base.endswith(c):
            base = base[: -len(c)]
    return KINDS.get(os.path.splitext(base)[1])


def _fs(source: str):
    import fsspec

    options = resolve_storage_options(source, None)  # the store's S3 endpoint rules apply to corpora too
    fs, root = fsspec.core.url_to_fs(os.path.expanduser(source), **options)
    return fs, root, options


def _url(fs, path: str, source: str) -> str:
    """A listed path back in the user's form: scheme kept for remote corpora, absolute for local ones."""
    if "://" in source and not source.startswith("file://"):
        return fs.unstrip_protocol(path)
    return os.path.abspath(path)


def list_corpus(source: str, split: str | None = None) -> Corpus:
    """The corpus's files, sorted, all of one kind; one-line errors for what cannot be a corpus."""
    try:
        check_url(source, "corpus")
    except StoreAccessError as e:
        raise CorpusError(str(e)) from None
    fs, root, options = _fs(source)
    try:
        if any(ch in source for ch in "*?["):
            paths = sorted(p for p in fs.glob(root) if fs.isfile(p))
        elif fs.isdir(root):
            paths = _datasets_files(fs, root, split) or sorted(fs.find(root))
        elif fs.exists(root):
            paths = [root]
        else:
            paths = None
    except CorpusError:
        raise
    except Exception as e:  # noqa: BLE001 -- unreachable bucket, no credentials: one line, not a traceback
        error = access_error(e, source, "corpus")
        if error is None and not isinstance(e, (OSError, ValueError)):
            raise
        raise CorpusError(str(error) if error else f"cannot list corpus {source}: {str(e).splitlines()[0][:200]}") from None
    if not paths:
        raise CorpusError(
            f"corpus {source} does not exist or matches no files; pass a datasets folder, parquet, "
            f"JSON(L), CSV or .txt files (a file, a folder, a glob or an s3:// or gs:// URL)"
        )
    # names starting with "_" or "." are bookkeeping (_SUCCESS, .crc, .cache): skipped, as Ray Data does
    visible = [p for p in paths if not any(part[:1] in "_." for part in p[len(root) :].split("/") if part)] or paths
    kinds = {p: _kind(p) for p in visible}
    found = sorted({k for k in kinds.values() if k})
    if not found:
        raise CorpusError(f"corpus {source} holds no .parquet, .jsonl, .json, .csv or .txt files")
    if len(found) > 1:
        examples = ", ".join(f"{os.path.basename(next(p for p in visible if kinds[p] == k))} ({k})" for k in found)
        raise CorpusError(f"corpus {source} mixes file kinds: {examples}; keep one kind per corpus or pass a glob such as {source.rstrip('/')}/*.parquet")
    files = tuple(_url(fs, p, source) for p in visible if kinds[p])
    return Corpus(source, found[0], files, options)


def _datasets_files(fs, root: str, split: str | None) -> list[str] | None:
    """The arrow shards of a `datasets.save_to_disk` folder (one split of a DatasetDict), in order."""
    if fs.exists(f"{root}/dataset_dict.json"):
        splits = json.loads(fs.cat_file(f"{root}/dataset_dict.json"))["splits"]
        chosen = split or ("train" if "train" in splits else splits[0])
        if chosen not in splits:
            raise CorpusError(f"datasets folder {root} has no split {chosen!r} (splits: {splits}); pass --split")
        root = f"{root}/{chosen}"
    elif not fs.exists(f"{root}/state.json"):
        return None
    elif split is not None:
        raise CorpusError(f"datasets folder {root} holds a single split; drop --split {split}")
    state = json.loads(fs.cat_file(f"{root}/state.json"))
    return [f"{root}/{name}" for name in saved_dataset_shards(state)]


# --- parsing: one open file -> lists of texts (None for a missing value) ----------------------------


def file_texts(kind: str, f, name: str, column: str) -> Iterator[list]:
    """Texts of one file in row order, in chunks. `f` is a binary file, already decompressed
    (random-access for parquet). Every parse error is one line naming the file and the fix."""
    if kind == "parquet":
        yield from _parquet_texts(f, name, column)
        return
    if kind == "arrow":
        yield from _arrow_texts(f, name, column)
        return
    data = _utf8(_read_all(f, name), name)
    if kind == "text":
        yield [data.decode("utf-8")]
    elif kind == "json":
        yield from _json_texts(data, name, column)
    else:
        yield from _csv_texts(data, name, column)


def _read_all(f, name: str) -> bytes:
    """The file's bytes, decompressed by suffix on the way; a file that is not what its suffix says (not gzip, a
    truncated .gz, not zstd) is bad input, named in one line. A network error stays what it is: transient."""
    try:
        return f.read()
    except (ConnectionError, TimeoutError):
        raise
    except (OSError, EOFError, ValueError) as e:  # zlib/zstd/lz4 failures, "Truncated compressed stream", ...
        suffix = next((c for c in COMPRESSIONS if name.lower().endswith(c)), None)
        if suffix is None:
            raise
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise CorpusError(
            f"cannot decompress {name} as {suffix} ({reason}); check it is a complete {suffix} file, "
            f"or rename it without the {suffix} suffix if it is not compressed"
        ) from None


def _utf8(data: bytes, name: str) -> bytes:
    """Checked up front: the arrow parsers silently turn bad bytes into U+FFFD."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{name} is not valid UTF-8 (byte {e.start}); re-encode it as UTF-8") from None
    return data


def _check_column(schema, name: str, column: str) -> None:
    import pyarrow as pa

    if column not in schema.names:
        raise CorpusError(f"corpus file {name} has no column {column!r} (columns: {schema.names}); pass --text-column")
    t = schema.field(column).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t) or pa.types.is_null(t)):
        raise CorpusError(f"column {column!r} of {name} holds {t}, not text; pass --text-column naming a text column")


def _arrow_texts(f, name: str, column: str) -> Iterator[list]:
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(f)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(
            f"cannot read {name} as an Arrow stream (a datasets shard): {str(e).splitlines()[0][:200]}; pass the folder `datasets.save_to_disk` wrote"
        ) from None
    _check_column(reader.schema, name, column)
    try:
        for batch in reader:
            yield batch.column(column).to_pylist()
    except (pa.ArrowInvalid, pa.ArrowIOError) as e:
        raise CorpusError(f"{name} is damaged: {str(e).splitlines()[0][:200]}; rewrite it with `datasets.save_to_disk`") from None


def _parquet_texts(f, name: str, column: str) -> Iterator[list]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # noqa: BLE001 -- arrow's errors are long; keep the first line
        raise CorpusError(f"cannot read {name} as parquet: {str(e).splitlines()[0][:200]}") from None
    _check_column(pf.schema_arrow, name, column)
    for batch in pf.iter_batches(batch_size=4096, columns=[column]):
        yield batch.column(0).to_pylist()


def _json_texts(data: bytes, name: str, column: str) -> Iterator[list]:
    """JSON Lines with pyarrow (as Ray's read_json), falling back to a JSON array of objects."""
    import pyarrow as pa
    import pyarrow.json as pajson

    if not data.strip():
        return  # an empty file is a file with no documents
    try:
        options = pajson.ReadOptions(use_threads=False, block_size=min(max(len(data), 1 << 20), 2**31 - 1))
        table = pajson.read_json(io.BytesIO(data), read_options=options)
    except pa.ArrowInvalid as e:
        try:
            rows = json.loads(data)
            table = pa.Table.from_pylist(rows if isinstance(rows, list) else [rows])
        except Exception:  # noqa: BLE001 -- neither JSON Lines nor a JSON array: report arrow's reason
            raise CorpusError(f"cannot read {name} as JSON Lines: {str(e).splitlines()[0][:200]}; write one JSON object per line") from None
    _check_column(table.schema, name, column)
    yield table.column(column).to_pylist()


def _csv_texts(data: bytes, name: str, column: str) -> Iterator[list]:
    """Strict CSV (RFC 4180, Python's csv module): a quote left open, text after a closing quote, or a row with
    another number of fields than the header is an error naming its line, never two rows merged into one
    document (pyarrow's reader accepts all three). Every value is text ("123" stays a document)."""
    import csv

    if not data.strip():
        return
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # a document may be a whole book in one field
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""), strict=True)
    texts, line = [], 1
    try:
        header = next(reader)
        if column not in header:
            raise CorpusError(f"corpus file {name} has no column {column!r} (columns: {header}); pass --text-column")
        i = header.index(column)
        line = reader.line_num + 1
        for row in reader:
            if row:  # a blank line is no row (as pyarrow and pandas read it)
                if len(row) != len(header):
                    raise CorpusError(f"{name} line {line}: {len(row)} fields, the header has {len(header)}; quote fields that hold commas or line breaks")
                texts.append(row[i])
            line = reader.line_num + 1
    except csv.Error as e:
        raise CorpusError(f'{name} line {line}: malformed CSV ({e}); close every quoted field, and write a quote inside one as two quotes ("")') from None
    yield texts


def is_document(text) -> bool:
    return isinstance(text, str) and bool(text.strip())


# --- local reading, no Ray ---------------------------------------------------------------------


def open_local(corpus: Corpus, i: int):
    """File i of the corpus opened for `file_texts`: decompressed by suffix, seekable for parquet. Local files go
    through pyarrow's streams, as the Ray job reads them (the same codecs and the same errors: zstd needs no
    extra package), remote ones through fsspec."""
    if not corpus.remote:
        import pyarrow.fs as pafs

        fs = pafs.LocalFileSystem()
        if corpus.kind == "parquet":
            return fs.open_input_file(corpus.files[i])
        return fs.open_input_stream(corpus.files[i], compression="detect")
    import fsspec

    compression = None if corpus.kind == "parquet" else "infer"
    return fsspec.open(corpus.files[i], "rb", compression=compression, **corpus.storage_options).open()


def iter_documents(source: str, text_column: str = "text", split: str | None = None, max_docs: int | None = None) -> Iterator[str]:
    """Non-empty documents of a corpus in corpus order, read in this process (for small corpora:
    MLM pretraining, tests, benchmarks). `max_docs` counts rows, empty ones included, as the job does."""
    corpus = list_corpus(source, split)
    seen = 0
    for i in range(len(corpus.files)):
        with open_local(corpus, i) as f:
            for texts in file_texts(corpus.kind, f, corpus.files[i], text_column):
                for t in texts:
                    if max_docs is not None and seen >= max_docs:
                        return
                    seen += 1
                    if is_document(t):
                        yield t


# --- ids, blocks and the fingerprint: pure functions of (rows per file, docs_per_block) ----------


def block_id(file: int, row_start: int) -> str:
    """A block is docs_per_block consecutive rows of one file; its id names the file and first row."""
    return f"f{file:06d}-r{row_start:010d}"


def plan_blocks(rows: list[int], docs_per_block: int) -> list[tuple[str, int, int, int]]:
    """(block_id, file, first row, end row) of every block, in corpus order."""
    return [(block_id(i, s), i, s, min(s + docs_per_block, n)) for i, n in enumerate(rows) for s in range(0, n, docs_per_block)]


def doc_offsets(rows: list[int]) -> list[int]:
    """Global id of each file's row 0: documents are numbered across files in corpus order."""
    out, total = [], 0
    for n in rows:
        out.append(total)
        total += n
    return out


def limit_rows(rows: list[int], max_docs: int | None) -> list[int]:
    """Rows used per file when only the first max_docs rows of the corpus are wanted."""
    if max_docs is None:
        return list(rows)
    out, left = [], max_docs
    for n in rows:
        out.append(min(n, left))
        left -= out[-1]
    return out


def text_digest(texts_digest, texts: list) -> None:
    """Fold one chunk of a file's texts into its digest (order-sensitive, missing values included)."""
    for t in texts:
        texts_digest.update(hashlib.sha256(t.encode()).digest() if isinstance(t, str) else b"\0" * 32)


def corpus_fingerprint(files: list[tuple[int, str]], max_docs: int | None) -> str:
    """From each file's (rows, digest of its texts): independent of file names and of where the
    corpus lives (a local copy and its s3:// upload agree), changed by any edit to a text."""
    h = hashlib.sha256()
    for n, digest in files:
        h.update(f"{n}:{digest};".encode())
    h.update(f"max_docs={max_docs}".encode())
    return h.hexdigest()[:16]


def cut_windows(ids: list[int], window_length: int, min_length: int = 8) -> list[list[int]]:
    """Consecutive windows of one document (never two documents in one window); a short tail
    window is kept if it has at least min_length tokens."""
    windows = [ids[i : i + window_length] for i in range(0, len(ids), window_length)]
    return [w for w in windows if len(w) >= min(min_length, window_length)]
