"""The production stack's files, checked without a Docker engine (none runs in CI).

``docker-compose.yaml`` is parsed with PyYAML and interpolated with the values of
``.env.example`` the way ``docker compose`` does it, then checked by small functions
that each return their problems: the services of Airflow 3's Celery topology, one
image built from the Dockerfile, CeleryExecutor on the redis/postgres services, two
workers with distinct hostnames, one lake shared by the API server, scheduler and
workers, every variable documented, the init service's order and the dependencies on
it. Each check is also run on a broken copy to prove it can fail. The Dockerfile, the
``.dockerignore`` and ``docker/check_secrets.py`` (the production refusal of example
secrets) are tested here too.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"
CHECK_SECRETS = ROOT / "docker" / "check_secrets.py"
PACKAGE = ROOT / "include" / "profile_engine"

AIRFLOW_IMAGE = "apache/airflow:3.3.2-python3.11"
INIT = "airflow-init"
API_SERVER = "airflow-apiserver"
SCHEDULER = "airflow-scheduler"
REQUIRED_SERVICES = {
    "postgres",
    "redis",
    INIT,
    API_SERVER,
    SCHEDULER,
    "airflow-dag-processor",
    "airflow-triggerer",
}
# Variables of the package that must not reach production: fault injection for the reliability tests.
TEST_ONLY_SETTINGS = {"PROFILE_ENGINE_FAULT", "PROFILE_ENGINE_FAULT_SKIP"}
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")

Compose = dict[str, Any]
Check = Callable[[Compose], list[str]]


def _load_check_secrets() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_secrets", CHECK_SECRETS)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_secrets"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


cs = _load_check_secrets()
EXAMPLE: dict[str, str] = cs.read_env_file(ENV_EXAMPLE)
SECRETS: list[str] = cs.secret_names(EXAMPLE)
REQUIRED_SECRETS = [name for name in SECRETS if EXAMPLE[name]]
OPTIONAL_SECRETS = [name for name in SECRETS if not EXAMPLE[name]]


# ---- loading and interpolation (docker compose's rules for ${VAR}, ${VAR:-x}, ${VAR:?msg}, $$) -------------------
def interpolate(text: str, env: dict[str, str]) -> str:
    """Replace ``${...}`` like docker compose; an unset required variable raises ``KeyError`` naming it."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        value = env.get(name)
        unset_or_empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if unset_or_empty else str(value)
        if op in (":?", "?"):
            if unset_or_empty:
                raise KeyError(f"{name}: {arg}")
            return str(value)
        if op in (":+", "+"):
            return "" if unset_or_empty else arg
        return value or ""

    return VARIABLE.sub(one, text).replace("$$", "$")


def _walk(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: _walk(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_walk(value, env) for value in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def raw_compose(text: str | None = None) -> Compose:
    """The parsed compose file, merge keys resolved, no interpolation; a plain tree (no shared objects)."""
    data = yaml.safe_load(COMPOSE.read_text() if text is None else text)
    return dict(json.loads(json.dumps(data)))


def load_compose(text: str | None = None, env: dict[str, str] | None = None) -> Compose:
    """The compose file as ``docker compose config`` would see it with ``env`` (default: ``.env.example``)."""
    return dict(_walk(raw_compose(text), EXAMPLE if env is None else env))


def compose_variables(text: str) -> dict[str, set[str]]:
    """Every ``${VAR}`` of the compose file outside comments, with the operators it is used with."""
    used: dict[str, set[str]] = {}

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                collect(key)
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)
        elif isinstance(node, str):
            for match in VARIABLE.finditer(node):
                used.setdefault(match.group(1), set()).add(match.group(2) or "")

    collect(yaml.safe_load(text))
    return used


# ---- helpers over a loaded compose tree ---------------------------------------------------------------------------
def services(compose: Compose) -> dict[str, dict[str, Any]]:
    return dict(compose.get("services") or {})


def airflow_services(compose: Compose) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services(compose).items() if name.startswith("airflow-") or name == "flower"}


