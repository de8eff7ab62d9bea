"""Where a run's files live: a local directory or an object-store prefix (``gs://bucket/run``).

Every file a run writes or reads under its workdir (config.gin, metrics, TensorBoard events,
evaluation JSON, the report) goes through ``etils.epath``; checkpoints through orbax, whose
tensorstore reaches the same URIs. Object stores have no append and no rename: a file is always
written whole, which on a local disk is a write beside it and a rename (a crash never leaves half
a file), and in a bucket one upload (an object is replaced atomically).

Credentials and endpoints are the storage clients' own settings: on a TPU VM the VM's service
account; against a local emulator ``STORAGE_EMULATOR_HOST`` (gcsfs, behind epath) and
``TENSORSTORE_GCS_HTTP_URL`` (tensorstore, behind orbax).
"""

from __future__ import annotations

import os

from etils import epath


def is_uri(location: str | os.PathLike) -> bool:
    """True for an object-store location (``gs://...``), False for a local path."""
    return "://" in os.fspath(location)


def path(location: str | os.PathLike) -> epath.Path:
    """The location as an ``epath.Path``: a local path made absolute, a URI as it is."""
    text = os.fspath(location)
    return epath.Path(text if is_uri(text) else os.path.abspath(text))


def write_text(target: epath.Path, text: str) -> None:
    """Writes ``target`` whole (its folder created), never leaving a half-written file."""
    write_bytes(target, text.encode())


def write_bytes(target: epath.Path, data: bytes) -> None:
    target = epath.Path(target)
    if is_uri(target):
        target.write_bytes(data)  # one upload: the object appears complete or not at all
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".tmp")
    partial.write_bytes(data)
    partial.replace(target)


class _EventFileInObjectStore:
    """A tensorboardX record writer for object storage: the events are kept in memory and the
    event file is uploaded whole when tensorboardX flushes it (every ``flush_secs`` and on close).
    tensorboardX's own GCS writer uploads again when garbage-collected after ``close`` and needs
    the google-cloud-storage client; this one goes through epath like the rest of the run."""

    def __init__(self, location: str):
        self.target = epath.Path(location)
        self.events = bytearray()
        self.uploaded = 0

    def write(self, data: bytes) -> None:
        self.events += data

    def flush(self) -> None:
        if len(self.events) != self.uploaded:
            self.target.write_bytes(bytes(self.events))
            self.uploaded = len(self.events)

    def close(self) -> None:
        self.flush()


class _EventFileFactory:
    def open(self, location: str) -> _EventFileInObjectStore:
        return _EventFileInObjectStore(location)

    def directory_check(self, location: str) -> None:
        """Buckets have no folders to create."""


def tensorboard_writer(directory: epath.Path, **kwargs):
    """A tensorboardX ``SummaryWriter`` for ``directory``, local or in a bucket."""
    from tensorboardX import SummaryWriter, record_writer

    if is_uri(directory):
        record_writer.register_writer_factory(str(directory).split("://", 1)[0], _EventFileFactory())
    return SummaryWriter(str(directory), **kwargs)
