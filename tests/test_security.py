"""Security (issue 9): no committed secret, and files holding raw user ids readable by the service user only.

The secret scan reads every file ``git ls-files`` lists (text only) for private keys,
cloud and service tokens, passwords inside URLs and high-entropy values assigned to
``*_KEY`` / ``*_PASSWORD`` / ``*_SECRET`` / ``*_TOKEN`` names. Only the documented example
values of ``.env.example`` are allowed (they are examples, refused in production).
A planted secret in a temporary file proves each rule fires.
"""

from __future__ import annotations

import json
import math
import re
import stat
import subprocess
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from profile_engine.config import Settings
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import Lake
from profile_engine.ops import runner
from profile_engine.sources.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]
ENV_EXAMPLE = ROOT / ".env.example"
MAX_BYTES = 2_000_000
MIN_SECRET_CHARS = 16
MIN_ENTROPY_BITS = 3.5  # per character; random base64/hex keys are above, words and placeholders below

RULES: dict[str, re.Pattern[str]] = {
    "private key": re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+=]{40}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Slack token": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    "Google API key": re.compile(r"\bAIza[0-9A-Za-z_\-]{35}\b"),
    "Stripe live key": re.compile(r"\b[sr]k_live_[0-9A-Za-z]{20,}\b"),
}
# A password between the user and the host of a URL is captured.
URL_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.\-]*://[^\s:/@'\"]+:([^\s@/'\"]+)@[^\s/'\"]+")
# NAME_KEY = value, NAME_PASSWORD: "value", secret_token='value' - the name and the value are captured.
ASSIGNMENT = re.compile(
    r"(?i)\b([A-Z0-9_]*(?:_KEY|_PASSWORD|_SECRET|_TOKEN|PASSWORD|SECRET))\b['\"]?\s*[:=]\s*['\"]?([^\s'\"#,;)]+)"
)
# Values that name a secret instead of holding one: variables, templates, placeholders.
PLACEHOLDER = re.compile(r"^(?:\$|\{|<|%|\*+$|x+$|changeme|example|your[-_]|dummy|test|none|null|os\.|env)", re.I)
# Code, not a value: a call or a dotted name (``delivery.connection_secret(...)``, ``settings.key``).
CODE = re.compile(r"\(|^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+$")


def entropy(text: str) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def example_values(path: Path = ENV_EXAMPLE) -> set[str]:
    """The documented example values of ``.env.example`` (empty when another engineer has not written it yet)."""
    if not path.is_file():
        return set()
    values = set()
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#") and value.strip():
            values.add(value.strip().strip("'\""))
    return values


def secret_findings(text: str, allowed: set[str]) -> list[str]:
    """What in ``text`` looks like a committed secret: ``"<rule>: line <n>"`` each (never the value)."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for rule, pattern in RULES.items():
            if pattern.search(line):
                found.append(f"{rule}: line {number}")
        for match in URL_PASSWORD.finditer(line):
            password = match.group(1)
            if password not in allowed and not PLACEHOLDER.match(password):
                found.append(f"password in a URL: line {number}")
        for match in ASSIGNMENT.finditer(line):
            name, value = match.groups()
            if (
                len(value) >= MIN_SECRET_CHARS
                and value not in allowed
                and not PLACEHOLDER.match(value)
                and not CODE.search(value)
                and entropy(value) >= MIN_ENTROPY_BITS
            ):
                found.append(f"high-entropy value assigned to {name}: line {number}")
    return found


def scan(paths: list[Path], allowed: set[str]) -> list[str]:
    """Findings over text files, as ``"<path>: <rule>: line <n>"``."""
    findings = []
    for path in paths:
        if not path.is_file() or path.stat().st_size > MAX_BYTES:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary (fonts, images, Parquet fixtures)
        findings += [f"{path}: {f}" for f in secret_findings(text, allowed)]
    return findings


def tracked_files() -> list[Path]:
    """Every file git tracks in the repository (read-only ``git ls-files``)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    return [ROOT / name for name in listed.decode().split("\0") if name]