def command_text(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def workers(compose: Compose) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services(compose).items() if "celery worker" in command_text(s)}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Target -> source of a service's short-syntax volumes."""
    result = {}
    for volume in service.get("volumes") or []:
        source, _, rest = str(volume).partition(":")
        result[rest.split(":")[0]] = source
    return result


def long_running(compose: Compose) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services(compose).items() if name not in (INIT, "airflow-cli")}


# ---- the checks: each returns its problems -------------------------------------------------------------------------
def check_services(compose: Compose) -> list[str]:
    missing = sorted(REQUIRED_SERVICES - set(services(compose)))
    return [f"missing services: {missing}"] if missing else []


def check_image(compose: Compose) -> list[str]:
    common = compose.get("x-airflow-common") or {}
    image, build = common.get("image"), common.get("build") or {}
    problems = []
    if build.get("context") != "." or build.get("dockerfile", "Dockerfile") != "Dockerfile":
        problems.append(f"x-airflow-common does not build ./Dockerfile: {build}")
    for name, service in airflow_services(compose).items():
        if service.get("image") != image or service.get("build") != build:
            problems.append(f"{name} does not run the image built from the Dockerfile ({service.get('image')})")
    return problems


def check_celery(compose: Compose) -> list[str]:
    problems = []
    postgres_password = environment(services(compose).get("postgres", {})).get("POSTGRES_PASSWORD")
    redis_password = environment(services(compose).get("redis", {})).get("REDIS_PASSWORD")
    for name, service in airflow_services(compose).items():
        env = environment(service)
        if env.get("AIRFLOW__CORE__EXECUTOR") != "CeleryExecutor":
            problems.append(f"{name}: executor is {env.get('AIRFLOW__CORE__EXECUTOR')!r}, not CeleryExecutor")
        for key, scheme, host, password in (
            ("AIRFLOW__CELERY__BROKER_URL", "redis", "redis", redis_password),
            ("AIRFLOW__CELERY__RESULT_BACKEND", "db+postgresql", "postgres", postgres_password),
            ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql+psycopg2", "postgres", postgres_password),
        ):
            url = urlparse(env.get(key, ""))
            if (url.scheme, url.hostname, url.password) != (scheme, host, password):
                problems.append(f"{name}: {key} does not point at the {host} service with its password")
    return problems


def check_workers(compose: Compose) -> list[str]:
    found = workers(compose)
    if len(found) < 2:
        return [f"{len(found)} Celery worker(s), need two"]
    hostnames = [s.get("hostname") for s in found.values()]
    nodes = [re.search(r"--celery-hostname\s+(\S+)", command_text(s)) for s in found.values()]
    problems = []
    if None in hostnames or len(set(hostnames)) != len(hostnames):
        problems.append(f"workers need distinct hostnames, got {hostnames}")
    node_names = [m.group(1) if m else None for m in nodes]
    if None in node_names or len(set(node_names)) != len(node_names):
        problems.append(f"workers need distinct --celery-hostname, got {node_names}")
    return problems


def check_lake(compose: Compose) -> list[str]:
    problems = []
    sharing = {API_SERVER, SCHEDULER, *workers(compose)}
    sources = set()
    for name in sorted(sharing):
        service = services(compose).get(name, {})
        lake = environment(service).get("PROFILE_ENGINE_LAKE")
        source = mounts(service).get(lake or "")
        if not lake or source is None:
            problems.append(f"{name}: PROFILE_ENGINE_LAKE {lake!r} is not a mounted volume")
        sources.add((lake, source))
    if len(sources) > 1:
        problems.append(f"the lake is not one shared volume: {sorted(map(str, sources))}")
    for _, source in sources:
        if source and not source.startswith("/") and source not in (compose.get("volumes") or {}):
            problems.append(f"named volume {source!r} is not declared")
    return problems


