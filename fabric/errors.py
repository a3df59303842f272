"""Errors: one small hierarchy with stable codes.

Every error Fabric raises on purpose is a `FabricError`. Each class has a stable
string `code` (used in JSON error bodies and `--json` output) and an HTTP status
(used by servers at the edge). Where a built-in exception fits, the class also
inherits it, so `except FileNotFoundError` still works for callers who do not know
Fabric's types.

Raise where the problem is found; turn into a CLI message and exit code (`fabric.cli.output`, `fabric.cli.exits`) or an
HTTP response (`fabric.wire.frames.error_response`) only at the edge.
"""

from __future__ import annotations


class FabricError(Exception):
    """Base class. `code` is stable; `message` is for humans."""

    code = "fabric_error"
    http_status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict:
        return {"code": self.code, "message": self.message}


# --- input the caller gave us -------------------------------------------------

class InvalidInput(FabricError, ValueError):
    code = "invalid_input"
    http_status = 422


class InvalidSafetensors(InvalidInput):
    code = "invalid_safetensors"


class InvalidManifest(InvalidInput):
    code = "invalid_manifest"


class InvalidChunkId(InvalidInput):
    code = "invalid_chunk_id"


class InvalidName(InvalidInput):
    code = "invalid_name"


class ConfigError(InvalidInput):
    code = "invalid_config"


class SourceError(InvalidInput):
    """The source folder of a publish is missing, unreadable or unsafe."""

    code = "bad_source"


class SourceChanged(SourceError):
    """A file changed while it was being published."""

    code = "source_changed"


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"
    http_status = 413


class MalformedEvent(InvalidInput):
    """A storage event sent to the push hook is not JSON (`fabric.hook.envelopes`)."""

    code = "malformed_event"
    http_status = 400


class TensorMismatch(InvalidInput):
    """A version's tensors do not fit the live module (name, shape or dtype)."""

    code = "tensor_mismatch"


# --- state of the store or registry ------------------------------------------

class NotFound(FabricError, FileNotFoundError):
    code = "not_found"
    http_status = 404


class ArtifactNotFound(NotFound):
    code = "artifact_not_found"


class VersionNotFound(NotFound):
    code = "version_not_found"


class ChannelNotFound(NotFound):
    code = "channel_not_found"


class ChunkNotFound(NotFound):
    code = "chunk_not_found"


class SignatureNotFound(NotFound):
    """The origin holds no signature envelope for the version (`GET …/signature`)."""

    code = "signature_not_found"


class TrustNotFound(NotFound):
    """The origin holds no delegations envelope (`GET /v1/trust`)."""

    code = "trust_not_found"


class Conflict(FabricError):
    code = "conflict"
    http_status = 409


class VersionExists(Conflict):
    code = "version_exists"


class DestinationExists(Conflict, FileExistsError):
    code = "destination_exists"


class MissingChunks(Conflict):
    """A manifest names chunks the store does not hold."""

    code = "missing_chunks"


class GcRunning(Conflict):
    """Another gc holds the store's sweep lease, or a commit waited too long for one to end."""

    code = "gc_running"


class GcLeaseLost(Conflict):
    """A gc lost its sweep lease (a committer judged it dead) and stopped deleting."""

    code = "gc_lease_lost"


# --- integrity -----------------------------------------------------------------

class IntegrityError(FabricError):
    """Bytes do not match the digest that names them."""

    code = "integrity_error"
    http_status = 422


class CorruptChunk(IntegrityError):
    code = "corrupt_chunk"


class ReferenceMismatch(IntegrityError):
    """A delta-encoded chunk names a reference the decoder does not hold (or holds other bytes)."""

    code = "reference_mismatch"


class HealthCheckFailed(FabricError):
    """New weights failed (or did not finish) a worker's health check; the old ones serve.

    `report` is the worker's `LoadReport` of the failed load, when there is one.
    """

    code = "health_check_failed"
    http_status = 422

    def __init__(self, message: str, report: object | None = None):
        super().__init__(message)
        self.report = report


class UnknownEncoding(InvalidInput):
    code = "unknown_encoding"


class BadFrame(InvalidInput):
    """A binary chunk stream is malformed (bad magic, lengths, truncation)."""

    code = "bad_frame"


# --- access --------------------------------------------------------------------

class Unauthorized(FabricError, PermissionError):
    code = "unauthorized"
    http_status = 401


class Forbidden(FabricError, PermissionError):
    code = "forbidden"
    http_status = 403


# --- the network ---------------------------------------------------------------

