"""Where a store lives: a local directory or an fsspec URL (s3://...), with the few file operations the
store needs beside zarr: atomic small-file writes (commit markers, group metadata), listing, removal."""

from __future__ import annotations

import importlib.util
import os

from maria_storage.format import StoreAccessError

# URL schemes a store or corpus may use: object stores with listing and all-or-nothing single-object writes (what a
# commit marker needs), each with the package that gives fsspec access to it and how to install that package
BACKENDS = {
    "s3": ("s3fs", "pip install 'maria-infill[s3]'"),
    "s3a": ("s3fs", "pip install 'maria-infill[s3]'"),
    "gs": ("gcsfs", "pip install 'maria-infill[gcs]'"),
    "gcs": ("gcsfs", "pip install 'maria-infill[gcs]'"),
    "az": ("adlfs", "pip install adlfs"),
    "abfs": ("adlfs", "pip install adlfs"),
    "abfss": ("adlfs", "pip install adlfs"),
}


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def check_url(url: str, what: str) -> None:
    """StoreAccessError for a URL no installed backend can serve: an unknown scheme (ftp://, http://, ...), or a
    known one whose package is missing (gs:// without gcsfs), naming what to install."""
    if is_local(url):
        return
    scheme = url.split("://", 1)[0].lower()
    if scheme not in BACKENDS:
        raise StoreAccessError(f"{what} {url}: {scheme}:// is not supported; use a local path or an s3://, gs:// or az:// URL")
    package, install = BACKENDS[scheme]
    if importlib.util.find_spec(package) is None:
        raise StoreAccessError(f"{what} {url}: {scheme}:// needs the {package} package, which is not installed; {install}")


def access_error(e: BaseException, url: str, what: str) -> StoreAccessError | None:
    """The one line for an error met reaching `url` (no credentials, access denied, no server answering), or None
    when `e` is none of those. Callers turn a missing file into "nothing there" themselves."""
    name, module = type(e).__name__, type(e).__module__.split(".")[0]
    first = " ".join((str(e).strip().splitlines() or [name])[0].split())[:200] or name
    cloud = module in ("botocore", "aiobotocore", "google", "aiohttp", "azure", "gcsfs", "s3fs")
    if cloud and "Credentials" in name:  # botocore's NoCredentialsError, PartialCredentialsError
        return StoreAccessError(
            f"cannot reach {what} {url}: no credentials ({first}); set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY or AWS_PROFILE (or run where a role grants access)"
        )
    if isinstance(e, PermissionError) or any(k in str(e) for k in ("AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch")):
        return StoreAccessError(
            f"cannot reach {what} {url}: access denied ({first}); use credentials allowed to read it (and to write it, for a store being extracted)"
        )
    if isinstance(e, (ConnectionError, TimeoutError)) or (cloud and any(k in name for k in ("Connect", "Timeout", "Endpoint"))):
        return StoreAccessError(f"cannot reach {what} {url}: {first}; check the URL, the network and, for an S3-compatible server, MARIA_S3_ENDPOINT_URL")
    return None


def local_path(url: str) -> str:
    return os.path.abspath(os.path.expanduser(url[len("file://") :] if url.startswith("file://") else url))


def resolve_storage_options(url: str, storage_options: dict | None) -> dict:
    """Copy of storage_options; for s3:// adds the endpoint from MARIA_S3_ENDPOINT_URL / AWS_ENDPOINT_URL(_S3)
    unless one is given (s3fs only reads the standard variable in some versions, and never ours)."""
    options = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        given = "endpoint_url" in options or "endpoint_url" in options.get("client_kwargs", {})
        env = os.environ.get("MARIA_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if env and not given:
            options["endpoint_url"] = env
    return options


class Location:
    """Where a store lives: a zarr store for the arrays plus plain file operations for markers and cleanup."""

    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec
        import zarr

        check_url(url, "store")
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
