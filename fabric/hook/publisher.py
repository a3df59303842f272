"""The hook's worker: from queued events to published checkpoints. Blocking; runs in a thread.

One `step()` does what is due, in order:

1. **Rescan** (every `rescan_interval`): list each rule's prefix in its bucket; every
   checkpoint found there that the queue does not know becomes a waiting one, and
   every waiting one is re-checked. This catches events the store dropped (the
   SeaweedFS filer keeps its webhook queue in memory) or sent while we were down.
2. **Events**: HEAD the object first. Gone → the event is `gone`; a different ETag →
   `superseded` (a newer event, or the next listing, brings the current object);
   otherwise the event's checkpoint is marked active (created if new) in the same
   transaction that finishes the event. An unreachable store leaves the event
   pending with back-off: nothing is lost while S3 is down.
3. **Checkpoints**: list the checkpoint's objects (the bucket is the truth, so events
   may arrive in any order) and apply the rule's completion test. A complete one is
   published straight from the bucket (`fabric.s3source`), then the channel moves,
   unless a later checkpoint of the same rule is already on it.

A publish is idempotent (same files, same version → the registry's no-op) and the
channel move is skipped when the channel already points at the version, so a worker
killed anywhere simply does the step again after a restart.

With `sign_key` (hook.toml) the target is a `fabric.signing.SigningTarget`: the commit
is followed by the version statement, and the channel moves with a signed channel
statement (sequence + 1, valid for `statement_expiry`), as `fabric publish --sign-key`
does. A retried publish signs again: the same key's signature over the same statement
replaces itself at the origin, so nothing doubles.
"""

from __future__ import annotations

import json
import re
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fabric.errors import (ChannelNotFound, FabricError, InvalidInput, InvalidName, NotFound, SourceChanged,
                     VersionExists)
from fabric.hook.config import HookConfig, Rule
from fabric.hook.queue import Queue
from fabric import tracing
from fabric.logs import get_logger
from fabric.publish import publish
from fabric.s3source import S3Source
from fabric.signing import SigningTarget
from fabric.store.s3 import S3Options, make_client, translate

log = get_logger("hook")
DCP_METADATA = ".metadata"
SAFETENSORS_INDEX = "model.safetensors.index.json"
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
_SKIP = {".metadata.tmp"}  # torch DCP's staging name for .metadata on S3
DEDUP_WINDOW = 7 * 86400  # finished events are remembered this long (redeliveries are deduplicated)
_PRUNE_EVERY = 3600


class HookMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.events = Counter("fabric_hook_events", "Events received, by result", ["result"], registry=r)
        self.failures = Counter("fabric_hook_failures", "Failures, by stage", ["stage"], registry=r)
        self.published = Counter("fabric_hook_checkpoints_published", "Checkpoints published", registry=r)
        self.depth = Gauge("fabric_hook_queue_depth", "Events accepted but not yet processed", registry=r)
        self.lag = Gauge("fabric_hook_lag_seconds", "Age of the oldest unprocessed event", registry=r)
        self.checkpoints = Gauge("fabric_hook_checkpoints", "Checkpoints by state", ["state"], registry=r)
        self.oldest_waiting = Gauge("fabric_hook_oldest_waiting_seconds",
                                    "Age of the oldest checkpoint not yet complete or published", registry=r)
        self.publish_seconds = Histogram("fabric_hook_publish_seconds", "Time to publish a checkpoint",
                                         registry=r)


