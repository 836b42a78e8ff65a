"""A streaming safetensors writer: the header is computed up front from (name, dtype, shape), then
each tensor is produced and written one at a time, so the peak extra memory is about the largest
tensor (two while a background thread writes one and the next is being computed) plus the header.

The file is written to a hidden temporary file in the destination folder and only linked / renamed
to its final name when complete and flushed to disk; on any error, Cancel included, the temporary
file is removed and nothing appears under the final name.  An existing file is never overwritten.

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, N bytes
of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``
padded with spaces to a multiple of 8, then the tensors' bytes (little-endian, C order).
"""
from __future__ import annotations

import json
import math
import os
import queue
import struct
import sys
import threading
import uuid
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

DTYPE_CODES: Dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = _code
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}

TMP_SUFFIX = ".mergelab-tmp"
_MAX_HEADER = 100_000_000          # the safetensors library refuses larger headers (MAX_HEADER_SIZE in its tensor.rs)


class SafetensorsFormatError(ValueError):
    pass


@dataclass
class TensorPlan:
    """One tensor of the file to write: its name, dtype, shape and how to compute it."""

    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dtype_code(dtype: torch.dtype) -> str:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise SafetensorsFormatError(f"safetensors cannot store dtype {dtype}") from None


def build_header(plans: Sequence[TensorPlan], metadata: Optional[Dict[str, str]] = None, slack: int = 0) -> bytes:
    """The padded JSON header (without the 8-byte length) for ``plans`` written in order; ``slack``
    more spaces at its end leave room for :func:`rewrite_metadata`."""
    header: Dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise SafetensorsFormatError(f"metadata keys and values must be strings: {bad[:5]}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for p in plans:
        if p.name == "__metadata__" or p.name in header:
            raise SafetensorsFormatError(f"duplicate or reserved tensor name {p.name!r}")
        n = p.nbytes
        header[p.name] = {"dtype": dtype_code(p.dtype), "shape": [int(s) for s in p.shape],
                          "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b" " * slack
    raw += b" " * (-len(raw) % 8)
    if len(raw) > _MAX_HEADER:
        raise SafetensorsFormatError(f"the header would be {len(raw)} bytes; safetensors allows at most "
                                     f"{_MAX_HEADER} (metadata too large?)")
    return raw


def file_size(plans: Sequence[TensorPlan], metadata: Optional[Dict[str, str]] = None, slack: int = 0) -> int:
    return 8 + len(build_header(plans, metadata, slack)) + sum(p.nbytes for p in plans)


def rewrite_metadata(path: str, plans: Sequence[TensorPlan], metadata: Optional[Dict[str, str]],
                     fsync: bool = True) -> bool:
    """Replace the metadata of a file :func:`write_file` wrote from ``plans``, in place, when the new
    header fits in the old one's length (the rest is space padding, which the format allows); False
    (file unchanged) when it does not fit."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = build_header(plans, metadata)
        if len(header) > n:
            return False
        f.seek(8)
        f.write(header + b" " * (n - len(header)))
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return True


def tensor_bytes(t: torch.Tensor):
    """A buffer over ``t``'s bytes (CPU, contiguous), without copying when possible."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return b""
    flat = t.reshape(-1).view(torch.uint8)
    if sys.byteorder != "little" and t.element_size() > 1:   # pragma: no cover - big-endian hosts
        flat = t.reshape(-1).numpy().byteswap().view("uint8")
        return flat
    return flat.numpy()


def temp_path_for(final_path: str) -> str:
    d, base = os.path.split(os.path.abspath(final_path))
    return os.path.join(d, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def cleanup_stale_temps(folder: str) -> List[str]:
    """Remove temporary files that a save killed outright (power cut, kill -9) left in ``folder``:
    ours are named ``.<name>.<pid>.<random>.mergelab-tmp``; only those of processes that no longer
    run are removed.  Returns the removed paths."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for n in names:
        if not (n.startswith(".") and n.endswith(TMP_SUFFIX)):
            continue
        parts = n[: -len(TMP_SUFFIX)].rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            os.unlink(os.path.join(folder, n))
            removed.append(os.path.join(folder, n))
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name != "posix":
        return True          # cannot tell cheaply: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def commit_no_clobber(tmp: str, final: str) -> None:
    """Give ``tmp`` the name ``final`` atomically; raises FileExistsError if ``final`` exists (it is
    never overwritten).  Uses a hard link where the file system has them, else a checked os.replace."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError:       # no hard links here (some network / FAT file systems)
        if os.path.lexists(final):
            raise FileExistsError(final) from None
        os.replace(tmp, final)
        return
    os.unlink(tmp)


def _fsync_dir(path: str) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _writeback_starter():
    """``start(fd, offset, nbytes)``: ask the kernel to start writing a range to disk now, without
    waiting (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so the final fsync has little left to
    do; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
        fn.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None

    def start(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, 2)      # SYNC_FILE_RANGE_WRITE; errors are left to the final fsync
    return start


_WRITEBACK_STEP = 64 << 20


class _Sink:
    """Writes buffers to the file, starting the disk write-back of every 64 MB as it goes."""

    def __init__(self, f, writeback: bool):
        self.f = f
        self.start = _writeback_starter() if writeback else None
        self.synced = 0
        self.pos = f.tell()

    def write(self, buf) -> None:
        self.f.write(buf)
        self.pos += len(buf) if isinstance(buf, (bytes, bytearray)) else buf.nbytes
        if self.start is not None and self.pos - self.synced >= _WRITEBACK_STEP:
            self.f.flush()
            self.start(self.f.fileno(), self.synced, self.pos - self.synced)
            self.synced = self.pos


class _BackgroundWriter:
    """Writes buffers to a file in a thread so the next tensor is computed while one is written."""

    def __init__(self, sink: _Sink, depth: int):
        self.sink = sink
        self.q: "queue.Queue" = queue.Queue(maxsize=max(1, depth))
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="mergelab-safetensors-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                self.sink.write(item)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                self.error = e

    def put(self, buf) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(buf)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def write_file(final_path: str, plans: Sequence[TensorPlan], metadata: Optional[Dict[str, str]] = None, *,
               on_tensor: Optional[Callable[[int, int, TensorPlan], None]] = None,
               threaded: bool = True, fsync: bool = True,
               commit: Optional[Callable[[str], str]] = None, header_slack: int = 0) -> str:
    """Write ``plans`` to ``final_path`` (streaming, atomic, never overwriting).

    ``on_tensor(i, total, plan)`` is called after each tensor is handed to the writer (progress and
    Cancel: let it raise to abort).  ``commit(tmp_path) -> final path`` replaces the default
    no-clobber commit (e.g. to pick another file name when the first one was taken meanwhile).
    Returns the final path.  Each produced tensor must have exactly the planned dtype and shape.
    ``header_slack``: spaces left in the header for a commit that rewrites the metadata.
    """
    header = build_header(plans, metadata, header_slack)
    folder = os.path.dirname(os.path.abspath(final_path))
    os.makedirs(folder, exist_ok=True)
    tmp = temp_path_for(final_path)
    total = len(plans)
    committed = False
    try:
        with open(tmp, "xb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            sink = _Sink(f, writeback=fsync)
            writer = _BackgroundWriter(sink, depth=1) if threaded else None
            try:
                for i, p in enumerate(plans):
                    t = p.produce()
                    if not isinstance(t, torch.Tensor):
                        raise SafetensorsFormatError(f"{p.name}: produced {type(t).__name__}, not a tensor")
                    if t.dtype != p.dtype or tuple(t.shape) != tuple(p.shape):
                        raise SafetensorsFormatError(
                            f"{p.name}: produced {t.dtype} {tuple(t.shape)}, planned {p.dtype} {tuple(p.shape)}")
                    buf = tensor_bytes(t)
                    del t
                    if writer is not None:
                        writer.put(buf)
                    else:
                        sink.write(buf)
                    del buf
                    if on_tensor is not None:
                        on_tensor(i + 1, total, p)
            finally:
                if writer is not None:
                    writer.close()
            f.flush()
            if fsync:
                os.fsync(f.fileno())
            expected = 8 + len(header) + sum(p.nbytes for p in plans)
            if f.tell() != expected:
                raise SafetensorsFormatError(f"wrote {f.tell()} bytes, expected {expected}")
        if commit is not None:
            final_path = commit(tmp)
        else:
            commit_no_clobber(tmp, final_path)
        committed = True
        if fsync:
            _fsync_dir(folder)
        return final_path
    finally:
        if not committed:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def read_header(path: str) -> Tuple[Dict[str, dict], Dict[str, str]]:
    """``(tensors, metadata)`` from a safetensors file's header, checking that the file is complete."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsFormatError(f"{path}: not a safetensors file (too short)")
        n = struct.unpack("<Q", raw)[0]
        if n > min(size - 8, _MAX_HEADER):
            raise SafetensorsFormatError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise SafetensorsFormatError(f"{path}: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path}: not a safetensors file (header is not an object)")
    meta = header.pop("__metadata__", None) or {}
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end != size:
        raise SafetensorsFormatError(f"{path}: truncated or corrupt ({size} bytes, header says {8 + n + end})")
    return header, meta


def read_metadata(path: str) -> Dict[str, str]:
    return read_header(path)[1]
