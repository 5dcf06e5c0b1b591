"""The name rule: torch module path -> Flax module path.

torch registers list children under their index ("down.0.conv1"); a Flax ``setup`` that assigns a
list names them ``down_0``, ``down_1`` (nested lists ``a_0_1``). So digits join the previous
component with "_" and every other dot becomes a path separator.
"""
from __future__ import annotations


def torch_to_flax_path(torch_path: str) -> tuple[str, ...]:
    """'down.0.conv1' -> ('down_0', 'conv1'); '' (the root module) -> ()."""
    parts: list[str] = []
    for part in torch_path.split(".") if torch_path else []:
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    return tuple(parts)


def flax_path_str(path: tuple[str, ...]) -> str:
    return "/".join(path) or "<root>"
