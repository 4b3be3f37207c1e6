"""docker-compose.yml cannot run here (no Docker engine), so check it by parsing it."""

from pathlib import Path

import yaml
from typer.main import get_command

from service.cli import app

ROOT = Path(__file__).resolve().parents[2]


def _cli_paths() -> set[tuple[str, ...]]:
    """Every command path the real CLI offers, e.g. ("keys", "create")."""
    paths: set[tuple[str, ...]] = set()

    def walk(cmd, prefix):
        for name, sub in getattr(cmd, "commands", {}).items():
            paths.add((*prefix, name))
            walk(sub, (*prefix, name))

    walk(get_command(app), ())
    return paths


def test_compose_services_and_health_checks():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "api", "worker", "dashboard"} <= set(services)
    for name in ("postgres", "api"):
        assert "healthcheck" in services[name], name
    # Workers scale with --scale worker=N: no fixed container name or host port.
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]
    url = services["worker"]["environment"]["HPTUNE_DATABASE_URL"]
    assert url.startswith("postgresql+psycopg://") and "@postgres:" in url
    assert (ROOT / "Dockerfile").is_file()


def test_every_compose_command_exists_in_the_cli():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    paths = _cli_paths()
    commands = [s["command"] for s in compose["services"].values() if "command" in s]
    assert len(commands) == 3
    for command in commands:
        assert command[0] == "hptune"
        words = tuple(w for w in command[1:] if not w.startswith("-"))
        assert any(words[: len(p)] == p for p in paths), (command, sorted(paths))
        # Options must be real options of that command.
        cmd = get_command(app)
        for w in words:
            if w in getattr(cmd, "commands", {}):
                cmd = cmd.commands[w]
        opts = {o for p in cmd.params for o in p.opts}
        assert {w for w in command[1:] if w.startswith("--")} <= opts, (command, opts)
