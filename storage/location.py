"""Where a store lives: a local directory or an fsspec URL (s3://...), with the few file operations the
store needs beside zarr: atomic small-file writes (commit markers, group metadata), listing, removal."""
from __future__ import annotations

import os


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return os.path.abspath(os.path.expanduser(url[len("file://"):] if url.startswith("file://") else url))


def resolve_storage_options(url: str, storage_options: dict | None) -> dict:
    """Copy of storage_options; for s3:// adds the endpoint from MARIA_S3_ENDPOINT_URL / AWS_ENDPOINT_URL(_S3)
    unless one is given (s3fs only reads the standard variable in some versions, and never ours)."""
    options = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        given = "endpoint_url" in options or "endpoint_url" in options.get("client_kwargs", {})
        env = (os.environ.get("MARIA_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
               or os.environ.get("AWS_ENDPOINT_URL"))
        if env and not given:
            options["endpoint_url"] = env
    return options


class Location:
    """Where a store lives: a zarr store for the arrays plus plain file operations for markers and cleanup."""

    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec
        import zarr

        self.url = url
        self.local = is_local(url)
        if self.local:
            self.root = local_path(url)
            self.fs = None  # plain os calls: os.replace gives the atomic marker write
            self.zarr_store = zarr.storage.LocalStore(self.root)
        else:
            options = resolve_storage_options(url, storage_options)
            self.fs, path = fsspec.url_to_fs(url, **options)
            self.root = path.rstrip("/")
            self.zarr_store = zarr.storage.FsspecStore.from_url(url, storage_options=options)

    def sub_store(self, subpath: str, read_only: bool = False):
        """A zarr store rooted at a sub-folder: a block attempt is written as its own small hierarchy, so a
        writer never checks or touches the parents' metadata (fewer requests on S3, no shared files)."""
        import zarr

        if self.local:
            return zarr.storage.LocalStore(self.path(subpath), read_only=read_only)
        return zarr.storage.FsspecStore(self.zarr_store.fs, path=self.path(subpath), read_only=read_only)

    def path(self, *parts: str) -> str:
        return "/".join((self.root,) + parts)

    def exists(self, *parts: str) -> bool:
        if self.local:
            return os.path.exists(self.path(*parts))
        self.fs.invalidate_cache(self.path(*parts))
        return self.fs.exists(self.path(*parts))

    def listdir(self, *parts: str) -> list[str]:
        """Names (not paths) directly under a folder; [] when it does not exist. Never cached: other
        processes add markers while we run."""
        if self.local:
            try:
                return sorted(os.listdir(self.path(*parts)))
            except (FileNotFoundError, NotADirectoryError):
                return []
        folder = self.path(*parts)
        self.fs.invalidate_cache(folder)
        try:
            entries = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries} - {""})

    def read_bytes(self, *parts: str) -> bytes:
        if self.local:
            with open(self.path(*parts), "rb") as f:
                return f.read()
        return self.fs.cat_file(self.path(*parts))

    def read_optional(self, *parts: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        try:
            return self.read_bytes(*parts)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def write_atomic(self, data: bytes, *parts: str) -> None:
        """Local: temp file + os.replace; object stores: one PUT, which is atomic."""
        target = self.path(*parts)
        if not self.local:
            self.fs.pipe_file(target, data)
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{os.path.dirname(target)}/.{os.path.basename(target)}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def remove_tree(self, *parts: str) -> None:
        target = self.path(*parts)
        if self.local:
            import shutil
            shutil.rmtree(target, ignore_errors=True)
        elif self.exists(*parts):  # not the cached listing: another process may have written here
            self.fs.rm(target, recursive=True)
