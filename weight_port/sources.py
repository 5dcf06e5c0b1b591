"""Checkpoint sources: a torch module, a state_dict, .safetensors, .pt/.pth, sharded *.index.json.

Every source becomes a read-only Mapping[str, tensor] in torch layout. File sources are lazy:
a tensor is read when the port asks for it and can be freed as soon as it is converted, so
peak memory is one tensor plus the output, not the whole checkpoint twice.
"""
from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path

try:
    import torch
except ImportError:  # a Flax-only machine (parity verify): only the torch-side paths need torch
    torch = None

from weight_port.errors import CheckpointError, UnsafeCheckpointError



class SafetensorsState(Mapping):
    """Lazy mapping over one .safetensors file (safe_open: header parsed once, one tensor per get).

    Opened with framework="pt" so bfloat16 arrives as a torch bfloat16 tensor (numpy has no
    bfloat16), never through float32.
    """

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        try:
            # Check the declared extent against the file size first, so a file cut short (an
            # interrupted download) is reported as exactly that rather than a header error.
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if 8 + n > size:
                    raise CheckpointError(self.path, f"truncated: header of {n} bytes, file has {size}")
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end > size:
                raise CheckpointError(self.path, f"truncated: header declares {8 + n + end} bytes, file has {size}")
            self._file = safe_open(str(self.path), framework="pt", device="cpu")
            self._keys = list(self._file.keys())
        except CheckpointError:
            raise
        except Exception as exc:  # SafetensorError, JSON errors, OSError on odd files
            raise CheckpointError(self.path, f"not a readable safetensors file ({type(exc).__name__}: {exc})") from exc

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        try:
            return self._file.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(self.path, f"tensor {key!r} unreadable ({exc})") from exc

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._keys


def load_pt(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A .pt/.pth state_dict, always with weights_only=True (plain unpickling can run code).

    Memory-mapped when the file is in torch's zip format, so tensors are paged in on use.
    A file that needs arbitrary objects raises UnsafeCheckpointError naming it; a {"state_dict":
    ...} or {"model": ...} wrapper is unwrapped.
    """
    path = Path(path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc):  # torch names the class it refused; anything else is damage
            raise CheckpointError(path, _not_a_checkpoint(path, exc)) from exc
        raise UnsafeCheckpointError(
            path, "it needs unpickling of arbitrary objects, refused (weights_only=True); "
            "re-save it as a state_dict (torch.save(model.state_dict(), ...)) or as .safetensors"
        ) from exc
    except Exception as exc:  # RuntimeError (zip), OSError (Errno 22 on a cut zip), EOF, KeyError
        raise CheckpointError(path, _not_a_checkpoint(path, exc)) from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(path, f"expected a state_dict of tensors, found {type(obj).__name__}")
    return dict(obj)


def _not_a_checkpoint(path: Path, exc: BaseException) -> str:
    """Why a .pt file did not load, in words: torch's own messages (``OSError: [Errno 22]``,
    ``KeyError: 101``, "internal miniz error") do not say that the file is the problem."""
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    detail = (str(exc).splitlines() or [""])[0][:100]
    what = ("not a complete torch checkpoint: torch.save's zip archive is truncated or corrupt"
            if zipped else "not a valid torch checkpoint: neither torch.save's zip format nor its legacy "
            "pickle format (empty, truncated, or another kind of file)")
    return f"{what} ({type(exc).__name__}: {detail})"


class ShardedState(Mapping):
    """Lazy mapping over a sharded checkpoint: ``*.index.json`` {"weight_map": {key: shard}}."""

    def __init__(self, index: str | os.PathLike):
        self.path = Path(index)
        try:
            self._map = dict(json.loads(self.path.read_text())["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(self.path, f"not a shard index with a weight_map ({exc})") from exc
        self._shards: dict[str, Mapping] = {}
        for shard in dict.fromkeys(self._map.values()):
            if not (self.path.parent / shard).is_file():
                raise CheckpointError(self.path, f"shard {shard} is missing")

    def _shard(self, name: str) -> Mapping:
        if name not in self._shards:
            self._shards[name] = load_state(self.path.parent / name)
        return self._shards[name]

    def shards(self) -> dict[str, list[str]]:
        """Shard file name -> the keys it holds, shards in the index's order of first mention."""
        out: dict[str, list[str]] = {}
        for key, shard in self._map.items():
            out.setdefault(shard, []).append(key)
        return out

    def shard_of(self, key: str) -> str:
        return self._map[key]

    def release(self, name: str) -> None:
        """Close shard ``name`` (drops its memory map / loaded tensors); reopened on next use.

        A streaming port calls this after each shard so at most one shard is mapped at a time.
        """
        self._shards.pop(name, None)

    def __getitem__(self, key: str):
        return self._shard(self._map[key])[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return shape_of(self._shard(self._map[key]), key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, key) -> bool:
        return key in self._map


def load_state(source) -> Mapping[str, torch.Tensor]:
    """Any supported source -> a Mapping of torch-layout tensors (lazy for files).

    A directory is searched for model.safetensors.index.json, model.safetensors,
    pytorch_model.bin.index.json, pytorch_model.bin, in that order, then for a single
    *.index.json, *.safetensors, *.pt, *.pth or *.bin file.
    """
    if isinstance(source, torch.nn.Module):
        return source.state_dict()
    if isinstance(source, Mapping):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"unsupported port source {type(source).__name__}; pass a torch module, "
                        "a state_dict or a checkpoint path")
    path = Path(source)
    if path.is_dir():
        for name in ("model.safetensors.index.json", "model.safetensors",
                     "pytorch_model.bin.index.json", "pytorch_model.bin"):
            if (path / name).is_file():
                return load_state(path / name)
        for pattern in ("*.index.json", "*.safetensors", "*.pt", "*.pth", "*.bin"):
            found = sorted(path.glob(pattern))
            if len(found) == 1:
                return load_state(found[0])
            if len(found) > 1:
                raise CheckpointError(path, f"ambiguous: several {pattern} files "
                                      f"({', '.join(f.name for f in found[:4])}); pass one")
        raise FileNotFoundError(f"no checkpoint file in directory {path}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.name.endswith(".index.json"):
        return ShardedState(path)
    if path.suffix == ".safetensors":
        return SafetensorsState(path)
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return load_pt(path)
    raise CheckpointError(path, "unknown checkpoint kind (expected .safetensors, .pt, .pth, .bin "
                          "or *.index.json)")


def shape_of(state: Mapping, key: str) -> tuple[int, ...]:
    """A tensor's shape without reading its data where the source allows it."""
    if hasattr(state, "shape") and not isinstance(state, dict):
        return state.shape(key)
    return tuple(state[key].shape)


__all__ = ["SafetensorsState", "ShardedState", "load_pt", "load_state", "shape_of"]
