"""Paths and URIs: one place that turns "data/x", "/abs/x" or "s3://bucket/x" into a pyarrow filesystem.

Stages hand off through URIs. Local relative paths are made absolute in the driver (Train workers chdir
into their own run directories, so a relative path means something else there): against the storage
root when one is set ($HEYGEN_RAY_STORAGE, or a spec's ``storage`` through ``runtime.use_storage``), else
against the current directory. A job submitted to a cluster runs in a temporary copy of the code, so
there a relative ``run_dir`` or data folder must land under the storage root, not beside the code.
"""

from __future__ import annotations

import os
import posixpath
from typing import Optional, Tuple

import pyarrow.fs as pafs


def has_scheme(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


STORAGE_ENV = "HEYGEN_RAY_STORAGE"


def storage_root() -> Optional[str]:
    """The directory relative output and data paths resolve against ($HEYGEN_RAY_STORAGE), or None."""
    root = os.environ.get(STORAGE_ENV, "").strip()
    return root or None


def absolute(uri: str) -> str:
    """Local paths -> absolute paths (a relative one against :func:`storage_root` when set, else the
    current directory); URIs with a scheme are returned unchanged."""
    if has_scheme(uri):
        return uri
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    uri = os.path.expanduser(uri)
    root = storage_root()
    if root and not os.path.isabs(uri):
        return os.path.abspath(os.path.join(os.path.expanduser(root), uri))
    return os.path.abspath(uri)


def filesystem(uri: str) -> Tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or any pyarrow URI (s3://, gs://, hdfs://...)."""
    if has_scheme(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), absolute(uri)


def join(base: str, rel: str) -> str:
    """Join a relative path onto a base URI or path. Absolute ``rel`` (or a URI) is returned as is."""
    if has_scheme(rel) or os.path.isabs(rel):
        return rel
    if has_scheme(base):
        return posixpath.join(base, rel)
    return os.path.join(absolute(base), rel)


def parent(uri: str) -> str:
    if has_scheme(uri):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest)}"
    return os.path.dirname(absolute(uri))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.readall()


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically where the filesystem allows (local: write a temp file, then rename)."""
    fs, path = filesystem(uri)
    fs.create_dir(posixpath.dirname(path) if has_scheme(uri) else os.path.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