class Worker:
    def __init__(self, cfg: HookConfig, queue: Queue, metrics: HookMetrics | None = None, *,
                 s3_client=None, target=None):
        self.cfg, self.queue = cfg, queue
        self.metrics = metrics or HookMetrics()
        s3 = cfg.s3
        self.options = S3Options(endpoint=s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key,
                                 region=s3.region, max_attempts=3, connect_timeout=2, read_timeout=30)
        self.s3 = s3_client or make_client(self.options)
        self.signer = cfg.signer()  # None without sign_key
        self._target = SigningTarget(target, self.signer) if target is not None and self.signer else target
        self._closers: list = []
        self._next_rescan = 0.0
        self._next_prune = 0.0
        self._stopping = threading.Event()
        self._busy = threading.Lock()  # held while a step runs

    def close(self) -> None:
        """Stop after the event or checkpoint in hand (a publish finishes), then release resources."""
        self._stopping.set()
        with self._busy:
            for close in self._closers:
                close()
            self._closers.clear()

    # --- routing -------------------------------------------------------------------------------

    def route(self, bucket: str, key: str) -> tuple[Rule, str, dict, str] | None:
        """The first rule whose pattern matches: (rule, checkpoint prefix, values, relative path)."""
        for rule in self.cfg.rules:
            if rule.bucket == bucket:
                m = rule.match(key)
                if m:
                    return (rule, *m)
        return None

    def watched(self, bucket: str, key: str) -> bool:
        """Whether any rule looks at this key (a checkpoint object, or a file beside them)."""
        return any(r.bucket == bucket and key.startswith(r.literal_prefix) for r in self.cfg.rules)

    # --- one step --------------------------------------------------------------------------------

    def step(self, now: float | None = None) -> float:
        """Do everything due; return the seconds until something else is due."""
        with self._busy:
            if self._stopping.is_set():
                return 5.0
            return self._step(time.time() if now is None else now)

    def _step(self, now: float) -> float:
        if self.cfg.rescan_interval and now >= self._next_rescan:
            try:
                self.rescan(now)
                self._next_rescan = now + self.cfg.rescan_interval
            except FabricError as e:
                self.metrics.failures.labels("rescan").inc()
                log.warning("rescan failed", error=e.message)
                self._next_rescan = now + min(self.cfg.retry_max, 5.0)
        if now >= self._next_prune:
            self.queue.prune(now - DEDUP_WINDOW)
            self._next_prune = now + _PRUNE_EVERY
        for row in self.queue.due_events(now):
            if self._stopping.is_set():
                return 0.0
            self.process_event(row, now)
        for cp in self.queue.due_checkpoints(time.time()):
            if self._stopping.is_set():
                return 0.0
            self.evaluate(cp, time.time())
        return self._idle(time.time())

    def _idle(self, now: float) -> float:
        nexts = [self._next_rescan] if self.cfg.rescan_interval else []
        due = self.queue.next_due()
        if due is not None:
            nexts.append(due)
        return max(0.0, min(nexts, default=now + 5.0) - now)

    def _backoff(self, attempts: int) -> float:
        return min(self.cfg.retry_max, 0.5 * 2 ** min(attempts, 20))

    # --- events ----------------------------------------------------------------------------------

    def process_event(self, row, now: float) -> None:
        bucket, key = row["bucket"], row["key"]
        routed = self.route(bucket, key)
        if routed is None:  # beside the checkpoints, e.g. Megatron's tracker file
            self.queue.wake_bucket(bucket, now)
            self.queue.finish_event(row["id"], "done")
            return
        rule, prefix, values, rel = routed
        if not rel or rel.endswith("/"):
            self.queue.finish_event(row["id"], "ignored", "folder")
            return
        try:
            artifact, version = rule.names(values)
        except InvalidName as e:
            self.metrics.failures.labels("event").inc()
            log.error("checkpoint name is not a valid artifact or version", bucket=bucket, key=key, error=e.message)
            self.queue.finish_event(row["id"], "invalid", e.message)
            return
        try:
            head = self._head(bucket, key)
        except FabricError as e:
            delay = self._backoff(row["attempts"])
            self.metrics.failures.labels("head").inc()
            log.warning("cannot check object; will retry", bucket=bucket, key=key, error=e.message, retry_in_s=delay)
            self.queue.retry_event(row["id"], now + delay, e.message)
            return
        if head is None:
            log.info("object is gone; event dropped", bucket=bucket, key=key)
            self.queue.finish_event(row["id"], "gone")
            return
        if row["etag"] and head["etag"] != row["etag"]:
            log.info("object changed since the event; waiting for the newer one", bucket=bucket, key=key,
                     event_etag=row["etag"], current_etag=head["etag"])
            self.queue.finish_event(row["id"], "superseded")
            return
        state, completed_at = self.queue.touch(bucket=bucket, prefix=prefix, rule=rule.index,
                                               artifact=artifact, version=version, now=now, event_id=row["id"])
        if state == "waiting":
            return
        if completed_at is not None and head["mtime"] > completed_at:
            log.warning("object written after its checkpoint was published; versions are immutable, "
                        "so it is not republished", bucket=bucket, key=key, artifact=artifact, version=version)
        else:  # the event of an object that was already in the published listing
            log.info("event for an already published checkpoint", bucket=bucket, key=key, state=state)

    def _head(self, bucket: str, key: str) -> dict | None:
        try:
            with translate(f"s3://{bucket}/{key}"):
                h = self.s3.head_object(Bucket=bucket, Key=key)
        except NotFound:
            return None
        return {"etag": h.get("ETag", "").strip('"'), "size": int(h["ContentLength"]),
                "mtime": h["LastModified"].timestamp()}

    def rescan(self, now: float) -> None:
        for rule in self.cfg.rules:
            found: dict[str, dict] = {}
            for key, *_ in self._list(rule.bucket, rule.literal_prefix):
                m = rule.match(key)
                if m and m[2] and not m[2].endswith("/"):
                    found.setdefault(m[0], m[1])
            for prefix, values in found.items():
                if self.queue.known(rule.bucket, prefix):
                    continue
                try:
                    artifact, version = rule.names(values)
                except InvalidName as e:
                    log.error("checkpoint name is not valid", bucket=rule.bucket, prefix=prefix, error=e.message)
                    continue
                log.info("listing found a checkpoint", bucket=rule.bucket, prefix=prefix)
                self.queue.touch(bucket=rule.bucket, prefix=prefix, rule=rule.index, artifact=artifact,
                                 version=version, now=now)
            self.queue.wake_bucket(rule.bucket, now)

    def _list(self, bucket: str, prefix: str) -> list[tuple[str, int, str, float]]:
        """(key, size, etag, mtime) of every object under `prefix`."""
        out = []
        with translate(f"listing s3://{bucket}/{prefix}"):
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for o in page.get("Contents", []):
                    if not o["Key"].endswith("/"):
                        out.append((o["Key"], int(o["Size"]), o.get("ETag", "").strip('"'),
                                    o["LastModified"].timestamp()))
        return out

    # --- checkpoints ----------------------------------------------------------------------------

    def evaluate(self, cp, now: float) -> None:
        rule = self.cfg.rules[cp["rule"]]
        bucket, prefix = cp["bucket"], cp["prefix"]
        try:
            objects = {k[len(prefix):]: (k, size, etag, mtime) for k, size, etag, mtime in self._list(bucket, prefix)}
            objects = {rel: o for rel, o in objects.items() if rel not in _SKIP or rule.complete != "dcp"}
            complete, why, wait = self.complete(rule, cp, objects, now)
        except FabricError as e:
            self._retry_checkpoint(cp, now, "evaluate", e)
            return
        if not complete:
            self.queue.update_checkpoint(bucket, prefix, next_try=now + wait, error=why)
            return
        completed_at = max(o[3] for o in objects.values())
        if cp["detected"] is None:
            self.queue.update_checkpoint(bucket, prefix, detected=now, completed_at=completed_at)
        self._publish(rule, cp, objects, completed_at)

    def complete(self, rule: Rule, cp, objects: dict, now: float) -> tuple[bool, str | None, float]:
        """(complete?, why not, seconds before looking again)."""
        later = self.cfg.rescan_interval or 3600.0
        if not objects:
            return False, "no objects under the prefix", later
        if rule.complete == "dcp":
            return DCP_METADATA in objects, f"waiting for {DCP_METADATA}", later
        if rule.complete == "marker":
            return rule.marker in objects, f"waiting for marker {rule.marker}", later
        if rule.complete == "safetensors-index":
            if SAFETENSORS_INDEX not in objects:
                return False, f"waiting for {SAFETENSORS_INDEX}", later
            shards = self._index_shards(cp["bucket"], objects[SAFETENSORS_INDEX][0])
            missing = sorted(s for s in shards if s not in objects)
            return not missing, f"waiting for shards {missing[:3]}" if missing else None, later
        if rule.complete == "megatron":
            return self._megatron_done(cp["bucket"], cp["prefix"]), f"waiting for {MEGATRON_TRACKER}", later
        newest = max([cp["last_activity"]] + [o[3] for o in objects.values()])
        left = newest + rule.quiet - now
        return left <= 0, f"quiet for {rule.quiet:g}s not yet reached", max(left, 0.05)

    def _get_text(self, bucket: str, key: str, limit: int = 16 << 20) -> str:
        with translate(f"s3://{bucket}/{key}"):
            body = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read(limit)
        return body.decode("utf-8", errors="replace")

    def _index_shards(self, bucket: str, key: str) -> set[str]:
        try:
            index = json.loads(self._get_text(bucket, key))
            return {str(v) for v in index["weight_map"].values()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InvalidInput(f"s3://{bucket}/{key} is not a safetensors index ({e!r})") from None

    def _megatron_done(self, bucket: str, prefix: str) -> bool:
        """Megatron writes `<save>/iter_NNNNNNN/…` then `<save>/latest_checkpointed_iteration.txt`."""
        parent, _, name = prefix.rstrip("/").rpartition("/")
        tracker = f"{parent}/{MEGATRON_TRACKER}" if parent else MEGATRON_TRACKER
        try:
            text = self._get_text(bucket, tracker).strip()
        except NotFound:
            return False
        digits = re.findall(r"\d+", name)
        if text.isdigit() and digits:
            return int(text) >= int(digits[-1])
        return text == name

    def _publish(self, rule: Rule, cp, objects: dict, completed_at: float) -> None:
        bucket, prefix, artifact, version = cp["bucket"], cp["prefix"], cp["artifact"], cp["version"]
        t0 = time.time()
        sources = [S3Source(self.s3, bucket, key, rel, size, etag) for rel, (key, size, etag, _) in objects.items()]
        try:
            target = self.target()
            with tracing.span("publish", artifact=artifact, version=version, source=f"s3://{bucket}/{prefix}"):
                result = publish(sources, artifact=artifact, version=version, target=target,
                                 metadata={"source": f"s3://{bucket}/{prefix}"})
                promoted = self._promote(rule, cp, target, completed_at)
        except (VersionExists, InvalidName) as e:
            self._fail_checkpoint(cp, e)
            return
        except SourceChanged as e:  # an object moved under us: list again shortly
            self.metrics.failures.labels("publish").inc()
            log.info("checkpoint changed while publishing; retrying", bucket=bucket, prefix=prefix, error=e.message)
            self.queue.update_checkpoint(bucket, prefix, next_try=time.time() + 0.5, error=e.message)
            return
        except InvalidInput as e:
            self._fail_checkpoint(cp, e)
            return
        except (FabricError, OSError) as e:
            self._retry_checkpoint(cp, time.time(), "publish", e)
            return
        now = time.time()
        self.metrics.published.inc()
        self.metrics.publish_seconds.observe(now - t0)
        self.queue.update_checkpoint(bucket, prefix, state="published", published=now, manifest_id=result.manifest_id,
                                     promoted=int(promoted), error=None)
        log.info("checkpoint published", bucket=bucket, prefix=prefix, artifact=artifact, version=version,
                 manifest_id=result.manifest_id, files=result.files, bytes=result.bytes,
                 new_bytes=result.new_bytes, seconds=round(now - t0, 3),
                 channel=rule.channel if promoted else None,
                 signed_by=self.signer.keyids[0] if self.signer else None)

    def _promote(self, rule: Rule, cp, target, completed_at: float) -> bool:
        if not rule.channel:
            return False
        artifact, version = cp["artifact"], cp["version"]
        if self.queue.newer_promoted(rule.index, artifact, completed_at, cp["prefix"]):
            log.info("a later checkpoint is already on the channel; not moving it", artifact=artifact,
                     version=version, channel=rule.channel)
            return False
        if _channel_version(target, artifact, rule.channel) != version:
            target.promote(artifact, version, rule.channel)
        return True

    def _retry_checkpoint(self, cp, now: float, stage: str, e: Exception) -> None:
        delay = self._backoff(cp["attempts"])
        message = getattr(e, "message", str(e))
        self.metrics.failures.labels(stage).inc()
        log.warning(f"checkpoint {stage} failed; will retry", bucket=cp["bucket"], prefix=cp["prefix"],
                    error=message, retry_in_s=delay)
        self.queue.update_checkpoint(cp["bucket"], cp["prefix"], attempts=cp["attempts"] + 1,
                                     next_try=now + delay, error=message)

    def _fail_checkpoint(self, cp, e: FabricError) -> None:
        self.metrics.failures.labels("publish").inc()
        log.error("checkpoint cannot be published", bucket=cp["bucket"], prefix=cp["prefix"],
                  artifact=cp["artifact"], version=cp["version"], code=e.code, error=e.message)
        self.queue.update_checkpoint(cp["bucket"], cp["prefix"], state="failed", error=f"{e.code}: {e.message}")

    # --- where versions go ------------------------------------------------------------------------

    def target(self):
        """Where versions go (the origin, or a store), signing with `sign_key` when set."""
        if self._target is None:
            from fabric.publish import LocalTarget
            if self.cfg.origin:
                from fabric.wire.client import RemoteTarget, SyncOrigin
                origin = SyncOrigin(self.cfg.origin, self.cfg.origin_token)
                self._closers.append(origin.close)
                target = RemoteTarget(origin)
            else:
                from fabric.store.store import open_store
                target = LocalTarget(open_store(self.cfg.store, s3=self.options))
            self._target = SigningTarget(target, self.signer) if self.signer else target
        return self._target


def _channel_version(target, artifact: str, channel: str) -> str | None:
    try:
        return target.registry.channel(artifact, channel).version  # the store's, or the origin's
    except ChannelNotFound:
        return None
