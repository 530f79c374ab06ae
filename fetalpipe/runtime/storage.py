"""Where a run's files live: a local path or an object-store URI (``s3://bucket/prefix/...``), through one layer,
``pyarrow.fs``, the one Ray Data and Ray Train use too. S3-compatible stores (AWS, MinIO, Ceph) are configured by the
standard AWS environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``).

Writes never need a rename on an object store: an object becomes visible only when its upload completes, so a reader
sees either nothing or the whole object. Local files get the same guarantee from a temporary name and ``os.replace``."""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid


def is_uri(location: str) -> bool:
    return "://" in str(location)


def absolute(location: str) -> str:
    return str(location) if is_uri(location) else os.path.abspath(location)


def join(location: str, *names: str) -> str:
    return "/".join([str(location).rstrip("/"), *names]) if is_uri(location) else os.path.join(location, *names)


def filesystem(location: str):
    """(pyarrow filesystem, path inside it)."""
    import pyarrow.fs

    if is_uri(location):
        return pyarrow.fs.FileSystem.from_uri(str(location))
    return pyarrow.fs.LocalFileSystem(), os.path.abspath(location)


def file_info(location: str):
    fs, path = filesystem(location)
    return fs.get_file_info(path)


def exists(location: str) -> bool:
    import pyarrow.fs

    return file_info(location).type != pyarrow.fs.FileType.NotFound


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as handle:
        return handle.read()


def write_bytes(location: str, data: bytes) -> None:
    """The whole object or file appears at once, or not at all (see the module docstring)."""
    write_chunks(location, [data])


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def write_chunks(location: str, chunks) -> None:
    """Write an iterable of bytes without holding it all in memory. On disk: a temporary name, then a rename. On an
    object store: one streamed upload, visible when it completes; a failure mid-way deletes what was uploaded."""
    if is_uri(location):
        fs, path = filesystem(location)
        try:
            with fs.open_output_stream(path) as handle:
                for chunk in chunks:
                    handle.write(chunk)
        except BaseException:
            if fs.get_file_info(path).type.name != "NotFound":
                fs.delete_file(path)
            raise
        return
    folder = os.path.dirname(os.path.abspath(location))
    os.makedirs(folder, exist_ok=True)
    # A leading "_": dataset readers (and `list_files`) skip it, so a crash mid-write never leaves a readable part.
    partial = os.path.join(folder, f"_partial-{uuid.uuid4().hex}-{os.path.basename(location)}.tmp")
    try:
        with open(partial, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
        os.replace(partial, location)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def makedirs(location: str) -> None:
    """Local folders only: an object store has no folders, a prefix exists once an object is under it."""
    if not is_uri(location):
        os.makedirs(location, exist_ok=True)


def list_files(folder: str, suffix: str = "") -> list[str]:
    """Files directly in FOLDER ending with SUFFIX, sorted, without hidden or temporary ones (a leading "_" or ".")."""
    import pyarrow.fs

    fs, path = filesystem(folder)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    names = sorted(info.base_name for info in infos if info.type == pyarrow.fs.FileType.File)
    return [join(folder, name) for name in names if name.endswith(suffix) and not name.startswith(("_", "."))]


def remove(location: str) -> None:
    fs, path = filesystem(location)
    fs.delete_file(path)


def remove_folder(location: str) -> None:
    """Everything under LOCATION (missing: nothing to do)."""
    import pyarrow.fs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(path)


def move(source: str, target: str) -> None:
    fs, source_path = filesystem(source)
    fs.move(source_path, filesystem(target)[1])


def local_copy(location: str) -> str:
    """A local path to read LOCATION from: itself when local; for a URI, a download cached by URI, size and modification
    time (so every actor on a node downloads a model once, and a changed object is downloaded again)."""
    if not is_uri(location):
        return os.path.abspath(location)
    import pyarrow.fs

    info = file_info(location)
    if info.type != pyarrow.fs.FileType.File:
        raise FileNotFoundError(f"no such object: {location}")
    key = hashlib.sha256(f"{location}|{info.size}|{info.mtime_ns}".encode()).hexdigest()[:24]
    folder = os.path.join(tempfile.gettempdir(), "fetalpipe-cache")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{key}-{os.path.basename(location.rstrip('/'))}")
    if not os.path.exists(path):
        write_bytes(path, read_bytes(location))
    return path
