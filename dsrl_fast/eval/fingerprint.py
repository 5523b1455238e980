"""A model's identity by content, the key of the evaluation cache: new weights written into the same directory are a
different model.

A local model directory is identified by the SHA-256 of its weight, config and tokenizer files (:data:`MODEL_FILES`,
the top level of the directory, symbolic links followed). Hashing reads every byte (0.35 GB/s measured on a busy
2-core machine: about 25 s for an 8 GB model there), so each file's digest is remembered in a sidecar JSON beside the
generations, under the file's resolved path with its size, mtime_ns, ctime_ns and inode: a file whose four are
unchanged is not read again. Any write into a file moves its mtime and ctime, and a file replaced by another (a new
checkpoint moved into place) has a new inode, so changed weights are always read again. A hub id (not a local
directory) is identified by the commit its files resolve to.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dsrl_fast.errors import UserError

__all__ = ["MODEL_FILES", "model_digest", "model_files"]

MODEL_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.msgpack", "*.h5", "*.index.json",
               "config.json", "generation_config.json", "tokenizer*", "vocab*", "merges.txt",
               "special_tokens_map.json", "added_tokens.json", "*.model", "*.tiktoken", "chat_template*")


def model_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The files of a model directory that decide its generations (:data:`MODEL_FILES`), sorted by name."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"directory must be a model directory, got {str(root)!r}")
    found = {p for pattern in MODEL_FILES for p in root.glob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.name)


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_sidecar(path: Path) -> dict[str, list]:
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # missing or damaged: every file is hashed again, nothing is trusted
    return known if isinstance(known, dict) else {}


def _write_sidecar(path: Path, known: dict[str, list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(known, indent=0, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _hub_digest(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    snapshot = Path(snapshot_download(repo_id, allow_patterns=["config.json"]))
    return f"hub:{repo_id}@{snapshot.name}"


def model_digest(path: str, sidecar: str | os.PathLike[str]) -> str:
    """"sha256:<hex>" over the (name, SHA-256) of every file of the model directory `path` (:func:`model_files`),
    reading only the files the `sidecar` JSON does not know unchanged (and recording them there); a hub id gives
    "hub:<id>@<commit>". Raises ValueError for a directory without any such file, UserError for a file written
    while it is read."""
    if not Path(path).is_dir():
        return _hub_digest(path)
    files = model_files(path)
    if not files:
        raise ValueError(f"model {path!r} holds none of the weight/config/tokenizer files {MODEL_FILES}")
    sidecar = Path(sidecar)
    known = _read_sidecar(sidecar)
    changed = False
    total = hashlib.sha256()
    for file in files:
        real = str(file.resolve())
        key = _stat_key(file)
        entry = known.get(real)
        if not (isinstance(entry, list) and len(entry) == 5 and entry[:4] == key):
            entry = [*key, _file_sha256(file)]
            if _stat_key(file) != key:  # written while being read: the digest may mix two versions
                raise UserError(f"model file {str(file)!r} changed while it was being read; evaluate it once it is "
                                "written")
            known[real] = entry
            changed = True
        total.update(f"{file.name}\0{entry[4]}\n".encode())
    if changed:
        _write_sidecar(sidecar, known)
    return "sha256:" + total.hexdigest()