def check_init(compose: Compose) -> list[str]:
    init = services(compose).get(INIT)
    if init is None:
        return [f"no {INIT} service"]
    script = command_text(init)
    steps = ["check_secrets.py", "airflow db migrate", "airflow users create"]
    positions = [script.find(step) for step in steps]
    problems = []
    if -1 in positions or positions != sorted(positions):
        problems.append(f"{INIT} must run {steps} in this order, got positions {positions}")
    if "set -e" not in script and "set -euo pipefail" not in script:
        problems.append(f"{INIT} does not stop at the first failing step (set -e)")
    env = environment(init)
    for name in SECRETS:
        if env.get(name) != EXAMPLE.get(name):
            problems.append(f"{INIT} does not pass {name} from .env to check_secrets.py")
    if (
        "airflow users create" in script
        and "fab" not in environment(init).get("AIRFLOW__CORE__AUTH_MANAGER", "").lower()
    ):
        problems.append("airflow users create needs the FAB auth manager")
    return problems


def check_dependencies(compose: Compose) -> list[str]:
    problems = []
    all_services = services(compose)
    for name, service in airflow_services(compose).items():
        depends = service.get("depends_on") or {}
        for dependency in ("postgres", "redis"):
            if (depends.get(dependency) or {}).get("condition") != "service_healthy":
                problems.append(f"{name} does not wait for {dependency} to be healthy")
        if name not in (INIT, "airflow-cli") and (depends.get(INIT) or {}).get("condition") != (
            "service_completed_successfully"
        ):
            problems.append(f"{name} does not wait for {INIT} to complete successfully")
    for name, service in all_services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            if rule.get("condition") == "service_healthy" and "healthcheck" not in all_services.get(dependency, {}):
                problems.append(f"{name} waits for {dependency} to be healthy, which has no healthcheck")
    for name, service in long_running(compose).items():
        if "healthcheck" not in service:
            problems.append(f"{name} has no healthcheck")
    return problems


def check_variables(text: str, example: dict[str, str], doc: str) -> list[str]:
    used = compose_variables(text)
    problems = [
        f"${{{name}}} is used in docker-compose.yaml but not in .env.example" for name in used if name not in example
    ]
    problems += [
        f"{name} of .env.example is neither used in docker-compose.yaml nor documented in docs/deployment.md"
        for name in example
        if name not in used and name not in doc
    ]
    problems += [
        f"secret {name} has a default in docker-compose.yaml (use ${{{name}:?...}})"
        for name in SECRETS
        if example.get(name) and name in used and used[name] != {":?"}
    ]
    return problems


CHECKS: list[Check] = [
    check_services,
    check_image,
    check_celery,
    check_workers,
    check_lake,
    check_init,
    check_dependencies,
]


# ---- the real files pass -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_compose_passes_check(check: Check) -> None:
    # Arrange
    compose = load_compose()

    # Act
    problems = check(compose)

    # Assert
    assert problems == []


def test_every_variable_is_documented_and_secrets_have_no_default() -> None:
    # Arrange
    text, doc = COMPOSE.read_text(), DEPLOYMENT_DOC.read_text()

    # Act
    problems = check_variables(text, EXAMPLE, doc)

    # Assert
    assert problems == []


def test_compose_refuses_to_start_without_a_secret() -> None:
    # Arrange: .env.example without the Postgres password
    env = {k: v for k, v in EXAMPLE.items() if k != "POSTGRES_PASSWORD"}

    # Act / Assert: ${POSTGRES_PASSWORD:?...} stops the interpolation, naming the variable
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        load_compose(env=env)


