"""Fabric: model and checkpoint replication to GPU sites (docs/README.md has the layout).

The library's public names, declared here once:

    from fabric import publish, pull, open_store, Manifest

    store = open_store("/var/lib/fabric/store")
    publish("ckpt/step-1200", artifact="llama", target=LocalTarget(store), channel="prod")  # fabric.publish.LocalTarget
    await pull(store, manifest, Sink.folder("/srv/llama"), upstream=Upstream([origin]))

`publish` (fabric.publish) chunks a folder into a new version; `pull` (fabric.pull) is
the one pull path; `open_store` (fabric.store) opens a local or S3 store; `Manifest`
(fabric.core.manifest) is a version's verified description. Importing a name here
binds the package attribute to the function, so the modules of the same names are
reached with `from fabric.publish import …` / `from fabric.pull import …`.
"""

from fabric.core.manifest import Manifest
from fabric.publish import publish
from fabric.pull import pull
from fabric.store import open_store

__all__ = ["Manifest", "open_store", "publish", "pull"]
