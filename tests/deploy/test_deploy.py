"""deploy/: what can be checked without Docker or a cluster.

- Kubernetes manifests against the API schemas bundled in `kubernetes-validate` (offline, strict:
  an unknown field is an error), for the oldest supported and the newest bundled version, plus the
  rules of the design (replicas, gRPC probes, grace periods, non-root, references that resolve).
- compose.yaml as YAML: the services and their order, and every variable it gives the server is
  one the server reads, with values `Settings` accepts in production.
- The Dockerfile, parsed: stages, non-root user, no compilers in the final image; its HEALTHCHECK
  command is run against the real server, the migrate and gateway commands against real inputs.

Docker and kubectl are not available here, so images are not built and manifests not applied.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from kubernetes_validate import utils as kv

from everything_server.config import Settings
from tests.support import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PYTHON = sys.executable
MIN_K8S = "1.30.0"  # lifecycle.preStop.sleep is on by default from 1.30
K8S_VERSIONS = [MIN_K8S, kv.latest_version()]


# -- helpers ----------------------------------------------------------------------------------------


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def generated_config_maps() -> list[dict[str, Any]]:
    """The ConfigMaps kustomize's configMapGenerator makes (without the hash suffix)."""
    out = []
    for gen in kustomization().get("configMapGenerator", []):
        data: dict[str, str] = {}
        for item in gen.get("files", []):
            key, _, rel = item.partition("=") if "=" in item else (Path(item).name, "", item)
            data[key] = (K8S / rel).read_text()
        for item in gen.get("literals", []):
            key, _, value = item.partition("=")
            data[key] = value
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    return out


def resources() -> list[dict[str, Any]]:
    docs = [d for rel in kustomization()["resources"] for d in load_all(K8S / rel)]
    return docs + generated_config_maps()


def one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in resources() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def server_env_names() -> set[str]:
    """Every environment variable the server reads: Settings fields (with their aliases) and the
    few read directly from os.environ."""
    prefix = Settings.model_config.get("env_prefix", "")
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if alias is None:
            names.add((prefix + name).upper())
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.update(str(c).upper() for c in alias.choices)
    source = (ROOT / "server").rglob("*.py")
    for path in source:
        names.update(re.findall(r"os\.environ\.get\(\s*[\"']([A-Z0-9_]+)[\"']", path.read_text()))
    return names


def settings_from(env: dict[str, str]) -> Settings:
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith("EVERYTHING_") or k.endswith("DATABASE_URL")]:
            del os.environ[key]
        os.environ.update(env)
        return Settings(_env_file=None)
    finally:
        os.environ.clear()
        os.environ.update(saved)


SAMPLE_SECRETS = {
    "POSTGRES_PASSWORD": "owner-password",
    "APP_DB_PASSWORD": "app-password",
    "EVERYTHING_JWT_KEYS": "k1:" + "x" * 40,
    "EVERYTHING_URL_SIGNING_KEY": "y" * 40,
    "OPENAI_API_KEY": "sk-test",
}

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation: $$, ${V}, ${V:-default}, ${V-default}, ${V:?err}, ${V?err}."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        value = env.get(name)
        if op in (":-", "-"):
            return value if (value if op == ":-" else value is not None) else arg
        if op in (":?", "?"):
            if not value if op == ":?" else value is None:
                raise KeyError(f"{name}: {arg}")
            return value
        return value or ""

    return _VAR.sub(sub, text)


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    text = (DEPLOY / "compose.yaml").read_text()
    return yaml.safe_load(interpolate(text, SAMPLE_SECRETS if env is None else env))