def test_every_engine_setting_is_passed_to_the_airflow_containers() -> None:
    # Arrange: the PROFILE_ENGINE_* variables the package reads (literals, ENV_PREFIX + "X", config.py's get("X"),
    # number("X", ...), hour("X"), path("X"))
    sources = {path: path.read_text() for path in PACKAGE.rglob("*.py")}
    read = set()
    for path, source in sources.items():
        read |= set(re.findall(r"[\"'](PROFILE_ENGINE_[A-Z0-9_]+)[\"']", source))
        read |= {"PROFILE_ENGINE_" + m for m in re.findall(r'ENV_PREFIX \+ "([A-Z0-9_]+)"', source)}
        if path.name == "config.py":
            read |= {
                "PROFILE_ENGINE_" + m for m in re.findall(r'\b(?:get|number|hour|path)\(\s*"([A-Z0-9_]+)"', source)
            }
    # the scan works, also for a call wrapped over lines
    assert {"PROFILE_ENGINE_LAKE", "PROFILE_ENGINE_BUCKETS", "PROFILE_ENGINE_GATE_MIN_AUC"} <= read
    assert "PROFILE_ENGINE_SNAPSHOT_FROM_PREVIOUS_MIN_USERS" in read

    # Act
    compose = load_compose()
    passed = {name: set(environment(s)) for name, s in airflow_services(compose).items()}

    # Assert
    for name, env in passed.items():
        assert sorted(read - TEST_ONLY_SETTINGS - env) == [], name
        assert not (TEST_ONLY_SETTINGS & env), f"{name} passes fault injection settings"


# ---- each check fails on a broken copy ---------------------------------------------------------------------------
def _set(path: list[str], value: Any) -> Callable[[Compose], None]:
    def mutate(compose: Compose) -> None:
        node = compose
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _delete(path: list[str]) -> Callable[[Compose], None]:
    def mutate(compose: Compose) -> None:
        node = compose
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


def _swap_init_steps(compose: Compose) -> None:
    script = compose["services"][INIT]["command"][-1]
    lines = script.splitlines()
    check = next(i for i, line in enumerate(lines) if "check_secrets.py" in line)
    migrate = next(i for i, line in enumerate(lines) if "airflow db migrate" in line)
    lines[check], lines[migrate] = lines[migrate], lines[check]
    compose["services"][INIT]["command"][-1] = "\n".join(lines)


MUTATIONS: list[tuple[str, Callable[[Compose], None], Check, str]] = [
    ("no dag-processor", _delete(["services", "airflow-dag-processor"]), check_services, "airflow-dag-processor"),
    ("stock image", _set(["services", "airflow-worker-2", "image"], AIRFLOW_IMAGE), check_image, "airflow-worker-2"),
    (
        "local executor",
        _set(["services", SCHEDULER, "environment", "AIRFLOW__CORE__EXECUTOR"], "LocalExecutor"),
        check_celery,
        "LocalExecutor",
    ),
    (
        "broker on localhost",
        _set(
            ["services", "airflow-worker-1", "environment", "AIRFLOW__CELERY__BROKER_URL"], "redis://localhost:6379/0"
        ),
        check_celery,
        "BROKER_URL",
    ),
    ("one worker", _delete(["services", "airflow-worker-2"]), check_workers, "need two"),
    (
        "same hostname",
        _set(["services", "airflow-worker-2", "hostname"], "airflow-worker-1"),
        check_workers,
        "hostnames",
    ),
    ("worker without lake", _set(["services", "airflow-worker-1", "volumes"], []), check_lake, "airflow-worker-1"),
    (
        "api-server on another volume",
        _set(["services", API_SERVER, "volumes"], ["other:/data/lake"]),
        check_lake,
        "not one shared volume",
    ),
    ("migrate before the secrets check", _swap_init_steps, check_init, "in this order"),
    (
        "init without a secret",
        _delete(["services", INIT, "environment", "AIRFLOW_JWT_SECRET"]),
        check_init,
        "AIRFLOW_JWT_SECRET",
    ),
    (
        "scheduler not waiting for init",
        _delete(["services", SCHEDULER, "depends_on", INIT]),
        check_dependencies,
        SCHEDULER,
    ),
    ("redis without healthcheck", _delete(["services", "redis", "healthcheck"]), check_dependencies, "redis"),
]


