"""docker-compose.yml cannot run here (no Docker engine), so check it by parsing it."""

import re
import shlex
from pathlib import Path

import yaml
from typer.main import get_command

from service.cli import app

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("postgres", "api", "worker", "dashboard")
# Programs a health check may run besides `hptune`, by the image that has them.
IMAGE_PROGRAMS = {"postgres": {"pg_isready"}, "build": {"python"}}
URL = re.compile(r"https?://(?:127\.0\.0\.1|localhost):(\d+)(/[^'\"\s]*)?")


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _cli_paths() -> set[tuple[str, ...]]:
    """Every command path the real CLI offers, e.g. ("keys", "create")."""
    paths: set[tuple[str, ...]] = set()

    def walk(cmd, prefix):
        for name, sub in getattr(cmd, "commands", {}).items():
            paths.add((*prefix, name))
            walk(sub, (*prefix, name))

    walk(get_command(app), ())
    return paths


def _check_cli_command(command: list[str]) -> None:
    """`command` ("hptune", words...) names a real CLI command with real options."""
    assert command[0] == "hptune", command
    paths = _cli_paths()
    words = tuple(w for w in command[1:] if not w.startswith("-"))
    assert any(words[: len(p)] == p for p in paths), (command, sorted(paths))
    cmd = get_command(app)
    for w in words:
        if w in getattr(cmd, "commands", {}):
            cmd = cmd.commands[w]
    opts = {o for p in cmd.params for o in p.opts}
    assert {w for w in command[1:] if w.startswith("--")} <= opts, (command, opts)


def _health_argv(service: dict) -> list[str]:
    kind, *rest = service["healthcheck"]["test"]
    assert kind in ("CMD", "CMD-SHELL"), kind
    return shlex.split(rest[0]) if kind == "CMD-SHELL" else rest


def _option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def test_compose_services_and_health_checks():
    services = _compose()["services"]
    assert set(SERVICES) <= set(services)
    for name in SERVICES:
        assert "healthcheck" in services[name], name
    # Workers scale with --scale worker=N: no fixed container name or host port.
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]
    url = services["worker"]["environment"]["HPTUNE_DATABASE_URL"]
    assert url.startswith("postgresql+psycopg://") and "@postgres:" in url
    assert (ROOT / "Dockerfile").is_file()


def test_every_compose_command_exists_in_the_cli():
    commands = [s["command"] for s in _compose()["services"].values() if "command" in s]
    assert len(commands) == 3
    for command in commands:
        _check_cli_command(command)


def test_every_health_check_command_exists(tmp_path):
    """hptune commands exist in the CLI; other programs are in the service's image; an inline
    Python check compiles, and a URL it fetches is the service's own port (and, for the API, one
    of its routes)."""
    from service.api import create_app
    from service.settings import Settings

    api_routes = set(create_app(
        Settings(database_url=f"sqlite:///{tmp_path / 'routes.db'}")).openapi()["paths"])
    for name, service in _compose()["services"].items():
        argv = _health_argv(service)
        if argv[0] == "hptune":
            _check_cli_command(argv)
            continue
        image = "build" if "build" in service else service["image"].split(":")[0]
        assert argv[0] in IMAGE_PROGRAMS[image], (name, argv)
        if argv[0] != "python":
            continue
        assert argv[1] == "-c", argv
        compile(argv[2], f"{name} healthcheck", "exec")
        for port, path in URL.findall(argv[2]):
            assert port == _option(service["command"], "--port"), (name, argv)
            if name == "api":
                assert path in api_routes, (path, sorted(api_routes))


def test_no_password_in_the_compose_file():
    """The PostgreSQL password comes from the environment (.env), and compose refuses to start
    without it; no literal password is written anywhere in the file."""
    raw = "\n".join(line for line in (ROOT / "docker-compose.yml").read_text().splitlines()
                    if not line.lstrip().startswith("#"))
    services = _compose()["services"]
    required = "${POSTGRES_PASSWORD:?"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith(required)
    for name in ("api", "worker", "dashboard"):
        url = services[name]["environment"]["HPTUNE_DATABASE_URL"]
        userinfo = url.split("://", 1)[1].rsplit("@", 1)[0]
        user, _, password = userinfo.partition(":")
        assert user == "hptune" and password.startswith(required), (name, url)
    # Neither the old default nor any other literal: every password value is a substitution.
    assert "hptune:hptune@" not in raw and "POSTGRES_PASSWORD: hptune" not in raw
    for match in re.finditer(r"(?im)^\s*-?\s*\w*password\w*\s*[:=]\s*(\S+)", raw):
        assert match.group(1).startswith("${"), match.group(0)
    for match in re.finditer(r"://[^:/@\s]+:([^@\s]+)@", raw):
        assert match.group(1).startswith("${"), match.group(0)


def test_dashboard_is_gated_and_published_on_loopback_only():
    services = _compose()["services"]
    dashboard = services["dashboard"]
    # Inside its container it listens on every interface (so the port can be published), and
    # the host publishes it on loopback only.
    assert dashboard["command"][:2] == ["hptune", "dashboard"]
    assert _option(dashboard["command"], "--host") == "0.0.0.0"
    port = _option(dashboard["command"], "--port")
    assert dashboard["ports"] == [f"127.0.0.1:{port}:{port}"]
    # Its health check asks a path the gated dashboard app answers without a login.
    (path,) = [p for _, p in URL.findall(_health_argv(dashboard)[2])]
    assert path == "/healthz"
    # Every published port binds an address, or is the API's own (which checks every key).
    for name, service in services.items():
        for mapping in service.get("ports", []):
            if name != "api":
                assert str(mapping).startswith("127.0.0.1:"), (name, mapping)
