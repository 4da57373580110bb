"""The deployment files, checked without Docker or Kubernetes.

* ``docker/docker-compose.yml``: every dcache service's command (after the
  image's ENTRYPOINT ``dcache``) passes ``dcache ... --check-config`` with the
  service's environment; the topology holds together (one coordinator, the
  others follow it, aux nodes join it and advertise their service name, the
  shim lists every master); names and ports line up with ``docker/nginx.conf``
  and ``docker/prometheus.yml``; each aux node has its own named volume at
  its ``--data-dir``; Grafana's mounts match its provisioning files.
* ``docker/docker-compose.zookeeper.yml``: merged into the base file the way
  compose merges an override (``command`` replaced, ``depends_on`` by
  service, ``environment`` and ``volumes`` by key), the result passes the
  same checks; masters and aux nodes use ``--zookeeper`` at the zookeeper
  service's client port (no ``--coordinator``/``--join``), wait for it to be
  healthy, and differ from the base file in nothing but membership flags;
  ZooKeeper's health check, run against a fake ``nc``, passes only while the
  server serves.
* Credentials (docs/SECURITY.md), in both compose sets: ``--check-config``
  applies protected mode (the same refusal as the daemon's, checked here),
  and every dcache service listens on 0.0.0.0, so each has one; with the env
  files ``docker/create-secrets.sh`` makes (run into a temp directory, its
  modes, values and idempotence checked, ``docker/secrets/`` git- and
  docker-ignored): masters and aux nodes mount the one cluster secret where
  ``--cluster-secret-file`` points and have the client token, the shim has
  the client token and its HTTP token and no cluster secret; no credential
  or ``--insecure`` on a command line or written in a file.
* ``docker/nginx.conf``: rendered for the local nginx (service names ->
  127.0.0.1, paths -> a temp prefix, the stream module loaded if dynamic),
  ``nginx -t`` accepts it.
* ``docker/Dockerfile``: multi-stage python:3.11-slim, non-root numeric
  USER, ENTRYPOINT dcache, the snapshot VOLUME; its HEALTHCHECK script,
  extracted from the Dockerfile, run against real daemons of every role.
* ``k8s/*.yaml``: Services select pod templates and target their declared
  ports, HPAs scale existing Deployments, probes hit declared ports and paths
  the daemons serve, the StatefulSet's Service is headless, and every
  container's args pass ``--check-config`` once the downward-API variables
  are filled in; the membership wiring (coordinator, followers, aux join and
  advertise) points at Services that reach the right pods.
* ``k8s/zookeeper/*.yaml`` with the shared ``k8s/configmap.yaml`` and
  ``k8s/http.yaml``: the same checks; one autoscaled master Deployment; every
  ``--zookeeper`` reaches the ZooKeeper StatefulSet's client port; the
  ensemble's ``ZOO_SERVERS`` names its pods, the ``ZOO_MY_ID`` wrapper (run
  with bash) gives each pod its id, its probes (run against a fake ``nc``)
  keep a quorum-less server alive but not ready, its PDB keeps a quorum.
* Credentials in both manifest sets: no manifest creates a Secret; every
  reference names ``dcache-credentials``, none optional; master and aux pods
  mount its ``cluster-secret`` read-only (group-readable through their
  fsGroup, nobody else) where ``--cluster-secret-file`` points; every dcache
  container reads ``auth-token`` into DCACHE_AUTH_TOKEN, the shim
  ``http-token`` into DCACHE_HTTP_TOKEN; no ``--insecure`` or literal
  credential in args, env or the ConfigMap.
* The docs (SECURITY.md, OPERATIONS.md, docker/README.md, the ConfigMap's
  comment) name the same secret files and show ``kubectl create secret
  generic dcache-credentials`` (and ``dcache-tls``) with exactly the keys
  the manifests read.
* TLS, compose: ``docker/docker-compose.tls.yml`` merged into both sets
  (``embedded-tls``, ``zookeeper-tls``), checked like them, plus: every
  dcache service's ``--tls-cert/--tls-key/--tls-ca`` (masters and aux nodes
  ``--tls-client-auth``) point at compose secrets (read-only) from
  ``./secrets/tls/``, its own certificate and key, one CA; the files
  ``create-secrets.sh --tls`` makes (run into a temp directory: modes,
  idempotence, a new certificate from the kept CA) load as the daemon loads
  them, verify against the CA (``openssl verify``) and name the service, and
  what clients dial through nginx; ``docker/nginx.tls.conf`` passes TLS
  through to exactly the masters and the shims (``nginx -t`` too);
  ``docker/prometheus.tls.yml`` scrapes the shim over HTTPS and differs from
  ``prometheus.yml`` in nothing else; the image's health check passes for
  TLS daemons of every role, and fails when it would speak plaintext.
* TLS, Kubernetes (on by default, both sets): every dcache container's
  ``--tls-*`` point at ``ca.crt``, ``tls.crt``, ``tls.key`` of the Secret
  ``dcache-tls``, mounted read-only 0440 through the fsGroup; masters and
  aux nodes ``--tls-client-auth``; probes and scrape annotations use HTTPS
  where the port serves it.
* No PEM private key in git or under ``docker/`` and ``k8s/`` (but the
  git-ignored ``docker/secrets/``).
"""

from __future__ import annotations

import atexit
import copy
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped, unused-ignore]  # no types-PyYAML in the venv

from dcache.config import read_secret
from dcache.tls import TlsContexts, client_context
from tests.harness import DaemonProcess
from tests.nginx import NginxProcess, find_nginx, free_port, stream_module_path
from tests.tlscerts import make_certs

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = DOCKER / "docker-compose.yml"
COMPOSE_ZK = DOCKER / "docker-compose.zookeeper.yml"
COMPOSE_TLS = DOCKER / "docker-compose.tls.yml"
CREATE_SECRETS = DOCKER / "create-secrets.sh"
NGINX_CONF = DOCKER / "nginx.conf"
NGINX_TLS_CONF = DOCKER / "nginx.tls.conf"
PROMETHEUS = DOCKER / "prometheus.yml"
PROMETHEUS_TLS = DOCKER / "prometheus.tls.yml"
GRAFANA = DOCKER / "grafana"
K8S = REPO / "k8s"
K8S_ZK = K8S / "zookeeper"

ROLES = ("aux", "master", "http")
CHECK_TIMEOUT_S = 30.0
HEALTHCHECK_TIMEOUT_S = 15.0
#: What the downward API and Secrets would give a pod, for --check-config.
FIELD_SAMPLES = {"metadata.namespace": "default", "status.podIP": "10.1.2.3", "spec.nodeName": "node-1"}
SECRET_SAMPLE = "sample-token"
ANY_ADDRESS = ("0.0.0.0", "::")

# -- credentials (docs/SECURITY.md) --
#: Where the compose files find their credentials (relative to docker/, git-ignored), made by docker/create-secrets.sh.
COMPOSE_SECRETS = "./secrets"
#: The Secret the manifests read, never created by them, and the key of each credential.
K8S_SECRET = "dcache-credentials"
K8S_KEYS = {"cluster": "cluster-secret", "client": "auth-token", "http": "http-token"}
#: Environment variables that hold a credential: never written out in a compose file, manifest or ConfigMap.
CREDENTIAL_VARS = ("DCACHE_AUTH_TOKEN", "DCACHE_HTTP_TOKEN", "DCACHE_CLUSTER_SECRET")
#: Flags that would put a credential (or the lack of one) on a command line, where ps and `docker inspect` show it.
FORBIDDEN_FLAGS = ("--insecure", "--auth-token", "--http-token", "--cluster-secret")
#: Docs that show how to create the credentials, and must name the same files and keys as the deployment files.
SECURITY_MD = REPO / "docs" / "SECURITY.md"
OPERATIONS_MD = REPO / "docs" / "OPERATIONS.md"
DOCKER_README = DOCKER / "README.md"

# -- TLS (docs/SECURITY.md, "TLS") --
#: Where docker/create-secrets.sh --tls writes the certificates, inside the compose secrets directory.
COMPOSE_TLS_DIR = "tls"
#: Files of COMPOSE_TLS_DIR that stay on the host: the CA's key and the host's client certificate.
COMPOSE_TLS_HOST_ONLY = {"ca.key", "client.crt", "client.key"}
#: Names clients on the host and on the compose network use for whatever nginx passes TLS through to.
COMPOSE_NGINX_NAMES = {"DNS:localhost", "IP Address:127.0.0.1", "DNS:nginx"}
#: The Secret with the pods' certificate (never created by the manifests) and its keys, cert-manager's names.
K8S_TLS_SECRET = "dcache-tls"
K8S_TLS_KEYS = {"ca": "ca.crt", "cert": "tls.crt", "key": "tls.key"}
#: Every Secret the manifests read, and its keys.
K8S_SECRETS = {K8S_SECRET: set(K8S_KEYS.values()), K8S_TLS_SECRET: set(K8S_TLS_KEYS.values())}


# -- running dcache ----------------------------------------------------------------


def _dcache() -> list[str]:
    """The venv's ``dcache`` script (what the image's ENTRYPOINT runs)."""
    script = Path(sys.executable).with_name("dcache")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "dcache"]


def _env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without its DCACHE_* variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCACHE_")}
    env.update(extra)
    return env


@dataclass
class Checked:
    """A command line accepted by ``--check-config``, and the config it printed."""

    where: str
    argv: list[str]
    env: dict[str, str]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def role(self) -> str:
        return self.argv[0]

    @property
    def endpoint(self) -> int:
        """The port serving /metrics: --metrics-port, or the shim's own port."""
        if self.config.get("metrics_port") is not None:
            return int(self.config["metrics_port"])
        assert self.role == "http", f"{self.where}: no --metrics-port"
        return int(self.config["port"])


def _check_config(item: Checked) -> Checked:
    assert item.argv and item.argv[0] in ROLES, f"{item.where}: {item.argv!r} does not start with a role ({', '.join(ROLES)})"
    res = subprocess.run(
        [*_dcache(), *item.argv, "--check-config"],
        capture_output=True,
        text=True,
        env=_env(item.env),
        timeout=CHECK_TIMEOUT_S,
    )
    assert res.returncode == 0, f"{item.where}: dcache {shlex.join(item.argv)} --check-config exited {res.returncode}:\n{res.stderr}"
    item.config = json.loads(res.stdout)
    return item


def _check_all(items: Sequence[Checked]) -> list[Checked]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(_check_config, items))


def _addr(host: str, port: int) -> str:
    return f"{host}:{port}"


# -- ZooKeeper (the official image) ----------------------------------------------------------

#: The ensemble the official zookeeper image writes into zoo.cfg when ZOO_SERVERS is unset (standalone).
ZOO_DEFAULT_SERVERS = "server.1=localhost:2888:3888;2181"
#: ZooKeeper's own default whitelist of four-letter words (the image passes ZOO_4LW_COMMANDS_WHITELIST on).
ZOO_DEFAULT_4LW = "srvr"
ZOO_DEFAULT_TICK_MS = 2000
ZK_PROBE_TIMEOUT_S = 15.0
_ZOO_SERVER = re.compile(
    r"server\.(?P<id>\d+)=(?P<host>[^:;\s]+):(?P<quorum>\d+):(?P<election>\d+)(?::(?:participant|observer))?;(?:[^:;\s]+:)?(?P<client>\d+)"
)


@dataclass(frozen=True)
class ZooServer:
    id: int
    host: str
    quorum_port: int
    election_port: int
    client_port: int


def _zoo_servers(env: Mapping[str, str]) -> list[ZooServer]:
    """The servers the image's entrypoint writes into zoo.cfg (ZOO_SERVERS, space-separated).

    The image writes no ``clientPort``: each entry must end with ``;CLIENT_PORT``.
    """
    out = []
    for entry in env.get("ZOO_SERVERS", ZOO_DEFAULT_SERVERS).split():
        m = _ZOO_SERVER.fullmatch(entry)
        assert m, f"ZOO_SERVERS entry {entry!r} is not server.ID=HOST:QUORUM_PORT:ELECTION_PORT;CLIENT_PORT"
        out.append(ZooServer(int(m["id"]), m["host"], int(m["quorum"]), int(m["election"]), int(m["client"])))
    assert len({s.client_port for s in out}) == 1, f"ZOO_SERVERS: servers disagree on the client port: {out}"
    return out


#: ``nc`` as a ZooKeeper server in state $FAKE_ZK would answer one four-letter word on $FAKE_ZK_PORT.
_FAKE_NC = r"""#!/bin/sh
eval "port=\${$#}"
read -r word
if [ "$FAKE_ZK" = down ] || [ "$port" != "$FAKE_ZK_PORT" ]; then
    echo "nc: connect to port $port (tcp) failed: Connection refused" >&2
    exit 1
fi
case ",$FAKE_ZK_4LW," in
    *",$word,"* | ",*,") ;;
    *) echo "$word is not executed because it is not in the whitelist."; exit 0 ;;
esac
case "$word" in
    ruok) printf imok ;;
    srvr)
        if [ "$FAKE_ZK" = serving ]; then
            printf 'Zookeeper version: 3.8.4\nLatency min/avg/max: 0/0.0/0\nMode: follower\nNode count: 12\n'
        else
            echo "This ZooKeeper instance is not currently serving requests"
        fi ;;
    *) echo "fake nc: no answer for $word" >&2; exit 1 ;;
esac
"""


