"""Where a run's durable files live: its run directory, or a storage URI beside it. No Ray.

`storage` (IDAConfig) is a path on a mount every node shares (NFS), or a URI that
`pyarrow.fs.FileSystem.from_uri` takes - the same that Ray Train's `storage_path` takes -
query parameters included:

    s3://bucket/runs/sum-1                                   AWS, credentials from the environment
    s3://bucket/runs/sum-1?endpoint_override=10.0.0.5:9000&scheme=http   MinIO or another S3 server
    gs://bucket/runs/sum-1                                   Google Cloud Storage

Storage holds a run laid out as its run directory is. The run directory stays the working
copy on the head node (the coordinator and replay buffer live there): tree records and the
replay spill are appended to it as trees complete. With `storage` set,
  * the learner's checkpoints go straight from each worker's node to <storage>/checkpoints
    (Ray Train writes them there), so learners on several nodes need no shared disk;
  * after every iteration the run directory's files that changed since the last push are
    copied to storage, state.json last: storage's state.json names a checkpoint that is there,
    and trees, replay spill and metrics at least as new as it (resume drops what is newer);
  * `--resume` on a head without the run directory (a new cluster) copies storage's run files
    into it first; a checkpoint is fetched from storage where it is read (the learner's
    workers restore it on their own nodes; the coordinator copies one into <run_dir>/cache to
    serve it and to keep the run's best/).
Checkpoints are named everywhere by a reference: a local path, or a URI inside storage.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import posixpath
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from ida_ray.errors import ConfigError, IDAError

# Every stream is opened with compression=None: pyarrow otherwise gzips on write and gunzips on
# read by file extension, and the run's tree records are .jsonl.gz files already.
# Filesystems pyarrow resolves from a URI scheme (no scheme: a local path).
SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
# Not pushed: Ray Train writes checkpoints to storage itself; cache/ holds copies fetched from
# storage; initial/ is rebuilt from the config; *.partial and *.tmp are writes in progress.
CHECKPOINTS_DIR = "checkpoints"  # under run_dir and under storage: the learner's checkpoints
CACHE_DIR = "cache"  # under run_dir: checkpoints copied from storage, removed once used
NOT_PUSHED_DIRS = (CHECKPOINTS_DIR, CACHE_DIR, "initial")
NOT_PUSHED_SUFFIXES = (".partial", ".tmp")
PUSHED_LAST = "state.json"
PROBE_FILE = ".ida-ray-probe"
CHECKPOINT_META = "learner.json"  # as ida_ray.checkpoint.META_FILE (imported lazily there: it needs torch)


class StorageError(IDAError):
    """Storage could not be read or written (unreachable, refused, or missing what it should hold)."""

    kind = "storage_failure"


def is_uri(ref: str | os.PathLike) -> bool:
    return "://" in str(ref)


def scheme_problem(uri: str) -> str | None:
    """Why `uri` cannot be a storage location, from its text alone (no network)."""
    if not uri.strip():
        return "storage is empty (leave it null to keep everything in run_dir)"
    if not is_uri(uri):
        return None
    scheme = urlsplit(uri).scheme
    if scheme not in SCHEMES:
        return f"storage {uri!r}: scheme {scheme!r} is not one pyarrow's filesystems take ({', '.join(SCHEMES)})"
    if scheme != "file" and not urlsplit(uri).netloc:
        return f"storage {uri!r} names no bucket or host"
    return None


def join_ref(ref: str, *parts: str) -> str:
    """A path or URI with parts appended (a URI keeps its query: endpoint, scheme, region)."""
    if not is_uri(ref):
        return str(Path(ref, *parts))
    s = urlsplit(ref)
    return urlunsplit((s.scheme, s.netloc, posixpath.join(s.path or "/", *parts), s.query, ""))


def filesystem(ref: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path on it) of a local path or URI."""
    if not is_uri(ref):
        return pafs.LocalFileSystem(), str(Path(ref).resolve())
    try:
        return pafs.FileSystem.from_uri(ref)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError or ValueError
        raise StorageError(f"storage {ref!r}: {exc}") from exc


