r"""A resumable on-disk store of influence scores: ``.npy`` chunks, one shard per rank, a ``manifest.json``.

:func:`~lightning_influence.influence.influence_scores` (``store_dir=``) and
:class:`~lightning_influence.callbacks.InfluenceReport` (``<log_dir>/influence/store/``) write every streamed chunk
of training examples here as soon as it is scored, so a train-end stage killed mid-way and re-run with the same
config skips the chunks already on disk and returns bit-identical scores. The format is plain NumPy
(``np.load`` opens every file; no need for this library)::

    store/
      manifest.json                 # format, fingerprint (config + hashes), world size, shapes, complete flag
      scores.npy                    # (n_query, n_train) float, written by rank 0 once every chunk is done
      self_influence.npy  train_losses.npy  query_losses.npy  train_indices.npy  query_indices.npy
      shard-0-of-2/                 # one shard per rank: only that rank writes it
        manifest.json               # fingerprint, then per chunk: rows, files, shapes, dtype, complete
        chunk-000000.scores.npy     # (n_query, rows): this rank's training examples of chunk 0
        chunk-000000.self_influence.npy  chunk-000000.train_losses.npy
        chunk-000000.positions.npy  # column of each row in scores.npy (int64)
      extras/                       # opaque arrays keyed by name (e.g. a curvature sketch), rank 0

**Fault model.** Every file is written to a temporary name and moved into place with :func:`os.replace`; a chunk is
marked complete in its shard's manifest only after all its files are in place, and on resume a complete chunk whose
files are missing or have another shape is recomputed. A failing write (e.g. a full disk) raises
:class:`StoreError` naming the directory; the chunks completed before it stay valid. The *fingerprint* is the
:class:`~lightning_influence.config.InfluenceConfig` (all fields that change scores), hashes of the model's weights
and of the training, query and curvature indices, and the world size: when any of it differs from the one on disk
the store starts fresh and warns naming what changed (``on_mismatch="restart"``), or raises
(``on_mismatch="raise"``); chunks of two configs are never mixed.

Example::

    >>> import tempfile, numpy as np
    >>> store = ScoreStore(tempfile.mkdtemp())
    >>> store.open({"damping": 0.1}, num_chunks=2)
    set()
    >>> store.write_chunk(0, {"scores": np.ones((3, 2)), "positions": np.arange(2)})
    >>> ScoreStore(store.directory).open({"damping": 0.1}, num_chunks=2)   # a re-run: chunk 0 is done
    {0}
    >>> store.read_chunk(0)["scores"].shape
    (3, 2)
"""

from __future__ import annotations

import errno as _errno
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lightning_influence._io import atomic_write
from lightning_influence.exceptions import ConfigurationError, LightningInfluenceError

__all__ = ["FORMAT", "ScoreStore", "StoreError", "fingerprint", "load_store"]

#: ``"format"`` entry of every manifest this module writes (a directory with another one is not a score store).
FORMAT = "lightning_influence.score_store/1"
MANIFEST = "manifest.json"
_SHARD = re.compile(r"^shard-(\d+)-of-(\d+)$")
_OWN_FILES = {MANIFEST, "extras", "scores.npy", "self_influence.npy", "train_losses.npy", "query_losses.npy",
              "train_indices.npy", "query_indices.npy"}


class StoreError(LightningInfluenceError, OSError):
    """Writing the score store failed (e.g. a full disk); the message names the directory and the fix.

    Example::

        >>> issubclass(StoreError, OSError)
        True
    """