def _run_zk_probe(argv: Sequence[str], state: str, env: Mapping[str, str], port: int, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run a health check or probe command with ``nc`` answering like a ZooKeeper server that is
    ``serving`` (in a quorum, or standalone), in ``no-quorum`` (running, not serving) or ``down``,
    on ``port``, with the whitelist of four-letter words the container's environment sets."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    nc = bin_dir / "nc"
    nc.write_text(_FAKE_NC)
    nc.chmod(0o755)
    whitelist = ",".join(w.strip() for w in env.get("ZOO_4LW_COMMANDS_WHITELIST", ZOO_DEFAULT_4LW).split(","))
    run_env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_ZK": state, "FAKE_ZK_PORT": str(port), "FAKE_ZK_4LW": whitelist}
    return subprocess.run(list(argv), capture_output=True, text=True, env=run_env, timeout=ZK_PROBE_TIMEOUT_S)


# -- docker compose ------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<braced>\w+)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}|\$(?P<plain>\w+)")


def _interpolate(value: Any) -> Any:
    """Compose's ``${VAR:-default}`` interpolation, as if no variable were set."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            if m["op"] and m["op"].endswith("?"):
                raise AssertionError(f"compose file requires ${{{m['braced']}}}: {value!r}")
            return m["default"] or ""

        return _INTERPOLATION.sub(sub, value)
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    return value


#: Service attributes an override replaces instead of merging (compose-go's override rules).
_REPLACED = {("command",), ("entrypoint",), ("healthcheck", "test")}
#: Service attributes merged as KEY=VALUE sequences (mappings or lists alike).
_AS_SEQUENCE = {("environment",), ("labels",)}


def _as_sequence(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return sorted(k if v is None else f"{k}={v}" for k, v in value.items())
    return list(value or [])


def _as_depends_on(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    return {name: {"condition": "service_started", "required": True} for name in value or []}


def _merge(base: Any, override: Any, path: tuple[str, ...] = ()) -> Any:
    """Compose's merge of an override file into a base file (the Compose Specification's merge rules).

    Mappings merge by key, sequences append, except: ``command``, ``entrypoint``
    and ``healthcheck.test`` are replaced; ``depends_on`` merges by service name
    (short syntax expanded first); ``environment`` and ``labels`` merge as
    ``KEY=VALUE`` lists (the last one wins); ``volumes`` are unique by
    container path, ``secrets`` by target and ``ports`` by value, the later
    entry winning.
    """
    attribute = path[2:] if len(path) > 2 and path[0] == "services" else None
    if attribute in _REPLACED:
        return override
    if attribute == ("depends_on",):
        return _merge(_as_depends_on(base), _as_depends_on(override), (*path, "*"))
    if attribute in _AS_SEQUENCE:
        return _as_sequence(base) + _as_sequence(override)
    if override is None:
        return base
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merge(base[k], v, (*path, k)) if k in base else v for k, v in override.items()}}
    if isinstance(base, list) and isinstance(override, list):
        merged = base + override
        if attribute == ("volumes",):
            return list({_mount_target(v): v for v in merged}.values())
        if attribute == ("ports",):
            return list({json.dumps(p, sort_keys=True): p for p in merged}.values())
        if attribute == ("secrets",):
            return list({_secret_target(s): s for s in merged}.values())
        return merged
    return override


def test_compose_merge_rules() -> None:
    """The merge the ZooKeeper checks rely on, on the cases the override uses (as `docker compose config` merges them)."""
    base = {
        "services": {
            "a": {
                "command": "master --port 1",
                "depends_on": ["b"],
                "environment": {"X": "1", "Y": "2"},
                "volumes": ["v1:/data", "./f:/etc/f:ro"],
                "healthcheck": {"test": ["CMD", "true"], "interval": "5s"},
            }
        },
        "volumes": {"v1": None},
    }
    override = {
        "services": {
            "a": {
                "command": ["master", "--port", "2"],
                "depends_on": {"c": {"condition": "service_healthy"}},
                "environment": ["Y=3"],
                "volumes": ["v2:/data"],
                "healthcheck": {"test": ["CMD", "false"]},
            },
            "c": {"image": "zookeeper:3.8"},
        },
        "volumes": {"v2": None},
    }
    merged = _merge(copy.deepcopy(base), override)
    a = merged["services"]["a"]
    assert a["command"] == ["master", "--port", "2"]
    assert a["depends_on"] == {"b": {"condition": "service_started", "required": True}, "c": {"condition": "service_healthy"}}
    assert _environment(a) == {"X": "1", "Y": "3"}
    assert _mounts(a) == {"/data": "v2", "/etc/f": "./f"}
    assert a["healthcheck"] == {"test": ["CMD", "false"], "interval": "5s"}
    assert set(merged["services"]) == {"a", "c"} and set(merged["volumes"]) == {"v1", "v2"}


#: The compose files of each membership mode, plain or with TLS, in `docker compose -f ... -f ...` order.
COMPOSE_FILES = {
    "embedded": (COMPOSE,),
    "zookeeper": (COMPOSE, COMPOSE_ZK),
    "embedded-tls": (COMPOSE, COMPOSE_TLS),
    "zookeeper-tls": (COMPOSE, COMPOSE_ZK, COMPOSE_TLS),
}
PLAIN_MODES = ["embedded", "zookeeper"]
TLS_MODES = ["embedded-tls", "zookeeper-tls"]


@functools.cache
def _load_compose(mode: str) -> dict[str, Any]:
    """A mode's compose files, each interpolated, merged the way compose merges them."""
    doc: dict[str, Any] = {}
    for path in COMPOSE_FILES[mode]:
        part = _interpolate(yaml.safe_load(path.read_text()))
        assert isinstance(part, dict), f"{path.name} is not a mapping"
        assert path.parent == COMPOSE.parent, f"{path.name}: compose resolves paths against the first file's directory"
        doc = _merge(doc, copy.deepcopy(part))  # deep copies: YAML aliases share objects
    assert isinstance(doc.get("services"), dict), f"{mode}: compose files have no services"
    return doc


@pytest.fixture(scope="module", params=sorted(COMPOSE_FILES))
def compose_mode(request: pytest.FixtureRequest) -> str:
    """Which compose set: the base file alone (embedded) or base + ZooKeeper override, each plain or + TLS override."""
    return str(request.param)


@pytest.fixture(scope="module")
def compose(compose_mode: str) -> dict[str, Any]:
    return _load_compose(compose_mode)


def _is_dcache(service: Mapping[str, Any]) -> bool:
    build = service.get("build")
    return isinstance(build, dict) and Path(build.get("dockerfile", "")).name == DOCKERFILE.name


def _command(service: Mapping[str, Any]) -> list[str]:
    cmd = service.get("command")
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd or []]


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.partition("=")[::2] for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _env_file_entries(service: Mapping[str, Any]) -> list[str | dict[str, Any]]:
    """A service's ``env_file`` entries: paths (short syntax) or ``{path, required}`` (long syntax)."""
    value = service.get("env_file") or []
    return [value] if isinstance(value, str | dict) else list(value)


def _env_files(service: Mapping[str, Any]) -> list[str]:
    """The paths of a service's ``env_file``, as written (relative to docker/)."""
    return [str(e["path"] if isinstance(e, dict) else e) for e in _env_file_entries(service)]


