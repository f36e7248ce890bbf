"""Refuse to start the production stack with example or weak secrets.

The compose file's ``airflow-init`` service runs this before it touches the
metadata database; every other Airflow service waits for ``airflow-init`` to
complete successfully, so a refusal here stops the whole stack. It runs with
nothing but the standard library (no Airflow import, no network).

Secrets are the variables of ``.env.example`` whose names end in ``PASSWORD``,
``SECRET`` or ``_KEY``. With ``PROFILE_ENGINE_ENV=production`` each must be set,
differ from its value in ``.env.example`` (those values are published), not be
a well-known default and have at least 16 characters; a secret whose example
value is empty is optional (the engine falls back to another key), but when set
it must be strong too. In ``development`` the same findings are printed as
warnings. In both modes a value that cannot work is an
error: a password embedded in a connection URL with characters that break the
URL, or a Fernet key that is not one. Every message names the variable.

Usage: ``python docker/check_secrets.py [--example PATH]`` (reads the process
environment; exit status 1 when the stack must not start).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

MODE_VARIABLE = "PROFILE_ENGINE_ENV"
MODES = ("development", "production")
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|_KEY)$")
# Passwords that compose puts inside connection URLs (SQLAlchemy, Celery broker and result backend).
URL_EMBEDDED = frozenset({"POSTGRES_PASSWORD", "REDIS_PASSWORD"})
URL_SAFE = re.compile(r"[A-Za-z0-9._~-]+")
FERNET_VARIABLE = "AIRFLOW_FERNET_KEY"
FERNET_FORMAT = re.compile(r"[A-Za-z0-9_-]{43}=")
MIN_CHARS = 16
# Defaults of the official Airflow compose file, of Postgres/Redis images and of tutorials.
WELL_KNOWN = frozenset(
    {"airflow", "admin", "password", "passw0rd", "secret", "changeme", "change-me", "postgres", "redis", "root", "test"}
)
WEAK_MARKERS = ("example", "change-me", "changeme")
DEFAULT_EXAMPLE = Path(__file__).resolve().parents[1] / ".env.example"
HINTS = {
    FERNET_VARIABLE: 'python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"',
}
DEFAULT_HINT = "openssl rand -hex 32"


@dataclass
class Findings:
    """What the check found: ``errors`` stop the stack, ``warnings`` are only printed."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the stack may start."""
        return not self.errors


def read_env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines of a dotenv file (comments and blank lines skipped, one level of quotes removed)."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"{path}:{number}: not a NAME=value line: {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name] = value
    return values


def secret_names(example: Mapping[str, str]) -> list[str]:
    """The variables of ``.env.example`` that hold secrets, sorted."""
    return sorted(name for name in example if SECRET_NAME.search(name))


def is_fernet_key(value: str) -> bool:
    """Whether ``value`` is a Fernet key: 32 bytes, url-safe base64 encoded (44 characters)."""
    if not FERNET_FORMAT.fullmatch(value):
        return False
    try:
        return len(base64.urlsafe_b64decode(value)) == 32
    except (binascii.Error, ValueError):
        return False


def _unusable(name: str, value: str) -> str | None:
    """Why ``value`` cannot work at all for ``name`` (None when it can)."""
    if name in URL_EMBEDDED and value and not URL_SAFE.fullmatch(value):
        return f"{name} contains characters that break the connection URL it is put in; use only letters, digits and . _ ~ -"
    if name == FERNET_VARIABLE and value and not is_fernet_key(value):
        return f"{name} is not a Fernet key (32 random bytes, url-safe base64, 44 characters)"
    return None


def _weakness(name: str, value: str, example_value: str | None) -> str | None:
    """Why ``value`` must not be used in production for ``name`` (None when it is acceptable)."""
    if not value:
        return f"{name} is not set"
    if example_value is not None and value == example_value:
        return f"{name} is the example value from .env.example (published with the code)"
    lowered = value.lower()
    if lowered in WELL_KNOWN or any(marker in lowered for marker in WEAK_MARKERS):
        return f"{name} is a well-known default or placeholder value"
    if len(value) < MIN_CHARS:
        return f"{name} has {len(value)} characters; at least {MIN_CHARS} are needed"
    return None


def check_secrets(environ: Mapping[str, str], example: Mapping[str, str]) -> Findings:
    """Check every secret of ``example`` (the parsed ``.env.example``) in ``environ``.

    Production turns weak or example values into errors; development only warns.
    """
    findings = Findings()
    mode = environ.get(MODE_VARIABLE) or "development"
    if mode not in MODES:
        findings.errors.append(f"{MODE_VARIABLE} must be one of {', '.join(MODES)}, got {mode!r}")
        return findings
    production = mode == "production"
    for name in secret_names(example):
        value = environ.get(name, "")
        if not value and not example.get(name):
            continue  # optional secret, not set
        unusable = _unusable(name, value)
        if unusable:
            findings.errors.append(unusable)
            continue
        weakness = _weakness(name, value, example.get(name))
        if weakness:
            hint = f" (generate one with: {HINTS.get(name, DEFAULT_HINT)})"
            (findings.errors if production else findings.warnings).append(weakness + hint)
    return findings


def main(argv: list[str] | None = None) -> int:
    """Check the process environment against ``.env.example``; print the findings; 1 if the stack must not start."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--example", type=Path, default=DEFAULT_EXAMPLE, help="the committed .env.example")
    args = parser.parse_args(argv)
    findings = check_secrets(os.environ, read_env_file(args.example))
    mode = os.environ.get(MODE_VARIABLE) or "development"
    for warning in findings.warnings:
        print(f"check_secrets: warning ({mode} mode; refused in production): {warning}", file=sys.stderr)
    for error in findings.errors:
        print(f"check_secrets: refusing to start ({mode} mode): {error}", file=sys.stderr)
    if findings.ok:
        print(f"check_secrets: {len(secret_names(read_env_file(args.example)))} secrets checked, {mode} mode: ok")
    return 0 if findings.ok else 1


if __name__ == "__main__":
    sys.exit(main())
