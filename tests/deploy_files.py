"""The repository's deployment files, read for the tests that check them
(tests/unit/test_deploy_files.py: schemas, cross-file agreement, the key scan;
tests/integration/test_deploy_files.py: the tools and the healthcheck commands run)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"


def compose_files() -> list[Path]:
    """Every compose file in the repository's root (the stack, and any variant beside it)."""
    return sorted({*ROOT.glob("docker-compose*.yml"), *ROOT.glob("compose*.yml")})


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = load_yaml(ROOT / "docker-compose.yml")["services"]
    return services


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of each Dockerfile instruction, continuations joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, args = line.strip().partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def dockerfile_healthcheck() -> list[str]:
    """The exec-form command of the Dockerfile's HEALTHCHECK."""
    checks = [args for instruction, args in dockerfile() if instruction == "HEALTHCHECK"]
    assert 1 == len(checks), checks
    command: list[str] = json.loads(checks[0][checks[0].index("CMD") + len("CMD") :])
    return command


def compose_healthcheck(service: str) -> list[str]:
    """The exec-form command of a compose service's healthcheck (without "CMD")."""
    test: list[str] = compose_services()[service]["healthcheck"]["test"]
    assert "CMD" == test[0], test
    return test[1:]


def probed(command: list[str]) -> tuple[str, int]:
    """(path, port) of the loopback URL a healthcheck command asks for."""
    match = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", " ".join(command))
    assert match, command
    return match[2], int(match[1])


def option(command: list[str], name: str) -> str:
    """The value after ``name`` in an exec-form command."""
    return command[command.index(name) + 1]