def bounded(fn, timeout_s: float, what: str):
    """fn() on a daemon thread, given up after timeout_s with a StorageError: a storage call
    that hangs (an endpoint that accepts and never answers) must not hold the run, nor keep
    the process from exiting. An exception of fn's that is not a StorageError comes back as one."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name="ida-storage", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise StorageError(f"{what}: no answer within {timeout_s:.0f}s (storage_timeout_s)")
    if "error" in box:
        error = box["error"]
        if isinstance(error, StorageError | ConfigError):
            raise error
        raise StorageError(f"{what}: {type(error).__name__}: {error}") from error
    return box.get("value")


def fetch_dir(ref: str, into: str | Path) -> Path:
    """The directory `ref` names (a checkpoint), as a local directory: a local path as it is;
    a remote one copied afresh into `into` (through `into`.partial and a rename, so a copy
    that is there is whole)."""
    fs, path = filesystem(ref)
    if isinstance(fs, pafs.LocalFileSystem):
        return Path(path)
    into = Path(into)
    shutil.rmtree(into, ignore_errors=True)  # what a crash left: maybe another launch's checkpoint of that name
    partial = into.with_name(into.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise StorageError(f"{ref} is not in storage")
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        pafs.copy_files(path, str(partial), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except Exception as exc:  # noqa: BLE001
        shutil.rmtree(partial, ignore_errors=True)
        raise StorageError(f"could not copy {ref} from storage: {exc}") from exc
    os.replace(partial, into)
    return into


def local_checkpoint(ref: str, run_dir: str | Path) -> tuple[Path, bool]:
    """(a local directory holding checkpoint `ref`, whether it is a copy the caller should
    remove once done): a local path as it is, a URI copied into <run_dir>/cache/<its name>."""
    name = posixpath.basename(urlsplit(ref).path.rstrip("/")) if is_uri(ref) else Path(ref).name
    into = Path(run_dir) / CACHE_DIR / name
    local = fetch_dir(ref, into)  # resolves the URI once (an s3:// one may ask its region over the network)
    return local, local == into


@contextlib.asynccontextmanager
async def checkpoint_on_disk(ref: str, run_dir: str | Path, timeout_s: float) -> AsyncIterator[Path]:
    """`async with checkpoint_on_disk(ref, run_dir, t) as local:` a local directory holding
    checkpoint `ref` for the block: a local path as it is; a URI copied into run_dir/cache off
    the event loop (a StorageError past timeout_s), and the copy removed when the block ends."""
    local, fetched = await asyncio.to_thread(bounded, lambda: local_checkpoint(ref, run_dir), timeout_s,
                                             f"copying {ref} from storage")
    try:
        yield local
    finally:
        if fetched:
            shutil.rmtree(local, ignore_errors=True)


class RunStorage:
    """A run's storage location (see the module docstring): push and pull of the run
    directory's files, checkpoint references, and a check that it answers."""

    def __init__(self, uri: str, timeout_s: float = 600.0):
        problem = scheme_problem(uri)
        if problem:
            raise ConfigError(problem)
        uri = uri if is_uri(uri) else str(Path(uri).resolve())
        # Resolving an s3:// URI without a region asks the bucket's region over the network.
        self.fs, self.root = bounded(lambda: filesystem(uri), timeout_s, f"opening storage {uri}")
        # A local filesystem (a shared mount, file://) is named by its path: refs stay plain paths.
        self.uri = self.root if isinstance(self.fs, pafs.LocalFileSystem) else uri
        self.timeout_s = timeout_s
        # run-dir file -> (size, mtime_ns) as last pushed; None: not read from storage yet (the
        # first push lists storage, so files a previous process pushed are neither copied again
        # nor left behind once gone here). mtime None: known by size only.
        self._pushed: dict[str, tuple[int, int | None]] | None = None
        self._push_lock = threading.Lock()

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        """A path on self.fs."""
        return posixpath.join(self.root, *parts)

    def ref(self, *parts: str) -> str:
        """A reference (local path or URI) to something in storage."""
        return join_ref(self.uri, *parts)

    def checkpoints(self) -> tuple[str, pafs.FileSystem | None]:
        """Ray Train's (storage_path, storage_filesystem) for the learner's checkpoints."""
        return (self.path(CHECKPOINTS_DIR), None) if self.local else (self.path(CHECKPOINTS_DIR), self.fs)

    def check(self) -> None:
        """Write, read back and delete a small file: a wrong endpoint, bucket or credential
        is a StorageError before the run takes any resource."""
        probe = self.path(PROBE_FILE)
        try:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(probe, compression=None) as f:
                f.write(b"ida-ray")
            with self.fs.open_input_stream(probe, compression=None) as f:
                got = f.read()
            self.fs.delete_file(probe)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"storage {self.uri} cannot be written and read back: {exc}") from exc
        if got != b"ida-ray":
            raise StorageError(f"storage {self.uri} gave back {got!r} for what was written")

    # -- the run directory's files -------------------------------------------------------

    def push_run_dir(self, run_dir: str | Path) -> int:
        """Copy run_dir's files that changed since the last push (by size and mtime) to
        storage, state.json last; files in storage that are gone here (gzipped or retired
        tree records, a replaced best/) are deleted there. One push at a time. Returns how many
        files were copied."""
        if not self._push_lock.acquire(blocking=False):  # one given up on is still copying
            raise StorageError(f"the previous copy to storage {self.uri} is still running")
        try:
            return self._push(Path(run_dir))
        finally:
            self._push_lock.release()

    def _push(self, run_dir: Path) -> int:
        if self._pushed is None:
            self._pushed = {rel: (size, None) for rel, size in self._stored_run_files().items()}
        files: dict[str, tuple[int, int]] = {}
        for root, dirs, names in os.walk(run_dir):
            rel_root = Path(root).relative_to(run_dir)
            if rel_root == Path("."):
                dirs[:] = [d for d in dirs if d not in NOT_PUSHED_DIRS]
            for name in names:
                if name.endswith(NOT_PUSHED_SUFFIXES):
                    continue
                try:
                    st = os.stat(os.path.join(root, name))
                except FileNotFoundError:  # renamed away while we walked
                    continue
                files[(rel_root / name).as_posix()] = (st.st_size, st.st_mtime_ns)

        def unchanged(rel: str) -> bool:
            known = self._pushed.get(rel)
            if known is None:
                return False
            if known[1] is None:  # pushed by an earlier process: trust the size, but not for JSON rewritten in place
                return known[0] == files[rel][0] and not rel.endswith(".json")
            return known == files[rel]

        changed = sorted((f for f in files if not unchanged(f)), key=lambda f: f == PUSHED_LAST)
        for rel in changed:
            self._put(run_dir / rel, rel)
            self._pushed[rel] = files[rel]
        for rel in [f for f in self._pushed if f not in files]:
            try:
                self.fs.delete_file(self.path(rel))
            except FileNotFoundError:
                pass
            except Exception as exc:  # noqa: BLE001
                raise StorageError(f"could not delete {rel} in storage {self.uri}: {exc}") from exc
            del self._pushed[rel]
        return len(changed)

    def _stored_run_files(self) -> dict[str, int]:
        """rel path -> size of the run files in storage (not its checkpoints)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"could not list storage {self.uri}: {exc}") from exc
        out = {}
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            rel = posixpath.relpath(info.path, self.root)
            if rel.split("/", 1)[0] in NOT_PUSHED_DIRS or rel.endswith(NOT_PUSHED_SUFFIXES) or rel == PROBE_FILE:
                continue
            out[rel] = info.size
        return out

    def _put(self, local: Path, rel: str) -> None:
        dest = self.path(rel)
        try:
            self.fs.create_dir(posixpath.dirname(dest), recursive=True)
            if self.local:  # another process may read it: whole or not at all
                tmp = dest + ".tmp"
                shutil.copyfile(local, tmp)
                os.replace(tmp, dest)
            else:  # an object store's PUT is atomic
                with open(local, "rb") as src, self.fs.open_output_stream(dest, compression=None) as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        except FileNotFoundError:  # gone since the walk (a tree file gzipped): the next push sees it
            return
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"could not copy {local} to storage {self.uri}: {exc}") from exc

    def stored_state(self) -> dict | None:
        """Storage's state.json (None: storage holds no run)."""
        try:
            with self.fs.open_input_stream(self.path(PUSHED_LAST), compression=None) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise StorageError(f"{self.ref(PUSHED_LAST)} is corrupt ({exc})") from exc
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"could not read {self.ref(PUSHED_LAST)}: {exc}") from exc

    def pull_run_dir(self, run_dir: str | Path) -> int:
        """Copy storage's run files (not its checkpoints) into run_dir, state.json last and
        by a rename: a pull cut short leaves no state.json, so the next --resume pulls again.
        Returns how many files were copied."""
        run_dir = Path(run_dir)
        files = self._stored_run_files()
        pushed = {}
        try:
            for rel in sorted(files, key=lambda f: f == PUSHED_LAST):
                target = run_dir / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                with self.fs.open_input_stream(self.path(rel), compression=None) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                os.replace(tmp, target)
                st = target.stat()
                pushed[rel] = (st.st_size, st.st_mtime_ns)  # storage has it as it is now
        except FileNotFoundError as exc:
            raise StorageError(f"{exc.filename or exc} went from storage {self.uri} while it was copied") from exc
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"could not copy the run from storage {self.uri}: {exc}") from exc
        with self._push_lock:
            self._pushed = pushed
        return len(files)

    # -- checkpoints ---------------------------------------------------------------------

    def checkpoint_problem(self, ref: str) -> str | None:
        """Why the checkpoint `ref` in storage cannot be used, from its learner.json and the
        sizes of its files (no download; the sha256s are checked where it is loaded)."""
        fs, path = filesystem(ref)
        try:
            with fs.open_input_stream(posixpath.join(path, CHECKPOINT_META), compression=None) as f:
                meta = json.loads(f.read())
            meta["iteration"]
        except FileNotFoundError:
            return f"{ref} is not a complete learner checkpoint (no {CHECKPOINT_META})"
        except (ValueError, KeyError, TypeError) as exc:
            return f"{ref}/{CHECKPOINT_META} is corrupt ({exc})"
        except Exception as exc:  # noqa: BLE001
            return f"{ref} cannot be read from storage ({exc})"
        for name, want in meta.get("files", {}).items():
            try:
                info = fs.get_file_info(posixpath.join(path, name))
                size = want["bytes"]
            except (KeyError, TypeError) as exc:
                return f"{ref}/{CHECKPOINT_META} is corrupt ({exc})"
            except Exception as exc:  # noqa: BLE001
                return f"{ref} cannot be read from storage ({exc})"
            if info.type != pafs.FileType.File:
                return f"{ref}/{name} is missing from the checkpoint"
            if info.size != size:
                return f"{ref}/{name} is truncated or overwritten ({info.size} bytes, {size} written)"
        return None

    def checkpoint_ref(self, name: str) -> str:
        """The reference of checkpoint `name` (its path under <storage>/checkpoints)."""
        return self.ref(CHECKPOINTS_DIR, *name.split("/"))

    def checkpoint_names(self) -> list[tuple[int, str]]:
        """(iteration, name) of every checkpoint under <storage>/checkpoints whose learner.json
        reads, newest iteration first (name: its path under checkpoints/, e.g. ida/iteration_0003)."""
        found = []
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path(CHECKPOINTS_DIR), recursive=True,
                                                            allow_not_found=True))
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"could not list the checkpoints in storage {self.uri}: {exc}") from exc
        for info in infos:
            if info.base_name != CHECKPOINT_META or info.type != pafs.FileType.File:
                continue
            try:
                with self.fs.open_input_stream(info.path, compression=None) as f:
                    it = json.loads(f.read())["iteration"]
            except Exception:  # noqa: BLE001 - a torn one is passed over
                continue
            found.append((it, posixpath.relpath(posixpath.dirname(info.path), self.path(CHECKPOINTS_DIR))))
        return sorted(found, reverse=True)

    def put_checkpoint(self, local: str | Path, name: str) -> str:
        """Copy a checkpoint directory written locally to <storage>/checkpoints/name, its
        learner.json last (until it is there, the checkpoint is incomplete); returns its reference."""
        local = Path(local)
        self.delete_checkpoint(name)  # a re-run iteration's: no old learner.json over new files
        files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.name == CHECKPOINT_META)
        for p in files:
            self._put(p, posixpath.join(CHECKPOINTS_DIR, name, p.relative_to(local).as_posix()))
        return self.checkpoint_ref(name)

    def delete_checkpoint(self, name: str) -> None:
        try:
            self.fs.delete_dir(self.path(CHECKPOINTS_DIR, name))
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"could not delete checkpoint {name} in storage {self.uri}: {exc}") from exc
