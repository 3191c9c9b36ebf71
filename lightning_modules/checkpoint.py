"""Checkpoint files that cannot mislead: written atomically with a SHA-256 of every tensor inside,
refused on load with one line when they are not whole.

* :class:`AtomicCheckpointIO` (the ``CheckpointIO`` plugin of ``attnres fit``) writes to a temporary
  file in the target's directory, ``fsync``s and renames it over the target, and stores
  ``attnres_checksums`` (``{"state_dict/model.embed.weight": sha256 hex, ...}``) in the checkpoint;
  its ``load_checkpoint`` (resume, ``validate/test/predict --ckpt_path``) verifies them.
* :func:`load_checkpoint` is the one loader of ``generate``, ``plot``, ``export`` and the start-up
  checks: not a file, not a checkpoint, truncated, or a tensor that no longer matches its checksum
  each raise :class:`CheckpointError` naming the file and what is wrong.

Why per-tensor SHA-256 stored inside the checkpoint rather than one hash of the file in a sidecar:
the checkpoint stays one self-contained file (copying ``last.ckpt`` elsewhere keeps its check, and
there is no pair of files whose two renames a crash could split), the error names the damaged tensor,
and tensors are nearly all of the bytes. A truncated file loses the zip's central directory (it is
written last) and fails ``torch.load``; corrupted pickled metadata fails to unpickle; corrupted tensor
bytes, which ``torch.load`` accepts (PyTorch does not check the zip's CRC-32 on read), fail their
checksum. SHA-256 runs at ~1.7 GB/s on one core here (OpenSSL): ~0.3 s for a 0.5 GB checkpoint, small
beside writing and ``fsync``ing it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

CHECKSUM_KEY = "attnres_checksums"
# the temporary files of an atomic save: ".<target name>.<random>.tmp" beside the target
TMP_PREFIX, TMP_SUFFIX = ".", ".tmp"


class CheckpointError(ValueError):
    """A checkpoint file that is not a whole PyTorch checkpoint (one line: the file and the cause)."""


def tensor_checksums(checkpoint: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of every tensor in ``checkpoint`` (nested dicts, lists and tuples), keyed by its path
    (``"state_dict/model.embed.weight"``, ``"optimizer_states/0/state/3/exp_avg"``). The digest
    covers dtype, shape and the bytes in row-major order (a GPU tensor is copied to the host)."""
    return {path: _digest(t) for path, t in _tensors(checkpoint, "") if path != CHECKSUM_KEY}


def _tensors(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if prefix == "" and k == CHECKSUM_KEY:
                continue
            yield from _tensors(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def _digest(t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        h.update(memoryview(data.numpy()))
    return h.hexdigest()


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a checkpoint whose tensors are checked against the
    checksums written at save (checkpoints written without them are loaded unchecked). The checksums
    are removed from the returned dict.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        CheckpointError: not a PyTorch checkpoint, truncated, or corrupted (names the tensor).
    """
    path = Path(path)
    if not path.is_file():
        what = "a directory (a sharded checkpoint? give its file)" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"checkpoint {path}: {what}; training writes <run dir>/checkpoints/last.ckpt")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive ("PK\x03\x04"); before PyTorch 1.6, a pickle (protocol 2: "\x80\x02")
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise CheckpointError(
            f"checkpoint {path} is not a PyTorch checkpoint (it starts with {head!r}); give a .ckpt file "
            "written by attnres fit (<run dir>/checkpoints/last.ckpt)"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        text = str(exc).strip()
        cause = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupted or truncated ({cause[:200]}); use an earlier checkpoint"
        ) from exc
    verify_checksums(checkpoint, path)
    return checkpoint


def verify_checksums(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """Compare the tensors of a loaded checkpoint with the checksums written at save (and pop them);
    a checkpoint without checksums passes."""
    expected = checkpoint.pop(CHECKSUM_KEY, None) if isinstance(checkpoint, dict) else None
    if expected is None:
        return
    found = tensor_checksums(checkpoint)
    missing = sorted(set(expected) - set(found))
    bad = [k for k in expected if k in found and found[k] != expected[k]]
    if missing or bad:
        what = f"tensor {bad[0]} does not match its checksum" if bad else f"tensor {missing[0]} is missing"
        n = len(bad) + len(missing)
        raise CheckpointError(
            f"checkpoint {path} is corrupted or truncated ({what}"
            f"{f', {n - 1} more' if n > 1 else ''}); use an earlier checkpoint"
        )


def stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Temporary files of :class:`AtomicCheckpointIO` saves that never finished (a kill mid-save)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob(f"{TMP_PREFIX}*.ckpt.*{TMP_SUFFIX}") if p.is_file())


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the target's directory, ``fsync``, then ``os.replace``:
    a crash or a full disk mid-write leaves the previous ``last.ckpt`` whole (and a temporary file that
    the next ``attnres fit`` removes). Every tensor's SHA-256 goes into the checkpoint
    (:func:`tensor_checksums`); :meth:`load_checkpoint` verifies them."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        checkpoint = {**checkpoint, CHECKSUM_KEY: tensor_checksums(checkpoint)}
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote: no rename semantics
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.", suffix=TMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a normal file's mode
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only)
        if weights_only is False:  # a caller that needs arbitrary objects: loaded as asked, still checked
            checkpoint = super().load_checkpoint(path, map_location, weights_only)
            verify_checksums(checkpoint, path)
            return checkpoint
        return load_checkpoint(path, map_location=map_location or (lambda storage, loc: storage))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