@pytest.mark.parametrize(("mutate", "check", "expected"), [m[1:] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS])
def test_check_fails_on_broken_compose(mutate: Callable[[Compose], None], check: Check, expected: str) -> None:
    # Arrange
    compose = load_compose()
    mutate(compose)

    # Act
    problems = check(compose)

    # Assert
    assert problems, "the check passed a broken compose file"
    assert any(expected in problem for problem in problems), problems


def test_variables_check_fails_on_undocumented_variable_and_secret_default() -> None:
    # Arrange
    text = (
        COMPOSE.read_text()
        .replace("${AIRFLOW_WORKER_CONCURRENCY:-2}", "${UNDOCUMENTED_CONCURRENCY:-2}")
        .replace("${REDIS_PASSWORD:?set REDIS_PASSWORD in .env}@redis", "${REDIS_PASSWORD:-redis}@redis")
    )

    # Act
    problems = check_variables(text, EXAMPLE, doc="")
    documented = check_variables(text, EXAMPLE, doc="AIRFLOW_WORKER_CONCURRENCY is explained here")

    # Assert
    assert any("UNDOCUMENTED_CONCURRENCY" in p for p in problems)
    assert any("secret REDIS_PASSWORD has a default" in p for p in problems)
    assert any("AIRFLOW_WORKER_CONCURRENCY of .env.example" in p for p in problems)  # now unused, undocumented
    assert not any("AIRFLOW_WORKER_CONCURRENCY of .env.example" in p for p in documented)


def test_interpolation_follows_compose_rules() -> None:
    # Arrange
    env = {"SET": "x", "EMPTY": ""}

    # Act
    results = [
        interpolate(t, env) for t in ("${SET}", "${EMPTY:-d}", "${EMPTY-d}", "${UNSET:-d}", "$${HOSTNAME}", "${SET:+y}")
    ]

    # Assert
    assert results == ["x", "d", "", "d", "${HOSTNAME}", "y"]
    with pytest.raises(KeyError, match="EMPTY"):
        interpolate("${EMPTY:?needed}", env)


# ---- Dockerfile and .dockerignore ---------------------------------------------------------------------------------
def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_extends_the_official_image_with_the_pinned_set() -> None:
    # Arrange
    instructions = _instructions()
    requirements = (ROOT / "requirements.txt").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()

    # Act
    froms = [arg for op, arg in instructions if op == "FROM"]
    runs = [arg for op, arg in instructions if op == "RUN"]
    copies = [arg for op, arg in instructions if op == "COPY"]
    users = [arg for op, arg in instructions if op == "USER"]
    installs = [run for run in runs if "pip install" in run]

    # Assert: the official image, the same Airflow and Python as the project
    assert froms == [AIRFLOW_IMAGE]
    version = re.search(r"^apache-airflow(?:\[[a-z,]+\])?==(\S+)$", requirements, re.M)
    assert version and f"apache/airflow:{version.group(1)}-" in froms[0]
    assert '">=3.11,<3.12"' in pyproject and froms[0].endswith("python3.11")
    # dependencies with the constraints file, Airflow pinned; the package installed
    pinned = re.compile(r'"apache-airflow\[([a-z,]+)\]==3\.3\.2"')
    install = next(run for run in installs if "-c constraints.txt" in run and "-r " in run and pinned.search(run))
    match = pinned.search(install)
    assert match
    extras = set(match.group(1).split(","))
    assert {"celery", "postgres", "redis", "fab"} <= extras  # the providers the compose file uses
    assert any(re.search(r"pip install .*-e /opt/airflow\b", run) for run in installs)
    for folder in ("include/", "dags/", "plugins/", "docker/", ".env.example"):
        assert any(folder in copy for copy in copies), folder
    assert users[-1] == "airflow"


