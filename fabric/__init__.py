"""Fabric: model and checkpoint replication to GPU sites (docs/README.md has the layout).

The library's public names, declared here once:

    from fabric import publish, pull, open_store, Manifest

    store = open_store("/var/lib/fabric/store")
    publish("ckpt/step-1200", artifact="llama", target=LocalTarget(store), channel="prod")  # fabric.publish.LocalTarget
    await pull(store, manifest, Sink.folder("/srv/llama"), upstream=Upstream([origin]))

`publish` (fabric.publish) chunks a folder into a new version; `pull` (fabric.pull) is
the one pull path; `open_store` (fabric.store) opens a local or S3 store; `Manifest`
(fabric.core.manifest) is a version's verified description. Each name is imported on
first use (PEP 562), so a process that imports one module of the library does not load
them all: `fabric publish` never imports the pull path's HTTP client, which cost about
0.4 s of CPU per start. The package attributes `fabric.publish` and `fabric.pull` stay
the functions even once their modules are imported; the modules are reached with
`from fabric.publish import …` / `from fabric.pull import …`.
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fabric.core.manifest import Manifest
    from fabric.publish import publish
    from fabric.pull import pull
    from fabric.store import open_store

__all__ = ["Manifest", "open_store", "publish", "pull"]
_HOMES = {"Manifest": "fabric.core.manifest", "open_store": "fabric.store", "publish": "fabric.publish",
          "pull": "fabric.pull"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'fabric' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """The package's module type: importing `fabric.publish` or `fabric.pull` binds the function,
    not the module, to the package attribute of that name (as an eager import here did)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _HOMES.get(name) == value.__name__ == f"fabric.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