def _read_env_file(path: Path) -> dict[str, str]:
    """A compose env file: ``KEY=VALUE`` lines, blank lines and ``#`` comments skipped, quotes around a value removed."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and key.strip(), f"{path.name}: {line!r} is not KEY=VALUE"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def _run_create_secrets(target: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """``docker/create-secrets.sh [OPTIONS] TARGET``, run the way docker/README.md says (an executable script)."""
    argv = [str(CREATE_SECRETS), *options, str(target)]
    res = subprocess.run(argv, capture_output=True, text=True, env=_env({}), timeout=CHECK_TIMEOUT_S)
    assert res.returncode == 0, f"{shlex.join(argv)} exited {res.returncode}:\n{res.stdout}{res.stderr}"
    return res


@functools.cache
def _sample_secrets() -> Path:
    """What docker/secrets/ holds once the operator ran docker/create-secrets.sh --tls: the script, run into a temp directory."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is not on PATH: docker/create-secrets.sh needs it")
    root = Path(tempfile.mkdtemp(prefix="dcache-test-deploy-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    _run_create_secrets(root / "secrets", "--tls")
    return root / "secrets"


def _files_under(root: Path) -> dict[str, Path]:
    """Every file under ``root``, by its path relative to it."""
    return {str(f.relative_to(root)): f for f in sorted(root.rglob("*")) if f.is_file()}


def _in_secrets(path: str) -> str | None:
    """``path`` (as a compose file writes it) relative to docker/secrets/, or None if it lies elsewhere."""
    parts = Path(os.path.normpath(path)).parts
    return str(Path(*parts[1:])) if len(parts) > 1 and parts[0] == os.path.normpath(COMPOSE_SECRETS) else None


def _compose_file(path: str) -> Path:
    """A file a compose file names (relative to docker/); under ./secrets/, the one the script made in the sample."""
    inside = _in_secrets(path)
    return _sample_secrets() / inside if inside is not None else COMPOSE.parent / path


def _service_env(service: Mapping[str, Any]) -> dict[str, str]:
    """A container's environment: its env files in order, then ``environment``, which wins (as compose does)."""
    env: dict[str, str] = {}
    for path in _env_files(service):
        env.update(_read_env_file(_compose_file(path)))
    env.update(_environment(service))
    return env


def _mount_target(volume: str | Mapping[str, Any]) -> str:
    if isinstance(volume, Mapping):
        return str(volume["target"])
    parts = volume.split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def _mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """Container path -> source (volume name or host path) of a service's volumes."""
    out = {}
    for v in service.get("volumes") or []:
        source = v.get("source", "") if isinstance(v, dict) else v.partition(":")[0]
        out[_mount_target(v)] = source
    return out


def _published(service: Mapping[str, Any]) -> set[int]:
    """Container ports a service publishes."""
    ports = set()
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            ports.add(int(p["target"]))
        else:
            ports.add(int(str(p).rsplit(":", 1)[-1].split("/")[0]))
    return ports


@functools.cache
def _checked_compose(mode: str) -> dict[str, Checked]:
    items = []
    for name, service in _load_compose(mode)["services"].items():
        if not _is_dcache(service):
            continue
        assert "entrypoint" not in service, f"{name}: keep the image's ENTRYPOINT (dcache)"
        items.append(Checked(f"compose service {name}", _command(service), _service_env(service)))
    assert items, "no service builds docker/Dockerfile"
    return {c.where.rsplit(" ", 1)[-1]: c for c in _check_all(items)}


@pytest.fixture(scope="module")
def compose_daemons(compose_mode: str) -> dict[str, Checked]:
    """Every dcache service of the compose set, checked by --check-config."""
    return _checked_compose(compose_mode)


def _by_role(daemons: Mapping[str, Checked], role: str) -> dict[str, Checked]:
    return {name: c for name, c in daemons.items() if c.role == role}


def test_compose_builds_the_image_from_the_repo(compose: dict[str, Any]) -> None:
    images = set()
    for name, service in compose["services"].items():
        if _is_dcache(service):
            build = service["build"]
            context = (COMPOSE.parent / build.get("context", ".")).resolve()
            assert context == REPO, f"{name}: build context {context} is not the repository root"
            assert (context / build["dockerfile"]).resolve() == DOCKERFILE.resolve(), f"{name}: {build['dockerfile']}"
            images.add(service.get("image"))
    assert len(images) == 1, f"dcache services should share one image tag, got {images}"


def test_compose_commands_pass_check_config(compose_daemons: dict[str, Checked]) -> None:
    roles = {c.role for c in compose_daemons.values()}
    assert roles == set(ROLES), f"compose runs roles {roles}, expected {set(ROLES)}"
    for name, c in compose_daemons.items():
        assert c.config["host"] in ANY_ADDRESS, f"{name}: listens on {c.config['host']}, unreachable from other containers"
        assert c.config["port"] != 0, f"{name}: a fixed port is needed for the others to reach it"


def test_compose_references_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        deps = service.get("depends_on") or []
        for dep in deps if isinstance(deps, list) else list(deps):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for target, source in _mounts(service).items():
            if source.startswith((".", "/", "~")):
                assert (COMPOSE.parent / source).exists(), f"{name}: mounts missing {source} at {target}"
            else:
                assert source in declared, f"{name}: named volume {source!r} is not declared under volumes:"


def _check_compose_data_nodes(compose: Mapping[str, Any], masters: Mapping[str, Checked], aux: Mapping[str, Checked]) -> None:
    """What either membership mode needs of the aux nodes: ids, advertised names, one volume each."""
    replicas = {c.config["replicas"] for c in masters.values()}
    assert len(replicas) == 1, f"masters disagree on --replicas: {replicas}"
    assert replicas.pop() <= len(aux), "more replicas than aux nodes"
    node_ids = [c.config["node_id"] for c in (*masters.values(), *aux.values())]
    assert all(node_ids) and len(set(node_ids)) == len(node_ids), f"node ids must be set and unique: {node_ids}"
    volume_path = _dockerfile_volume()
    used_volumes: set[str] = set()
    for name, c in aux.items():
        assert c.config["advertise"] == _addr(name, c.config["port"]), f"{name} must advertise its service name and port"
        data_dir = c.config["data_dir"]
        mounts = _mounts(compose["services"][name])
        assert data_dir in mounts, f"{name}: --data-dir {data_dir} is not a mounted volume ({mounts})"
        assert data_dir == volume_path, f"{name}: --data-dir {data_dir} is not the image's VOLUME {volume_path} (owned by the user)"
        assert mounts[data_dir] not in used_volumes, f"{name} shares volume {mounts[data_dir]} with another aux node"
        used_volumes.add(mounts[data_dir])


def _check_compose_shims(masters: Mapping[str, Checked], shims: Mapping[str, Checked]) -> None:
    every_master = {_addr(n, c.config["port"]) for n, c in masters.items()}
    for name, c in shims.items():
        assert set(c.config["master"]) == every_master, f"{name} --master {c.config['master']} != {sorted(every_master)}"


@pytest.mark.parametrize("compose_mode", ["embedded", "embedded-tls"], indirect=True)
def test_compose_topology(compose: dict[str, Any], compose_daemons: dict[str, Checked]) -> None:
    masters = _by_role(compose_daemons, "master")
    aux = _by_role(compose_daemons, "aux")
    coordinators = [n for n, c in masters.items() if not c.config["coordinator"]]
    assert len(coordinators) == 1, f"exactly one master must coordinate (no --coordinator), got {coordinators}"
    coordinator = _addr(coordinators[0], masters[coordinators[0]].config["port"])
    for name, c in masters.items():
        assert not c.config["zookeeper"], f"{name}: docker-compose.yml is the embedded mode (ZooKeeper: the override file)"
        if name not in coordinators:
            assert c.config["coordinator"] == coordinator, f"{name} follows {c.config['coordinator']}, not {coordinator}"
            assert coordinators[0] in (compose["services"][name].get("depends_on") or []), f"{name}: depends_on the coordinator"
    for name, c in aux.items():
        assert c.config["join"] == coordinator, f"{name} joins {c.config['join']}, not the coordinator {coordinator}"
    _check_compose_data_nodes(compose, masters, aux)
    _check_compose_shims(masters, _by_role(compose_daemons, "http"))


#: The settings of the membership mode; everything else must not differ between the modes.
MEMBERSHIP = {"coordinator", "aux", "join", "zookeeper", "cluster", "zk_session_timeout"}


@pytest.mark.parametrize("compose_mode", ["zookeeper", "zookeeper-tls"], indirect=True)
def test_compose_zookeeper_topology(compose_mode: str, compose: dict[str, Any], compose_daemons: dict[str, Checked]) -> None:
    services = compose["services"]
    (zk,) = [n for n, s in services.items() if str(s.get("image", "")).startswith("zookeeper:")]
    zk_env = _environment(services[zk])
    ensemble = _zoo_servers(zk_env)
    assert len(ensemble) == 1, f"{zk}: one standalone server expected, got {ensemble}"
    zk_addr = _addr(zk, ensemble[0].client_port)
    for target in (zk_env.get("ZOO_DATA_DIR", "/data"), zk_env.get("ZOO_DATA_LOG_DIR", "/datalog")):
        source = _mounts(services[zk]).get(target, "")
        assert source in (compose.get("volumes") or {}), f"{zk}: {target} must be a named volume (the ring lives there)"
    assert services[zk].get("healthcheck", {}).get("test"), f"{zk}: a healthcheck, for depends_on: service_healthy"

    masters = _by_role(compose_daemons, "master")
    aux = _by_role(compose_daemons, "aux")
    clusters = {c.config["cluster"] for c in (*masters.values(), *aux.values())}
    assert len(clusters) == 1, f"masters and aux nodes must name one cluster, got {clusters}"
    for name, c in (*masters.items(), *aux.items()):
        assert c.config["zookeeper"] == zk_addr, f"{name}: --zookeeper {c.config['zookeeper']}, not the service {zk_addr}"
        assert not c.config.get("coordinator") and not c.config.get("aux") and not c.config.get("join"), f"{name}: embedded flags left"
        dep = _as_depends_on(services[name].get("depends_on")).get(zk) or {}
        assert dep.get("condition") == "service_healthy", f"{name}: depends_on {zk} with condition service_healthy"
    assert len(masters) >= 2, "masters are peers in ZooKeeper mode: run at least two"
    _check_compose_data_nodes(compose, masters, aux)
    _check_compose_shims(masters, _by_role(compose_daemons, "http"))

    # The override changes the membership flags only: same services, ports, ids, addresses, directories (and TLS).
    embedded = _checked_compose(compose_mode.replace("zookeeper", "embedded"))
    assert set(compose_daemons) == set(embedded), f"dcache services differ from the base file: {set(compose_daemons) ^ set(embedded)}"
    for name, c in compose_daemons.items():
        want = {k: v for k, v in embedded[name].config.items() if k not in MEMBERSHIP}
        got = {k: v for k, v in c.config.items() if k not in MEMBERSHIP}
        assert got == want, f"{name}: the override changes {sorted(k for k in want if got.get(k) != want[k])}"


@pytest.mark.parametrize("compose_mode", ["zookeeper"], indirect=True)
def test_compose_zookeeper_healthcheck(compose: dict[str, Any], tmp_path: Path) -> None:
    (zk,) = [s for s in compose["services"].values() if str(s.get("image", "")).startswith("zookeeper:")]
    test = zk["healthcheck"]["test"]
    if isinstance(test, str):
        argv = ["sh", "-c", test]
    else:
        assert test[0] in ("CMD", "CMD-SHELL"), f"healthcheck test {test}"
        argv = ["sh", "-c", test[1]] if test[0] == "CMD-SHELL" else list(test[1:])
    zk_env = _environment(zk)
    port = _zoo_servers(zk_env)[0].client_port
    for state, healthy in (("serving", True), ("no-quorum", False), ("down", False)):
        res = _run_zk_probe(argv, state, zk_env, port, tmp_path)
        assert (res.returncode == 0) == healthy, f"healthcheck {test} with ZooKeeper {state}: exit {res.returncode} {res.stderr}"


# -- credentials: compose ------------------------------------------------------------


def _secret_target(entry: str | Mapping[str, Any]) -> str:
    """Where a service's compose secret is mounted: ``/run/secrets/TARGET`` (TARGET defaults to the secret's name)."""
    target = entry if isinstance(entry, str) else str(entry.get("target", entry["source"]))
    return target if target.startswith("/") else f"/run/secrets/{target}"


def _secret_mounts(compose: Mapping[str, Any], name: str) -> dict[str, str]:
    """Container path -> host file of each compose secret service ``name`` mounts (``/run/secrets/NAME`` by default)."""
    declared = compose.get("secrets") or {}
    out = {}
    for entry in compose["services"][name].get("secrets") or []:
        source = entry if isinstance(entry, str) else entry["source"]
        assert source in declared, f"{name}: secret {source!r} is not declared under the top-level secrets:"
        assert "file" in declared[source], f"secret {source}: expected `file:` (a file made by {CREATE_SECRETS.name})"
        target = _secret_target(entry)
        assert target not in out, f"{name}: two secrets mounted at {target}"
        out[target] = str(declared[source]["file"])
    return out


def _is_tls_file(path: str) -> bool:
    """``path`` (as a compose file writes it) is under docker/secrets/tls/, where create-secrets.sh --tls writes."""
    inside = _in_secrets(path)
    return inside is not None and Path(inside).parts[0] == COMPOSE_TLS_DIR


def _no_credential_on_display(where: str, argv: Sequence[str], literal_env: Mapping[str, str]) -> None:
    """No --insecure, no credential on the command line or written out in the file (``literal_env``)."""
    flags = {a.partition("=")[0] for a in argv}
    assert "--insecure" not in flags and "DCACHE_INSECURE" not in literal_env, f"{where}: protected mode off (--insecure)"
    shown = sorted(flags & set(FORBIDDEN_FLAGS))
    assert not shown, f"{where}: {shown} on the command line, where ps shows it: use the file or the variable"
    written = sorted(set(literal_env) & set(CREDENTIAL_VARS))
    assert not written, f"{where}: {written} written in the file: credentials come from {COMPOSE_SECRETS}/ or the Secret {K8S_SECRET}"


def test_compose_credentials(compose: dict[str, Any], compose_daemons: dict[str, Checked]) -> None:
    """Every dcache service has its credentials, from docker/secrets/: masters and aux nodes the one cluster
    secret (a compose secret mounted where --cluster-secret-file points) and the client token; the shim the
    client token and its HTTP token, and no cluster secret. --check-config (protected mode included) passed."""
    services = compose["services"]
    cluster_secrets = set()
    for name, c in compose_daemons.items():
        cfg = c.config
        _no_credential_on_display(f"compose service {name}", c.argv, _environment(services[name]))
        assert cfg["insecure"] is False, f"{name}: protected mode must stay on"
        assert cfg["host"] in ANY_ADDRESS and cfg["auth_token"] == "<redacted>", f"{name}: no client token (DCACHE_AUTH_TOKEN)"
        for path in _env_files(services[name]):
            if set(_read_env_file(_compose_file(path))) & set(CREDENTIAL_VARS):
                assert _in_secrets(path), f"{name}: env_file {path} holds credentials outside {COMPOSE_SECRETS}/ (git-ignored)"
        optional = [e for e in _env_file_entries(services[name]) if isinstance(e, dict) and e.get("required") is False]
        assert not optional, f"{name}: optional env files {optional}: without them the service would start with no credential"
        mounts = {target: f for target, f in _secret_mounts(compose, name).items() if not _is_tls_file(f)}
        if c.role == "http":
            assert cfg["http_token"] == "<redacted>", f"{name}: the shim listens on {cfg['host']} without DCACHE_HTTP_TOKEN"
            assert not mounts, f"{name}: the shim is a client of the masters; it needs no cluster secret ({mounts})"
            continue
        path = cfg["cluster_secret_file"]
        assert path and cfg["cluster_secret"] is None, f"{name}: give the cluster secret as a file (--cluster-secret-file)"
        assert path in mounts, f"{name}: --cluster-secret-file {path} is not where a compose secret is mounted ({mounts})"
        assert _in_secrets(mounts[path]), f"{name}: the cluster secret {mounts[path]} is not in {COMPOSE_SECRETS}/ (git-ignored)"
        cluster_secrets.add(mounts[path])
        read_secret(str(_compose_file(mounts[path])), None)  # long enough, as the daemon reads it
    assert len(cluster_secrets) == 1, f"masters and aux nodes must share one cluster secret, got {sorted(cluster_secrets)}"


def _named_secrets(mode: str) -> tuple[set[str], set[str]]:
    """The credential files under ./secrets/ a compose set names (the certificates under ./secrets/tls/ aside):
    (mounted as compose secrets, read as env files)."""
    doc = _load_compose(mode)
    mounted = {_in_secrets(str(s.get("file", ""))) for s in (doc.get("secrets") or {}).values() if not _is_tls_file(str(s.get("file", "")))}
    env_files = {_in_secrets(p) for s in doc["services"].values() for p in _env_files(s)}
    return {m for m in mounted if m}, {e for e in env_files if e}


def _named_tls_files(mode: str) -> set[str]:
    """The files under ./secrets/tls/ a compose set mounts, relative to ./secrets/."""
    doc = _load_compose(mode)
    files = (str(s.get("file", "")) for s in (doc.get("secrets") or {}).values())
    return {str(_in_secrets(f)) for f in files if _is_tls_file(f)}


def _git(*args: str) -> subprocess.CompletedProcess[str] | None:
    """``git -C REPO ARGS``, or None where the repository is no git checkout (or git is missing)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return None
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)


def test_compose_secrets_script(tmp_path: Path) -> None:
    """docker/create-secrets.sh makes every file under ./secrets/ the compose files name, with random values,
    restrictive modes and readable by the daemons; it keeps existing files; the directory is never committed."""
    assert os.access(CREATE_SECRETS, os.X_OK), f"{CREATE_SECRETS.name} must be executable (docker/README.md runs it)"
    target = tmp_path / "secrets"
    _run_create_secrets(target)
    made = _files_under(target)
    assert target.stat().st_mode & 0o777 == 0o700, f"{target}: mode {target.stat().st_mode & 0o777:o}, expected 0700"

    mounted: set[str] = set()  # compose secrets (bind mounts)
    env_files: set[str] = set()  # read by the compose CLI
    for compose_set in COMPOSE_FILES:
        more_mounted, more_env_files = _named_secrets(compose_set)
        mounted |= more_mounted
        env_files |= more_env_files
    named = mounted | env_files
    assert named and named == set(made), f"compose files name {sorted(named)} in {COMPOSE_SECRETS}/, the script makes {sorted(made)}"

    values = {}
    for fname, path in made.items():
        mode = path.stat().st_mode & 0o777
        assert not mode & 0o022, f"{fname}: mode {mode:o} lets others write it"
        if fname in mounted:
            # A bind mount keeps the host file's owner and mode; the daemon (uid 10001) is "other" there.
            assert mode & 0o004, f"{fname}: mode {mode:o}: the daemons (uid 10001, not the file's owner) cannot read the mounted file"
            secret = read_secret(str(path), None)
            assert secret is not None and re.fullmatch(rb"[0-9a-f]{64}", secret), f"{fname}: expected openssl rand -hex 32"
            values[fname] = secret.decode()
        else:
            assert mode == 0o600, f"{fname}: mode {mode:o}, expected 0600 (only the compose CLI, as the operator, reads it)"
            env = _read_env_file(path)
            assert env and set(env) <= set(CREDENTIAL_VARS), f"{fname}: {sorted(env)} are not credential variables"
            for var, value in env.items():
                assert re.fullmatch(r"[0-9a-f]{64}", value), f"{fname}: {var} is not openssl rand -hex 32"
                values[f"{fname}:{var}"] = value
    assert len(set(values.values())) == len(values), "every credential must be a value of its own"

    before = {p.name: p.read_bytes() for p in target.iterdir()}
    _run_create_secrets(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before, "a second run must keep the existing files"
    other = tmp_path / "other"
    _run_create_secrets(other)
    assert all((other / n).read_bytes() != b for n, b in before.items()), "two runs must make different values"

    ignored = [p.strip().rstrip("/") for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    assert "docker/secrets" in ignored, ".dockerignore must keep docker/secrets out of the build context"
    paths = [f"docker/secrets/{n}" for n in sorted(made)]
    check = _git("check-ignore", "--no-index", *paths)
    if check is not None:
        assert check.stdout.split() == paths, f"docker/secrets/ must be git-ignored: {check.stdout}{check.stderr}"
        tracked = _git("ls-files", "docker/secrets")
        assert tracked is not None and not tracked.stdout.strip(), f"committed credentials: {tracked.stdout if tracked else ''}"


# -- TLS: compose ----------------------------------------------------------------------


def _openssl(*args: str) -> str:
    """``openssl ARGS``'s output; fails the test if it fails."""
    res = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    assert res.returncode == 0, f"openssl {shlex.join(args)} exited {res.returncode}: {res.stderr}"
    return res.stdout


def _cert_ext(cert: Path, ext: str) -> set[str]:
    """The values of one X.509 extension of ``cert`` (``openssl x509 -ext``), e.g. {"DNS:aux1", "IP Address:127.0.0.1"}."""
    out = _openssl("x509", "-in", str(cert), "-noout", "-ext", ext).splitlines()[1:]
    return {v.strip() for line in out for v in line.split(",") if v.strip()}


def _verifies(ca: Path, cert: Path) -> bool:
    """``openssl verify -CAfile CA CERT`` accepts the certificate (chain, dates, purpose left to the caller)."""
    res = subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(cert)], capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    return res.returncode == 0 and res.stdout.strip() == f"{cert}: OK"


def _walk(d: Directive) -> Iterator[Directive]:
    for child in d.block or []:
        yield child
        yield from _walk(child)


def _nginx_tls_upstreams(compose: Mapping[str, Any]) -> tuple[str, dict[str, list[Directive]], Directive]:
    """The nginx service of a TLS compose set, the upstreams of the nginx.conf it mounts, and that file parsed."""
    services = compose["services"]
    (nginx,) = [n for n, s in services.items() if str(s.get("image", "")).startswith("nginx")]
    mounted = _mounts(services[nginx]).get("/etc/nginx/nginx.conf")
    assert mounted == "./nginx.tls.conf", f"{nginx}: mount ./nginx.tls.conf (TLS passthrough), not {mounted}"
    conf = _parse_nginx(NGINX_TLS_CONF.read_text())
    (stream,) = conf.find("stream")
    return nginx, _upstream_servers(stream), conf


@pytest.mark.parametrize("compose_mode", TLS_MODES, indirect=True)
def test_compose_tls(compose: dict[str, Any], compose_daemons: dict[str, Checked]) -> None:
    """With the TLS override, every dcache service has --tls-cert, --tls-key and --tls-ca (masters and aux nodes
    --tls-client-auth too; the shim not, see docker-compose.tls.yml) pointing at compose secrets mounted from
    ./secrets/tls/, its own certificate and key, the one CA; the files create-secrets.sh --tls makes load as the
    daemon loads them, verify against that CA and name the service (and what clients dial through nginx)."""
    services = compose["services"]
    _, upstreams, _ = _nginx_tls_upstreams(compose)
    behind_nginx = {s.args[0].rpartition(":")[0] for servers in upstreams.values() for s in servers}
    cas: set[str] = set()
    keys: dict[str, str] = {}
    for name, c in compose_daemons.items():
        cfg = c.config
        paths = {kind: cfg[f"tls_{kind}"] for kind in ("cert", "key", "ca")}
        assert all(paths.values()), f"{name}: TLS needs --tls-cert, --tls-key and --tls-ca, got {paths}"
        if c.role == "http":
            assert cfg["tls_client_auth"] is False, f"{name}: HTTPS without client certificates (Prometheus, curl, probes)"
        else:
            assert cfg["tls_client_auth"] is True, f"{name}: masters and aux nodes run mutual TLS (--tls-client-auth true)"
        mounts = _secret_mounts(compose, name)
        volumes = _mounts(services[name])
        host = {}
        for kind, path in paths.items():
            assert path in mounts, f"{name}: --tls-{kind} {path} is not where a compose secret is mounted ({sorted(mounts)})"
            assert path not in volumes, f"{name}: a volume at {path} hides the secret"
            assert _is_tls_file(mounts[path]), f"{name}: {mounts[path]} is not in {COMPOSE_SECRETS}/{COMPOSE_TLS_DIR}/ (git-ignored)"
            host[kind] = _compose_file(mounts[path])
            assert host[kind].is_file(), f"{name}: {CREATE_SECRETS.name} --tls makes no {mounts[path]}"
        own = {kind: Path(mounts[paths[kind]]).name for kind in ("cert", "key")}
        assert own == {"cert": f"{name}.crt", "key": f"{name}.key"}, f"{name}: mount its own certificate and key, not {own}"
        cas.add(mounts[paths["ca"]])
        keys[name] = mounts[paths["key"]]
        # As the daemon loads them: the key matches the certificate, the CA is a CA.
        TlsContexts(cert=str(host["cert"]), key=str(host["key"]), ca=str(host["ca"]), client_auth=cfg["tls_client_auth"])
        assert _verifies(host["ca"], host["cert"]), f"{name}: {mounts[paths['cert']]} is not signed by {mounts[paths['ca']]}"
        sans = _cert_ext(host["cert"], "subjectAltName")
        assert f"DNS:{name}" in sans, f"{name}: its certificate names {sorted(sans)}, not its service name"
        if name in behind_nginx:
            missing = COMPOSE_NGINX_NAMES - sans
            assert not missing, f"{name}: nginx passes TLS through to it; its certificate must also name {sorted(missing)}"
    assert len(cas) == 1, f"every service must trust the one compose CA, got {sorted(cas)}"
    for name, service in services.items():
        for target, source in _mounts(service).items():
            assert _in_secrets(source) is None, f"{name}: {source} mounted as a volume at {target}: use a compose secret (read-only)"


@pytest.mark.parametrize("compose_mode", TLS_MODES, indirect=True)
def test_nginx_tls_conf_matches_compose(compose: dict[str, Any], compose_daemons: dict[str, Checked]) -> None:
    """docker/nginx.tls.conf passes TLS through (no certificate, no key, no termination) to the masters and to
    the shims, on the ports compose publishes, with the same passive health as docker/nginx.conf."""
    nginx, upstreams, conf = _nginx_tls_upstreams(compose)
    assert not conf.find("http"), "TLS passthrough: no http block (nginx cannot read HTTPS it does not terminate)"
    assert not conf.find("load_module"), "the official nginx image has stream built in: no load_module"
    terminating = [d.name for d in _walk(conf) if d.name.startswith(("ssl", "proxy_ssl"))]
    assert not terminating, f"nginx must not terminate or originate TLS here: {terminating}"
    (stream,) = conf.find("stream")
    for server in stream.find("server"):
        for listen in server.find("listen"):
            assert "ssl" not in listen.args, f"listen {listen.args}: passthrough, no ssl"
        (proxy_pass,) = server.find("proxy_pass")
        assert proxy_pass.args[0] in upstreams, f"proxy_pass {proxy_pass.args[0]} names no upstream"
    groups = {frozenset(s.args[0] for s in servers) for servers in upstreams.values()}
    for role in ("master", "http"):
        want = frozenset(_addr(n, c.config["port"]) for n, c in _by_role(compose_daemons, role).items())
        assert want in groups, f"no upstream lists exactly the {role} services {sorted(want)}: {groups}"
    resp = frozenset(_addr(n, c.config["resp_port"]) for n, c in _by_role(compose_daemons, "master").items())
    assert resp in groups, f"no upstream lists exactly the masters' RESP ports {sorted(resp)}: {groups}"
    assert len(groups) == len(upstreams) == 3, f"one upstream for the masters, their RESP ports, the shims: {list(upstreams)}"
    for servers in upstreams.values():
        for s in servers:
            host = s.args[0].rpartition(":")[0]
            assert _serves_tls(compose_daemons[host], int(s.args[0].rpartition(":")[2])), f"{s.args[0]} does not serve TLS"
            params = " ".join(s.args[1:])
            assert "max_fails=" in params and "fail_timeout=" in params, f"{s.args[0]} lacks passive health"
    service = compose["services"][nginx]
    listens = _listen_ports(stream)
    assert _published(service) == listens, f"{nginx} publishes {_published(service)}, nginx listens on {listens}"
    for servers in upstreams.values():
        for s in servers:
            assert s.args[0].rsplit(":", 1)[0] in (service.get("depends_on") or []), f"{nginx}: depends_on {s.args[0]}"


@pytest.mark.parametrize("compose_mode", ["embedded-tls"], indirect=True)
def test_nginx_tls_conf_passes_nginx_t(tmp_path: Path, compose: dict[str, Any]) -> None:
    nginx = find_nginx()  # skips, or fails under CI, when nginx cannot be had
    text, listen = _render_nginx(NGINX_TLS_CONF.read_text(), stream_module_path(nginx), list(compose["services"]))
    res = NginxProcess(nginx, text, tmp_path, listen).check()
    assert res.returncode == 0, f"nginx -t rejected the rendered docker/nginx.tls.conf:\n{res.stderr}\n---\n{text}"


def test_compose_tls_script(tmp_path: Path) -> None:
    """docker/create-secrets.sh --tls makes every file under ./secrets/tls/ the TLS override mounts, plus the CA's
    key and a client certificate that stay on the host; mounted files readable by the daemons (0444: bind mounts
    keep the host mode), the others 0600, in 0700 directories; every certificate signed by the new CA, for server
    and client use; existing files kept, a deleted certificate made again by the same CA; never committed."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is not on PATH: docker/create-secrets.sh --tls needs it")
    target = tmp_path / "secrets"
    _run_create_secrets(target, "--tls")
    tls_dir = target / COMPOSE_TLS_DIR
    for d in (target, tls_dir):
        assert d.stat().st_mode & 0o777 == 0o700, f"{d}: mode {d.stat().st_mode & 0o777:o}, expected 0700"
    made = {f: path for f, path in _files_under(target).items() if Path(f).parts[0] == COMPOSE_TLS_DIR}
    mounted = set().union(*(_named_tls_files(m) for m in TLS_MODES))
    host_only = {f"{COMPOSE_TLS_DIR}/{f}" for f in COMPOSE_TLS_HOST_ONLY}
    assert not mounted & host_only, f"never mount {sorted(mounted & host_only)}: they stay on the host"
    assert set(made) == mounted | host_only, f"the TLS override mounts {sorted(mounted)}, the script makes {sorted(made)}"
    for f, path in made.items():
        mode = path.stat().st_mode & 0o777
        if f in mounted:
            assert mode & 0o004 and not mode & 0o022, f"{f}: mode {mode:o}: the daemons (uid 10001, not the owner) must read it"
        else:
            assert mode == 0o600, f"{f}: mode {mode:o}, expected 0600 (only the operator uses it)"

    ca = tls_dir / "ca.crt"
    assert _cert_ext(ca, "basicConstraints") == {"CA:TRUE"}, "ca.crt is no CA"
    certs = sorted(tls_dir.glob("*.crt"))
    assert {c.stem for c in certs} >= {"ca", "client"}, f"certificates made: {[c.name for c in certs]}"
    for cert in (c for c in certs if c != ca):
        assert _verifies(ca, cert), f"{cert.name} does not verify against ca.crt"
        eku = _cert_ext(cert, "extendedKeyUsage")
        assert eku == {"TLS Web Server Authentication", "TLS Web Client Authentication"}, f"{cert.name}: {eku}"
        assert _cert_ext(cert, "basicConstraints") == {"CA:FALSE"}, f"{cert.name} must not be a CA"
        # The key is the certificate's (ssl loads the pair or refuses it).
        client_context(ca=str(ca), cert=str(cert), key=str(cert.with_suffix(".key")))

    before = {f: path.read_bytes() for f, path in made.items()}
    _run_create_secrets(target, "--tls")
    assert {f: path.read_bytes() for f, path in _files_under(target).items() if f in before} == before, "a second run keeps every file"
    (tls_dir / "aux1.crt").unlink()
    (tls_dir / "aux1.key").unlink()
    _run_create_secrets(target, "--tls")
    assert (tls_dir / "aux1.crt").read_bytes() != before[f"{COMPOSE_TLS_DIR}/aux1.crt"], "aux1.crt was not made again"
    assert _verifies(ca, tls_dir / "aux1.crt") and ca.read_bytes() == before[f"{COMPOSE_TLS_DIR}/ca.crt"], "a new certificate, the same CA"
    other = tmp_path / "other"
    _run_create_secrets(other, "--tls")
    assert not _verifies(ca, other / COMPOSE_TLS_DIR / "master1.crt"), "two runs must make two different CAs"
    assert set(_files_under(other)) == set(_files_under(target)), "every run makes the same files"

    paths = [f"docker/secrets/{f}" for f in sorted(made)]
    check = _git("check-ignore", "--no-index", *paths)
    if check is not None:
        assert check.stdout.split() == paths, f"docker/secrets/tls/ must be git-ignored: {check.stdout}{check.stderr}"


_PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")


def test_no_private_key_committed() -> None:
    """No PEM private key in the repository (git's tracked files) nor anywhere under docker/ or k8s/ but the
    git-ignored docker/secrets/: keys are made at run time (create-secrets.sh, cert-manager, tests/tlscerts.py)."""
    files = {p for d in (DOCKER, K8S) for p in d.rglob("*") if p.is_file() and DOCKER / "secrets" not in p.parents}
    tracked = _git("ls-files", "-z")
    if tracked is not None:
        files |= {REPO / f for f in tracked.stdout.split("\0") if f}
    found = []
    for path in sorted(files):
        try:
            text = path.read_text(errors="replace")
        except (IsADirectoryError, FileNotFoundError):
            continue
        if _PRIVATE_KEY.search(text):
            found.append(str(path.relative_to(REPO)))
    assert not found, f"PEM private keys committed: {found}"


# -- nginx -------------------------------------------------------------------------------


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = None

    def find(self, name: str) -> list[Directive]:
        return [d for d in self.block or [] if d.name == name]


def _parse_nginx(text: str) -> Directive:
    """A small nginx.conf parser: directives, arguments, blocks (comments and quotes handled)."""
    tokens = re.findall(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|#[^\n]*|[{};]|[^\s{};]+', text)
    root = Directive("", [], [])
    stack = [root]
    words: list[str] = []
    for tok in tokens:
        if tok.startswith("#"):
            continue
        if tok in ("{", ";"):
            assert words, f"nginx.conf: {tok!r} without a directive"
            d = Directive(words[0], words[1:], [] if tok == "{" else None)
            assert stack[-1].block is not None
            stack[-1].block.append(d)
            if tok == "{":
                stack.append(d)
            words = []
        elif tok == "}":
            assert not words and len(stack) > 1, "nginx.conf: unbalanced }"
            stack.pop()
        else:
            words.append(tok)
    assert len(stack) == 1 and not words, "nginx.conf: unbalanced {"
    return root


def _upstream_servers(section: Directive) -> dict[str, list[Directive]]:
    return {u.args[0]: u.find("server") for u in section.find("upstream")}


def _listen_ports(section: Directive) -> set[int]:
    return {int(d.args[0].rsplit(":", 1)[-1]) for s in section.find("server") for d in s.find("listen")}


@pytest.fixture(scope="module")
def nginx_conf() -> Directive:
    return _parse_nginx(NGINX_CONF.read_text())


@pytest.mark.parametrize("compose_mode", PLAIN_MODES, indirect=True)  # TLS: test_nginx_tls_conf_matches_compose
def test_nginx_conf_matches_compose(nginx_conf: Directive, compose: dict[str, Any], compose_daemons: dict[str, Checked]) -> None:
    (stream,) = nginx_conf.find("stream")
    (http,) = nginx_conf.find("http")
    assert not nginx_conf.find("load_module"), "the official nginx image has stream built in: no load_module"
    masters = _by_role(compose_daemons, "master")
    assert all(c.config["resp_port"] for c in masters.values()), "every master serves RESP (--resp-port), for Redis clients"
    expected = {
        # the native protocol and RESP, each an upstream over every master
        "stream": [
            {_addr(n, c.config["port"]) for n, c in masters.items()},
            {_addr(n, c.config["resp_port"]) for n, c in masters.items()},
        ],
        "http": [{_addr(n, c.config["port"]) for n, c in _by_role(compose_daemons, "http").items()}],
    }
    for section, want in ((stream, expected["stream"]), (http, expected["http"])):
        upstreams = _upstream_servers(section)
        got = sorted(({s.args[0] for s in servers} for servers in upstreams.values()), key=sorted)
        assert got == sorted(want, key=sorted), f"{section.name} upstreams {got} != compose services {want}"
        for servers in upstreams.values():
            for s in servers:
                params = " ".join(s.args[1:])
                assert "max_fails=" in params and "fail_timeout=" in params, f"{section.name}: {s.args[0]} lacks passive health"
        for server in section.find("server"):
            for d in server.find("proxy_pass"):
                target = d.args[0].removeprefix("http://")
                assert target in upstreams, f"{section.name}: proxy_pass {d.args[0]} names no upstream"
    assert any(s.find("proxy_connect_timeout") for s in stream.find("server")), "stream: set proxy_connect_timeout"

    services = compose["services"]
    (nginx,) = [n for n, s in services.items() if str(s.get("image", "")).startswith("nginx")]
    assert _mounts(services[nginx]).get("/etc/nginx/nginx.conf") == "./nginx.conf", f"{nginx} must mount ./nginx.conf"
    listens = _listen_ports(stream) | _listen_ports(http)
    assert _published(services[nginx]) == listens, f"{nginx} publishes {_published(services[nginx])}, nginx listens on {listens}"
    for upstream in (*_upstream_servers(stream).values(), *_upstream_servers(http).values()):
        for s in upstream:
            assert s.args[0].rsplit(":", 1)[0] in (services[nginx].get("depends_on") or []), f"{nginx}: depends_on {s.args[0]}"


def _render_nginx(text: str, stream_module: str | None, names: Sequence[str]) -> tuple[str, str]:
    """docker/nginx.conf for a local ``nginx -t`` under a temp prefix; also returns a listen address."""

    def sub(pattern: str, repl: Any, text: str, flags: int = re.M) -> str:
        out, n = re.subn(pattern, repl, text, flags=flags)
        assert n, f"rendering nginx.conf: {pattern!r} matched nothing"
        return out

    listen = f"127.0.0.1:{free_port()}"
    text = sub(r"^(\s*pid\s+)[^;]+;", r"\1logs/nginx.pid;", text)
    text = sub(r"^(\s*error_log\s+)\S+", r"\1logs/error.log", text)
    if re.search(r"^\s*access_log\s", text, re.M):  # http blocks only
        text = sub(r"^(\s*access_log\s+)/\S+?(;|\s)", r"\1logs/access.log\2", text)
    hosts = "|".join(re.escape(n) for n in names)
    text = sub(rf"^(\s*server\s+)(?:{hosts}):(\d+)", r"\g<1>127.0.0.1:\2", text)
    ports = iter([listen, *(f"127.0.0.1:{free_port()}" for _ in range(8))])
    text = sub(r"^(\s*listen\s+)\d+\b", lambda m: m[1] + next(ports), text)
    temp = "".join(f"    {k}_temp_path {k}_temp;\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    if re.search(r"^http\s*\{", text, re.M):
        text = sub(r"^http\s*\{\n", lambda m: m[0] + temp, text)
    if stream_module:
        text = f"load_module {stream_module};\n" + text
    return text, listen


@pytest.mark.parametrize("compose_mode", ["embedded"], indirect=True)  # the override leaves nginx alone
def test_nginx_conf_passes_nginx_t(tmp_path: Path, compose: dict[str, Any]) -> None:
    nginx = find_nginx()  # skips, or fails under CI, when nginx cannot be had
    text, listen = _render_nginx(NGINX_CONF.read_text(), stream_module_path(nginx), list(compose["services"]))
    res = NginxProcess(nginx, text, tmp_path, listen).check()
    assert res.returncode == 0, f"nginx -t rejected the rendered docker/nginx.conf:\n{res.stderr}\n---\n{text}"


# -- prometheus and grafana ------------------------------------------------------------------


def _serves_tls(c: Checked, port: int) -> bool:
    """Whether ``port`` of a checked daemon serves TLS: its own port or its RESP port, with a certificate (metrics ports are plain HTTP)."""
    return c.config.get("tls_cert") is not None and port in (c.config["port"], c.config.get("resp_port"))


def test_prometheus_targets_match_compose(compose_mode: str, compose: dict[str, Any], compose_daemons: dict[str, Checked]) -> None:
    """Prometheus (the file compose mounts) scrapes every dcache service where it serves /metrics, over HTTPS
    (checked against the CA compose mounts into Prometheus) where that port serves TLS, plain HTTP elsewhere."""
    services = compose["services"]
    (prom,) = [n for n, s in services.items() if str(s.get("image", "")).startswith(("prom/prometheus", "quay.io/prometheus"))]
    flags = dict(a.partition("=")[::2] for a in _command(services[prom]))
    config_path = flags.get("--config.file", "/etc/prometheus/prometheus.yml")
    want_file = "./prometheus.tls.yml" if compose_mode in TLS_MODES else "./prometheus.yml"
    assert _mounts(services[prom]).get(config_path) == want_file, f"{prom} must mount {want_file} at {config_path}"
    doc = yaml.safe_load((COMPOSE.parent / want_file).read_text())
    prom_secrets = _secret_mounts(compose, prom)

    scraped: dict[str, str] = {}
    for job in doc.get("scrape_configs") or []:
        assert job.get("metrics_path", "/metrics") == "/metrics", f"job {job['job_name']}: dcache serves /metrics"
        for sc in job.get("static_configs") or []:
            for target in sc.get("targets") or []:
                host, _, port = target.rpartition(":")
                assert host in services, f"prometheus job {job['job_name']} scrapes {target}: no such compose service"
                assert host in compose_daemons, f"prometheus job {job['job_name']} scrapes {target}: not a dcache service"
                want = compose_daemons[host].endpoint
                assert int(port) == want, f"prometheus scrapes {target}, but {host} serves /metrics on {want}"
                scraped[host] = job["job_name"]
                tls = _serves_tls(compose_daemons[host], want)
                assert job.get("scheme", "http") == ("https" if tls else "http"), (
                    f"job {job['job_name']}: {target} serves {'HTTPS' if tls else 'HTTP'}"
                )
                if tls:
                    ca = (job.get("tls_config") or {}).get("ca_file")
                    assert ca == compose_daemons[host].config["tls_ca"], (
                        f"job {job['job_name']}: verify {target} against the CA {host} trusts"
                    )
                    assert ca in prom_secrets and _is_tls_file(prom_secrets[ca]), f"{prom}: {ca} is not the compose CA mounted"
                    assert not (job.get("tls_config") or {}).get("insecure_skip_verify"), f"job {job['job_name']}: verify {target}"
    assert set(scraped) == set(compose_daemons), f"dcache services not scraped: {sorted(set(compose_daemons) - set(scraped))}"


def test_prometheus_tls_config_differs_only_in_tls() -> None:
    """docker/prometheus.tls.yml is docker/prometheus.yml with scheme and tls_config added to jobs, nothing else."""
    plain = yaml.safe_load(PROMETHEUS.read_text())
    tls = yaml.safe_load(PROMETHEUS_TLS.read_text())
    for job in tls["scrape_configs"]:
        job.pop("scheme", None)
        job.pop("tls_config", None)
    assert tls == plain, "docker/prometheus.tls.yml must differ from docker/prometheus.yml in scheme and tls_config only"


def test_grafana_mounts_match_provisioning(compose: dict[str, Any]) -> None:
    services = compose["services"]
    (grafana,) = [n for n, s in services.items() if "grafana" in str(s.get("image", ""))]
    mounts = _mounts(services[grafana])
    assert mounts.get("/etc/grafana/provisioning") == "./grafana/provisioning", f"{grafana}: provisioning mount"
    assert mounts.get("/var/lib/grafana/dashboards") == "./grafana/dashboards", f"{grafana}: dashboards mount"
    home = _environment(services[grafana]).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        rel = Path(home).relative_to("/var/lib/grafana/dashboards")
        assert (GRAFANA / "dashboards" / rel).is_file(), f"{grafana}: home dashboard {home} is not in docker/grafana/dashboards"
    (prom,) = [n for n, s in services.items() if "prometheus" in str(s.get("image", ""))]
    for f in sorted((GRAFANA / "provisioning" / "datasources").glob("*.y*ml")):
        for ds in yaml.safe_load(f.read_text()).get("datasources") or []:
            if ds.get("type") == "prometheus":
                assert ds["url"] == f"http://{prom}:9090", f"{f.name}: data source {ds['url']} is not the compose service {prom}"
    for f in sorted((GRAFANA / "provisioning" / "dashboards").glob("*.y*ml")):
        for provider in yaml.safe_load(f.read_text()).get("providers") or []:
            assert provider["options"]["path"] == "/var/lib/grafana/dashboards", f"{f.name}: provider path"


# -- Dockerfile --------------------------------------------------------------------------------------


@dataclass
class Instruction:
    name: str
    args: str
    heredocs: dict[str, str] = field(default_factory=dict)


def _parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined, comments dropped, heredoc bodies kept."""
    lines = text.splitlines()
    out: list[Instruction] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            nxt = lines[i]
            i += 1
            if nxt.lstrip().startswith("#"):
                continue
            line = line[:-1] + " " + nxt.strip()
        name, _, args = line.strip().partition(" ")
        inst = Instruction(name.upper(), args.strip())
        for delim in re.findall(r"<<-?['\"]?(\w+)['\"]?", args):
            body = []
            while lines[i] != delim:
                body.append(lines[i])
                i += 1
            i += 1
            inst.heredocs[delim] = "\n".join(body) + "\n"
        out.append(inst)
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return _parse_dockerfile(DOCKERFILE.read_text())


def _final_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [i for i, inst in enumerate(instructions) if inst.name == "FROM"]
    return instructions[starts[-1] :]


def _dockerfile_volume() -> str:
    (volume,) = [i for i in _final_stage(_parse_dockerfile(DOCKERFILE.read_text())) if i.name == "VOLUME"]
    paths = json.loads(volume.args) if volume.args.startswith("[") else volume.args.split()
    assert len(paths) == 1, f"one VOLUME (the snapshots) expected, got {paths}"
    return str(paths[0])


def test_dockerfile_instructions(dockerfile: list[Instruction]) -> None:
    froms = [i.args.split()[0] for i in dockerfile if i.name == "FROM"]
    assert len(froms) >= 2 and all(f == "python:3.11-slim" for f in froms), f"multi-stage python:3.11-slim expected, got {froms}"
    final = _final_stage(dockerfile)
    assert any(i.name == "COPY" and "--from=" in i.args for i in final), "the runtime stage copies the venv from the build stage"
    users = [i.args for i in final if i.name == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {users[-1]}: a numeric non-root uid (Kubernetes runAsNonRoot checks it)"
    (entrypoint,) = [i.args for i in final if i.name == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["dcache"], f"ENTRYPOINT {entrypoint}"
    volume = _dockerfile_volume()
    assert any(i.name == "RUN" and "chown" in i.args and volume in i.args for i in final), f"{volume} must be chowned to the user"
    assert [i for i in final if i.name == "HEALTHCHECK"], "no HEALTHCHECK"
    copied = {a for i in dockerfile if i.name == "COPY" and "--from=" not in i.args and not i.heredocs for a in i.args.split()[:-1]}
    ignored = [p.strip().rstrip("/") for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    for must in (".venv", ".git", "data"):
        assert must in ignored, f".dockerignore should exclude {must}"
    for path in copied:
        assert path.rstrip("/") not in ignored, f".dockerignore excludes {path}, which the Dockerfile copies"
        assert (REPO / path).exists(), f"the Dockerfile copies {path}, which is not in the repository"


def test_the_image_is_built_with_the_c_entry(dockerfile: list[Instruction]) -> None:
    """pip builds the LRU's C entry only if it can (optional): without gcc the image would hold a third fewer keys, silently."""
    starts = [i for i, inst in enumerate(dockerfile) if inst.name == "FROM"]
    build = dockerfile[starts[0] : starts[1]]
    runs = [i.args for i in build if i.name == "RUN"]
    copied = {a for i in build if i.name == "COPY" for a in i.args.split()[:-1]}
    assert "setup.py" in copied, "the build stage must copy setup.py, which declares the extension"
    assert any("apt-get install" in r and "gcc" in r for r in runs), "the build stage installs no C compiler"
    (install,) = [r for r in runs if "pip install" in r]
    assert install.index("import dcache.lru._entry") > install.index("pip install"), "the build does not check the extension was built"


def test_dockerfile_exposes_every_port_compose_serves(dockerfile: list[Instruction], compose_daemons: dict[str, Checked]) -> None:
    exposed = {int(p.split("/")[0]) for i in _final_stage(dockerfile) if i.name == "EXPOSE" for p in i.args.split()}
    for name, c in compose_daemons.items():
        served = {c.config[k] for k in ("port", "resp_port", "metrics_port") if c.config.get(k)}
        assert served <= exposed, f"{name} serves {sorted(served - exposed)}, which the image does not EXPOSE ({sorted(exposed)})"


def _healthcheck(dockerfile: list[Instruction], tmp_path: Path) -> Path:
    """The HEALTHCHECK's script, extracted from its heredoc into ``tmp_path``."""
    (hc,) = [i for i in _final_stage(dockerfile) if i.name == "HEALTHCHECK"]
    cmd = json.loads(hc.args[hc.args.index("CMD") + 3 :])
    assert cmd[0] == "python" and len(cmd) == 2, f"HEALTHCHECK CMD {cmd}: expected python SCRIPT"
    sources = [i for i in dockerfile if i.name == "COPY" and i.heredocs and i.args.split()[-1] == cmd[1]]
    assert len(sources) == 1, f"HEALTHCHECK runs {cmd[1]}, which no COPY heredoc writes"
    script = tmp_path / "healthcheck.py"
    script.write_text(next(iter(sources[0].heredocs.values())))
    return script


def _run_healthcheck(script: Path, pid: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), str(pid)], capture_output=True, text=True, env=_env({}), timeout=HEALTHCHECK_TIMEOUT_S
    )


@pytest.fixture
def fake_daemon() -> Iterator[Any]:
    """Start a sleeping process whose command line and environment look like a dcache daemon's."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: Sequence[str], env: Mapping[str, str]) -> int:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *argv], env=_env(env))
        procs.append(proc)
        return proc.pid

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def test_healthcheck_every_role(dockerfile: list[Instruction], tmp_path: Path, fake_daemon: Any) -> None:
    script = _healthcheck(dockerfile, tmp_path)
    loopback = ["--host", "127.0.0.1", "--log-level", "warning"]
    daemons: list[DaemonProcess] = []
    try:
        master = DaemonProcess("master", [*loopback, "--port", str(free_port())]).start()
        daemons.append(master)
        aux = DaemonProcess("aux", [*loopback, "--port", str(free_port()), "--auth-token", "s3cret"]).start()
        daemons.append(aux)
        shim = DaemonProcess("http", [*loopback, "--port", str(free_port()), "--master", master.addr]).start()
        daemons.append(shim)
        for d in daemons:
            assert d.proc is not None
            res = _run_healthcheck(script, d.proc.pid)
            assert res.returncode == 0, f"healthcheck of a live {d.role}: {res.stdout}{res.stderr}"
            assert res.stdout.startswith("healthy:"), res.stdout

        # As in a container: 0.0.0.0 in the command line, the port and token from DCACHE_* variables.
        env = {"DCACHE_PORT": str(aux.port), "DCACHE_AUTH_TOKEN": "s3cret"}
        res = _run_healthcheck(script, fake_daemon(["aux", "--host", "0.0.0.0"], env))
        assert res.returncode == 0, f"healthcheck via 0.0.0.0 and DCACHE_PORT: {res.stdout}{res.stderr}"
        res = _run_healthcheck(script, fake_daemon(["aux", "--host", "0.0.0.0"], {"DCACHE_PORT": str(aux.port)}))
        assert res.returncode == 1 and "Auth" in res.stdout, f"an aux node demanding a token must fail without it: {res.stdout}"

        # The shim is unhealthy when no master answers.
        master.kill()
        res = _run_healthcheck(script, shim.proc.pid if shim.proc else 0)
        assert res.returncode == 1 and "503" in res.stdout, f"shim without masters: {res.stdout}{res.stderr}"
    finally:
        for d in daemons:
            d.kill()
    for role in ROLES:  # nothing listens there
        res = _run_healthcheck(script, fake_daemon([role, "--host", "127.0.0.1", "--port", str(free_port())], {}))
        assert res.returncode == 1 and res.stdout.startswith("unhealthy:"), f"{role} with nothing listening: {res.stdout}{res.stderr}"
    res = _run_healthcheck(script, fake_daemon(["--version"], {}))
    assert res.returncode == 1, "a process that is no dcache daemon must be unhealthy"


def test_healthcheck_tls(dockerfile: list[Instruction], tmp_path: Path, fake_daemon: Any) -> None:
    """As docker-compose.tls.yml runs them (DCACHE_TLS_* variables, certificates that name only the service,
    mutual TLS on masters and aux nodes, HTTPS on the shim), every role is healthy; the same daemon reached
    without TLS is not, so the health check's TLS is what passes."""
    script = _healthcheck(dockerfile, tmp_path)
    certs = make_certs(tmp_path / "certs")
    node = certs.ca.issue("aux1", san="DNS:aux1")  # no loopback name: the health check dials 127.0.0.1 all the same
    shim_tls = {"DCACHE_TLS_CERT": node.cert, "DCACHE_TLS_KEY": node.key, "DCACHE_TLS_CA": certs.ca.cert}
    member_tls = {**shim_tls, "DCACHE_TLS_CLIENT_AUTH": "true"}
    loopback = ["--host", "127.0.0.1", "--log-level", "warning"]
    daemons: list[DaemonProcess] = []
    try:
        master = DaemonProcess("master", [*loopback, "--port", str(free_port())], env=member_tls).start()
        daemons.append(master)
        aux = DaemonProcess("aux", [*loopback, "--port", str(free_port())], env=member_tls).start()
        daemons.append(aux)
        shim = DaemonProcess("http", [*loopback, "--port", str(free_port()), "--master", master.addr], env=shim_tls).start()
        daemons.append(shim)
        for d in daemons:
            assert d.proc is not None
            res = _run_healthcheck(script, d.proc.pid)
            assert res.returncode == 0 and ("(TLS)" in res.stdout or "https://" in res.stdout), (
                f"{d.role} over TLS: {res.stdout}{res.stderr}"
            )
            assert res.stdout.startswith("healthy:"), res.stdout
            # The same command line without the TLS settings: a plain PING or GET, which the TLS port refuses.
            res = _run_healthcheck(script, fake_daemon([d.role, *loopback, "--port", str(d.port)], {}))
            assert res.returncode == 1, f"{d.role}: a plaintext health check of a TLS port passed: {res.stdout}"
    finally:
        for d in daemons:
            d.kill()


# -- Kubernetes ---------------------------------------------------------------------------------------

WORKLOADS = ("Deployment", "StatefulSet")


@dataclass
class K8s:
    docs: list[dict[str, Any]]

    def of(self, kind: str) -> dict[str, dict[str, Any]]:
        return {d["metadata"]["name"]: d for d in self.docs if d["kind"] == kind}

    def workloads(self) -> dict[str, dict[str, Any]]:
        return {f"{d['kind']}/{d['metadata']['name']}": d for d in self.docs if d["kind"] in WORKLOADS}

    def selected(self, selector: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """Workloads whose pod template carries every label of ``selector``."""
        return {n: w for n, w in self.workloads().items() if _matches(selector, _pod_labels(w))}

    def service_target(self, addr: str) -> tuple[dict[str, dict[str, Any]], int]:
        """The workloads a ``service:port`` address reaches, and the container port it lands on."""
        name, _, port_s = addr.rpartition(":")
        service = self.of("Service").get(name)
        assert service is not None, f"{addr}: no Service {name!r}"
        ports = [p for p in service["spec"]["ports"] if p["port"] == int(port_s)]
        assert ports, f"{addr}: Service {name} has no port {port_s}"
        selected = self.selected(service["spec"]["selector"])
        targets = {_container_port(w, ports[0].get("targetPort", ports[0]["port"])) for w in selected.values()}
        assert len(targets) == 1, f"{addr}: lands on different container ports {targets}"
        return selected, targets.pop()


def _matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _pod_labels(workload: Mapping[str, Any]) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"].get("labels") or {})


def _containers(workload: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def _container_port(workload: Mapping[str, Any], port: int | str, container: Mapping[str, Any] | None = None) -> int:
    """A named or numbered port, resolved against the pod's (or one container's) declared ports."""
    declared = [p for c in ([container] if container else _containers(workload)) for p in c.get("ports") or []]
    for p in declared:
        if port in (p.get("name"), p["containerPort"]):
            return int(p["containerPort"])
    raise AssertionError(f"{workload['metadata']['name']}: port {port!r} is not a declared containerPort ({declared})")


#: The manifests of each membership mode, as `kubectl apply -f` takes them. A directory
#: is not recursive (without -R): `kubectl apply -f k8s/` applies k8s/*.yaml, never k8s/zookeeper/.
K8S_FILES = {
    "embedded": sorted(K8S.glob("*.yaml")),
    "zookeeper": [K8S / "configmap.yaml", K8S / "http.yaml", *sorted(K8S_ZK.glob("*.yaml"))],
}


def _image_name(container: Mapping[str, Any]) -> str:
    """``registry/path/NAME:tag@digest`` -> ``NAME``."""
    return str(container.get("image", "")).split("@")[0].rsplit("/", 1)[-1].split(":")[0]


def _zookeepers(k8s: K8s) -> dict[str, dict[str, Any]]:
    """StatefulSets running the official zookeeper image."""
    return {n: w for n, w in k8s.of("StatefulSet").items() if any(_image_name(c) == "zookeeper" for c in _containers(w))}


@pytest.fixture(scope="module", params=sorted(K8S_FILES))
def k8s_mode(request: pytest.FixtureRequest) -> str:
    """Which manifest set: k8s/ (embedded) or the ZooKeeper set."""
    return str(request.param)


@pytest.fixture(scope="module")
def k8s(k8s_mode: str) -> K8s:
    files = K8S_FILES[k8s_mode]
    assert len(files) > 2 and all(f.is_file() for f in files), f"{k8s_mode}: manifests missing: {files}"
    docs = [d for f in files for d in yaml.safe_load_all(f.read_text()) if d is not None]
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d), f"not a Kubernetes object: {str(d)[:200]}"
        assert "namespace" not in d["metadata"], f"{d['kind']}/{d['metadata']['name']}: manifests are namespace-free"
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(set(keys)) == len(keys), f"duplicate objects: {keys}"
    return K8s(docs)


_K8S_VAR = re.compile(r"\$\$|\$\((\w+)\)")


def _expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of args and env values ($$ escapes)."""
    return _K8S_VAR.sub(lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)


def _container_env(k8s: K8s, workload: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, str]:
    """The environment the container would get, with sample values for the downward API and Secrets."""
    config_maps = k8s.of("ConfigMap")
    pod_name = workload["metadata"]["name"] + ("-0" if workload["kind"] == "StatefulSet" else "-5d9c7b8f4-x2x7q")
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        ref = src.get("configMapRef")
        assert ref is not None, f"{container['name']}: only configMapRef envFrom is understood here"
        assert ref["name"] in config_maps, f"{container['name']}: envFrom ConfigMap {ref['name']} is not in k8s/"
        env.update({str(k): str(v) for k, v in config_maps[ref["name"]]["data"].items()})
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = _expand(str(var["value"]), env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            env[var["name"]] = pod_name if path == "metadata.name" else FIELD_SAMPLES[path]
        elif "secretKeyRef" in source:
            env[var["name"]] = SECRET_SAMPLE
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[var["name"]] = str(config_maps[ref["name"]]["data"][ref["key"]])
        else:
            raise AssertionError(f"{container['name']}: env {var['name']} from {source} is not understood here")
    return env


@dataclass
class PodCheck:
    workload: dict[str, Any]
    container: dict[str, Any]
    raw_args: list[str]
    checked: Checked


@pytest.fixture(scope="module")
def k8s_daemons(k8s: K8s) -> dict[str, PodCheck]:
    """Every dcache container of every workload, its args expanded and checked by --check-config."""
    pending = []
    for name, w in k8s.workloads().items():
        for c in _containers(w):
            if _image_name(c) != "dcache":
                continue
            command = [str(a) for a in c.get("command") or []]
            assert not command or command[0] == "dcache", f"{name}: command {command} bypasses the dcache ENTRYPOINT"
            raw = command[1:] + [str(a) for a in c.get("args") or []]
            env = _container_env(k8s, w, c)
            argv = [_expand(a, env) for a in raw]
            leftover = [a for a in argv if "$(" in a]
            assert not leftover, f"{name}: undefined variables in {leftover}"
            pending.append((w, c, raw, Checked(f"{name} container {c['name']}", argv, env)))
    checked = _check_all([p[3] for p in pending])
    return {f"{w['kind']}/{w['metadata']['name']}": PodCheck(w, c, raw, ch) for (w, c, raw, _), ch in zip(pending, checked, strict=True)}


def test_k8s_commands_pass_check_config(k8s_daemons: dict[str, PodCheck]) -> None:
    roles = {p.checked.role for p in k8s_daemons.values()}
    assert roles == set(ROLES), f"k8s runs roles {roles}, expected {set(ROLES)}"
    for name, p in k8s_daemons.items():
        cfg = p.checked.config
        assert cfg["host"] in ANY_ADDRESS, f"{name}: listens on {cfg['host']}, unreachable from other pods"
        declared = {int(port["containerPort"]) for port in p.container.get("ports") or []}
        served = {cfg["port"]} | {cfg[k] for k in ("metrics_port", "resp_port") if cfg.get(k) is not None}
        assert served == declared, f"{name}: serves ports {served}, declares containerPorts {declared}"
        assert cfg["auth_token"] == "<redacted>", f"{name}: DCACHE_AUTH_TOKEN from the Secret is not wired"
        assert p.workload["spec"]["template"]["spec"].get("enableServiceLinks") is False, (
            f"{name}: set enableServiceLinks: false (a Service named e.g. dcache would inject DCACHE_PORT=tcp://...)"
        )


def _k8s_secret_files(p: PodCheck) -> dict[str, tuple[str, str, int]]:
    """Path -> (Secret, key, file mode) of each Secret key the container sees as a file (read-only mounts only)."""
    pod = p.workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v["secret"] for v in pod.get("volumes") or [] if "secret" in v}
    out = {}
    for m in p.container.get("volumeMounts") or []:
        secret = volumes.get(m["name"])
        if secret is None:
            continue
        assert m.get("readOnly") is True, f"{p.checked.where}: mount the Secret at {m['mountPath']} readOnly"
        default_mode = int(secret.get("defaultMode", 0o644))
        name = secret.get("secretName", "")
        items = secret.get("items") or [{"key": k, "path": k} for k in K8S_SECRETS.get(name, ())]  # no items: every key, by its name
        for item in items:
            mode = int(item.get("mode", default_mode))
            if m.get("subPath"):
                if item["path"] == m["subPath"]:
                    out[m["mountPath"]] = (name, item["key"], mode)
            else:
                out[f"{m['mountPath'].rstrip('/')}/{item['path']}"] = (name, item["key"], mode)
    return out


def test_k8s_credentials(k8s: K8s, k8s_daemons: dict[str, PodCheck]) -> None:
    """Credentials come from the Secret dcache-credentials (certificates: test_k8s_tls), which no manifest creates, and none is optional (no
    Secret: no pod, rather than an open one). Master and aux pods mount its cluster-secret read-only, readable
    through the fsGroup and by no one else, where --cluster-secret-file points; every dcache container reads
    auth-token as DCACHE_AUTH_TOKEN; the shim http-token as DCACHE_HTTP_TOKEN, and mounts no cluster secret.
    --check-config (protected mode included) passed for every container."""
    assert not k8s.of("Secret"), f"a Secret in the manifests: `kubectl apply -f` would overwrite the real {K8S_SECRET} with it"
    for name, cm in k8s.of("ConfigMap").items():
        _no_credential_on_display(f"ConfigMap {name}", [], {str(k): str(v) for k, v in (cm.get("data") or {}).items()})
    for name, w in k8s.workloads().items():
        pod = w["spec"]["template"]["spec"]
        refs = [v["secret"] | {"name": v["secret"].get("secretName")} for v in pod.get("volumes") or [] if "secret" in v]
        assert not [v for v in pod.get("volumes") or [] if "projected" in v], f"{name}: projected volumes are not checked here"
        for c in pod["containers"]:
            refs += [src["secretRef"] for src in c.get("envFrom") or [] if "secretRef" in src]
            refs += [v["valueFrom"]["secretKeyRef"] for v in c.get("env") or [] if "secretKeyRef" in v.get("valueFrom", {})]
        for ref in refs:
            assert ref["name"] in K8S_SECRETS, f"{name}: reads the Secret {ref['name']}, not one of {sorted(K8S_SECRETS)}"
            assert not ref.get("optional"), f"{name}: an optional Secret lets the pod start without credentials"
            for key in [ref["key"]] if "key" in ref else [i["key"] for i in ref.get("items") or []]:
                assert key in K8S_SECRETS[ref["name"]], f"{name}: key {key} is not one of {sorted(K8S_SECRETS[ref['name']])}"

    for name, p in k8s_daemons.items():
        cfg = p.checked.config
        literal = {str(v["name"]): str(v["value"]) for v in p.container.get("env") or [] if "value" in v}
        _no_credential_on_display(name, p.checked.argv, literal)
        assert cfg["insecure"] is False, f"{name}: protected mode must stay on"
        from_secret = {
            v["name"]: v["valueFrom"]["secretKeyRef"]["key"]
            for v in p.container.get("env") or []
            if "secretKeyRef" in v.get("valueFrom", {})
        }
        want = {"DCACHE_AUTH_TOKEN": K8S_KEYS["client"]}
        if p.checked.role == "http":
            want["DCACHE_HTTP_TOKEN"] = K8S_KEYS["http"]
        assert from_secret == want, f"{name}: takes {from_secret} from the Secret, expected {want}"
        files = {path: f for path, f in _k8s_secret_files(p).items() if f[0] == K8S_SECRET}
        if p.checked.role == "http":
            assert cfg["http_token"] == "<redacted>", f"{name}: the shim listens on {cfg['host']} without DCACHE_HTTP_TOKEN"
            assert not files, f"{name}: the shim is a client of the masters; it needs no cluster secret ({files})"
            continue
        path = cfg["cluster_secret_file"]
        assert path and cfg["cluster_secret"] is None, f"{name}: give the cluster secret as a file (--cluster-secret-file)"
        assert path in files, f"{name}: --cluster-secret-file {path} is not a file of the Secret {K8S_SECRET} ({files})"
        _, key, mode = files[path]
        assert key == K8S_KEYS["cluster"], f"{name}: {path} holds the key {key}, not {K8S_KEYS['cluster']}"
        security = p.workload["spec"]["template"]["spec"].get("securityContext") or {}
        assert security.get("runAsNonRoot") and security.get("fsGroup") is not None, f"{name}: non-root with an fsGroup"
        # The kubelet writes Secret files as root with the fsGroup as their group: the daemon reads them through it.
        assert mode & 0o040 and not mode & 0o027, f"{name}: {path} mode {mode:o}: readable by the fsGroup, by no one else"


def test_k8s_tls(k8s: K8s, k8s_daemons: dict[str, PodCheck]) -> None:
    """TLS on every dcache container (on by default: docs/DECISIONS.md): --tls-cert, --tls-key and --tls-ca point at
    tls.crt, tls.key and ca.crt of the Secret dcache-tls, which no manifest creates, mounted read-only, readable
    through the fsGroup and by no one else; masters and aux nodes also --tls-client-auth; the shim not (the
    kubelet's probes present no certificate), and Prometheus scrapes its HTTPS port with scheme https."""
    for name, p in k8s_daemons.items():
        cfg = p.checked.config
        files = _k8s_secret_files(p)
        for kind, key in K8S_TLS_KEYS.items():
            path = cfg[f"tls_{kind}"]
            assert path, f"{name}: no --tls-{kind}"
            assert path in files, f"{name}: --tls-{kind} {path} is not a file of a mounted Secret ({sorted(files)})"
            secret, got, mode = files[path]
            assert (secret, got) == (K8S_TLS_SECRET, key), f"{name}: --tls-{kind} {path} is {secret}/{got}, not {K8S_TLS_SECRET}/{key}"
            assert mode & 0o040 and not mode & 0o027, f"{name}: {path} mode {mode:o}: readable by the fsGroup, by no one else"
        security = p.workload["spec"]["template"]["spec"].get("securityContext") or {}
        assert security.get("runAsNonRoot") and security.get("fsGroup") is not None, f"{name}: non-root with an fsGroup (the files' group)"
        want_client_auth = p.checked.role != "http"
        assert cfg["tls_client_auth"] is want_client_auth, f"{name}: --tls-client-auth should be {want_client_auth}"
        annotations = p.workload["spec"]["template"]["metadata"].get("annotations") or {}
        scraped = annotations.get("prometheus.io/port")
        if scraped is not None:
            tls = _serves_tls(p.checked, int(scraped))
            assert annotations.get("prometheus.io/scheme", "http") == ("https" if tls else "http"), f"{name}: prometheus.io/scheme"


def test_k8s_selectors_and_service_ports(k8s: K8s) -> None:
    workloads = k8s.workloads()
    for name, w in workloads.items():
        selector = w["spec"]["selector"]["matchLabels"]
        assert _matches(selector, _pod_labels(w)), f"{name}: selector {selector} does not match its pod labels"
        others = [o for o, ow in workloads.items() if o != name and _matches(selector, _pod_labels(ow))]
        assert not others, f"{name}: selector also matches the pods of {others}"
    for name, svc in k8s.of("Service").items():
        selected = k8s.selected(svc["spec"].get("selector") or {})
        assert selected, f"Service {name}: selector {svc['spec'].get('selector')} matches no pod template"
        for port in svc["spec"]["ports"]:
            for w in selected.values():
                _container_port(w, port.get("targetPort", port["port"]))
    for name, pdb in k8s.of("PodDisruptionBudget").items():
        assert k8s.selected(pdb["spec"]["selector"]["matchLabels"]), f"PodDisruptionBudget {name} matches no pods"
    for w in workloads.values():
        port = (w["spec"]["template"]["metadata"].get("annotations") or {}).get("prometheus.io/port")
        if port is not None:
            _container_port(w, int(port))  # scraped where something is declared


def test_k8s_statefulset_service_is_headless(k8s: K8s) -> None:
    services = k8s.of("Service")
    for name, sts in k8s.of("StatefulSet").items():
        svc = services.get(sts["spec"]["serviceName"])
        assert svc is not None, f"StatefulSet {name}: serviceName {sts['spec']['serviceName']} is not a Service"
        assert svc["spec"].get("clusterIP") == "None", f"StatefulSet {name}: Service {svc['metadata']['name']} must be headless"
        assert _matches(svc["spec"]["selector"], _pod_labels(sts)), f"Service {svc['metadata']['name']} must select {name}'s pods"


def test_k8s_hpas_scale_deployments(k8s: K8s) -> None:
    deployments = k8s.of("Deployment")
    assert k8s.of("HorizontalPodAutoscaler"), "no HorizontalPodAutoscaler"
    for name, hpa in k8s.of("HorizontalPodAutoscaler").items():
        assert hpa["apiVersion"] == "autoscaling/v2", f"HPA {name}: {hpa['apiVersion']}"
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["name"] in deployments, f"HPA {name}: scaleTargetRef {ref} is no Deployment here"
        assert 1 <= hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"], f"HPA {name}: replica bounds"
        target = deployments[ref["name"]]
        assert "replicas" not in target["spec"], f"Deployment {ref['name']}: spec.replicas fights HPA {name} on every apply"
        for metric in hpa["spec"].get("metrics") or []:
            resource = metric.get("resource", {}).get("name")
            if resource:
                for c in _containers(target):
                    assert resource in c.get("resources", {}).get("requests", {}), f"{c['name']}: HPA {name} needs {resource} requests"


def test_k8s_probes_hit_served_endpoints(k8s_daemons: dict[str, PodCheck]) -> None:
    for name, p in k8s_daemons.items():
        cfg = p.checked.config
        for kind in ("readinessProbe", "livenessProbe"):
            assert kind in p.container, f"{name}: no {kind}"
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = p.container.get(kind)
            if probe is None:
                continue
            if "tcpSocket" in probe:
                port = _container_port(p.workload, probe["tcpSocket"]["port"], p.container)
                assert port in (cfg["port"], cfg.get("metrics_port")), f"{name} {kind}: nothing listens on {port}"
            elif "httpGet" in probe:
                port = _container_port(p.workload, probe["httpGet"]["port"], p.container)
                path = probe["httpGet"].get("path", "/")
                scheme = "HTTPS" if _serves_tls(p.checked, port) else "HTTP"
                assert probe["httpGet"].get("scheme", "HTTP") == scheme, f"{name} {kind}: port {port} serves {scheme}"
                if port == cfg.get("metrics_port"):
                    assert path == "/metrics", f"{name} {kind}: the metrics port serves only /metrics, not {path}"
                else:
                    assert p.checked.role == "http" and port == cfg["port"], f"{name} {kind}: no HTTP server on port {port}"
                    assert path in ("/health", "/metrics"), f"{name} {kind}: the shim serves /health and /metrics, not {path}"
            else:
                raise AssertionError(f"{name} {kind}: expected tcpSocket or httpGet, got {probe}")


def _check_k8s_aux(name: str, p: PodCheck, key_copies: int) -> None:
    """What either membership mode needs of an aux StatefulSet: stable ids and addresses, a volume each, time to hand over."""
    cfg = p.checked.config
    sts = p.workload
    assert sts["kind"] == "StatefulSet", f"{name}: aux nodes need stable names and volumes: a StatefulSet"
    assert key_copies <= sts["spec"]["replicas"], "more key replicas than aux pods"
    raw = " ".join(p.raw_args)
    assert "--node-id $(POD_NAME)" in raw, f"{name}: the node id must be the (stable) pod name"
    advertise = f"$(POD_NAME).{sts['spec']['serviceName']}:{cfg['port']}"
    assert f"--advertise {advertise}" in raw, f"{name}: advertise {advertise}, the pod's DNS name via the headless Service"
    claims = {t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates") or []}
    mounts = {m["mountPath"]: m["name"] for m in p.container.get("volumeMounts") or []}
    assert mounts.get(cfg["data_dir"]) in claims, f"{name}: --data-dir {cfg['data_dir']} is not a volumeClaimTemplate mount"
    grace = sts["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    assert grace > cfg["leave_timeout"], f"{name}: terminationGracePeriodSeconds {grace} cuts the hand-over short"


def _check_k8s_shims(k8s: K8s, daemons: Mapping[str, PodCheck], masters: Mapping[str, PodCheck]) -> None:
    """Every shim's --master reaches every master, on the port the masters listen on."""
    master_ports = {p.checked.config["port"] for p in masters.values()}
    assert len(master_ports) == 1, f"masters listen on different ports {master_ports}"
    for name, p in daemons.items():
        if p.checked.role == "http":
            for addr in p.checked.config["master"]:
                selected, port = k8s.service_target(addr)
                assert set(selected) == set(masters), f"{name}: --master {addr} reaches {list(selected)}, not every master"
                assert port in master_ports, f"{name}: {addr} lands on port {port}"


def _key_copies(masters: Mapping[str, PodCheck]) -> int:
    replicas = {p.checked.config["replicas"] for p in masters.values()}
    assert len(replicas) == 1, f"masters disagree on replicas: {replicas}"
    return int(replicas.pop())


@pytest.mark.parametrize("k8s_mode", ["embedded"], indirect=True)
def test_k8s_membership_wiring(k8s: K8s, k8s_daemons: dict[str, PodCheck]) -> None:
    masters = {n: p for n, p in k8s_daemons.items() if p.checked.role == "master"}
    coordinators = [n for n, p in masters.items() if not p.checked.config["coordinator"]]
    assert coordinators == ["Deployment/master-coordinator"], f"one coordinator Deployment expected, got {coordinators}"
    coordinator = masters[coordinators[0]]
    assert coordinator.workload["spec"].get("replicas") == 1, "the coordinator runs exactly one pod"
    assert coordinator.workload["spec"].get("strategy", {}).get("type") == "Recreate", "the coordinator must never run twice: Recreate"
    scaled = {h["spec"]["scaleTargetRef"]["name"] for h in k8s.of("HorizontalPodAutoscaler").values()}
    assert "master-coordinator" not in scaled, "no HPA may scale the coordinator"
    assert {c.rsplit("/", 1)[-1] for c in masters} - {"master-coordinator"} <= scaled, "follower masters should be autoscaled"
    assert not _zookeepers(k8s), "k8s/ is the embedded mode: ZooKeeper belongs in k8s/zookeeper/"

    def reaches_coordinator(addr: str, who: str) -> None:
        selected, port = k8s.service_target(addr)
        assert list(selected) == coordinators, f"{who}: {addr} reaches {list(selected)}, not only the coordinator"
        assert port == coordinator.checked.config["port"], f"{who}: {addr} lands on port {port}, the coordinator listens on another"

    for name, p in masters.items():
        assert not p.checked.config["zookeeper"], f"{name}: --zookeeper in the embedded set"
        if name not in coordinators:
            reaches_coordinator(p.checked.config["coordinator"], name)
    key_copies = _key_copies(masters)
    for name, p in k8s_daemons.items():
        if p.checked.role == "aux":
            assert not p.checked.config["zookeeper"], f"{name}: --zookeeper in the embedded set"
            reaches_coordinator(p.checked.config["join"], name)
            _check_k8s_aux(name, p, key_copies)
    _check_k8s_shims(k8s, k8s_daemons, masters)


@pytest.mark.parametrize("k8s_mode", ["zookeeper"], indirect=True)
def test_k8s_zookeeper_membership_wiring(k8s: K8s, k8s_daemons: dict[str, PodCheck]) -> None:
    masters = {n: p for n, p in k8s_daemons.items() if p.checked.role == "master"}
    members = {n: p for n, p in k8s_daemons.items() if p.checked.role in ("master", "aux")}
    scaled = {h["spec"]["scaleTargetRef"]["name"] for h in k8s.of("HorizontalPodAutoscaler").values()}
    assert len(masters) == 1, f"every master is alike in ZooKeeper mode: one Deployment, got {list(masters)}"
    for name, p in masters.items():
        assert not p.checked.config["coordinator"] and not p.checked.config["aux"], f"{name}: --coordinator/--aux left"
        assert p.workload["kind"] == "Deployment" and p.workload["metadata"]["name"] in scaled, f"{name}: an autoscaled Deployment"

    zookeepers = _zookeepers(k8s)
    assert len(zookeepers) == 1, f"one ZooKeeper StatefulSet expected, got {list(zookeepers)}"
    ((zk_name, zk),) = zookeepers.items()
    (zk_container,) = [c for c in _containers(zk) if _image_name(c) == "zookeeper"]
    zk_env = _container_env(k8s, zk, zk_container)
    client_port = _zoo_servers(zk_env)[0].client_port
    tick_ms = int(zk_env.get("ZOO_TICK_TIME", ZOO_DEFAULT_TICK_MS))
    ensembles = {p.checked.config["zookeeper"] for p in members.values()}
    clusters = {p.checked.config["cluster"] for p in members.values()}
    assert len(ensembles) == 1 and None not in ensembles, f"masters and aux nodes must all use one ZooKeeper ensemble: {ensembles}"
    assert len(clusters) == 1, f"masters and aux nodes must name one cluster: {clusters}"
    for addr in str(ensembles.pop()).partition("/")[0].split(","):
        selected, port = k8s.service_target(addr)
        assert list(selected) == [f"StatefulSet/{zk_name}"], f"--zookeeper {addr} reaches {list(selected)}, not the ZooKeeper servers"
        assert port == client_port, f"--zookeeper {addr} lands on port {port}, ZooKeeper serves clients on {client_port}"
    for name, p in members.items():
        timeout_ms = p.checked.config["zk_session_timeout"] * 1000
        assert 2 * tick_ms <= timeout_ms <= 20 * tick_ms, f"{name}: --zk-session-timeout outside 2..20 ticks of {tick_ms} ms: clamped"

    key_copies = _key_copies(masters)
    for name, p in k8s_daemons.items():
        if p.checked.role == "aux":
            assert not p.checked.config["join"], f"{name}: --join left (register in ZooKeeper instead)"
            _check_k8s_aux(name, p, key_copies)
    _check_k8s_shims(k8s, k8s_daemons, masters)


@pytest.mark.parametrize("k8s_mode", ["zookeeper"], indirect=True)
def test_k8s_zookeeper_ensemble(k8s: K8s, tmp_path: Path) -> None:
    zookeepers = _zookeepers(k8s)
    assert zookeepers, "no StatefulSet runs the zookeeper image"
    for name, sts in zookeepers.items():
        spec = sts["spec"]
        replicas = spec["replicas"]
        assert replicas >= 3 and replicas % 2 == 1, f"{name}: an odd number of servers, 3 or more, for a quorum that survives one loss"
        assert spec.get("podManagementPolicy") == "Parallel", f"{name}: servers need each other to become ready: start them in parallel"
        headless = k8s.of("Service")[spec["serviceName"]]
        assert headless["spec"].get("publishNotReadyAddresses") is True, f"{name}: servers must resolve each other before they are ready"
        (c,) = _containers(sts)
        env = _container_env(k8s, sts, c)

        # ZOO_SERVERS names every pod, server.N = ordinal N-1, by its name under the headless Service.
        servers = _zoo_servers(env)
        assert [s.id for s in servers] == list(range(1, replicas + 1)), f"{name}: ZOO_SERVERS ids {[s.id for s in servers]}"
        for s in servers:
            assert s.host == f"{name}-{s.id - 1}.{spec['serviceName']}", f"{name}: server.{s.id} is {s.host}, not pod {name}-{s.id - 1}"
            for port in (s.quorum_port, s.election_port, s.client_port):
                _container_port(sts, port, c)
        metrics = re.search(r"metricsProvider\.httpPort=(\d+)", env.get("ZOO_CFG_EXTRA", ""))
        if metrics:
            annotations = spec["template"]["metadata"].get("annotations") or {}
            assert annotations.get("prometheus.io/port") == metrics[1], f"{name}: scrape the metrics port {metrics[1]}"

        # The wrapper sets ZOO_MY_ID from the pod's ordinal, then runs the image's entrypoint and command.
        raw = [str(a) for a in [*(c.get("command") or []), *(c.get("args") or [])]]
        assert sum(a.count("/docker-entrypoint.sh") for a in raw) == 1, f"{name}: the command must run the image's /docker-entrypoint.sh"
        fake = tmp_path / "docker-entrypoint.sh"
        fake.write_text('#!/bin/sh\necho "$ZOO_MY_ID $*"\n')
        fake.chmod(0o755)
        name_vars = [
            v["name"] for v in c.get("env") or [] if v.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name"
        ]
        for ordinal in [*range(replicas), "x"]:
            pod = f"{name}-{ordinal}"
            run_env = {**env, **dict.fromkeys(name_vars, pod), "HOSTNAME": pod, "PATH": os.environ["PATH"]}
            argv = [_expand(a, run_env).replace("/docker-entrypoint.sh", str(fake)) for a in raw]
            res = subprocess.run(argv, capture_output=True, text=True, env=run_env, timeout=ZK_PROBE_TIMEOUT_S)
            if ordinal == "x":
                assert res.returncode != 0, f"{name}: a pod name without an ordinal must not start a server: {res.stdout}"
            else:
                assert res.returncode == 0, f"{name}: the command fails in pod {pod}: {res.stderr}"
                assert res.stdout.split() == [str(ordinal + 1), "zkServer.sh", "start-foreground"], f"{pod}: ran {res.stdout!r}"

        # Persistent snapshots and transaction log; writable by the image's non-root user.
        claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates") or []}
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
        for path in (env.get("ZOO_DATA_DIR", "/data"), env.get("ZOO_DATA_LOG_DIR", "/datalog")):
            assert mounts.get(path) in claims, f"{name}: {path} must be on a volumeClaimTemplate"
        pod_security = spec["template"]["spec"].get("securityContext") or {}
        if pod_security.get("runAsUser", 0) != 0:
            assert pod_security.get("fsGroup") is not None, f"{name}: non-root, the image's entrypoint chowns nothing: set fsGroup"

        # Probes, against a fake `nc`: started and alive while the server answers, ready only while it serves.
        expect = {
            "startupProbe": {"serving": True, "no-quorum": True, "down": False},
            "livenessProbe": {"serving": True, "no-quorum": True, "down": False},
            "readinessProbe": {"serving": True, "no-quorum": False, "down": False},
        }
        for kind, states in expect.items():
            probe = c.get(kind)
            if probe is None:
                assert kind == "startupProbe", f"{name}: no {kind}"
                continue
            if "tcpSocket" in probe and kind != "readinessProbe":
                assert _container_port(sts, probe["tcpSocket"]["port"], c) == servers[0].client_port, f"{name} {kind}: port"
                continue
            assert "exec" in probe, f"{name} {kind}: expected an exec probe, got {probe}"
            for state, ok in states.items():
                res = _run_zk_probe(probe["exec"]["command"], state, env, servers[0].client_port, tmp_path)
                assert (res.returncode == 0) == ok, f"{name} {kind} with ZooKeeper {state}: exit {res.returncode} {res.stdout}{res.stderr}"

        # Voluntary disruptions keep a quorum.
        pdbs = [
            b["spec"] for b in k8s.of("PodDisruptionBudget").values() if _matches(b["spec"]["selector"]["matchLabels"], _pod_labels(sts))
        ]
        assert len(pdbs) == 1, f"{name}: one PodDisruptionBudget expected, got {len(pdbs)}"
        away = pdbs[0].get("maxUnavailable", replicas - pdbs[0].get("minAvailable", 0))
        assert isinstance(away, int) and away <= (replicas - 1) // 2, f"{name}: the PodDisruptionBudget allows losing the quorum"


# -- credentials: docs ---------------------------------------------------------------


def _k8s_secret_keys() -> dict[str, set[str]]:
    """The keys of each Secret the manifests of every mode read."""
    keys: dict[str, set[str]] = {}
    for files in K8S_FILES.values():
        for doc in (d for f in files for d in yaml.safe_load_all(f.read_text()) if d and d["kind"] in WORKLOADS):
            pod = doc["spec"]["template"]["spec"]
            for v in pod.get("volumes") or []:
                if "secret" in v:
                    keys.setdefault(v["secret"]["secretName"], set()).update(i["key"] for i in v["secret"].get("items") or [])
            for c in pod["containers"]:
                for v in c.get("env") or []:
                    if "secretKeyRef" in v.get("valueFrom", {}):
                        ref = v["valueFrom"]["secretKeyRef"]
                        keys.setdefault(ref["name"], set()).add(ref["key"])
    return keys


_KUBECTL_CREATE_SECRET = re.compile(r"kubectl create secret generic (?P<name>[\w.-]+)(?P<args>[^\n]*)")


def test_credentials_docs_match_the_files() -> None:
    """The docs name the files docker/create-secrets.sh makes and the compose files read, and every
    `kubectl create secret generic` they show creates the Secret the manifests read, with exactly its keys."""
    compose_files = {f"docker/secrets/{f}" for mode in COMPOSE_FILES for named in _named_secrets(mode) for f in named}
    for path in (SECURITY_MD, DOCKER_README, OPERATIONS_MD):
        text = path.read_text()
        assert "docker/create-secrets.sh" in text, f"{path.name}: say how the compose credentials are made"
        mentioned = set(re.findall(r"docker/secrets/[\w.]+\w(?![\w./])", text))  # the certificates in docker/secrets/tls/ aside
        assert mentioned <= compose_files, f"{path.name} names {sorted(mentioned - compose_files)}, which compose does not read"
        if path != OPERATIONS_MD:
            assert mentioned == compose_files, f"{path.name}: name every credential file: {sorted(compose_files - mentioned)}"

    keys = _k8s_secret_keys()
    assert keys == K8S_SECRETS, f"the manifests read the Secrets {keys}, expected {K8S_SECRETS}"
    shown = {SECURITY_MD: set(K8S_SECRETS), OPERATIONS_MD: set(K8S_SECRETS), K8S / "configmap.yaml": {K8S_SECRET}}
    for path, secrets in shown.items():
        text = re.sub(r"\\\n[#\s]*", " ", path.read_text())  # join continued lines (in comments too)
        commands = list(_KUBECTL_CREATE_SECRET.finditer(text))
        missing = secrets - {m["name"] for m in commands}
        assert not missing, f"{path.name}: show the kubectl create secret generic command of {sorted(missing)}"
        for m in commands:
            assert m["name"] in keys, f"{path.name}: creates the Secret {m['name']}, the manifests read {sorted(keys)}"
            given = set(re.findall(r"--from-(?:literal|file)=([\w.-]+)=", m["args"]))
            want = keys[m["name"]]
            assert given == want, f"{path.name}: the command gives {m['name']} the keys {sorted(given)}, the manifests read {sorted(want)}"


@pytest.mark.parametrize("role", ROLES)
def test_check_config_refuses_like_the_daemon(role: str, tmp_path: Path) -> None:
    """--check-config applies protected mode as the daemon does before it listens (the checks above rely on it):
    on 0.0.0.0 with no credential, the daemon's one-line refusal and exit code; with one, on loopback or with
    --insecure, the config."""
    listen = [role, "--host", "0.0.0.0", "--port", str(free_port())]

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*_dcache(), *argv], capture_output=True, text=True, env=_env({}), timeout=CHECK_TIMEOUT_S)

    daemon = run(*listen)
    refusal = daemon.stderr.strip().splitlines()[-1] if daemon.stderr.strip() else ""
    assert daemon.returncode == 2 and "(protected mode)" in refusal, f"dcache {role} on 0.0.0.0 with no credential: {daemon}"
    check = run(*listen, "--check-config")
    assert (check.returncode, check.stderr.strip(), check.stdout) == (2, refusal, ""), f"--check-config: {check}"

    secret = tmp_path / "cluster_secret"
    secret.write_text("s" * 32)
    credentials = [["--http-token", "t"]] if role == "http" else [["--auth-token", "t"], ["--cluster-secret-file", str(secret)]]
    for extra in [*credentials, ["--insecure", "true"]]:
        ok = run(*listen, *extra, "--check-config")
        assert ok.returncode == 0 and json.loads(ok.stdout)["host"] == "0.0.0.0", f"{extra}: {ok.stderr}"
    ok = run(role, "--host", "127.0.0.1", "--check-config")
    assert ok.returncode == 0, f"on loopback no credential is needed: {ok.stderr}"