def test_runtime_requirements_keep_the_heavy_dependencies() -> None:
    # Arrange: the Dockerfile installs requirements.txt up to a marker line (dev tools stay out)
    run = next(arg for op, arg in _instructions() if op == "RUN" and "sed " in arg)
    marker = re.search(r"sed '/\^(.+?)/,\$d'", run)
    assert marker, run
    lines = (ROOT / "requirements.txt").read_text().splitlines()

    # Act
    assert marker.group(1) in lines
    runtime = lines[: lines.index(marker.group(1))]
    names = {line.split("==")[0].split("[")[0].lower() for line in runtime if "==" in line}

    # Assert
    assert {"apache-airflow", "tensorflow-cpu", "great-expectations", "duckdb", "pandas", "pyarrow", "pyyaml"} <= names
    assert not {"pytest", "ruff", "mypy"} & names


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_image() -> None:
    # Arrange
    lines = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}

    # Act / Assert
    assert {".env", ".venv", ".git", "lake", ".airflow"} <= lines
    assert "!.env.example" in lines  # the secrets check compares against it
    assert not {"include", "dags", "plugins", "docker", "requirements.txt", "constraints.txt"} & lines


def test_env_file_is_git_ignored_and_the_example_is_not() -> None:
    # Arrange
    lines = {line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()}

    # Act / Assert
    assert ".env" in lines
    assert ".env.example" not in lines


# ---- docker/check_secrets.py --------------------------------------------------------------------------------------
def _fernet_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def strong_env(mode: str = "production") -> dict[str, str]:
    """.env.example with a fresh random value for every secret."""
    env = dict(EXAMPLE, PROFILE_ENGINE_ENV=mode)
    for name in SECRETS:
        env[name] = _fernet_key() if name == cs.FERNET_VARIABLE else os.urandom(24).hex()
    return env


def test_the_example_declares_the_stack_secrets() -> None:
    # Arrange / Act
    names = set(SECRETS)

    # Assert
    assert {
        "POSTGRES_PASSWORD",
        "REDIS_PASSWORD",
        "AIRFLOW_FERNET_KEY",
        "AIRFLOW_JWT_SECRET",
        "AIRFLOW_API_SECRET_KEY",
        "AIRFLOW_ADMIN_PASSWORD",
        "PROFILE_ENGINE_EXPORT_KEY",
        "PROFILE_ENGINE_ERASURE_KEY",
    } == names
    assert OPTIONAL_SECRETS == ["PROFILE_ENGINE_ERASURE_KEY"]  # falls back to the export key


def test_production_refuses_every_example_value() -> None:
    # Arrange
    env = dict(EXAMPLE, PROFILE_ENGINE_ENV="production")

    # Act
    findings = cs.check_secrets(env, EXAMPLE)

    # Assert: one error per required secret, each naming its variable
    assert not findings.ok
    assert len(findings.errors) == len(REQUIRED_SECRETS)
    for name in REQUIRED_SECRETS:
        assert any(error.startswith(name + " ") for error in findings.errors), name


def test_production_accepts_strong_secrets() -> None:
    # Arrange
    env = strong_env()

    # Act
    findings = cs.check_secrets(env, EXAMPLE)

    # Assert
    assert findings.ok, findings.errors
    assert findings.warnings == []


def test_development_warns_about_example_values_but_starts() -> None:
    # Arrange
    env = dict(EXAMPLE, PROFILE_ENGINE_ENV="development")

    # Act
    findings = cs.check_secrets(env, EXAMPLE)

    # Assert
    assert findings.ok
    assert len(findings.warnings) == len(REQUIRED_SECRETS)


def test_optional_secret_may_be_unset_but_not_weak() -> None:
    # Arrange
    unset, weak = strong_env(), strong_env()
    for name in OPTIONAL_SECRETS:
        unset[name] = ""
        weak[name] = "short-key"

    # Act
    findings_unset, findings_weak = cs.check_secrets(unset, EXAMPLE), cs.check_secrets(weak, EXAMPLE)

    # Assert
    assert findings_unset.ok
    assert sorted(e.split()[0] for e in findings_weak.errors) == OPTIONAL_SECRETS


