"""Read and write safetensors checkpoints one tensor at a time: memory-mapped reads, resumable sharded writes.

Reads never hold more than the tensor asked for: the file is memory-mapped, the tensor copied out, and the
mapped pages dropped again. Writes plan every shard's header up front, so a killed merge resumes per tensor.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from fuse.io import read_json, write_json_atomic

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
PAGE = mmap.PAGESIZE


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as safetensors weights."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one .safetensors file, from its JSON header (nothing else is read)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        infos[name] = TensorInfo(
            name, path, DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + length + start, 8 + length + end
        )
    return infos


def weight_files(directory: Path) -> list[Path]:
    """The .safetensors files of a checkpoint folder: those its index names, or every one there is."""
    index = directory / INDEX_NAME
    if index.is_file():
        return [directory / name for name in sorted(set(read_json(index)["weight_map"].values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no .safetensors weights (and no {INDEX_NAME})")
    return files


class CheckpointReader:
    """A checkpoint folder's tensors by name, read through memory maps one tensor at a time."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.tensors: dict[str, TensorInfo] = {}
        for path in weight_files(self.directory):
            if not path.is_file():
                raise CheckpointError(
                    f"{self.directory / INDEX_NAME} names {path.name}, which does not exist"
                )
            self.tensors.update(read_header(path))
        self._maps: dict[Path, mmap.mmap] = {}

    def _map(self, path: Path) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as handle:
                self._maps[path] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[path]

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A private copy of tensor `name` (converted to `dtype`); the mapped pages are released afterwards."""
        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=dtype or info.dtype)
        return self.read_into(name, out)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Copy tensor `name` (or its first out.shape[0] rows) into `out`, converting the dtype on the way."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return out
        mapped = self._map(info.file)
        view = torch.frombuffer(memoryview(mapped)[info.start : info.end], dtype=torch.uint8)
        tensor = view.view(info.dtype).reshape(info.shape)
        out.copy_(tensor if tuple(out.shape) == info.shape else tensor[: out.shape[0]])
        del view, tensor
        # Drop the pages we touched from this process: the page cache keeps them, our RSS does not.
        aligned = info.start - info.start % PAGE
        mapped.madvise(mmap.MADV_DONTNEED, aligned, info.end - aligned)
        return out

    def close(self) -> None:
        for mapped in self._maps.values():
            with contextlib.suppress(BufferError):  # a tensor view still alive; the map goes with the reader
                mapped.close()
        self._maps.clear()


# --------------------------------------------------------------------------------------------- writing


def parse_size(text: str | int) -> int:
    """'2GB' / '500MB' / '5GiB' / 123 -> bytes."""
    if isinstance(text, int):
        return text
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    value = text.strip().upper()
    number = value.rstrip("KMGTIB")
    unit = value[len(number) :]
    if unit not in units or not number:
        raise ValueError(f"size {text!r}: use e.g. 2GB, 500MB, 5GiB")
    return int(float(number) * units[unit])


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(tensors: list[OutTensor], max_shard_size: int) -> list[list[OutTensor]]:
    """Tensors in order into shards of at most `max_shard_size` bytes (a larger tensor gets a shard alone)."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards if shards[0] else []


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def safetensors_header(tensors: list[OutTensor], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """The header bytes of a shard and each tensor's absolute data offset."""
    entries: dict[str, object] = {"__metadata__": metadata}
    offset, relative = 0, {}
    for tensor in tensors:
        entries[tensor.name] = {
            "dtype": DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        relative[tensor.name] = offset
        offset += tensor.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # data starts 8-byte aligned, as safetensors writes it
    prefix = struct.pack("<Q", len(header)) + header
    return prefix, {name: len(prefix) + start for name, start in relative.items()}


class ShardWriter:
    """Writes one planned shard tensor by tensor into `<name>.partial`, logging each finished tensor in a
    sidecar so that a killed merge resumes after the last tensor that reached the disk."""

    def __init__(self, directory: Path, filename: str, tensors: list[OutTensor]) -> None:
        self.final = directory / filename
        self.partial = directory / f"{filename}.partial"
        self.log = directory / f"{filename}.done-tensors"
        self.tensors = {t.name: t for t in tensors}
        header, self.offsets = safetensors_header(tensors, {"format": "pt"})
        total = len(header) + sum(t.nbytes for t in tensors)
        fresh = not (self.partial.is_file() and self.log.is_file())
        if fresh:
            self.log.unlink(missing_ok=True)
            with open(self.partial, "wb") as handle:
                handle.write(header)
                handle.truncate(total)
        self.handle = open(self.partial, "r+b")  # noqa: SIM115 — closed in finish()/close()
        self.done = set() if fresh else set(self.log.read_text(encoding="utf-8").splitlines())

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.tensors[name]
        if tensor.dtype != expected.dtype or tuple(tensor.shape) != expected.shape:
            raise RuntimeError(f"{name}: produced {tensor.dtype} {tuple(tensor.shape)}, planned {expected}")
        self.handle.seek(self.offsets[name])
        self.handle.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
        self.handle.flush()
        os.fsync(self.handle.fileno())  # the data before the record that vouches for it
        with open(self.log, "a", encoding="utf-8") as log:
            log.write(name + "\n")
            log.flush()
            os.fsync(log.fileno())
        self.done.add(name)

    def finish(self) -> None:
        missing = set(self.tensors) - self.done
        if missing:
            raise RuntimeError(f"{self.final.name}: tensors never written: {sorted(missing)[:5]}")
        self.handle.close()
        os.replace(self.partial, self.final)
        self.log.unlink(missing_ok=True)

    def close(self) -> None:
        self.handle.close()


def write_index(directory: Path, shards: list[list[OutTensor]]) -> None:
    names = shard_names(len(shards))
    if len(shards) <= 1:
        return
    weight_map = {t.name: names[i] for i, shard in enumerate(shards) for t in shard}
    total = sum(t.nbytes for shard in shards for t in shard)
    write_json_atomic(directory / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
