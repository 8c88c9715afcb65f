"""The corpus as a Ray Data source: files are read in parallel by read tasks on the workers.

Ray Data's file-based reader framework (FileBasedDatasource: listing, pyarrow and fsspec
filesystems, retries of flaky reads, decompression by suffix, read tasks spread over the
cluster) with extract/corpus.py's parsing, so a document's row number in its file is known where
it is read. Two modes over the same files:
    scan    one row per file: rows, non-empty rows, digest of its texts (plan and fingerprint)
    blocks  one row per block not yet committed: block id, global document ids, texts
The driver only ever sees scan rows (one per file) and block ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from maria_extract.corpus import Corpus, CorpusError, block_id, file_texts, is_document, text_digest
from maria_extract.ray_compat import RandomAccessDatasource


def _key(path: str) -> str:
    """A path as Ray hands it to a read task (scheme and leading slash stripped) and as we listed it."""
    return path.split("://", 1)[-1].lstrip("/")


def _arrow_filesystem(corpus: Corpus):
    """Remote corpora go through fsspec with the store's options (e.g. a custom S3 endpoint);
    local ones through Ray's default (pyarrow's local filesystem)."""
    if not corpus.remote:
        return None
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = fsspec.core.url_to_fs(corpus.files[0], **corpus.storage_options)
    return PyFileSystem(FSSpecHandler(fs))


class CorpusSource(RandomAccessDatasource):
    """Files `file_ids` of a corpus. `plan` (blocks mode) maps file id -> (doc id of row 0,
    rows to use, block starts still to do); it travels by object reference, not in every task."""

    def __init__(self, corpus: Corpus, file_ids: list[int], column: str, mode: str = "scan", docs_per_block: int = 1, plan: dict | None = None):
        import ray

        paths = [corpus.files[i] for i in file_ids]
        super().__init__(paths, filesystem=_arrow_filesystem(corpus))
        self._kind, self._column, self._mode, self._dpb = corpus.kind, column, mode, docs_per_block
        self._ids_ref = ray.put({_key(p): i for p, i in zip(paths, file_ids)})
        self._plan_ref = ray.put(plan or {})
        self._names = None

    def random_access(self, path: str) -> bool:
        return self._kind == "parquet"  # the footer is at the end: random access, not a stream

    def _read_stream(self, f, path: str) -> Iterator:
        import ray

        if self._names is None:
            self._names = ray.get(self._ids_ref)
        i = self._names[_key(path)]
        texts = file_texts(self._kind, f, path, self._column)
        if self._mode == "scan":
            yield _scan_row(i, texts)
        else:
            offset, rows, starts = ray.get(self._plan_ref)[i]
            yield from _block_rows(i, texts, offset, rows, set(starts), self._dpb)


def _scan_row(i: int, texts: Iterator[list]):
    import pyarrow as pa

    digest, rows, docs = hashlib.sha256(), 0, 0
    for chunk in texts:
        text_digest(digest, chunk)
        rows += len(chunk)
        docs += sum(is_document(t) for t in chunk)
    return pa.table({"file": [i], "rows": [rows], "documents": [docs], "digest": [digest.hexdigest()]})


def _block_rows(i: int, texts: Iterator[list], offset: int, rows: int, starts: set, dpb: int):
    """One arrow row per wanted block; rows past `rows` (max_docs) are not read further."""
    row, current = 0, []
    for chunk in texts:
        for t in chunk:
            if row >= rows:
                break
            start = row - row % dpb
            if start in starts:
                current.append((offset + row, t if is_document(t) else ""))
            row += 1
            if (row % dpb == 0 or row == rows) and start in starts:
                yield _block_table(block_id(i, start), current)
                current = []
        if row >= rows:
            break
    if row < rows:  # never commit a block from a different file than the one planned
        raise CorpusError(f"corpus file {i} has {row} rows, the job planned {rows}: it changed while the job ran; re-run the same command")


def _block_table(bid: str, docs: list[tuple[int, str]]):
    import pyarrow as pa

    return pa.table(
        {
            "block_id": [bid],
            "doc_ids": pa.array([[d for d, _ in docs]], pa.list_(pa.int64())),
            "texts": pa.array([[t for _, t in docs]], pa.list_(pa.large_string())),
        }
    )


def read_corpus(
    corpus: Corpus, file_ids: list[int], column: str, mode: str = "scan", docs_per_block: int = 1, plan: dict | None = None, num_cpus: float = 0.25
):
    """A Ray Dataset over the given files; read tasks take a fraction of a CPU so reading never
    starves the backbone actors of a small node."""
    import ray

    source = CorpusSource(corpus, file_ids, column, mode, docs_per_block, plan)
    return ray.data.read_datasource(source, num_cpus=num_cpus)