@hsettings(max_examples=50, deadline=None)
@given(name=st.sampled_from(REQUIRED_SECRETS), kind=st.sampled_from(["example", "unset", "well-known", "short"]))
def test_production_refuses_one_weak_secret_among_strong_ones(name: str, kind: str) -> None:
    # Arrange
    env = strong_env()
    weak = {"example": EXAMPLE[name], "unset": "", "well-known": "airflow", "short": "a1b2c3d4"}[kind]
    env[name] = weak

    # Act
    findings = cs.check_secrets(env, EXAMPLE)

    # Assert: exactly this variable is refused
    assert not findings.ok
    assert len(findings.errors) == 1 and findings.errors[0].startswith(name + " "), findings.errors


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("POSTGRES_PASSWORD", "p@ss/word:with-url-chars", "break the connection URL"),
        ("REDIS_PASSWORD", "abc#defghijklmnopq", "break the connection URL"),
        ("AIRFLOW_FERNET_KEY", "not-a-fernet-key-but-long-enough-0123456789", "not a Fernet key"),
    ],
)
@pytest.mark.parametrize("mode", ["development", "production"])
def test_unusable_values_are_errors_in_every_mode(name: str, value: str, expected: str, mode: str) -> None:
    # Arrange
    env = strong_env(mode)
    env[name] = value

    # Act
    findings = cs.check_secrets(env, EXAMPLE)

    # Assert
    assert [e for e in findings.errors if e.startswith(name)] and expected in findings.errors[0]


def test_unknown_mode_is_refused() -> None:
    # Arrange
    env = strong_env("prod")

    # Act
    findings = cs.check_secrets(env, EXAMPLE)

    # Assert
    assert not findings.ok and "PROFILE_ENGINE_ENV" in findings.errors[0]


def test_script_exits_non_zero_naming_the_variable(tmp_path: Path) -> None:
    # Arrange: a temporary .env with strong values except the admin password, as airflow-init sees it
    env = strong_env()
    env["AIRFLOW_ADMIN_PASSWORD"] = EXAMPLE["AIRFLOW_ADMIN_PASSWORD"]
    dotenv = tmp_path / ".env"
    dotenv.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    process_env = {"PATH": os.environ.get("PATH", ""), **cs.read_env_file(dotenv)}

    # Act
    refused = subprocess.run(
        [sys.executable, str(CHECK_SECRETS), "--example", str(ENV_EXAMPLE)],
        env=process_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    process_env["AIRFLOW_ADMIN_PASSWORD"] = os.urandom(20).hex()
    accepted = subprocess.run(
        [sys.executable, str(CHECK_SECRETS)], env=process_env, capture_output=True, text=True, timeout=60, check=False
    )

    # Assert
    assert refused.returncode == 1
    assert "refusing to start (production mode): AIRFLOW_ADMIN_PASSWORD is the example value" in refused.stderr
    assert accepted.returncode == 0, accepted.stderr
    assert "8 secrets checked, production mode: ok" in accepted.stdout


def test_init_runs_the_files_the_image_contains() -> None:
    # Arrange: where the Dockerfile copies the check and the example, and the paths airflow-init calls
    copies = dict(
        (arg.split()[-2].rstrip("/"), arg.split()[-1].rstrip("/")) for op, arg in _instructions() if op == "COPY"
    )
    script = command_text(load_compose()["services"][INIT])

    # Act
    called = re.search(r"python (\S+check_secrets\.py) --example (\S+)", script)

    # Assert
    assert called, script
    assert called.group(1) == f"{copies['docker']}/check_secrets.py"
    assert called.group(2) == copies[".env.example"]
    assert (ROOT / "docker" / "check_secrets.py").is_file()
