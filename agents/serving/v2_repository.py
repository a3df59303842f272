"""The v2 model repository layout the agent writes for Triton and KServe (docs/serving.md).

    <repository>/<model>/
      config.pbtxt              Triton's model configuration: the operator's, never touched
      <n>/                      one folder per version laid out, n = 1, 2, 3, … never reused
        <entry> -> <agent's version folder>/<entry>     a symlink per top-level entry
        <entry> -> <template>/<entry>                   and per entry of the template folder
      fabric-versions.json      {"format": 1, "next": 4, "versions": {"2": "v7", "3": "v8"}}

A version folder is built under `.<n>.staging` and appears by rename, so a server
scanning the repository sees it complete or not at all (Triton and the KServe model
both ignore names that are not numbers). The number grows with every layout, even of
a version laid out before: a server that caches by path (Triton keeps a loaded version
whose folder did not change) never mistakes one layout for another. The index maps
each number to the Fabric version it holds; it is rewritten with a temp file and a
rename, and is the only place a Fabric version name is recorded, so the KServe model
(agents/serving/kserve_model.py) reports the name and the adapter maps Triton's
numeric `model_version` back to it.

Everything here is blocking file I/O: coroutines call it in a thread.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

INDEX = "fabric-versions.json"
FORMAT = 1


@dataclass
class Index:
    next: int = 1
    versions: dict[int, str] = field(default_factory=dict)  # laid-out number -> Fabric version

    def to_json(self) -> dict:
        return {"format": FORMAT, "next": self.next,
                "versions": {str(n): v for n, v in sorted(self.versions.items())}}


def read_index(model_dir: Path) -> Index:
    """The index, or an empty one when absent; numbers already on disk are never reused."""
    index = Index()
    try:
        raw = json.loads((model_dir / INDEX).read_text())
        index.next = int(raw.get("next", 1))
        index.versions = {int(n): str(v) for n, v in dict(raw.get("versions", {})).items()}
    except FileNotFoundError:
        pass
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{model_dir / INDEX} is not a Fabric version index: {e}") from e
    index.next = max([index.next, *(n + 1 for n in numbers(model_dir))])
    return index


def write_index(model_dir: Path, index: Index) -> None:
    tmp = model_dir / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index.to_json(), indent=1) + "\n")
    os.replace(tmp, model_dir / INDEX)


def numbers(model_dir: Path) -> list[int]:
    """The numeric version folders present, ascending."""
    try:
        names = os.listdir(model_dir)
    except FileNotFoundError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and (model_dir / n).is_dir())


def newest(model_dir: Path) -> tuple[int, Path, str] | None:
    """(number, folder, Fabric version) of the highest version folder, the one a server loads."""
    found = numbers(model_dir)
    if not found:
        return None
    n = found[-1]
    return n, model_dir / str(n), read_index(model_dir).versions.get(n, str(n))


def lay_out(model_dir: Path, version: str, folder: Path, template: Path | None = None) -> int:
    """Lay `folder` (an agent's version folder) out as the next numbered version; its number.

    Raises FileNotFoundError / NotADirectoryError / PermissionError when `folder` cannot be read.
    """
    entries = sorted(os.listdir(folder))  # raises when the folder is missing or unreadable
    model_dir.mkdir(parents=True, exist_ok=True)
    index = read_index(model_dir)
    n = index.next
    staging = model_dir / f".{n}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name in entries:
        os.symlink(Path(folder).resolve() / name, staging / name)
    for name in sorted(os.listdir(template)) if template else []:
        if not (staging / name).exists():
            os.symlink(Path(template).resolve() / name, staging / name)
    os.rename(staging, model_dir / str(n))
    index.next, index.versions[n] = n + 1, version
    write_index(model_dir, index)
    return n


def find(model_dir: Path, version: str, folder: Path | None = None) -> int | None:
    """The newest number holding `version` (laid out from `folder`, when given), if still on disk."""
    index = read_index(model_dir)
    for n in reversed(numbers(model_dir)):
        if index.versions.get(n) != version:
            continue
        if folder is None or _links_to(model_dir / str(n), Path(folder)):
            return n
    return None


def _links_to(version_dir: Path, folder: Path) -> bool:
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    target = folder.resolve()
    return all(os.path.islink(version_dir / name) and Path(os.readlink(version_dir / name)).parent == target
               for name in names)


def keep_only(model_dir: Path, keep: set[int]) -> list[int]:
    """Remove every numbered version folder not in `keep` (only the links: the agent owns the files)."""
    if not model_dir.is_dir():
        return []
    index = read_index(model_dir)
    removed = [n for n in numbers(model_dir) if n not in keep]
    for n in removed:
        shutil.rmtree(model_dir / str(n), ignore_errors=True)
        index.versions.pop(n, None)
    write_index(model_dir, index)
    return removed
