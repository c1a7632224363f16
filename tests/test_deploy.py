"""The deployment files agree with each other, with the docs (docs/deployment.md and the
README) and with the service, and the CI checks in .ci/check-deploy (hadolint, Compose and
Kubernetes schemas) catch real mistakes. No Docker engine or cluster is needed."""

from __future__ import annotations

import http.server
import json
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from unet_service.serving.metrics import Metrics
from unet_service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
KUBE = REPO / "deploy" / "kubernetes"
BIN = Path(sys.executable).parent  # the test extra installs the check tools beside python
PROJECT = "<this project>"


# --- Dockerfile ------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        (rest,) = self.all(keyword)
        return rest


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions, continuation lines joined and global ARG defaults
    substituted (enough for this repository's Dockerfile, not every Dockerfile)."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
        else:
            lines.append(pending + line)
            pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), rest.strip())
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, flags=re.IGNORECASE)
            assert match, f"every stage is named: {line}"
            stages.append(Stage(name=match[2], base=match[1]))
        else:
            stages[-1].instructions.append((keyword, rest))
    return stages


def shell_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell command line, split on `&&`, `||`, `;` and `|` outside
    quotes, each as its words."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def pip_installs(command: str) -> set[tuple[str, str | None]]:
    """(what, index URL) for each target of each `pip install` in a shell command line. The
    project itself, as `.` or as its wheel, becomes PROJECT plus its extras; a requirements
    file becomes `-r PATH`."""
    installs: set[tuple[str, str | None]] = set()
    for words in shell_commands(command):
        if words[:2] != ["pip", "install"]:
            continue
        targets, index = [], None
        it = iter(words[2:])
        for word in it:
            if word == "--index-url":
                index = next(it)
            elif word == "-r":
                targets.append(f"-r {next(it)}")
            elif not word.startswith("-"):
                targets.append(word)
        for target in targets:
            path, bracket, extras = target.partition("[")
            is_project = path == "." or path.endswith(".whl")
            installs.add(((PROJECT if is_project else path) + bracket + extras, index))
    return installs


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    parsed = parse_dockerfile((REPO / "Dockerfile").read_text())
    assert parsed[-1].name == "cuda", "the default target (last stage) is the GPU image"
    return {s.name: s for s in parsed}


def run_commands(stage: Stage) -> list[str]:
    # BuildKit flags (--mount=...) come before the command itself.
    return [re.sub(r"^(--\S+\s+)+", "", rest) for rest in stage.all("RUN")]


# Where "Run with Docker" lives in full; the README keeps its first commands and links to it.
DEPLOYMENT_DOC = REPO / "docs" / "deployment.md"
README = REPO / "README.md"


def doc_section(title: str, doc: Path = DEPLOYMENT_DOC) -> str:
    text = doc.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{doc.relative_to(REPO)} has a section '## {title}'"
    return match[1]