# ----------------------------------------------------------------------------------------------- fingerprint
def _digest(value: Any) -> str:
    """SHA-256 (16 hex digits) of a tensor's bytes (with dtype and shape), a module's parameters or JSON."""
    h = hashlib.sha256()
    if isinstance(value, nn.Module):
        for name, t in value.state_dict().items():
            h.update(name.encode())
            h.update(_digest(t).encode())
    elif isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(json.dumps(value, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def fingerprint(config: Mapping[str, Any], **hashed: Any) -> dict[str, Any]:
    """What a store's results depend on: ``config`` fields as ``"config.<name>"`` and hashes of ``hashed``.

    Args:
        config: Plain settings (e.g. ``InfluenceConfig.to_dict()``), kept verbatim so a change is named.
        **hashed: Tensors, modules or JSON-able values, stored as short SHA-256 digests (``None`` stays ``None``).

    Returns:
        A flat JSON-able dict; two runs may share a store exactly when their fingerprints are equal.

    Example::

        >>> fp = fingerprint({"damping": 0.1}, train_indices=torch.arange(3))
        >>> fp["config.damping"], len(fp["train_indices"])
        (0.1, 16)
        >>> fp == fingerprint({"damping": 0.1}, train_indices=torch.arange(3))
        True
    """
    out: dict[str, Any] = {f"config.{k}": v for k, v in sorted(config.items())}
    out.update({k: None if v is None else _digest(v) for k, v in sorted(hashed.items())})
    return json.loads(json.dumps(out, default=str))


def _changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    names = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in names if old.get(k) != new.get(k)]


# ------------------------------------------------------------------------------------------- atomic writes
def _write_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` at ``path`` atomically (:func:`~lightning_influence._io.atomic_write`)."""
    atomic_write(path, lambda f: np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False))


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write(path, lambda f: json.dump(data, f, indent=1, sort_keys=True, default=str), binary=False)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _npy_header(path: Path) -> tuple[list[int], str] | None:
    """Shape and dtype of a ``.npy`` file (header only), ``None`` when it is missing or unreadable."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return list(arr.shape), str(arr.dtype)


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


# --------------------------------------------------------------------------------------------------- store
class ScoreStore:
    """One rank's view of a chunked, resumable score store (layout and fault model: the module docstring).

    Call :meth:`open` with the run's fingerprint first (it decides resume or restart), then :meth:`write_chunk`
    per finished chunk and :meth:`finish` at the end; :meth:`read_chunk` reads a completed chunk back.

    Args:
        directory: The store directory (created if needed; shared by all ranks).
        rank: This process's rank (it writes ``shard-<rank>-of-<world_size>/`` only; rank 0 also the top level).
        world_size: Number of ranks.
        on_mismatch: ``"restart"`` (default: warn naming what changed, discard the old chunks, start fresh) or
            ``"raise"`` (:class:`~lightning_influence.exceptions.ConfigurationError`) when the directory holds a
            store of another fingerprint.

    Raises:
        ConfigurationError: For a bad rank or ``on_mismatch``.

    Example::

        >>> import tempfile
        >>> store = ScoreStore(tempfile.mkdtemp(), rank=1, world_size=2)
        >>> store.shard_dir.name
        'shard-1-of-2'
    """

    def __init__(self, directory: str | os.PathLike[str], *, rank: int = 0, world_size: int = 1,
                 on_mismatch: Literal["restart", "raise"] = "restart") -> None:
        if not 0 <= rank < world_size:
            raise ConfigurationError(f"ScoreStore: rank={rank} must lie in [0, world_size={world_size}).")
        if on_mismatch not in ("restart", "raise"):
            raise ConfigurationError(f"ScoreStore: on_mismatch must be 'restart' or 'raise', got {on_mismatch!r}.")
        self.directory = Path(directory)
        self.rank, self.world_size, self.on_mismatch = rank, world_size, on_mismatch
        self.shard_dir = self.directory / f"shard-{rank}-of-{world_size}"
        self._manifest: dict[str, Any] = {}
        #: What :meth:`open` found: ``"new"``, ``"resumed"`` or ``"restarted"`` (with the changes in ``changes``).
        self.status = "new"
        self.changes: list[str] = []

    # ------------------------------------------------------------------------------------------ open
    def _check_foreign(self) -> None:
        if not self.directory.exists():
            return
        if not self.directory.is_dir():
            raise ConfigurationError(f"store directory {self.directory} is a file: pass a directory (store_dir=).")
        foreign = sorted(p.name for p in self.directory.iterdir()
                         if p.name not in _OWN_FILES and not _SHARD.match(p.name) and not p.name.endswith(".tmp"))
        top = _read_json(self.directory / MANIFEST)  # written atomically: absent, or whole
        if foreign or (top is not None and top.get("format") != FORMAT):
            what = f"it holds {foreign[:5]}" if foreign else "its manifest.json is not a score store's"
            raise ConfigurationError(
                f"store directory {self.directory} is not a lightning_influence score store ({what}); pass an "
                "empty or new directory as store_dir (nothing was written there)."
            )

    def open(self, fp: Mapping[str, Any], *, num_chunks: int, layout: Mapping[str, Any] | None = None) -> set[int]:
        """Compare ``fp`` with the store on disk; resume (return the valid complete chunks) or start fresh.

        Args:
            fp: This run's :func:`fingerprint` (identical on every rank).
            num_chunks: Number of chunks of the run.
            layout: Extra JSON recorded in the top-level manifest (sizes, dtype, chunk size).

        Returns:
            This rank's chunks that are complete on disk with all their files (empty for a fresh store).

        Raises:
            ConfigurationError: If the directory is not a score store, or holds another fingerprint's store with
                ``on_mismatch="raise"``.
            StoreError: If the directory cannot be written.
        """
        self._check_foreign()
        fp = json.loads(json.dumps(dict(fp), default=str))
        old = _read_json(self.shard_dir / MANIFEST)
        old_top = _read_json(self.directory / MANIFEST)
        previous = old["fingerprint"] if old is not None else (old_top or {}).get("fingerprint")
        self.changes = [] if previous is None else _changes(previous, fp)
        if self.changes and self.on_mismatch == "raise":
            raise ConfigurationError(
                f"store directory {self.directory} holds scores of another config (changed: "
                f"{'; '.join(self.changes)}); pass a new store_dir, or on_mismatch='restart' to discard them."
            )
        with self._errors("open"):
            self.directory.mkdir(parents=True, exist_ok=True)
            if self.changes or old is None:
                self._discard()
            self.shard_dir.mkdir(exist_ok=True)
            self._manifest = {"format": FORMAT, "fingerprint": fp, "rank": self.rank, "world_size": self.world_size,
                              "num_chunks": num_chunks, "chunks": {}}
            if old is not None and not self.changes:
                self._manifest["chunks"] = {c: e for c, e in old.get("chunks", {}).items() if self._valid(e)}
            _write_json(self.shard_dir / MANIFEST, self._manifest)
            if self.rank == 0:
                _write_json(self.directory / MANIFEST, {
                    "format": FORMAT, "fingerprint": fp, "world_size": self.world_size, "num_chunks": num_chunks,
                    "shards": [f"shard-{r}-of-{self.world_size}" for r in range(self.world_size)],
                    "complete": False, **dict(layout or {})})
        self.status = "restarted" if self.changes else ("resumed" if self._manifest["chunks"] else "new")
        if self.changes and self.rank == 0:
            warnings.warn(f"score store {self.directory} was written with another config (changed: "
                          f"{'; '.join(self.changes)}): starting fresh.", UserWarning, stacklevel=2)
        return {int(c) for c in self._manifest["chunks"]}

    def _valid(self, entry: Mapping[str, Any]) -> bool:
        """A chunk counts as complete only with every file present, of the recorded shape and dtype."""
        if not entry.get("complete"):
            return False
        for name, meta in entry.get("files", {}).items():
            if _npy_header(self.shard_dir / name) != (meta["shape"], meta["dtype"]):
                return False
        return True

    def _discard(self) -> None:
        """Remove this rank's shard and (rank 0) the assembled files, extras and shards of other world sizes."""
        for path in self.shard_dir.glob("*") if self.shard_dir.is_dir() else []:
            path.unlink()
        if self.rank != 0:
            return
        for path in (self.directory / "extras").glob("*.npy"):
            path.unlink()
        for path in self.directory.iterdir():
            m = _SHARD.match(path.name)
            if m and int(m.group(2)) != self.world_size:
                for p in path.glob("*"):
                    p.unlink()
                path.rmdir()
            elif path.name.endswith(".npy"):
                path.unlink()

    # ------------------------------------------------------------------------------------------ chunks
    def write_chunk(self, chunk: int, arrays: Mapping[str, Any], info: Mapping[str, Any] | None = None) -> None:
        """Write one finished chunk's arrays (``.npy``), then mark it complete in the shard manifest.

        Args:
            chunk: The chunk number.
            arrays: ``name -> array`` (tensors or NumPy), e.g. ``scores``, ``self_influence``, ``positions``.
            info: JSON-able details kept with the chunk (e.g. its self-influence solves).

        Raises:
            StoreError: If a write fails; the chunk is then not marked complete.
        """
        files = {}
        with self._errors(f"chunk {chunk}"):
            for name, value in arrays.items():
                arr = _as_numpy(value)
                fname = f"chunk-{chunk:06d}.{name}.npy"
                _write_npy(self.shard_dir / fname, arr)
                files[fname] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "array": name}
            self._manifest["chunks"][str(chunk)] = {"complete": True, "files": files, "info": dict(info or {})}
            _write_json(self.shard_dir / MANIFEST, self._manifest)

    def read_chunk(self, chunk: int) -> dict[str, Any]:
        """The arrays of a complete chunk (NumPy) and its ``"info"``.

        Returns:
            ``name -> array`` plus ``"info" -> dict``.
        """
        entry = self._manifest["chunks"][str(chunk)]
        out: dict[str, Any] = {meta["array"]: np.load(self.shard_dir / f, allow_pickle=False)
                               for f, meta in entry["files"].items()}
        out["info"] = entry.get("info", {})
        return out

    def finish(self, arrays: Mapping[str, Any]) -> None:
        """Rank 0: write the assembled arrays (``scores.npy`` ...) and flag the store complete; others: nothing.

        Raises:
            StoreError: If a write fails.
        """
        if self.rank != 0:
            return
        with self._errors("the assembled scores"):
            for name, value in arrays.items():
                _write_npy(self.directory / f"{name}.npy", _as_numpy(value))
            top = _read_json(self.directory / MANIFEST) or {}
            top.update(complete=True, arrays=sorted(arrays))
            _write_json(self.directory / MANIFEST, top)

    # ------------------------------------------------------------------------------------------ extras
    def save_array(self, name: str, array: Any) -> Path:
        """Save an opaque array (e.g. a curvature sketch) as ``extras/<name>.npy`` (atomic; rank 0 calls it).

        Call it after :meth:`open`: extras belong to the fingerprint and are discarded with the chunks when it changes.

        Returns:
            The file path.

        Raises:
            StoreError: If the write fails.
        """
        path = self.directory / "extras" / f"{name}.npy"
        with self._errors(f"extras/{name}"):
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_npy(path, _as_numpy(array))
        return path

    def load_array(self, name: str) -> np.ndarray | None:
        """An array saved with :meth:`save_array` (``None`` when absent).

        Returns:
            The array or ``None``.
        """
        path = self.directory / "extras" / f"{name}.npy"
        return np.load(path, allow_pickle=False) if path.exists() else None

    def _errors(self, what: str) -> _StoreErrors:
        return _StoreErrors(self.directory, what)


class _StoreErrors:
    """Turn an :class:`OSError` while writing into a :class:`StoreError` naming the directory and the fix."""

    def __init__(self, directory: Path, what: str) -> None:
        self.directory, self.what = directory, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: BaseException | None, tb: Any) -> Literal[False]:
        if isinstance(err, OSError) and not isinstance(err, StoreError):
            full = err.errno in (_errno.ENOSPC, getattr(_errno, "EDQUOT", -1))
            hint = "the disk is full: free space or" if full else "check permissions and space, or"
            exc = StoreError(f"could not write {self.what} of the score store in {self.directory} ({err}); {hint} "
                             "pass another store_dir. Chunks completed before this one stay valid and a re-run "
                             "resumes from them.")
            exc.errno = err.errno
            raise exc from err
        return False


# ----------------------------------------------------------------------------------------------- reading
def load_store(directory: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Assemble a store's arrays with NumPy only (from ``scores.npy`` ..., or from the shards if unfinished).

    Returns:
        ``name -> array``: ``scores`` ``(n_query, n_train)`` (NaN where no chunk is complete yet),
        ``self_influence`` and ``train_losses`` when stored, and ``positions_done`` (scored columns).

    Raises:
        FileNotFoundError: If ``directory`` holds no score store.

    Example::

        >>> import tempfile
        >>> s = ScoreStore(tempfile.mkdtemp()); _ = s.open({}, num_chunks=1)
        >>> s.write_chunk(0, {"scores": np.ones((1, 2)), "positions": np.array([1, 0])})
        >>> load_store(s.directory)["scores"].tolist()
        [[1.0, 1.0]]
    """
    root = Path(directory)
    top = _read_json(root / MANIFEST)
    if top is None or top.get("format") != FORMAT:
        raise FileNotFoundError(f"{root} holds no score store ({MANIFEST} of format {FORMAT}).")
    if top.get("complete"):
        return {name: np.load(root / f"{name}.npy", allow_pickle=False) for name in top.get("arrays", [])}
    parts: dict[str, list[np.ndarray]] = {}
    for shard in (root / s for s in top["shards"]):
        manifest = _read_json(shard / MANIFEST) or {"chunks": {}}
        for entry in manifest["chunks"].values():
            for f, meta in entry["files"].items():
                parts.setdefault(meta["array"], []).append(np.load(shard / f, allow_pickle=False))
    return _assemble(parts)


def _assemble(parts: Mapping[str, Iterable[np.ndarray]]) -> dict[str, np.ndarray]:
    pos = np.concatenate(list(parts.get("positions", [np.zeros(0, np.int64)]))).astype(np.int64)
    n = int(pos.max()) + 1 if pos.size else 0
    out: dict[str, np.ndarray] = {"positions_done": np.sort(pos)}
    for name, chunks in parts.items():
        if name == "positions":
            continue
        cat = np.concatenate(list(chunks), axis=-1)
        full = np.full((*cat.shape[:-1], n), math.nan, dtype=np.float64 if cat.dtype.kind != "f" else cat.dtype)
        full[..., pos] = cat
        out[name] = full
    return out