def test_the_repository_holds_no_secret() -> None:
    files = tracked_files()

    findings = scan(files, example_values())

    assert len(files) > 50
    assert findings == [], "\n".join(findings)


def planted(kind: str) -> str:
    """A fake secret of each kind, assembled at run time so this file itself never matches."""
    key_body = "MIIEowIBAAKCAQEA7x" + "q" * 40
    return {
        "private key": "-----BEGIN " + "RSA PRIVATE KEY-----\n" + key_body + "\n-----END RSA PRIVATE KEY-----",
        "AWS access key id": "aws_access_key_id = " + "AKIA" + "Q3EXAMPLE7KEYZ4W",
        "GitHub token": "token: " + "ghp_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A",
        "password in a URL": "sql_alchemy_conn = postgresql://airflow:" + "Tr0ub4dor-3x@db:5432/airflow",
        "high-entropy value assigned to": "PROFILE_ENGINE_EXPORT_KEY=" + "9f8Kq2Lr7XzB4mW1vT6nY3pC",
    }[kind]


@pytest.mark.parametrize(
    "kind", ["private key", "AWS access key id", "GitHub token", "password in a URL", "high-entropy value assigned to"]
)
def test_a_planted_secret_is_found(tmp_path: Path, kind: str) -> None:
    leaked = tmp_path / "settings.env"
    leaked.write_text(f"# deployment settings\n{planted(kind)}\n")

    findings = scan([leaked], allowed=set())

    assert findings and all(kind in f for f in findings), findings
    assert all(planted(kind).split("\n")[0][-8:] not in f for f in findings)  # the value is never printed


def test_example_values_placeholders_and_low_entropy_values_pass(tmp_path: Path) -> None:
    example = tmp_path / ".env.example"
    example.write_text("# documented examples\nPOSTGRES_PASSWORD=example-postgres-8Jk3Lm2Q\nAIRFLOW_UID=50000\n")
    config = tmp_path / "compose.yaml"
    config.write_text(
        "POSTGRES_PASSWORD: example-postgres-8Jk3Lm2Q\n"
        "url: postgresql://airflow:${POSTGRES_PASSWORD}@postgres/airflow\n"
        "PROFILE_ENGINE_EXPORT_KEY: ${PROFILE_ENGINE_EXPORT_KEY}\n"
        "SMTP_PASSWORD = os.environ['SMTP_PASSWORD']\n"
        "TEST_KEY = 'aaaaaaaaaaaaaaaaaaaaaaaaaaaa'\n"
    )

    findings = scan([config], example_values(example))

    assert findings == []


def test_files_with_raw_user_ids_are_private_after_an_hour(settings: Settings) -> None:
    hour = datetime(2026, 11, 3, 12, tzinfo=UTC)
    simulate(Lake(settings.lake), hour - timedelta(hours=1), hour, users=50, seed=11, intensity=4.0)
    run = Settings(lake=settings.lake, buckets=2, lateness_hours=6, start=hour)

    runner.run_hour(run, hour, build_docs=True)

    checked = 0
    for layer in lk.PRIVATE_LAYERS:
        base = settings.lake / layer
        if not base.exists():
            continue
        top = settings.lake / layer.split("/")[0]
        assert stat.S_IMODE(top.stat().st_mode) == lk.PRIVATE_DIR_MODE, top
        for manifest in base.rglob(lk.MANIFEST):
            if "files" not in json.loads(manifest.read_text()):
                continue  # a snapshot's hour-level marker (counts only), inside the private layer
            partition = manifest.parent
            assert stat.S_IMODE(partition.stat().st_mode) == lk.PRIVATE_DIR_MODE, partition
            for path in partition.rglob("*"):
                expected = lk.PRIVATE_DIR_MODE if path.is_dir() else lk.PRIVATE_FILE_MODE
                assert stat.S_IMODE(path.stat().st_mode) == expected, path
                checked += 1
    assert checked > 20
    for layer in (lk.STAGING, lk.QUARANTINE, lk.STATE, lk.PROFILES, lk.INTERESTS, lk.SCORES, lk.SEGMENTS, lk.CONTACTS):
        assert (settings.lake / layer).exists(), layer