def code_lines(markdown: str) -> list[str]:
    blocks = re.findall(r"^```\w*\n(.*?)^```", markdown, re.M | re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_images_install_what_the_docs_document(stages: dict[str, Stage]) -> None:
    documented = set().union(
        *(pip_installs(line) for line in code_lines(doc_section("Run with Docker")))
    )
    cpu = set().union(*(pip_installs(c) for c in run_commands(stages["cpu"])))
    cuda = set().union(*(pip_installs(c) for c in run_commands(stages["cuda"])))
    assert (PROJECT, None) in documented
    # Every dependency but torch from the serving lock (tests/test_lock.py checks it).
    assert ("-r requirements/serve.txt", None) in documented
    assert cpu == documented
    torch = {(what, index) for what, index in documented if what.startswith("torch")}
    assert len(torch) == 1
    # The CUDA base ships torch itself: the same release as the CPU image pins.
    assert cuda == documented - torch
    ((pin, index),) = torch
    version = pin.removeprefix("torch==")
    assert stages["cuda"].base.startswith(f"pytorch/pytorch:{version}-cuda")
    # The index is a build argument (a mirror, an offline build) whose default is the CPU one.
    assert index == "https://download.pytorch.org/whl/cpu"
    # (a global ARG is empty in a stage that does not declare it again)
    assert "--index-url ${TORCH_INDEX}" in (REPO / "Dockerfile").read_text()
    assert {"TORCH_VERSION", "TORCH_INDEX"} <= set(stages["cpu"].all("ARG"))
    # Each lock install checks hashes; torch and the project add no unlocked dependencies.
    for command in run_commands(stages["cpu"]) + run_commands(stages["cuda"]):
        for words in shell_commands(command):
            if words[:2] == ["pip", "install"]:
                assert ("-r" in words) == ("--require-hashes" in words) != ("--no-deps" in words)
    # The wheel the images install is built from the project itself.
    assert any(re.search(r"\bpip wheel\b.*\s\.$", c) for c in run_commands(stages["wheel"]))


def test_images_start_the_documented_entrypoint(stages: dict[str, Stage]) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["unet-serve"] == "unet_service.cli.serve:main"
    assert "unet-serve" in code_lines(doc_section("Run with Docker"))
    for name in ("cpu", "cuda"):
        # JSON (exec) form: unet-serve is PID 1 and gets SIGTERM itself, not a shell.
        assert json.loads(stages[name].one("ENTRYPOINT")) == ["unet-serve"]
        assert not stages[name].all("CMD")


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_final_stages(stages: dict[str, Stage], name: str) -> None:
    stage = stages[name]
    env = dict(pair.split("=", 1) for line in stage.all("ENV") for pair in shlex.split(line))
    # Non-root, by number so Kubernetes' runAsNonRoot can verify it.
    user = stage.one("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert f"runAsUser: {user}" in (KUBE / "deployment.yaml").read_text()
    assert stage.one("EXPOSE") == env["UNET_PORT"] == "8000"
    assert env["UNET_HOST"] == "0.0.0.0"
    # The baked-in weights are where UNET_WEIGHTS points, with their card beside them.
    weights = Path(env["UNET_WEIGHTS"])
    copied = [c.split() for c in stage.all("COPY") if not c.startswith("--from")]
    destinations = {Path(words[-1]) / Path(src).name for words in copied for src in words[:-1]}
    assert {weights, weights.with_suffix(".json")} <= destinations
    # Nothing that builds software, and no pip cache, in the final image.
    for command in run_commands(stage):
        assert not re.search(r"apt-get|gcc|build-essential|pip wheel", command)
        if "pip install" in command:
            assert "--no-cache-dir" in command
    # The strip kit it copies from the binutils stage is deleted by the last RUN that uses it.
    kits = [c.split()[-1] for c in stage.all("COPY") if c.startswith("--from=binutils ")]
    assert kits, "the image's install steps strip what they install"
    runs = run_commands(stage)
    for kit in kits:
        using = [i for i, c in enumerate(runs) if f"{kit}/strip" in c]
        assert using, f"{kit} is copied in but never used"
        assert any(
            words[:2] == ["rm", "-rf"] and kit in words for words in shell_commands(runs[using[-1]])
        ), f"the last RUN that uses {kit} leaves it in the image"
    assert "/v2/health/ready" in stage.one("HEALTHCHECK")


def account_options(words: list[str]) -> tuple[dict[str, str], str]:
    """The options of a `groupadd`/`useradd` command, long names, and the account's name."""
    short = {"-u": "--uid", "-g": "--gid", "-d": "--home-dir", "-s": "--shell", "-G": "--groups"}
    with_value = {"--uid", "--gid", "--home-dir", "--shell", "--groups", "--comment"}
    options: dict[str, str] = {}
    names: list[str] = []
    it = iter(words[1:])
    for word in it:
        key, eq, value = word.partition("=")
        key = short.get(key, key)
        if key in with_value:
            options[key] = value if eq else next(it)
        elif word.startswith("-"):
            options[key] = ""
        else:
            names.append(word)
    (name,) = names
    return options, name


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_image_user_and_group_are_the_manifests(stages: dict[str, Stage], name: str) -> None:
    groups: dict[str, int] = {}
    users: dict[str, tuple[int, str]] = {}
    for command in run_commands(stages[name]):
        for words in shell_commands(command):
            if words[0] == "groupadd":
                options, group = account_options(words)
                groups[group] = int(options["--gid"])
            elif words[0] == "useradd":
                options, user = account_options(words)
                # Without --gid, useradd would make a group of its own choosing (or use 100).
                users[user] = (int(options["--uid"]), options["--gid"])
    uid, gid = (int(n) for n in stages[name].one("USER").split(":"))
    # USER names the user by number (runAsNonRoot can verify it), and that user exists with
    # that group as its primary one, so its files and home folder belong to the running ids.
    (user,) = [u for u, (number, _) in users.items() if number == uid]
    primary = users[user][1]
    assert (int(primary) if primary.isdigit() else groups[primary]) == gid
    assert gid in groups.values(), f"no group with gid {gid}"
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (uid, gid, gid)
    assert uid != 0


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins,
    `!` re-includes, `*` stays within one path segment and `**` spans any number."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def test_wheel_holds_every_package_the_console_scripts_need(stages: dict[str, Stage]) -> None:
    # The images' wheel is built from what the wheel stage copies: every console script's
    # package must be there, or its command fails in the image (unet-eval needs training/).
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    copied = {
        Path(src).parts[0]
        for line in stages["wheel"].all("COPY")
        if not line.startswith("--from")
        for src in line.split()[:-1]
    }
    for script, target in project["project"]["scripts"].items():
        package = target.split(".")[0]
        assert package in copied, f"{script} needs {package}/, which the wheel stage leaves out"
    included = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {pattern.rstrip("*") for pattern in included} <= copied


def test_dockerignore_keeps_the_context_to_what_the_image_needs(stages: dict[str, Stage]) -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    for path in [
        ".git/HEAD",
        ".venv/bin/python",
        "tests/test_deploy.py",
        "weights/README.md",
        "runs/checkpoint.safetensors",
        ".ruff_cache/CACHEDIR.TAG",
        ".pytest_cache/README.md",
        "unet_service/core/__pycache__/unet.cpython-311.pyc",
        "docker-compose.yml",
        "deploy/kubernetes/deployment.yaml",
    ]:
        assert dockerignore_excludes(path, patterns), path
    # Everything the Dockerfile copies from the context exists and is sent.
    sources = [
        src
        for stage in stages.values()
        for line in stage.all("COPY")
        if not line.startswith("--from")
        for src in line.split()[:-1]
    ]
    assert "requirements/serve.txt" in sources
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"the Dockerfile copies {src}, which is not in the repo"
        files = [REPO / src] if (REPO / src).is_file() else (REPO / src).rglob("*.py")
        for file in files:
            rel = file.relative_to(REPO).as_posix()
            assert not dockerignore_excludes(rel, patterns), f"{rel} is left out of the context"


@pytest.mark.parametrize("status", [200, 503])
def test_healthcheck_command_follows_readiness(stages: dict[str, Stage], status: int) -> None:
    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/v2/health/ready" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    commands = [
        json.loads(stage.one("HEALTHCHECK").split(" CMD ", 1)[1])
        for stage in stages.values()
        if stage.all("HEALTHCHECK")
    ]
    compose = load_compose()["services"]["unet"]["healthcheck"]["test"]
    assert compose[0] == "CMD" and all(c == compose[1:] for c in commands)
    server = http.server.HTTPServer(("127.0.0.1", 0), Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        argv = [sys.executable if commands[0][0] == "python" else commands[0][0], *commands[0][1:]]
        port = str(server.server_address[1])
        done = subprocess.run(argv, env={"UNET_PORT": port}, capture_output=True, timeout=30)
    finally:
        server.shutdown()
    assert (done.returncode == 0) == (status == 200), done.stderr.decode()


# --- docker compose --------------------------------------------------------------------------


def load_compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def interpolation_default(value: object) -> str:
    """`${VAR:-default}` -> default; a literal stays as it is."""
    match = re.fullmatch(r"\$\{\w+:-(.*)\}", str(value))
    return match[1] if match else str(value)


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|s|m|h)", duration))


def test_compose_gpu_service() -> None:
    unet = load_compose()["services"]["unet"]
    assert "profiles" not in unet, "plain `docker compose up` starts the GPU service"
    assert unet["build"]["target"] == "cuda"
    (device,) = unet["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert unet["ports"] == ["${UNET_BIND:-127.0.0.1}:${UNET_PUBLISH_PORT:-8000}:8000"]
    assert unet["restart"] in ("always", "unless-stopped", "on-failure")
    models, jobs = unet["volumes"]
    assert models["target"] == "/models" and models["read_only"] is True
    # Section jobs live on a named volume at the image's UNET_JOBS_DIR: they survive
    # `docker compose down` and re-creation.
    assert jobs["type"] == "volume" and jobs["source"] in load_compose()["volumes"]
    assert jobs["target"] == unet["environment"]["UNET_JOBS_DIR"].split(":-")[1].rstrip("}")


@pytest.mark.parametrize("devices", [[], ["nvidiactl", "nvidia0"], ["dxg"]])
def test_compose_gpu_check_says_what_a_machine_without_a_gpu_runs(
    tmp_path: Path, devices: list[str]
) -> None:
    """Plain `docker compose up` is the GPU service; it waits for gpu-check, which fails with
    the CPU command on a machine without NVIDIA device nodes instead of the engine's driver
    error. (deploy/compose-check runs it for real.)"""
    services = load_compose()["services"]
    check = services["gpu-check"]
    assert services["unet"]["depends_on"] == {
        "gpu-check": {"condition": "service_completed_successfully"}
    }
    assert "deploy" not in check and "profiles" not in check
    assert check["image"] == services["unet"]["image"]  # nothing more to pull or build
    assert check["build"] == services["unet"]["build"]
    assert check["network_mode"] == "none"
    (dev,) = check["volumes"]
    assert (dev["source"], dev["target"], dev["read_only"]) == ("/dev", "/host/dev", True)
    python, flag, script = check["entrypoint"]
    assert (python, flag) == ("python", "-c")
    host_dev = tmp_path / "dev"
    host_dev.mkdir()
    for name in devices:
        (host_dev / name).touch()
    run = subprocess.run(
        [sys.executable, "-c", script.replace("/host/dev/", f"{host_dev}/")],
        capture_output=True,
        text=True,
    )
    if devices:
        assert run.returncode == 0 and "starting the GPU service" in run.stdout, run
    else:
        assert run.returncode == 1
        assert "docker compose up unet-cpu" in run.stderr and "no NVIDIA GPU" in run.stderr
        assert "docker compose up unet-cpu" in doc_section("Run with Docker")
        # The README says it too, and links to the whole section.
        readme = doc_section("Run with Docker", README)
        assert "docker compose up unet-cpu" in readme
        assert "(docs/deployment.md#run-with-docker)" in readme


def test_compose_cpu_profile_and_prometheus() -> None:
    services = load_compose()["services"]
    cpu = services["unet-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert cpu["build"]["target"] == "cpu"
    assert "deploy" not in cpu
    assert cpu["environment"]["UNET_DEVICE"] == "cpu"
    assert cpu["ports"] == services["unet"]["ports"]
    # Prometheus finds the service under one name, whichever of the two runs.
    assert "unet" in cpu["networks"]["default"]["aliases"]
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    (config,) = prometheus["volumes"]
    assert config["target"] == "/etc/prometheus/prometheus.yml" and config["read_only"]
    scrape = yaml.safe_load((REPO / config["source"]).read_text())["scrape_configs"]
    assert [(s["metrics_path"], s["static_configs"][0]["targets"]) for s in scrape] == [
        ("/metrics", ["unet:8000"])
    ]


def test_compose_publishes_on_loopback_unless_opened() -> None:
    services = load_compose()["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            # HOST_IP:HOST_PORT:CONTAINER_PORT, with the host address a loopback default.
            match = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):(\$\{[^}]*\}|\d+):\d+", port)
            assert match and interpolation_default(match[1]) == "127.0.0.1", (name, port)
    # One variable opens the service, and the docs say which.
    (port,) = services["unet"]["ports"]
    assert port.startswith("${UNET_BIND:-127.0.0.1}:")
    section = doc_section("Run with Docker")
    assert "UNET_BIND=0.0.0.0" in section and "UNET_API_KEY" in section


def compose_up_services(command: str) -> set[str]:
    """The services `docker compose [--profile P]... up [SERVICE]...` starts: those named
    (whatever their profiles) with what they depend on, else every service whose profiles are
    all inactive or that has an active one."""
    words = shlex.split(command, comments=True)
    assert words[:2] == ["docker", "compose"] and "up" in words, command
    up = words.index("up")
    profiles = {words[i + 1] for i in range(2, up) if words[i] == "--profile"}
    named = [w for w in words[up + 1 :] if not w.startswith("-")]
    services = load_compose()["services"]
    if not named:
        return {
            name
            for name, service in services.items()
            if not service.get("profiles") or profiles & set(service["profiles"])
        }
    started: set[str] = set()
    while named:
        name = named.pop()
        started.add(name)
        named += [d for d in services[name].get("depends_on", []) if d not in started]
    return started


def compose_commands(markdown: str) -> list[str]:
    return [
        line.split("#")[0].strip()
        for line in code_lines(markdown)
        if line.startswith("docker compose")
    ]


def test_documented_compose_commands_start_what_they_say() -> None:
    commands = compose_commands(doc_section("Run with Docker"))
    started = {command: compose_up_services(command) for command in commands}
    assert started == {
        "docker compose up": {"unet", "gpu-check"},
        "docker compose up unet-cpu": {"unet-cpu"},
        "docker compose --profile monitoring up": {"unet", "gpu-check", "prometheus"},
        "docker compose up unet-cpu prometheus": {"unet-cpu", "prometheus"},
    }
    # The README's commands are among them.
    readme = compose_commands(doc_section("Run with Docker", README))
    assert "docker compose up unet-cpu" in readme and set(readme) <= set(started)
    # The CPU commands start nothing that reserves a GPU.
    services = load_compose()["services"]
    for command in ("docker compose up unet-cpu", "docker compose up unet-cpu prometheus"):
        assert not any("deploy" in services[name] for name in started[command]), command


def test_compose_settings_are_the_service_defaults(stages: dict[str, Stage]) -> None:
    env = load_compose()["services"]["unet"]["environment"]
    defaults = Settings(_env_file=None)
    assert set(env) == {f"UNET_{name.upper()}" for name in Settings.model_fields}
    given = {
        name: interpolation_default(env[f"UNET_{name.upper()}"]) for name in Settings.model_fields
    }
    # The deliberate differences: the weights baked into the image, its jobs volume, and
    # every interface inside the container (compose publishes the port on loopback).
    image_env = " ".join(stages["cuda"].all("ENV"))
    assert f"UNET_WEIGHTS={given.pop('weights')}" in image_env
    assert f"UNET_JOBS_DIR={given.pop('jobs_dir')}" in image_env
    assert f"UNET_HOST={given.pop('host')}" in image_env
    assert defaults.host == "127.0.0.1"
    parsed = Settings(_env_file=None, **given)
    for name in given:
        assert getattr(parsed, name) == getattr(defaults, name), name
    # A stop waits for the drain before it kills.
    grace = seconds(load_compose()["services"]["unet"]["stop_grace_period"])
    assert grace > parsed.drain_timeout_s


# --- Kubernetes ------------------------------------------------------------------------------


def manifests() -> dict[str, dict]:
    """The service's manifests by kind (the optional Dask cluster's apart)."""
    files = [p for p in sorted(KUBE.glob("*.yaml")) if p.name != "dask-cluster.yaml"]
    docs = [d for p in files for d in yaml.safe_load_all(p.read_text())]
    return {d["kind"]: d for d in docs}


def test_dask_cluster_workers_reach_the_scheduler_with_a_gpu_and_the_jobs_volume() -> None:
    docs = list(yaml.safe_load_all((KUBE / "dask-cluster.yaml").read_text()))
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    service = by_name["Service", "unet-dask-scheduler"]
    scheduler = by_name["Deployment", "unet-dask-scheduler"]["spec"]["template"]
    assert service["spec"]["selector"] == scheduler["metadata"]["labels"]
    (port,) = service["spec"]["ports"]
    worker = by_name["Deployment", "unet-dask-worker"]["spec"]["template"]["spec"]
    (container,) = worker["containers"]
    assert f"tcp://unet-dask-scheduler:{port['port']}" in container["command"]
    assert container["command"][:2] == ["dask", "worker"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    service_pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    assert {m["mountPath"] for m in service_pod["containers"][0]["volumeMounts"]} <= mounts
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in worker["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"unet-jobs"}


def test_compose_dask_profile_points_the_service_at_its_scheduler() -> None:
    services = load_compose()["services"]
    dask = {name for name, s in services.items() if "dask" in s.get("profiles", [])}
    assert dask == {"unet-dask", "dask-scheduler", "dask-worker"}
    address = services["unet-dask"]["environment"]["UNET_DASK_SCHEDULER"]
    assert address == "tcp://dask-scheduler:8786"
    assert address in services["dask-worker"]["entrypoint"]
    for name in ("unet", "unet-cpu"):
        assert services[name]["environment"]["UNET_DASK_SCHEDULER"].endswith(":-}")
    # Workers see what the service sees: the models and the jobs and data folders.
    targets = {v["target"] for v in services["dask-worker"]["volumes"]}
    assert targets == {v["target"] for v in services["unet-dask"]["volumes"]}


def test_deployment_probes_gpu_and_drain() -> None:
    deployment = manifests()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    (port,) = container["ports"]
    assert str(port["containerPort"]) == env["UNET_PORT"]
    probes = {k: container[k]["httpGet"] for k in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["path"] == "/v2/health/live"
    assert all(p["port"] == port["name"] for p in probes.values())
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == env["UNET_PORT"]
    # The kubelet kills at the end of the grace period, which also covers the preStop pause.
    pause = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    drain = float(env["UNET_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > float(pause[1]) + drain
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_replicas_share_the_jobs_volume_and_a_postgresql_job_table() -> None:
    kinds = manifests()
    claim = kinds["PersistentVolumeClaim"]
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    # Every replica mounts the one ReadWriteMany claim where UNET_JOBS_DIR points.
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [
        m for m in container["volumeMounts"] if m["mountPath"] == env["UNET_JOBS_DIR"]["value"]
    ]
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert not mount.get("readOnly")
    # The job table's URL holds a password: from a Secret, and required (SQLite on a shared
    # volume is not safe for several replicas).
    db = env["UNET_JOBS_DB"]["valueFrom"]["secretKeyRef"]
    assert db["name"] and db["key"] and not db.get("optional")
    # The quota leaves the volume a margin.
    quota = Settings(_env_file=None, jobs_quota_gb=env["UNET_JOBS_QUOTA_GB"]["value"])
    size = claim["spec"]["resources"]["requests"]["storage"]
    assert size.endswith("Gi") and quota.jobs_quota_bytes < int(size[:-2]) * 2**30
    readme = " ".join((KUBE / "README.md").read_text().split())
    assert f"kubectl create secret generic {db['name']} --from-literal={db['key']}=" in readme
    assert "not reliable over a network file system" in readme


def test_service_and_hpa_reach_the_deployment() -> None:
    kinds = manifests()
    deployment, service, hpa = (
        kinds["Deployment"],
        kinds["Service"],
        kinds["HorizontalPodAutoscaler"],
    )
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert (
        hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    )


def test_hpa_scales_on_the_queue_depth_the_service_exports() -> None:
    gauge = Metrics().queue_tiles
    (family,) = gauge.collect()
    assert family.type == "gauge"
    hpa = manifests()["HorizontalPodAutoscaler"]
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert [p["metric"]["name"] for p in pods] == [family.name]
    adapter = yaml.safe_load((REPO / "deploy" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["seriesQuery"].startswith(family.name + "{")
    assert rule["name"]["as"] == family.name


# --- the CI checks have teeth ----------------------------------------------------------------


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} comes with the test extra: pip install -e '.[test]'"
    return str(path)


def mutated(tmp_path: Path, source: Path, old: str, new: str) -> Path:
    text = source.read_text()
    assert old in text
    out = tmp_path / source.name
    out.write_text(text.replace(old, new))
    return out


@pytest.fixture
def checks(tmp_path: Path) -> Iterator[dict[str, tuple[list[str], str]]]:
    """Each check of .ci/check-deploy run on a copy with one typical mistake, and the message
    that must name the mistake."""
    yield {
        "hadolint: shell-form entrypoint": (
            [
                tool("hadolint"),
                str(
                    mutated(
                        tmp_path,
                        REPO / "Dockerfile",
                        'ENTRYPOINT ["unet-serve"]',
                        "ENTRYPOINT unet-serve",
                    )
                ),
            ],
            "DL3025",
        ),
        "compose: misspelt GPU capabilities": (
            [
                tool("check-jsonschema"),
                "--builtin-schema",
                "vendor.compose-spec",
                str(
                    mutated(
                        tmp_path,
                        REPO / "docker-compose.yml",
                        "capabilities: [gpu]",
                        "capability: [gpu]",
                    )
                ),
            ],
            "'capabilities' is a required property",
        ),
        "kubernetes: misspelt grace period": (
            [
                tool("kubernetes-validate"),
                "--strict",
                str(
                    mutated(
                        tmp_path,
                        KUBE / "deployment.yaml",
                        "terminationGracePeriodSeconds:",
                        "terminationGracePeriod:",
                    )
                ),
            ],
            "'terminationGracePeriod' was unexpected",
        ),
    }


def test_ci_checks_reject_typical_mistakes(checks: dict[str, tuple[list[str], str]]) -> None:
    assert ".ci/check-deploy" in (REPO / ".ci" / "run").read_text(), "CI runs the checks"
    script = (REPO / ".ci" / "check-deploy").read_text()
    for name, (argv, message) in checks.items():
        assert Path(argv[0]).name in script, f"{name}: .ci/check-deploy runs this tool"
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0, name
        assert message in done.stdout + done.stderr, name
