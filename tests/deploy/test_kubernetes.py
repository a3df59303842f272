"""The Kubernetes manifests in deploy/kubernetes: every object validates against the
Kubernetes API schemas that `kubernetes-validate` ships (strict: unknown fields fail;
offline, proven by running it in a network namespace of its own), every container has
its probes, resources and a non-root read-only sandbox, its command line is one the CLI
takes, and the site.toml, hook.toml and tokens.toml they carry load with Fabric's own
config checkers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the test extra (kubernetes-validate)")
kv = pytest.importorskip("kubernetes_validate.utils", reason="kubernetes-validate is in the test extra")

from agents.site.config import SiteConfig  # noqa: E402
from fabric.hook.config import HookConfig  # noqa: E402
from fabric.wire.auth import TokenTable  # noqa: E402
from helpers.origin import FABRIC, clean_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
FILES = sorted(K8S.glob("*.yaml")) + sorted((K8S / "examples").glob("*.yaml"))
VERSIONS = ["1.30.0", kv.latest_version()]  # the oldest release we document, and the newest schemas shipped
WORKLOADS = {"Deployment", "DaemonSet"}


def _objects() -> list[tuple[str, dict]]:
    return [(p.name, doc) for p in FILES for doc in yaml.safe_load_all(p.read_text()) if doc]


def _by(kind: str, name: str) -> dict:
    found = [d for _, d in _objects() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def _workloads() -> list[dict]:
    return [d for _, d in _objects() if d["kind"] in WORKLOADS]


def _containers() -> list[tuple[dict, dict]]:
    return [(w, c) for w in _workloads() for c in w["spec"]["template"]["spec"]["containers"]]


def _file_data(kind: str, name: str, key: str) -> str:
    obj = _by(kind, name)
    return (obj.get("stringData") or obj["data"])[key]


def test_the_files_hold_every_role():
    names = {(d["kind"], d["metadata"]["name"]) for _, d in _objects()}
    assert {("Deployment", "fabric-origin"), ("Service", "fabric-origin"), ("DaemonSet", "fabric-agent"),
            ("ConfigMap", "fabric-site"), ("Deployment", "fabric-hook"), ("Service", "fabric-hook")} <= names


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates_strictly_against_the_kubernetes_schemas(version):
    for filename, obj in _objects():
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{filename}: {obj['kind']}/{obj['metadata']['name']}: {path}: {e.message}")


def test_the_validator_needs_no_network(tmp_path):
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a network namespace here (unshare --net needs root)")
    p = subprocess.run([unshare, "--net", sys.executable, "-m", "kubernetes_validate", "--strict",
                        "-k", VERSIONS[0], *map(str, FILES)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("passed for resource") == len(_objects()), p.stdout


def test_a_misspelt_field_fails_the_strict_check():
    obj = _by("Deployment", "fabric-origin")
    broken = {**obj, "spec": {**obj["spec"], "replica": 1}}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, VERSIONS[0], strict=True)


@pytest.mark.parametrize("workload, container", [(w["metadata"]["name"], c["name"]) for w, c in _containers()])
def test_each_container_is_probed_bounded_and_sandboxed(workload, container):
    w, c = next((w, c) for w, c in _containers() if w["metadata"]["name"] == workload and c["name"] == container)
    pod = w["spec"]["template"]["spec"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["livenessProbe"]["httpGet"]["port"] in ports and c["readinessProbe"]["httpGet"]["port"] in ports
    assert set(c["resources"]["requests"]) == set(c["resources"]["limits"]) == {"cpu", "memory"}
    sc, psc = c["securityContext"], pod["securityContext"]
    assert (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")) is True
    assert (sc.get("runAsUser") or psc.get("runAsUser")) not in (None, 0)
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}  # a read-only root still has a writable /tmp
    assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("workload, container", [(w["metadata"]["name"], c["name"]) for w, c in _containers()])
def test_each_command_line_is_one_the_cli_takes(workload, container):
    _, c = next((w, c) for w, c in _containers() if w["metadata"]["name"] == workload and c["name"] == container)
    args = c["args"]
    assert args[0] in ("origin", "agent", "hook")
    helptext = subprocess.run(FABRIC + [args[0], "--help"], capture_output=True, text=True, env=clean_env(),
                              timeout=60, check=True).stdout
    for flag in (a for a in args if a.startswith("--")):
        assert flag in helptext, flag
    mounted = {m["mountPath"] for m in c["volumeMounts"]}
    for path in (a for a in args if a.startswith("/")):
        assert any(path.startswith(m + "/") for m in mounted), (path, mounted)


def test_the_origin_keeps_its_store_in_s3_with_credentials_from_a_secret():
    c = _by("Deployment", "fabric-origin")["spec"]["template"]["spec"]["containers"][0]
    args = c["args"]
    assert args[args.index("--store") + 1].startswith("s3://") and "--s3-endpoint" in args
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert set(env) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for ref in env.values():
        assert ref["key"] in _by("Secret", ref["name"])["stringData"]


def test_every_referenced_config_map_and_secret_exists():
    for w in _workloads():
        for v in w["spec"]["template"]["spec"]["volumes"]:
            if "configMap" in v:
                _by("ConfigMap", v["configMap"]["name"])
            if "secret" in v:
                _by("Secret", v["secret"]["secretName"])
            if "persistentVolumeClaim" in v:
                _by("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])


def test_the_agent_keeps_its_data_in_the_host_folder_the_inference_pods_share(tmp_path):
    ds = _by("DaemonSet", "fabric-agent")["spec"]["template"]["spec"]
    host = {v["name"]: v["hostPath"]["path"] for v in ds["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m["mountPath"] for m in ds["containers"][0]["volumeMounts"]}
    text = _file_data("ConfigMap", "fabric-site", "site.toml")
    data_line = next(line for line in text.splitlines() if line.startswith("data"))
    data = data_line.split("=", 1)[1].split("#")[0].strip().strip('"')
    assert host == {"data": "/var/lib/fabric/site"} and mounts["data"] == data == host["data"]


def test_the_site_toml_loads_with_the_agents_checker(tmp_path):
    text = _file_data("ConfigMap", "fabric-site", "site.toml")
    (tmp_path / "token").write_text(_file_data("Secret", "fabric-site-token", "token"))
    text = text.replace("/run/secrets/fabric/token", str(tmp_path / "token"))
    text = text.replace("/var/lib/fabric/site", str(tmp_path / "data"))
    (tmp_path / "site.toml").write_text(text)
    cfg = SiteConfig.load(tmp_path / "site.toml")
    assert cfg.site and cfg.origin.startswith("http://fabric-origin.fabric.svc:")


def test_the_hook_toml_and_the_tokens_load_with_their_checkers(tmp_path):
    (tmp_path / "hook.toml").write_text(_file_data("Secret", "fabric-hook", "hook.toml").replace(
        "/var/lib/fabric/hook", str(tmp_path)))
    cfg = HookConfig.load(tmp_path / "hook.toml")
    assert cfg.rules and cfg.origin
    (tmp_path / "tokens.toml").write_text(_file_data("Secret", "fabric-tokens", "tokens.toml"))
    table = TokenTable.from_file(tmp_path / "tokens.toml")
    site = _file_data("Secret", "fabric-site-token", "token")
    assert table.authenticate(f"Bearer {site}").name == "fra-edge-1"
    hook_origin_token = cfg.origin_token
    assert table.authenticate(f"Bearer {hook_origin_token}").may("publish")
