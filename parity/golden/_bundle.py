"""The golden bundle on disk: a directory of safetensors files and one manifest.json. Torch-free.

    DIR/manifest.json        format, model, dtype, seeds, versions, precision flags, the port plan
                             inputs, the layer calls, the output tree, and sha256 + size of every file
    DIR/weights.safetensors  the torch state_dict (torch names, torch layout; tied aliases stored once)
    DIR/run.safetensors      "<group>|<kind>|<path>": inputs, outputs, cotangents, input and parameter
                             gradients of the run ("main"), the float64 reference ("ref") and the
                             one-ulp-nudged float32 probe ("probe"); paths as parity.check names them
    DIR/layers.safetensors   (--layers) "<calls>|<i>|<kind>|<leaf>": every recorded module call's
                             inputs, outputs and their cotangents

Only json and safetensors are read: nothing is unpickled. A bundle is written into a temporary
directory beside DIR and renamed into place, the manifest last, so a half-written bundle is never
found at DIR; on reading, every file's size and sha256 must match the manifest before anything
is judged.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parity.errors import UsageError

FORMAT = "parity-golden/1"
MANIFEST = "manifest.json"
SEP = "|"


class BundleError(UsageError):
    """A bundle that is refused, never judged: missing, corrupt, truncated, hashes that do not match,
    another format, or recorded from a model that does not fit the twin (exit 2, one line)."""


class BundleTooLarge(BundleError):
    """Recording would write more than ``max_bytes`` of per-layer activations."""


def key(*parts) -> str:
    return SEP.join(str(p) for p in parts)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class BundleWriter:
    """Writes a bundle a file at a time, atomically: into a temporary directory beside ``path``,
    renamed into place by ``finish`` (the manifest, with every file's hash, written last); on an
    exception inside ``with`` the temporary directory is removed and nothing is left at ``path``.
    A file's tensors can be dropped once ``add`` returns: a recorder that writes the weights
    before its float64 run never holds both (parity.record's peak memory)."""

    def __init__(self, path: str | os.PathLike):
        self.dest = Path(path)
        if self.dest.exists():
            raise BundleError(f"{self.dest} exists; record into a new directory (a bundle is never overwritten)")
        parent = self.dest.parent if str(self.dest.parent) else Path(".")
        if not parent.is_dir():
            raise BundleError(f"{self.dest}: directory {str(parent)!r} does not exist")
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", suffix=".partial", dir=parent))
        os.chmod(self.tmp, 0o755)  # mkdtemp makes it private; a bundle is meant to be copied and shared
        self.listed: dict[str, dict] = {}

    def add(self, name: str, tensors: Mapping[str, np.ndarray]) -> None:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(self.tmp / name))
        self.listed[name] = {"bytes": (self.tmp / name).stat().st_size, "sha256": _sha256(self.tmp / name)}

    def stream(self, name: str) -> StreamedFile:
        """A safetensors file written a tensor at a time (``put``), listed when closed: what is
        put can be dropped at once (parity.record hands each gradient over as autograd makes it)."""
        return StreamedFile(self, name)

    def finish(self, manifest: dict) -> Path:
        (self.tmp / MANIFEST).write_text(json.dumps({**manifest, "format": FORMAT, "files": self.listed}, indent=1))
        os.rename(self.tmp, self.dest)
        return self.dest

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16",
              "uint32": "U32", "uint64": "U64"}