def service_env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def envoy_upstream() -> tuple[str, int]:
    config = yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "everything"]
    addresses = [
        e["endpoint"]["address"]["socket_address"]
        for group in cluster["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    ]
    assert len(addresses) == 1
    return addresses[0]["address"], addresses[0]["port_value"]


# -- Kubernetes -------------------------------------------------------------------------------------


MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", MANIFESTS)
def test_kubernetes_manifests_match_the_api_schemas(name, version):
    docs = load_all(K8S / name)
    assert docs, f"{name} is empty"
    for doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} at {path}: {err.message}")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_generated_config_maps_match_the_api_schemas(version):
    for doc in generated_config_maps():
        kv.validate(doc, version, strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_template():
    k = kustomization()
    assert k["namespace"] == "everything"
    assert sorted(k["resources"]) == sorted(n for n in MANIFESTS if n != "secret.example.yaml")
    (envoy,) = [g for g in k["configMapGenerator"] if g["name"] == "everything-envoy"]
    # The Envoy config is the one in deploy/envoy, referenced, not a copy that could drift.
    assert envoy["files"] == ["envoy.yaml=../envoy/envoy.yaml"]
    assert (K8S / "../envoy/envoy.yaml").resolve() == (DEPLOY / "envoy" / "envoy.yaml").resolve()
    assert not (K8S / "envoy.yaml").exists()
    assert {i["name"] for i in k["images"]} == {"everything-server"}


def test_server_deployment_runs_replicas_with_grpc_probes_and_a_drain_longer_than_the_grace():
    d = one("Deployment", "everything-server")
    assert d["spec"]["replicas"] >= 2
    spec = pod_spec(d)
    (c,) = spec["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == 50051, probe
    assert {p["containerPort"] for p in c["ports"]} == {50051}
    config = one("ConfigMap", "everything-config")["data"]
    grace = float(config["EVERYTHING_SHUTDOWN_GRACE_SECONDS"])
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] > pre_stop + grace
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]


@pytest.mark.parametrize(
    ("kind", "name"),
    [("Deployment", "everything-server"), ("Deployment", "everything-envoy"), ("Job", "everything-migrate")],
)
def test_every_pod_runs_as_non_root_on_a_read_only_root_filesystem(kind, name):
    spec = pod_spec(one(kind, name))
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec.get("automountServiceAccountToken") is False
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert "memory" in c["resources"]["limits"], c["name"]


def test_selectors_of_services_budgets_and_autoscaler_find_their_pods():
    server_labels = pod_spec_labels("everything-server")
    envoy_labels = pod_spec_labels("everything-envoy")
    for kind, name, labels in [
        ("Service", "server", server_labels),
        ("PodDisruptionBudget", "everything-server", server_labels),
        ("Service", "everything-gateway", envoy_labels),
        ("PodDisruptionBudget", "everything-envoy", envoy_labels),
    ]:
        doc = one(kind, name)
        selector = doc["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), f"{kind}/{name} selects {selector}, pods have {labels}"
    hpa = one("HorizontalPodAutoscaler", "everything-server")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "everything-server",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    assert one("PodDisruptionBudget", "everything-server")["spec"]["minAvailable"] >= 1


def pod_spec_labels(name: str) -> dict[str, str]:
    d = one("Deployment", name)
    labels = d["spec"]["template"]["metadata"]["labels"]
    assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    return labels


def test_envoy_reaches_every_server_replica_through_the_headless_service():
    host, port = envoy_upstream()
    svc = one("Service", host)
    assert svc["spec"]["clusterIP"] == "None", "Envoy's DNS cluster must see every pod, not one VIP"
    assert [p["port"] for p in svc["spec"]["ports"]] == [port]


def test_envoy_gets_the_shared_config_and_the_descriptor_from_the_server_image():
    spec = pod_spec(one("Deployment", "everything-envoy"))
    (init,) = spec["initContainers"]
    assert init["image"] == "everything-server"
    assert "everything_server.gateway --write-descriptor /out/everything.pb" in init["command"][-1]
    (envoy,) = spec["containers"]
    assert envoy["image"].startswith("envoyproxy/envoy:")
    assert envoy["args"][:2] == ["-c", "/etc/envoy/envoy.yaml"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["envoy-config"]["configMap"]["name"] == "everything-envoy"
    envoy_yaml = (DEPLOY / "envoy" / "envoy.yaml").read_text()
    assert "/etc/envoy/everything.pb" in envoy_yaml
    assert {m["mountPath"] for m in envoy["volumeMounts"]} == {"/etc/envoy"}


def test_secrets_and_config_maps_referenced_by_pods_exist_with_their_keys():
    secret = load_all(K8S / "secret.example.yaml")[0]
    secret_keys = set(secret["stringData"])
    config_maps = {cm["metadata"]["name"]: cm for cm in generated_config_maps()}
    for kind, name in [("Deployment", "everything-server"), ("Job", "everything-migrate")]:
        for c in pod_spec(one(kind, name))["containers"]:
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == secret["metadata"]["name"]
                    assert ref["key"] in secret_keys, ref
            for src in c.get("envFrom", []):
                assert src["configMapRef"]["name"] in config_maps


def test_the_secret_template_holds_only_placeholders_the_server_refuses():
    secret = load_all(K8S / "secret.example.yaml")[0]
    for key, value in secret["stringData"].items():
        assert "REPLACE_ME" in value, key
    with pytest.raises(ValueError):
        settings_from({"EVERYTHING_JWT_KEYS": secret["stringData"]["EVERYTHING_JWT_KEYS"]})


def test_kubernetes_server_env_is_read_by_the_server_and_valid_in_production():
    d = one("Deployment", "everything-server")
    (c,) = pod_spec(d)["containers"]
    env = dict(one("ConfigMap", "everything-config")["data"])
    for item in c["env"]:
        env[item["name"]] = item.get("value") or SAMPLE_SECRETS.get(
            item["name"], "postgresql://u:p@db/everything"
        )
    unknown = set(env) - server_env_names()
    assert not unknown, f"the server reads none of {sorted(unknown)}"
    s = settings_from(env)
    assert s.environment.value == "production" and s.port == 50051


# -- compose ----------------------------------------------------------------------------------------


def test_compose_runs_postgres_a_migration_two_servers_envoy_and_an_optional_mock():
    c = compose()
    services = c["services"]
    assert set(services) >= {"postgres", "migrate", "server", "envoy", "mock"}

    pg = services["postgres"]
    assert any(v.split(":")[1] == "/var/lib/postgresql/data" for v in pg["volumes"])
    assert pg["healthcheck"]["test"]

    migrate = services["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate.get("restart") == "no"

    server = services["server"]
    assert server["deploy"]["replicas"] == 2
    assert server["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "ports" not in server, "replicas are reached through Envoy"
    host, port = envoy_upstream()
    assert host == "server" and "50051" in [str(p) for p in server["expose"]]

    envoy = services["envoy"]
    assert envoy["image"].startswith("envoyproxy/envoy:")
    assert envoy["ports"] == ["8080:8080"]
    files = services["gateway-files"]
    assert "./envoy/envoy.yaml:/config/envoy.yaml:ro" in files["volumes"]
    assert "--write-descriptor /var/lib/everything/everything.pb" in " ".join(files["command"])
    assert envoy["depends_on"]["gateway-files"]["condition"] == "service_completed_successfully"
    assert (DEPLOY / "envoy" / "envoy.yaml").is_file()

    mock = services["mock"]
    assert mock["profiles"] == ["mock"]
    assert mock["entrypoint"] + mock["command"][:4] == [
        "python", "-m", "everything_server.ai.mock", "--host", "0.0.0.0", "--port", "8000",  # noqa: S104
    ]  # fmt: skip
    for name in ("migrate", "server", "gateway-files", "mock"):
        assert services[name]["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}


def test_compose_refuses_to_start_without_the_secrets():
    for missing in ("EVERYTHING_JWT_KEYS", "EVERYTHING_URL_SIGNING_KEY", "POSTGRES_PASSWORD"):
        env = {k: v for k, v in SAMPLE_SECRETS.items() if k != missing}
        with pytest.raises(KeyError, match=missing):
            compose(env)


def test_compose_server_env_is_read_by_the_server_and_valid_in_production():
    services = compose()["services"]
    env = service_env(services["server"])
    unknown = set(env) - server_env_names()
    assert not unknown, f"the server reads none of {sorted(unknown)}"
    s = settings_from(env)
    assert s.environment.value == "production"
    assert s.database_url is not None and "everything_app" in s.database_url.get_secret_value()
    grace = s.shutdown_grace_seconds
    stop = services["server"]["stop_grace_period"]
    assert stop.endswith("s") and float(stop[:-1]) > grace

    migrate_env = service_env(services["migrate"])
    assert set(migrate_env) <= server_env_names()
    assert "MIGRATION_DATABASE_URL" in migrate_env


def test_compose_with_the_mock_profile_points_the_server_at_the_mock():
    env = {**SAMPLE_SECRETS, "OPENAI_BASE_URL": "http://mock:8000/v1"}
    services = compose(env)["services"]
    s = settings_from(service_env(services["server"]))
    assert s.openai_base_url == "http://mock:8000/v1"
    assert str(services["mock"]["command"][3]) == "8000"


async def test_compose_postgres_init_script_creates_a_login_role_without_bypassrls(pg_admin_url, tmp_path):
    """The init script, run for real (psql from the pgserver wheel) with a password that needs quoting."""
    import pgserver

    script = compose()["configs"]["postgres-app-role"]["content"]
    role = f"everything_app_test_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "init.sh"
    path.write_text(script.replace("everything_app", role))
    password = "it's a 'quoted' pass"
    admin = urlsplit_env(pg_admin_url)
    env = {
        **os.environ,
        **admin,
        "PATH": f"{Path(pgserver.__file__).parent / 'pginstall' / 'bin'}:{os.environ['PATH']}",
        "APP_DB_PASSWORD": password,
    }
    proc = await asyncio.create_subprocess_exec(
        "sh", str(path), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    try:
        assert proc.returncode == 0, out.decode()
        conn = await asyncpg.connect(pg_admin_url)
        try:
            row = await conn.fetchrow(
                "SELECT rolcanlogin, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = $1", role
            )
            assert tuple(row) == (True, False, False)
            ok = await conn.fetchval("SELECT rolpassword IS NOT NULL FROM pg_authid WHERE rolname = $1", role)
            assert ok
        finally:
            await conn.close()
    finally:
        conn = await asyncpg.connect(pg_admin_url)
        try:
            await conn.execute(f'DROP ROLE IF EXISTS "{role}"')
        finally:
            await conn.close()


def urlsplit_env(url: str) -> dict[str, str]:
    """libpq environment (PGHOST, ...) for a postgresql:// URL, as the postgres image's entrypoint has."""
    from urllib.parse import parse_qs, unquote, urlsplit

    parts = urlsplit(url)
    env = {
        "POSTGRES_USER": unquote(parts.username or "postgres"),
        "POSTGRES_DB": parts.path.lstrip("/") or "postgres",
    }
    query = parse_qs(parts.query)
    host = parts.hostname or query.get("host", [""])[0]
    if host:
        env["PGHOST"] = host
    if parts.port:
        env["PGPORT"] = str(parts.port)
    elif "port" in query:
        env["PGPORT"] = query["port"][0]
    if parts.password:
        env["PGPASSWORD"] = unquote(parts.password)
    return env


# -- Dockerfile -------------------------------------------------------------------------------------


def dockerfile_stages() -> list[dict[str, Any]]:
    """[{"from": image, "name": alias, "instructions": [(KEYWORD, args), ...]}, ...]"""
    text = (DEPLOY / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: list[dict[str, Any]] = []
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
            continue
        if keyword == "FROM":
            image, _, alias = re.sub(r"(?i)\s+as\s+", " AS ", rest).partition(" AS ")
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image.strip())
            stages.append({"from": image, "name": alias.strip() or None, "instructions": []})
            continue
        stages[-1]["instructions"].append((keyword, rest.strip()))
    return stages


def instructions(stage: dict[str, Any], keyword: str) -> list[str]:
    return [rest for k, rest in stage["instructions"] if k == keyword]


COMPILERS = re.compile(r"\b(gcc|g\+\+|cc|clang|build-essential|make)\b")


def test_dockerfile_builds_in_a_stage_with_compilers_and_ships_a_slim_one_without():
    stages = dockerfile_stages()
    assert len(stages) >= 2
    builder, final = stages[0], stages[-1]
    assert builder["name"] == "builder"
    assert any("build-essential" in r for r in instructions(builder, "RUN"))
    assert any(re.search(r"pip install \.", r) for r in instructions(builder, "RUN"))

    assert final["from"].startswith("python:3.11-slim")
    for run in instructions(final, "RUN"):
        assert not COMPILERS.search(run), f"a compiler in the final stage: {run}"
        assert "apt-get install" not in run
    copies = instructions(final, "COPY")
    assert any(c.startswith("--from=builder /opt/venv") for c in copies)
    assert any(c.split()[0] == "migrations/" for c in copies)


def test_dockerfile_final_stage_runs_the_server_as_a_non_root_user():
    final = dockerfile_stages()[-1]
    users = instructions(final, "USER")
    assert users, "no USER: the server would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"0", "root"}
    assert user.isdigit(), "a numeric uid lets Kubernetes' runAsNonRoot verify it"
    pods = [pod_spec(one("Deployment", "everything-server")), pod_spec(one("Job", "everything-migrate"))]
    assert all(str(p["securityContext"]["runAsUser"]) == user for p in pods)
    assert json.loads(instructions(final, "ENTRYPOINT")[-1]) == ["everything-server"]
    assert "50051" in instructions(final, "EXPOSE")[-1].split()
    env = " ".join(instructions(final, "ENV"))
    assert "EVERYTHING_MIGRATIONS_DIR=/app/migrations" in env


def test_dockerfile_copies_only_paths_that_exist_and_pass_its_dockerignore():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for stage in dockerfile_stages():
        for copy in instructions(stage, "COPY"):
            parts = shlex.split(copy)
            if parts[0].startswith("--from"):
                continue
            for src in parts[:-1]:
                assert (ROOT / src).exists(), src
                assert src.rstrip("/") in allowed, f"{src} is excluded from the build context"


def dockerfile_healthcheck() -> list[str]:
    (check,) = instructions(dockerfile_stages()[-1], "HEALTHCHECK")
    command = check.split(" CMD ", 1)[1]
    return shlex.split(command)


async def run(*cmd: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")


async def test_dockerfile_healthcheck_passes_against_a_serving_server_and_fails_without_one(app):
    cmd = dockerfile_healthcheck()
    assert cmd[0] == "python"
    env = {**os.environ, "EVERYTHING_PORT": str(app.port)}
    code, out = await run(PYTHON, *cmd[1:], env=env, timeout=30)
    assert code == 0, out
    code, _ = await run(PYTHON, *cmd[1:], env={**os.environ, "EVERYTHING_PORT": "1"}, timeout=30)
    assert code != 0


async def test_migrate_as_compose_and_the_job_run_it_needs_only_the_owner_url(database_url):
    # No keys, no DATABASE_URL, development defaults: the one-shot migration must still work.
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVERYTHING_") and "DATABASE_URL" not in k}
    env.update(MIGRATION_DATABASE_URL=database_url, EVERYTHING_DATA_DIR="/nonexistent/never-used")
    code, out = await run(str(Path(PYTHON).parent / "everything-server"), "migrate", env=env, timeout=120)
    assert code == 0, out
    assert not Path("/nonexistent/never-used").exists()


async def test_the_gateway_descriptor_command_of_compose_and_k8s_writes_a_descriptor_set(tmp_path):
    from google.protobuf import descriptor_pb2

    out = tmp_path / "everything.pb"
    code, text = await run(
        PYTHON, "-m", "everything_server.gateway", "--write-descriptor", str(out), timeout=60
    )
    assert code == 0, text
    files = {f.name for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file}
    assert "everything/chat/v1/chat_service.proto" in files
