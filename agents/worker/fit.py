"""Which of a version's tensors a torch module takes, and whether they fit it.

`ModuleTensors(module)` reads the module once (docs/hotload.md "Module tensors" is the
specification):

* its *targets*: `state_dict()`'s entries, what a load writes;
* its non-persistent buffers (`register_buffer(..., persistent=False)`): the module
  computes them, so a version need not hold them and one that does is not foreign; such
  a tensor is not loaded (as `load_state_dict` and transformers' `from_pretrained` do);
* its tied tensors: names sharing one storage, and the pairs a transformers model
  declares tied (`all_tied_weights_keys`, or a `_tied_weights_keys` dict): one storage is
  loaded once, from whichever name the version holds;
* the model class's own lists of keys to ignore, read off the module and each submodule
  with getattr (Fabric imports nothing of transformers): `_keys_to_ignore_on_load_unexpected`
  (regular expressions: version tensors the module does without),
  `_keys_to_ignore_on_load_missing` (regular expressions) and `_keys_to_ignore_on_save`
  (names): module tensors a version may lack.

`match(manifest, strict)` maps each module tensor to the version's entry that loads it
and lists every misfit (a missing weight, a wrong shape or dtype, a foreign tensor),
each naming its tensor.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from fabric.core import dtypes
from fabric.core.manifest import Manifest, TensorEntry

_TORCH_NAMES = {  # every dtype of fabric.core.dtypes, by its torch name
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu", "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
    "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64", "F64": "float64",
    "C64": "complex64",
}
assert _TORCH_NAMES.keys() == dtypes.DTYPES.keys(), "agents.worker.fit: torch names out of step with fabric.core.dtypes"
DTYPES: dict[str, torch.dtype] = {  # those this torch build has (older ones lack uint16 and the float8s)
    name: getattr(torch, attr) for name, attr in _TORCH_NAMES.items() if hasattr(torch, attr)}

# what transformers' from_pretrained ignores beside a class's lists: buffers it renamed or
# made non-persistent, still found in older checkpoints (a model holding such a buffer)
_RENAMED_BUFFERS = (("rotary_emb.inv_freq", r"rotary_emb\.inv_freq"), ("position_ids", r"(^|\.)position_ids$"))


class _Rules:
    """One submodule's lists of keys to ignore, matched against names relative to it."""

    def __init__(self, prefix: str, module: torch.nn.Module, buffers: list[str]):
        self.prefix = prefix
        unexpected = _patterns(module, "_keys_to_ignore_on_load_unexpected")
        if hasattr(module, "_keys_to_ignore_on_load_unexpected") and hasattr(module, "config"):
            unexpected += [p for suffix, p in _RENAMED_BUFFERS if any(b.endswith(suffix) for b in buffers)]
        self.unexpected = _compile(unexpected)
        self.missing = _compile(_patterns(module, "_keys_to_ignore_on_load_missing"))
        self.unsaved = frozenset(_patterns(module, "_keys_to_ignore_on_save"))

    def _relative(self, name: str) -> str | None:
        if not self.prefix:
            return name
        return name[len(self.prefix) + 1:] if name.startswith(self.prefix + ".") else None

    def ignores_unexpected(self, name: str) -> bool:
        rel = self._relative(name)
        return rel is not None and self.unexpected is not None and self.unexpected.search(rel) is not None

    def ignores_missing(self, name: str) -> bool:
        rel = self._relative(name)
        return rel is not None and (rel in self.unsaved or (self.missing is not None
                                                            and self.missing.search(rel) is not None))


