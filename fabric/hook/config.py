"""Push-hook configuration: one typed object, loaded from TOML and checked at start-up.

    listen = "127.0.0.1:7100"
    metrics_listen = "0.0.0.0:9471"      # optional; /metrics here without a token
    log_level = "info"                   # debug | info | warning | error
    token = "…"                          # stores send Authorization: Bearer <token>
    origin = "http://origin:7000"        # publish to this origin with origin_token …
    origin_token = "…"
    # store = "s3://bucket/prefix"       # … or straight into a store (instead of origin)
    queue = "hook-queue.db"              # the durable event queue (SQLite); relative to this file
    rescan_interval = "60s"              # list watched prefixes this often ("0" = never)
    retry_max = "60s"                    # longest back-off after a failure
    sign_key = "hook.key"                # optional: sign every version and channel move (docs/trust.md)
    statement_expiry = "7d"              # how long a signed channel move stays valid
    [s3]                                 # where the watched buckets are
    endpoint = "http://127.0.0.1:8333"
    access_key = "…"                     # default: the standard AWS variables and files
    secret_key = "…"
    [sns]
    verify = true                        # check SNS signatures against certificates …
    cert_dir = "/etc/fabric/sns"         # … kept here (named as in SigningCertURL)
    [[rule]]
    bucket = "ckpt"
    prefix = "runs/{run}/step-{step}/"   # one checkpoint per match; {name} matches one path segment
    artifact = "{run}"
    version = "step-{step}"
    channel = "latest"                   # optional: move it after publishing
    complete = "dcp"                     # dcp | safetensors-index | megatron | marker:NAME | quiet:30s

Every problem names the key: `hook.toml: rule[0].complete: unknown completion 'dpc' …`.
`sign_key` is read when the config is loaded (`HookConfig.load`, at start-up): a missing
file, a file readable by group or others, or a key that is not Ed25519 stops the hook
(`key_file_invalid`, naming `sign_key`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from fabric.config import Checker, parse_duration, read_toml, resolve_path
from fabric.core.manifest import check_name
from fabric.errors import KeyFileInvalid
from fabric.logs import LEVELS
from fabric.signing import DEFAULT_EXPIRY, Signer
from fabric.trust import load_private_key

_TOP = {"listen", "token", "origin", "origin_token", "store", "queue", "rescan_interval", "retry_max",
        "log_level", "s3", "sns", "rule", "metrics_listen", "sign_key", "statement_expiry"}
_S3 = {"endpoint", "access_key", "secret_key", "region"}
_SNS = {"verify", "cert_dir", "topics"}
_RULE = {"bucket", "prefix", "artifact", "version", "channel", "complete"}
COMPLETIONS = ("dcp", "safetensors-index", "megatron", "marker:NAME", "quiet:DURATION")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Rule:
    """Which objects form a checkpoint, what to publish it as, and when it is complete."""

    index: int
    bucket: str
    prefix: str  # the pattern, e.g. runs/{run}/step-{step}/
    artifact: str  # templates over the pattern's placeholders
    version: str
    channel: str | None
    complete: str  # dcp | safetensors-index | megatron | marker | quiet
    marker: str | None = None
    quiet: float = 0.0
    regex: re.Pattern = field(default=None, repr=False, compare=False)

    @property
    def literal_prefix(self) -> str:
        """The part of the pattern before its first placeholder: what a listing covers."""
        return self.prefix.split("{", 1)[0]

    def match(self, key: str) -> tuple[str, dict[str, str], str] | None:
        """(checkpoint prefix, placeholder values, path inside the checkpoint) or None."""
        m = self.regex.match(key)
        if not m:
            return None
        return m.group(0), m.groupdict(), key[m.end():]

    def names(self, values: dict[str, str]) -> tuple[str, str]:
        """(artifact, version) for one checkpoint; InvalidName if the values make a bad name."""
        return (check_name("artifact", self.artifact.format(**values)),
                check_name("version", self.version.format(**values)))


@dataclass(frozen=True)
class S3Settings:
    endpoint: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    region: str | None = None


@dataclass(frozen=True)
class SnsSettings:
    verify: bool = True
    cert_dir: Path | None = None
    topics: tuple[str, ...] = ()


@dataclass(frozen=True)
class HookConfig:
    listen: str
    token: str
    rules: tuple[Rule, ...]
    queue: Path
    origin: str | None = None
    origin_token: str | None = None
    store: str | None = None
    rescan_interval: float = 60.0
    retry_max: float = 60.0
    log_level: str = "info"
    s3: S3Settings = field(default_factory=S3Settings)
    sns: SnsSettings = field(default_factory=SnsSettings)
    metrics_listen: str | None = None  # HOST:PORT for a token-free /metrics listener
    sign_key: Path | None = None  # the hook's private key: it signs every version and channel move
    statement_expiry: float = DEFAULT_EXPIRY  # seconds a signed channel move stays valid
    where: str = "hook.toml"

    def signer(self) -> Signer | None:
        """The hook's `Signer` (None without `sign_key`).

        Raises: KeyFileInvalid naming `sign_key` (unreadable, group/other-readable, not Ed25519).
        """
        if self.sign_key is None:
            return None
        try:
            key = load_private_key(self.sign_key)
        except KeyFileInvalid as e:
            raise KeyFileInvalid(f"{self.where}: sign_key: {e.message}") from None
        return Signer([key], self.statement_expiry)

    @classmethod
    def load(cls, path: str | Path, *, listen: str | None = None) -> "HookConfig":
        path = Path(path)
        raw = read_toml(path, "hook config")
        if listen:
            raw["listen"] = listen
        cfg = cls.from_dict(raw, path.name, base=path.parent)
        cfg.signer()  # a bad sign_key stops the hook at start-up, not at its first publish
        return cfg

    @classmethod
    def from_dict(cls, raw: dict, where: str = "hook.toml", base: Path = Path(".")) -> "HookConfig":
        c = Checker(raw, where)
        c.known(_TOP)
        listen = c.listen("listen")
        origin, store = c.optional("origin"), c.optional("store")
        if bool(origin) == bool(store):
            c.fail("origin", "give exactly one of origin (with origin_token) or store")
        if origin:
            if not origin.startswith(("http://", "https://")):
                c.fail("origin", f"must be an http(s) URL, got {origin!r}")
            if not c.optional("origin_token"):
                c.fail("origin_token", "missing: the origin needs a token with the publish scope")
        rules = c.raw.get("rule")
        if not isinstance(rules, list) or not rules:
            c.fail("rule", "give at least one [[rule]] table")
        s3 = c.table("s3")
        s3.known(_S3)
        sns = c.table("sns")
        sns.known(_SNS)
        return cls(
            listen=listen,
            token=c.secret("token"),
            rules=tuple(_rule(c, i, r) for i, r in enumerate(rules)),
            queue=resolve_path(base, c.string("queue", "hook-queue.db")),
            origin=origin.rstrip("/") if origin else None,
            origin_token=c.secret("origin_token") if "origin_token" in raw else None,
            store=store if not store or store.startswith("s3://") else str(resolve_path(base, store)),
            rescan_interval=c.duration("rescan_interval", 60.0),
            retry_max=c.duration("retry_max", 60.0, minimum=0.1),
            log_level=c.choice("log_level", LEVELS, "info"),
            metrics_listen=c.listen("metrics_listen", required=False),
            s3=S3Settings(s3.optional("endpoint"), s3.optional("access_key"), s3.optional("secret_key"),
                          s3.optional("region")),
            sns=SnsSettings(sns.boolean("verify", True),
                            resolve_path(base, sns.string("cert_dir")) if "cert_dir" in sns.raw else None,
                            tuple(sns.strings("topics"))),
            sign_key=resolve_path(base, c.string("sign_key")) if "sign_key" in raw else None,
            statement_expiry=c.duration("statement_expiry", DEFAULT_EXPIRY, minimum=1.0),
            where=where,
        )



def compile_prefix(pattern: str) -> tuple[re.Pattern, list[str]]:
    """`runs/{run}/step-{step}/` → a regex matching a key's checkpoint prefix, and the names."""
    out, names, pos = [], [], 0
    for m in _PLACEHOLDER.finditer(pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        name = m.group(1)
        if name in names:
            raise ValueError(f"placeholder {{{name}}} appears twice")
        names.append(name)
        out.append(f"(?P<{name}>[^/]+)")
        pos = m.end()
    rest = pattern[pos:]
    if "{" in rest or "}" in rest:
        raise ValueError("unbalanced '{' or '}' (placeholders look like {name})")
    out.append(re.escape(rest))
    return re.compile("".join(out)), names


def _rule(top: "Checker", i: int, raw: object) -> Rule:
    if not isinstance(raw, dict):
        top.fail(f"rule[{i}]", "must be a table")
    c = Checker(raw, f"{top.where}: rule[{i}]")
    c.known(_RULE)
    prefix = c.string("prefix")
    if prefix.startswith("/") or not prefix.endswith("/"):
        c.fail("prefix", f"must be relative to the bucket and end with '/', got {prefix!r}")
    try:
        regex, names = compile_prefix(prefix)
    except ValueError as e:
        c.fail("prefix", str(e))
    sample = {n: "x1" for n in names}
    templates = {}
    for key in ("artifact", "version"):
        template = c.string(key)
        used = _PLACEHOLDER.findall(template)
        unknown = [u for u in used if u not in names]
        if unknown:
            c.fail(key, f"uses {{{unknown[0]}}}, which prefix {prefix!r} does not define")
        try:
            check_name(key, template.format(**sample))
        except Exception:
            c.fail(key, f"{template!r} does not make a valid {key} name (letters, digits, '.', '_', '-')")
        templates[key] = template
    channel = c.optional("channel")
    if channel:
        try:
            check_name("channel", channel)
        except Exception:
            c.fail("channel", f"{channel!r} is not a valid channel name")
    complete = c.string("complete")
    kind, _, arg = complete.partition(":")
    marker, quiet = None, 0.0
    if kind == "marker" and arg and "/" not in arg.strip("/"):
        marker = arg.strip("/")
    elif kind == "quiet" and arg:
        try:
            quiet = parse_duration(arg)
        except ValueError as e:
            c.fail("complete", str(e))
    elif arg or kind not in ("dcp", "safetensors-index", "megatron"):
        c.fail("complete", f"unknown completion {complete!r} (known: {', '.join(COMPLETIONS)})")
    return Rule(index=i, bucket=c.string("bucket"), prefix=prefix, artifact=templates["artifact"],
                version=templates["version"], channel=channel, complete=kind, marker=marker,
                quiet=quiet, regex=regex)