class StreamedFile:
    """One safetensors file of a BundleWriter, written as its tensors come: each ``put`` appends
    the tensor's bytes to a spill file beside it and keeps only its dtype and shape; ``close``
    writes the header and then the spilled bytes after it (a file copy, a block at a time), so
    the file's tensors are never all in memory at once. The same format as safetensors' own
    save_file (its reader checks that the offsets tile the data), in the order put."""

    def __init__(self, writer: BundleWriter, name: str):
        self.writer, self.name = writer, name
        self.spill = writer.tmp / (name + ".spill")
        self._f = open(self.spill, "wb")
        self.header: dict[str, dict] = {}
        self.size = 0

    def put(self, name: str, array: np.ndarray) -> None:
        if name in self.header:
            raise ValueError(f"{self.name}: {name!r} put twice")
        a = np.ascontiguousarray(array)  # as ``add`` stores it (a 0-d value as shape [1])
        if a.dtype.name not in _ST_DTYPES:
            raise TypeError(f"{self.name}: {name!r} has dtype {a.dtype}, which safetensors cannot hold")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        self._f.write(a.reshape(-1).view(np.uint8).data)  # bytes as stored (bfloat16 has no buffer format)
        self.header[name] = {"dtype": _ST_DTYPES[a.dtype.name], "shape": list(a.shape),
                             "data_offsets": [self.size, self.size + a.nbytes]}
        self.size += a.nbytes

    def update(self, tensors: Mapping[str, np.ndarray]) -> None:
        for k, v in tensors.items():
            self.put(k, v)

    def close(self) -> None:
        """Write the file (header, then the spilled bytes) and list it in the manifest."""
        self._f.close()
        head = json.dumps(self.header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors pads it
        path = self.writer.tmp / self.name
        digest = hashlib.sha256()
        with open(path, "wb") as out, open(self.spill, "rb") as src:
            for block in (len(head).to_bytes(8, "little"), head):
                out.write(block)
                digest.update(block)
            for block in iter(lambda: src.read(1 << 24), b""):
                out.write(block)
                digest.update(block)
        os.remove(self.spill)
        self.writer.listed[self.name] = {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def write_bundle(path: str | os.PathLike, manifest: dict, files: Mapping[str, Mapping[str, np.ndarray]]) -> Path:
    """Write ``files`` ({file name: {key: array}}) and the manifest (with their hashes) to ``path``,
    atomically (BundleWriter). ``path`` must not exist yet (a bundle is evidence: it is never
    overwritten in place)."""
    with BundleWriter(path) as w:
        for name, tensors in files.items():
            w.add(name, tensors)
        return w.finish(manifest)


class Recorded(Mapping):
    """Recorded tensors of one bundle file, read when asked and never kept: each access reads the
    tensor (safetensors' memory map, opened and closed around the read, so the file's pages do
    not stay in the process), and a consumer that drops what it has judged frees it for good.
    Keys: the file's keys under a prefix, renamed (parity.verify: by the judge's keys)."""

    def __init__(self, path: Path, keys: Mapping[str, str]):
        self.path, self._keys = path, dict(keys)  # {name as asked: key in the file}

    def __getitem__(self, name: str) -> np.ndarray:
        return _read(self.path, [self._keys[name]])[self._keys[name]]

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the file's header (nothing read)."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="numpy") as f:
            return tuple(f.get_slice(self._keys[name]).get_shape())

    def __contains__(self, name) -> bool:
        return name in self._keys

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _read(path: Path, keys) -> dict[str, np.ndarray]:
    """{key: array} of ``keys`` of one safetensors file, each tensor read on its own (never the
    whole file into memory beside its arrays, which doubled the peak of reading it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in keys}
    except Exception as exc:  # noqa: BLE001 -- hashed already; this is a safetensors bug or a race
        raise BundleError(f"{path}: not a readable safetensors file ({exc})") from None


@dataclass
class Bundle:
    """A bundle whose files were all found intact (``read_bundle``); tensors load on demand."""

    path: Path
    manifest: dict
    # Each tensor read once: verify asks for groups of run.safetensors several times, and every
    # read of it would be another copy of what was recorded.
    _loaded: dict = field(default_factory=dict, repr=False)
    _keys: dict = field(default_factory=dict, repr=False)

    def keys(self, name: str) -> list[str]:
        """The keys of file ``name`` ([] if the bundle has none), from its header alone."""
        from safetensors import safe_open

        if name not in self.manifest["files"]:
            return []
        if name not in self._keys:
            try:
                with safe_open(str(self.path / name), framework="numpy") as f:
                    self._keys[name] = list(f.keys())
            except Exception as exc:  # noqa: BLE001
                raise BundleError(f"{self.path / name}: not a readable safetensors file ({exc})") from None
        return self._keys[name]

    def tensors(self, name: str, keep: bool = True) -> dict[str, np.ndarray]:
        """{key: array} of file ``name`` ({} if the bundle has none), read once and kept unless
        ``keep`` is false (the weights: ported once, then dropped)."""
        return self._get(name, self.keys(name), keep)

    def group(self, name: str, *prefix) -> dict[str, np.ndarray]:
        """{rest of the key: array} of the keys of file ``name`` that start with ``prefix``, read
        once (only those keys) and kept."""
        head = key(*prefix) + SEP
        got = self._get(name, [k for k in self.keys(name) if k.startswith(head)], True)
        return {k[len(head):]: v for k, v in got.items()}

    def recorded(self, name: str, *prefix, rename=None) -> Recorded:
        """The keys of file ``name`` under ``prefix`` as a Recorded mapping (read when asked, never
        kept), named ``rename(rest of the key)`` (the rest itself by default; None leaves a key out)."""
        head = key(*prefix) + SEP
        names = {}
        for k in self.keys(name):
            if k.startswith(head):
                n = k[len(head):] if rename is None else rename(k[len(head):])
                if n is not None:
                    names[n] = k
        return Recorded(self.path / name, names)

    def _get(self, name: str, keys: list[str], keep: bool) -> dict[str, np.ndarray]:
        cache = self._loaded.setdefault(name, {})
        new = _read(self.path / name, [k for k in keys if k not in cache])
        if keep:
            cache.update(new)
        return {k: cache[k] if k in cache else new[k] for k in keys}


def read_bundle(path: str | os.PathLike) -> Bundle:
    """The bundle at ``path`` with every listed file checked against the manifest (size, then
    sha256); BundleError naming what is wrong otherwise."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: no bundle here (not a directory)")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root}: no {MANIFEST} (not a bundle, or a half-written one)")
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mpath}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{mpath}: format {got!r}, expected {FORMAT!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or "weights.safetensors" not in files or "run.safetensors" not in files:
        raise BundleError(f"{mpath}: the file list is missing weights.safetensors or run.safetensors")
    for name, info in files.items():
        f = root / name
        if Path(name).name != name:
            raise BundleError(f"{mpath}: file name {name!r} is not a plain name in the bundle")
        if not f.is_file():
            raise BundleError(f"{root}: {name} is listed in the manifest but missing")
        size = f.stat().st_size
        if size != info.get("bytes"):
            raise BundleError(f"{f}: {size} bytes, the manifest says {info.get('bytes')} (truncated or replaced)")
        digest = _sha256(f)
        if digest != info.get("sha256"):
            raise BundleError(f"{f}: sha256 {digest[:16]}... does not match the manifest's "
                              f"{str(info.get('sha256'))[:16]}... (corrupt or edited)")
    return Bundle(root, manifest)


# --- pytrees of arrays <-> JSON -----------------------------------------------------------------
def encode_tree(tree, root: str = "input") -> object:
    """A JSON description of a pytree of tuples, lists, dicts and None whose array leaves are
    replaced by their path as parity names it (``input[0]``, ``input[1]['ids']``: their key in
    run.safetensors); other scalars are kept as they are."""
    def enc(node, path):
        if isinstance(node, (tuple, list)):
            return {type(node).__name__: [enc(v, f"{path}[{i}]") for i, v in enumerate(node)]}
        if isinstance(node, dict):
            return {"dict": [[k, enc(v, f"{path}[{k!r}]")] for k, v in node.items()]}
        if node is None or isinstance(node, (bool, int, float, str)):
            return {"value": node}
        return {"leaf": path}

    return enc(tree, root)


def decode_tree(desc, leaves: Mapping[str, np.ndarray]):
    """The pytree ``encode_tree`` described, its leaves from ``leaves`` (by name)."""
    if "tuple" in desc:
        return tuple(decode_tree(d, leaves) for d in desc["tuple"])
    if "list" in desc:
        return [decode_tree(d, leaves) for d in desc["list"]]
    if "dict" in desc:
        return {k: decode_tree(d, leaves) for k, d in desc["dict"]}
    if "value" in desc:
        return desc["value"]
    name = desc["leaf"]
    if name not in leaves:
        raise BundleError(f"run.safetensors has no input {name!r} named by the manifest")
    return leaves[name]


__all__ = ["Bundle", "BundleError", "Recorded", "BundleWriter", "BundleTooLarge", "FORMAT", "StreamedFile", "decode_tree", "encode_tree", "key", "read_bundle",
           "write_bundle"]