class ModuleTensors:
    """A module's tensors as a load sees them; see the module docstring."""

    def __init__(self, module: torch.nn.Module):
        self.targets: dict[str, torch.Tensor] = dict(module.state_dict(keep_vars=True))
        buffers = [n for n, _ in module.named_buffers(remove_duplicate=False)]
        self.transient = set(buffers) - self.targets.keys()  # non-persistent buffers
        self.rules: list[_Rules] = []
        declared: list[tuple[str, str]] = []
        for prefix, m in module.named_modules():
            dot = prefix + "." if prefix else ""
            mine = [b[len(dot):] for b in buffers if b.startswith(dot)]
            rules = _Rules(prefix, m, mine)
            if rules.unexpected is not None or rules.missing is not None or rules.unsaved:
                self.rules.append(rules)
            declared += [(dot + target, dot + source) for target, source in _declared_ties(m)]
        self.groups = self._tie_groups(declared)

    def _tie_groups(self, declared: list[tuple[str, str]]) -> list[list[list[str]]]:
        """Tied tensors: groups of storages (each a list of names sharing it), source first."""
        shared: dict[tuple, list[str]] = {}
        for n, t in self.targets.items():
            key = (str(t.device), t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) \
                if t.numel() and t.device.type != "meta" else (n,)
            shared.setdefault(key, []).append(n)
        subs = list(shared.values())
        where = {n: i for i, sub in enumerate(subs) for n in sub}
        parent = list(range(len(subs)))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i
        sources = set()
        for target, source in declared:
            a, b = self.targets.get(target), self.targets.get(source)
            if a is None or b is None or (a.dtype, tuple(a.shape)) != (b.dtype, tuple(b.shape)):
                continue  # a tie this module does not have as declared: its storages decide
            sources.add(source)
            ra, rb = root(where[target]), root(where[source])
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        groups: dict[int, list[list[str]]] = {}
        for i, sub in enumerate(subs):
            groups.setdefault(root(i), []).append(sub)
        for g in groups.values():  # the storage holding a declared source goes first
            g.sort(key=lambda sub: not any(n in sources for n in sub))
        return list(groups.values())

    def optional(self, name: str) -> bool:
        """A module tensor the version may lack (the model's own lists say so)."""
        return any(r.ignores_missing(name) for r in self.rules)

    def ignored(self, name: str) -> bool:
        """A version tensor outside the targets that is not foreign (not loaded either)."""
        return name in self.transient or any(r.ignores_unexpected(name) for r in self.rules)

    def match(self, manifest: Manifest, strict: bool = True) -> tuple[dict[str, TensorEntry], list[str]]:
        """(module tensor name -> the entry that loads it, misfits each naming its tensor)."""
        given: dict[str, TensorEntry] = {}
        problems: list[str] = []
        for t in manifest.tensors:
            if t.name in given:
                problems.append(f"{t.name}: twice in the version")
            given[t.name] = t
        for name, t in given.items():
            dst = self.targets.get(name)
            if dst is None:
                if strict and not self.ignored(name):
                    problems.append(f"{name}: not in the module")
            elif p := _misfit(t, dst):
                problems.append(p)
        loads: dict[str, TensorEntry] = {}
        for group in self.groups:
            chosen: list[str | None] = []
            for sub in group:
                have = [n for n in sub if n in given]
                for n in have[1:]:
                    if _key(given[n]) != _key(given[have[0]]):
                        problems.append(f"{n}: tied to {have[0]} in the module (one tensor) but different "
                                        "in the version")
                chosen.append(have[0] if have else None)
            source = next((c for c in chosen if c is not None), None)
            if source is None:
                names = [n for sub in group for n in sub]
                if strict and not all(self.optional(n) for n in names):
                    problems.append(f"{names[0]}: in the module but not in the version")
                continue
            for sub, c in zip(group, chosen):
                if c is not None:
                    loads[c] = given[c]
                else:  # a declared tie the module holds as two storages: the source's bytes
                    loads[sub[0]] = replace(given[source], name=sub[0])
        return loads, problems


def _patterns(module: torch.nn.Module, attr: str) -> list[str]:
    value = getattr(module, attr, None)
    if isinstance(value, str):
        return [value]
    return [p for p in value if isinstance(p, str)] if isinstance(value, (list, tuple, set, frozenset)) else []


def _compile(patterns: list[str]) -> re.Pattern | None:
    return re.compile("|".join(f"(?:{p})" for p in sorted(set(patterns)))) if patterns else None


def _declared_ties(module: torch.nn.Module) -> list[tuple[str, str]]:
    """(target, source) pairs a transformers model declares tied, names relative to it."""
    ties = getattr(module, "all_tied_weights_keys", None)  # transformers 5: expanded, gated by the config
    if ties is None:
        ties = getattr(module, "_tied_weights_keys", None)  # a dict: its exact names only
        if not getattr(getattr(module, "config", None), "tie_word_embeddings", False):
            ties = None
    if not isinstance(ties, dict):  # transformers 4 lists names only: the storages tell
        return []
    return [(t, s) for t, s in ties.items() if isinstance(t, str) and isinstance(s, str)]


def _key(t: TensorEntry) -> tuple:
    return t.dtype, t.shape, t.chunks


def _misfit(t: TensorEntry, dst: torch.Tensor) -> str | None:
    want = DTYPES.get(t.dtype)
    if want is None:
        return f"{t.name}: dtype {t.dtype} has no torch equivalent here"
    if dst.dtype != want:
        return f"{t.name}: dtype {t.dtype} ({want}) but the module has {dst.dtype}"
    if tuple(dst.shape) != tuple(t.shape):
        return f"{t.name}: shape {list(t.shape)} but the module has {list(dst.shape)}"
    if t.length != dst.numel() * dst.element_size():
        return f"{t.name}: {t.length} bytes for shape {list(t.shape)} {t.dtype}"
    return None
