"""A compile cache that survives restarts: one folder per strict key, filled by torch's own caches.

What torch offers, measured with torch 2.13 on a CPU (tiny UNet):

- ``torch.compiler.save_cache_artifacts()`` / ``load_cache_artifacts(bytes)`` (the "mega-cache") carry
  inductor's FX graph entries and AOTAutograd entries as bytes. On CUDA those entries bundle the compiled
  Triton kernels, but on a CPU they do not carry the compiled C++ kernels: a process that loads them still
  rebuilds every kernel with the C++ compiler, and its first call took half the cold time (59 s vs 117 s).
- Pointing ``TORCHINDUCTOR_CACHE_DIR`` (and ``TRITON_CACHE_DIR``) at a folder keeps everything inductor
  writes there: FX graph and AOTAutograd entries, the built ``.so`` kernels, Triton kernels, autotune
  results. A later process that compiles with the same folder loads all of it; only dynamo's tracing runs.

So each key gets its own inductor cache folder, switched in around every call of the compiled graph (the way
torch's own ``torch._inductor.utils.fresh_cache`` switches it: environment variables plus clearing inductor's
in-memory caches), so that the first compile and any later recompile (a new image size) land in it.

Nothing here serializes anything: the files are torch's. The strictness is ours. An entry is only used when

- its folder name is the digest of the full key (structure signature, backend, compile options, torch,
  onediff and Python versions, device incl. GPU name and capability or CPU ISA, dtype), and the
  ``manifest.json`` beside it states exactly that key, and
- every file the manifest lists has its recorded size and SHA-256, and no unlisted file is left in it.

Anything else (a missing or unreadable manifest, another key, a truncated or altered file, a crash between
compile and manifest) is reported as a problem message, the folder is emptied and the graph is compiled
afresh into it. Weights are never in an entry: parameters are graph inputs (inductor freezing stays off), so
a graph loaded from the cache always computes with the weights of the module it is called with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import stat
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from .backends import QUANTIZED_INDUCTOR_CONFIG

logger = logging.getLogger(__name__)

FORMAT = 2  # 2: ldm-layout UNets compile with control residuals as inputs (compile.control)
MANIFEST = "manifest.json"
INDUCTOR_FOLDER = "inductor"
# Files inductor writes for its own coordination, never read as cache content.
_IGNORED_FOLDERS = ("locks",)
_IGNORED_SUFFIXES = (".lock", ".tmp")


def _onediff_version() -> str:
    try:
        from importlib.metadata import version

        return version("onediff")
    except Exception:  # not installed as a distribution: the key still says so
        return "unknown"


def device_description(device: str) -> Dict[str, Any]:
    """What a compiled kernel depends on beyond torch's version: the GPU model or the CPU's instruction set."""
    parsed = torch.device(device)
    if parsed.type == "cuda":
        index = parsed.index if parsed.index is not None else torch.cuda.current_device()
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(index),
            "capability": list(torch.cuda.get_device_capability(index)),
            "cuda": torch.version.cuda,
        }
    description: Dict[str, Any] = {"type": parsed.type, "machine": platform.machine()}
    if parsed.type == "cpu":
        description["capability"] = torch.backends.cpu.get_cpu_capability()
    return description


def key_fields(key) -> Dict[str, Any]:
    """The full persistent key of a :class:`compile.graph_cache.GraphKey`, as JSON-able fields."""
    fields = {
        "format": FORMAT,
        "signature": key.signature,
        "backend": key.backend,
        "options": key.options.as_dict(),
        "device": key.device,
        "device_description": device_description(key.device),
        "dtype": key.dtype,
        "torch": torch.__version__,
        "onediff": _onediff_version(),
        "python": platform.python_version(),
    }
    if key.options.quantization:  # the inductor settings it is compiled with (float graphs keep their old keys)
        fields["inductor_config"] = QUANTIZED_INDUCTOR_CONFIG
    return fields


def key_digest(fields: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _content_files(folder: str) -> List[str]:
    """Relative paths of the cache files under ``folder`` (lock files left out), sorted."""
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if name not in _IGNORED_FOLDERS]
        for name in files:
            if not name.endswith(_IGNORED_SUFFIXES):
                found.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(found)


def _folder_bytes(folder: str) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


_ENV_LOCK = threading.RLock()


@contextlib.contextmanager
def inductor_cache_folder(folder: str) -> Iterator[None]:
    """Make inductor (and Triton) read and write their caches in ``folder`` for the duration of the block.

    The same switch as torch's ``fresh_cache`` (without deleting anything): the environment variables inductor
    reads on each access, and ``clear_caches`` so no path computed for the previous folder is reused.
    """
    from torch._inductor.utils import clear_caches

    names = {"TORCHINDUCTOR_CACHE_DIR": folder, "TRITON_CACHE_DIR": os.path.join(folder, "triton")}
    with _ENV_LOCK:
        previous = {name: os.environ.get(name) for name in names}
        os.environ.update(names)
        clear_caches()
        try:
            yield
        finally:
            clear_caches()
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _others_may_write(mode: int) -> bool:
    return bool(mode & (stat.S_IWGRP | stat.S_IWOTH))


def trust_problem(folder: str, *, contents: bool = True) -> Optional[str]:
    """Why code cached under ``folder`` must not be loaded (None when it may): inductor's cache holds generated
    code and pickles that run when loaded, so, as ssh refuses a key file others can write, every folder above
    ``folder`` must be writable only by its owner (or sticky, as /tmp), and ``folder`` and (``contents``)
    everything in it must belong to this user (or root) and be writable by no one else. On a system without
    POSIX ownership (Windows) nothing is checked."""
    if os.name != "posix":
        return None
    me = os.getuid()
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    while not os.path.exists(parent) and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)  # folders not made yet are made by this process
    while True:
        try:
            info = os.stat(parent)
        except OSError as error:
            return f"{parent} cannot be checked ({error.strerror})"
        if info.st_uid not in (me, 0) or (_others_may_write(info.st_mode) and not info.st_mode & stat.S_ISVTX):
            return f"{parent}, above the compile cache, can be changed by other users"
        if parent == os.path.dirname(parent):
            break
        parent = os.path.dirname(parent)
    if not os.path.exists(folder):
        return None
    paths = [folder]
    if contents:
        for root, folders, files in os.walk(folder):
            paths += [os.path.join(root, name) for name in folders + files]
    for path in paths:
        try:
            info = os.lstat(path)
        except OSError as error:
            return f"{path} cannot be checked ({error.strerror})"
        if info.st_uid not in (me, 0):
            return f"{path} belongs to another user (uid {info.st_uid})"
        if _others_may_write(info.st_mode) and not stat.S_ISLNK(info.st_mode):
            return f"{path} can be written by other users (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _writable(folder: str) -> bool:
    """Whether this process can create and write ``folder`` (its nearest existing folder when not made yet)."""
    while not os.path.exists(folder) and folder != os.path.dirname(folder):
        folder = os.path.dirname(folder)
    return os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)


def _tighten(path: str) -> None:
    """Take group and other users' write permission from ``path`` and all in it (what the process's umask
    left), so the trust check passes for what this process wrote itself."""
    for root, folders, files in os.walk(path):
        for name in [root, *(os.path.join(root, entry) for entry in folders + files)]:
            with contextlib.suppress(OSError):
                mode = os.lstat(name).st_mode
                if _others_may_write(mode) and not stat.S_ISLNK(mode):
                    os.chmod(name, stat.S_IMODE(mode) & ~(stat.S_IWGRP | stat.S_IWOTH))


@dataclasses.dataclass(frozen=True)
class Check:
    """The verdict on a stored entry: ``status`` is ``hit``, ``miss`` (nothing stored) or ``invalid``.

    ``manifest`` is the entry's manifest when it was readable and stated the right key (also when a file
    failed verification: its ``compile_s`` still tells how long compiling this key takes).
    """

    status: str
    problem: Optional[str] = None
    manifest: Optional[Dict[str, Any]] = None
    reason: Optional[str] = None  # the problem in a few words, for a job's info line


@dataclasses.dataclass(eq=False)
class StoredGraph:
    """One key's folder in the persistent cache, as used by one compiled graph.

    ``hit`` says the folder held a verified entry when the graph was created; ``problem`` is the message to
    show when an entry was found but refused, or the folder could not be used, and ``notice`` the same in a
    few words (a job's info line); ``expected_s`` is how long the first call should take, when known: on a hit
    the last load of this entry, when a damaged entry is recompiled its recorded compile.
    """

    cache: "PersistentCache"
    path: str
    fields: Dict[str, Any]
    hit: bool
    problem: Optional[str] = None
    expected_s: Optional[float] = None
    manifest: Optional[Dict[str, Any]] = None
    generation: int = 0
    notice: Optional[str] = None

    @property
    def inductor_folder(self) -> str:
        return os.path.join(self.path, INDUCTOR_FOLDER)

    bypassed: bool = False  # the folder is not used at all (untrusted or not writable): torch's defaults apply

    @contextlib.contextmanager
    def activated(self) -> Iterator[None]:
        """Compile and run with this entry's inductor cache folder."""
        if self.bypassed:
            yield
            return
        os.makedirs(self.inductor_folder, mode=0o700, exist_ok=True)
        with inductor_cache_folder(self.inductor_folder):
            yield

    def save(self, first_call_s: float) -> None:
        """Write the manifest for what inductor left in the folder (after the first call, after a recompile).

        On a miss ``first_call_s`` was the cold compile; on a hit it was the load, recorded as ``load_s``
        beside the original ``compile_s``. An entry whose cache was cleared in the meantime is not rewritten.
        """
        if self.generation != self.cache.generation or self.bypassed:
            return
        try:
            _tighten(self.path)
            files = {}
            for name in _content_files(self.path):
                if name != MANIFEST:
                    file_path = os.path.join(self.path, name)
                    files[name] = {"size": os.path.getsize(file_path), "sha256": _sha256(file_path)}
            if not files:
                return  # nothing compiled here (the graph came from dynamo's in-memory cache): nothing to record
            previous = self.manifest or {}
            manifest = {
                "key": self.fields,
                "created": previous.get("created", _now()),
                "updated": _now(),
                "compile_s": previous.get("compile_s", round(first_call_s, 3)) if self.hit else round(first_call_s, 3),
                "load_s": round(first_call_s, 3) if self.hit else previous.get("load_s"),
                "size_bytes": sum(entry["size"] for entry in files.values()),
                "files": files,
            }
            temporary = os.path.join(self.path, MANIFEST + ".tmp")
            with open(temporary, "w") as handle:
                json.dump(manifest, handle, indent=1, sort_keys=True)
            os.replace(temporary, os.path.join(self.path, MANIFEST))  # never a half-written manifest
            self.manifest = manifest
        except OSError as error:
            message = f"could not write the compile cache entry {self.path}: {error}"
            logger.warning(message)
            self.problem = message
            self.notice = f"compile cache entry not saved ({error.strerror or type(error).__name__})"

    def bypass_after_write_failure(self, error: BaseException) -> bool:
        """Stop using the folder when ``error`` (a failed compile) comes from writing into it: a full disk, a
        quota, the folder deleted or made read-only while the webui runs. Returns whether it did, so the caller
        compiles again with torch's own cache folder; any other failure is the caller's."""
        failure = _write_failure(error, self.cache.folder)
        if failure is None:
            return False
        self.bypassed = True
        shutil.rmtree(self.path, ignore_errors=True)  # what the failed compile left there (no manifest: unusable)
        self.problem = f"compile cache not used: writing into {self.cache.folder} failed ({failure})"
        self.notice = f"compile cache not used ({failure})"
        logger.warning("OneDiff: %s; compiling without it", self.problem)
        return True


def _is_under(path: str, folder: str) -> bool:
    path = os.path.abspath(path)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# What a failed write says when the disk, not the compile, is at fault (also in a C++ compiler's output).
_DISK_FAILURES = ("No space left on device", "Disk quota exceeded", "Read-only file system")


def _write_failure(error: BaseException, folder: str) -> Optional[str]:
    """The reason, in a few words, when ``error`` or an exception it was raised from is an OSError on a path
    under ``folder``, or says the disk is full or read-only; else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.filename and _is_under(str(error.filename), folder):
            return error.strerror or type(error).__name__
        for message in _DISK_FAILURES:
            if message in str(error):
                return message
        error = error.__cause__ or error.__context__
    return None


class PersistentCache:
    """Compiled-graph caches on disk under ``folder``, one subfolder per key (see the module docstring)."""

    def __init__(self, folder: str):
        self.folder = os.path.abspath(os.path.expanduser(folder))
        self.generation = 0  # bumped by clear(): graphs created before must not write into the emptied cache
        self._lock = threading.Lock()

    def entry_path(self, fields: Dict[str, Any]) -> str:
        return os.path.join(self.folder, key_digest(fields)[:32])

    def check(self, fields: Dict[str, Any]) -> Check:
        """Verify the entry for ``fields`` without changing anything."""
        path = self.entry_path(fields)
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.isdir(path) or not os.listdir(path):
            return Check("miss")  # nothing stored (a graph that was never called leaves at most an empty folder)
        where = f"compile cache entry {path}"
        if not os.path.exists(manifest_path):
            return Check("invalid", f"{where} has no manifest (an interrupted compile?)", reason="no manifest")
        try:
            with open(manifest_path) as handle:
                manifest = json.load(handle)
            stored_fields = manifest["key"]
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            return Check("invalid", f"{where} has an unreadable manifest ({type(error).__name__}: {error})",
                         reason="unreadable manifest")
        if stored_fields != fields:
            differing = sorted(
                name for name in set(fields) | set(stored_fields or {})
                if (stored_fields or {}).get(name) != fields.get(name)
            )
            return Check("invalid", f"{where} was written for another key (differs in: {', '.join(differing)})",
                         reason=f"another {differing[0]}" if len(differing) == 1 else "another key")
        def damaged(message: str, reason: str) -> Check:
            return Check("invalid", f"{where}: {message}", manifest, reason)

        try:
            present = set(_content_files(path)) - {MANIFEST}
            for name, recorded in files.items():
                file_path = os.path.join(path, name)
                if name not in present:
                    return damaged(f"{name} is missing", "a file missing")
                size = os.path.getsize(file_path)
                if size != recorded["size"]:
                    return damaged(f"{name} has {size} bytes, {recorded['size']} expected (truncated?)",
                                   "a file truncated")
                if _sha256(file_path) != recorded["sha256"]:
                    return damaged(f"{name} does not match its recorded SHA-256", "a file altered")
            unlisted = sorted(present - set(files))
        except (OSError, KeyError, TypeError) as error:
            return damaged(f"cannot be read ({type(error).__name__}: {error})", "unreadable")
        if unlisted:
            return damaged(f"holds {len(unlisted)} unrecorded file(s), e.g. {unlisted[0]}", "unrecorded files")
        return Check("hit", None, manifest)

    def open(self, key) -> StoredGraph:
        """The stored entry for a :class:`GraphKey`: verified (``hit``), or removed, to be filled by the compile.

        A refused entry is logged and its message kept in ``StoredGraph.problem``; the caller compiles anew.
        """
        fields = key_fields(key)
        with self._lock:
            path = self.entry_path(fields)
            distrust = trust_problem(self.folder, contents=False) or trust_problem(path)
            problem = f"compile cache not used: {distrust} (it must be writable by you only)" if distrust else None
            notice = "compile cache not used (others can write it)" if distrust else None
            if problem is None and not _writable(self.folder):
                problem = f"compile cache not used: {self.folder} cannot be written (read-only?)"
                notice = "compile cache not used (read-only)"
            if problem:
                logger.warning("OneDiff: %s", problem)
                return StoredGraph(self, path, fields, False, problem, None, None, self.generation, notice,
                                   bypassed=True)
            verdict = self.check(fields)
            if verdict.status == "hit":
                manifest = verdict.manifest
                return StoredGraph(self, path, fields, True, None, manifest.get("load_s"), manifest, self.generation)
            problem = verdict.problem
            notice = f"stored graph refused ({verdict.reason}), compiled afresh" if problem else None
            expected = verdict.manifest.get("compile_s") if verdict.manifest else None
            if problem:
                logger.warning("%s; compiling again", problem)
            try:
                if os.path.isdir(path):
                    shutil.rmtree(path)  # the folder is created on the first call, when there is something to keep
            except OSError as error:
                problem = f"{problem + '; ' if problem else ''}cannot empty {path}: {error}"
                notice = notice or f"compile cache entry not emptied ({error.strerror or type(error).__name__})"
                logger.warning(problem)
            return StoredGraph(self, path, fields, False, problem, expected, None, self.generation, notice)

    def entries(self) -> List[Dict[str, Any]]:
        """The manifests of all entries (unreadable ones left out), for a settings page."""
        found = []
        if os.path.isdir(self.folder):
            for name in sorted(os.listdir(self.folder)):
                with contextlib.suppress(OSError, ValueError):
                    with open(os.path.join(self.folder, name, MANIFEST)) as handle:
                        found.append(json.load(handle))
        return found

    def size_bytes(self) -> int:
        """Bytes on disk under the cache folder (what "clear" frees)."""
        return _folder_bytes(self.folder) if os.path.isdir(self.folder) else 0

    def clear(self) -> Tuple[int, int]:
        """Delete every entry; returns (entries removed, bytes freed). Graphs in memory keep working."""
        with self._lock:
            self.generation += 1
            freed = self.size_bytes()
            removed = 0
            if os.path.isdir(self.folder):
                for name in os.listdir(self.folder):
                    path = os.path.join(self.folder, name)
                    if os.path.isdir(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            os.remove(path)
                    removed += 1
            return removed, freed - self.size_bytes()

    def status(self) -> Dict[str, Any]:
        return {"folder": self.folder, "size_bytes": self.size_bytes(), "entries": len(self.entries()),
                "untrusted": trust_problem(self.folder, contents=False)}