class TransferError(FabricError, ConnectionError):
    """A transfer could not complete from any source."""

    code = "transfer_failed"
    http_status = 502


class TooManyConnections(TransferError):
    """A server refused a connection: it holds its cap of connections, in total or from this peer."""

    code = "too_many_connections"
    http_status = 503


class RelayUnavailable(TransferError):
    """A relay cannot serve a control request now: it has no live stream or answer from its own
    upstream (its children ask the next source; docs/protocol.md "Relays")."""

    code = "relay_unavailable"
    http_status = 503


class StoreFull(FabricError, OSError):
    code = "store_full"
    http_status = 507


class QuotaExceeded(FabricError):
    """A bound on what one client may keep at a server (uncommitted uploads, site reports) is reached."""

    code = "quota_exceeded"
    http_status = 507



# --- signed statements ---------------------------------------------------------

class SignatureError(FabricError):
    """A signed statement (docs/formats.md "Signed statements") is missing or refused by the trust policy."""

    code = "signature_refused"
    http_status = 422


class Unsigned(SignatureError):
    """A trust policy is in force and the version or channel move carries no signed statement."""

    code = "unsigned"


class SignatureInvalid(SignatureError):
    """A signature by a trusted key does not verify over the statement (tampered or corrupt bytes)."""

    code = "signature_invalid"


class UnknownKey(SignatureError):
    """Every signature is by a key the trust policy does not know."""

    code = "unknown_key"


class KeyRevoked(SignatureError):
    """The statement is signed by a revoked key (and by too few others)."""

    code = "key_revoked"
    http_status = 403


class KeyOutOfScope(SignatureError):
    """A known key signed, but no rule trusts it for this artifact (and channel)."""

    code = "key_out_of_scope"
    http_status = 403


class ThresholdNotMet(SignatureError):
    """Valid signatures by keys in scope, but fewer than the rule's threshold."""

    code = "threshold_not_met"


class StatementExpired(SignatureError):
    """A correctly signed statement whose `expires` has passed; `statement` is what it said."""

    code = "statement_expired"

    def __init__(self, message: str, statement: object | None = None):
        super().__init__(message)
        self.statement = statement


class SequenceRollback(SignatureError):
    """A channel statement's sequence is lower than the last accepted, or equal with other content."""

    code = "sequence_rollback"


class StatementMismatch(SignatureError):
    """A statement names another artifact, version, channel or manifest than the one it vouches for here."""

    code = "statement_mismatch"


class StatementMalformed(SignatureError):
    """An envelope or statement that does not follow the format: truncated, bad base64, wrong fields, too big."""

    code = "statement_malformed"


class StatementNotCanonical(StatementMalformed):
    """A statement's payload (or an envelope) is JSON but not in its canonical encoding."""

    code = "statement_not_canonical"


class TrustPolicyInvalid(ConfigError):
    """A trust policy file (docs/trust.md) that does not parse or check; the message names the key."""

    code = "trust_policy_invalid"


class KeyFileInvalid(ConfigError):
    """A signing or public key file that cannot be used: not an Ed25519 PEM key, or readable by others."""

    code = "key_file_invalid"


# --- inference servers the site agent drives (agents/serving) --------------------

class ServingError(FabricError):
    """An inference server (vLLM, SGLang, Triton/KServe) did not take a version: it answered 5xx
    or something Fabric cannot use. Subclasses say how it failed; the message names the server."""

    code = "server_error"
    http_status = 502


class ServerUnreachable(ServingError, ConnectionError):
    """No connection to the server (refused, reset, DNS): it is down or not where site.toml says."""

    code = "server_unreachable"


class ServerRefused(ServingError):
    """The server answered the request with a refusal (4xx, or `success: false`): it kept its weights."""

    code = "server_refused"


class ServerTimeout(ServingError, TimeoutError):
    """The server did not answer within the configured timeout (a pause or a load that never ends)."""

    code = "server_timeout"
    http_status = 504


class ServerWrongVersion(ServingError):
    """After a load the server reports another version than the one it was asked to load."""

    code = "server_wrong_version"


# --- the demo ------------------------------------------------------------------

class DemoFailed(FabricError):
    """A step of `python -m fabric.demo` could not do its job; the message says what and where to look."""

    code = "demo_failed"

_BY_CODE: dict[str, type[FabricError]] = {}


def _index(cls: type[FabricError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _index(sub)


_index(FabricError)


def from_code(code: str, message: str) -> FabricError:
    """Rebuild a typed error from a server's `{"code", "message"}` body."""
    return _BY_CODE.get(code, FabricError)(message)
