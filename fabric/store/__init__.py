"""The store: chunks, manifests, refs and packs on a backend (a local folder or an S3 bucket).

The public names, declared once here (`from fabric.store import open_store`):

    Store, StoredFile, open_store   the store (`fabric.store.store`)
    chunk_key, manifest_key         where a chunk or manifest lies in a backend
    Backend, Capabilities           the backend protocol and what a backend declares it can do
    ObjectInfo                      one listed object (`fabric.store.backend`)
    LocalBackend                    the backend on a local folder (`fabric.store.local`)
    Registry                        artifacts, versions and channels on a store (`fabric.store.registry`)

The S3 backend (`fabric.store.s3`) is imported only when an `s3://` store is opened,
so boto3 loads only where it is used.
"""

from fabric.store.backend import Backend, Capabilities, ObjectInfo
from fabric.store.local import LocalBackend
from fabric.store.store import Store, StoredFile, chunk_key, manifest_key, open_store
from fabric.store.registry import Registry

__all__ = ["Store", "StoredFile", "open_store", "chunk_key", "manifest_key", "Backend", "Capabilities",
           "ObjectInfo", "LocalBackend", "Registry"]
