"""Every code block of README.md and docs/**/*.md is executed by some test; here, the shell ones.

Each ```bash / ```sh / ```console block is parsed into commands (tests/doc_helpers.py) and every command
runs for real, from the repository root, in document order:

- long-running ones (`tdb serve`, `tdb dashboard`, `scripts/start.sh`, `tdb dap`) start on a free port,
  must print their "listening" / "dashboard at" line and answer (ModelInfo over gRPC, with the token and
  certificate they were given; the dashboard's page and health check; a DAP conversation that stops at
  a breakpoint), and are stopped (their whole process group) once nothing later in their block needs
  them, at the block's end at the latest;
- the others run to completion and must exit 0; a `# -> TEXT` line after a command is a line its output
  must contain, and an output block (```text right after a one-command block) is its exact stdout.
  grpcurl comes from scripts/install_grpcurl.sh (run by scripts/test.sh); without it its lines are
  skipped, except under CI, where that fails.

What the test changes, always: a server address `localhost:50051` / `127.0.0.1:50051` becomes the one the
block started (else the suite's bundled server), `--port N` / `--listen N` of a long-running command
becomes 0, `--host 0.0.0.0` becomes 127.0.0.1, `server.crt` / `server.key` are a self-signed pair made by
the test, `$TDB_TOKEN` is set for the commands that use it, $HOME is a temporary folder and the virtual
environment's bin/ comes first on $PATH. Everything else is in the two reviewed tables below, ADAPT and
SKIP; a command that no runner knows and no table names fails the test, and so does a table entry that
no longer matches any command.
"""

from __future__ import annotations

import difflib
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dap_client import DapClient
from doc_helpers import (
    ROOT,
    SHELL_LANGS,
    Block,
    Command,
    all_blocks,
    commands,
    docs,
    expect_pattern,
    rel,
)

CUDA = False
try:
    import torch

    CUDA = torch.cuda.is_available()
except ImportError:
    pass

DEMO_PROMPT = "the young lady saw Mr Darcy at the ball and her sister told Miss Bennet that Mr"

# -- the reviewed tables --------------------------------------------------------------------------------

# Commands that are not run: pattern (searched in the command) -> why.
SKIP: dict[str, str] = {
    r"^bash scripts/test\.sh\b": "the whole test suite, which runs this test (CI runs it: .ci/run)",
    r"\bpython (-m benchmarks\b|benchmarks/\w+\.py\b)": "measurements, minutes of CPU each (gpu_sweeps.py "
                                                     "needs CUDA): benchmarks are never run as tests",
    r"\bpip install\b.*(transformer-lens|\[bench\])": "installs the benchmarks' peer (TransformerLens and its "
                                                     "dependencies, the `bench` extra), never a runtime dependency",
}

# Commands run with a change: pattern -> ([(regex, replacement), ...], why, applies).
ADAPT: dict[str, tuple[list[tuple[str, str]], str, bool]] = {
    r"--device cuda\b": ([(r"--device cuda\b", "--device cpu")],
                         "no GPU here: the same command on the CPU (run as written where CUDA is available)",
                         not CUDA),
    r"/models/llama-3-8b\b": ([(r"/models/llama-3-8b\b", "tdb_server/bundled/austen")],
                              "docs/deploy.md's example model is not on the machine: the bundled one stands in",
                              True),
}

# What runs a command: pattern (searched in the command) -> kind. The first match wins.
RUN: list[tuple[str, str]] = [
    (r"^(bash )?scripts/start\.sh\b", "dashboard"),
    (r"^(\.venv/bin/)?tdb serve\b", "server"),
    (r"^(\.venv/bin/)?tdb dashboard\b", "dashboard"),
    (r"^(\.venv/bin/)?tdb dap --listen\b", "dap-tcp"),
    (r"^(\.venv/bin/)?tdb dap$", "dap-stdio"),
    (r"^grpcurl ", "grpcurl"),
    (r"^openssl req ", "once"),
    (r"^\.venv/bin/python docs/\w+\.py$", "once"),
    (r"^mkdir -p ~/\.vscode/extensions && ln -s ", "once"),
]

LISTENING = re.compile(r"^tdb: listening on (\S+)")
DASHBOARD = re.compile(r"^tdb: dashboard at (http://\S+)")
DAP_LISTENING = re.compile(r"^tdb dap: listening on (\S+)")
START_TIMEOUT = {"server": 120, "dashboard": 300, "dap-tcp": 60}   # start.sh may run its set-up first
ONCE_TIMEOUT = 180
LIFETIME_S = 600                          # no process started here outlives this, whatever happens to the test


def _shell_commands() -> list[Command]:
    """Every command of every shell block; an output block right after a one-command block is its stdout."""
    out: list[Command] = []
    previous: Block | None = None
    previous_cmds: list[Command] = []
    for b in all_blocks():
        if b.lang in SHELL_LANGS:
            previous_cmds = commands(b)
            out += previous_cmds
        elif b.lang == "text" and b.after_block and previous is not None and previous.lang in SHELL_LANGS:
            assert len(previous_cmds) == 1, f"{b.where}: an output block after a block of several commands"
            previous_cmds[0].output = b.text
        previous = b
    return out


COMMANDS = _shell_commands()
SHELL_BLOCKS = sorted({c.block for c in COMMANDS}, key=lambda b: (b.doc != "README.md", b.doc, b.line))


def _kind(cmd: str) -> str | None:
    for pattern, kind in RUN:
        if re.search(pattern, cmd):
            return kind
    return None


def _skipped(cmd: str) -> str | None:
    return next((why for pattern, why in SKIP.items() if re.search(pattern, cmd)), None)


def _adapt(cmd: str) -> str:
    for pattern, (subs, _, applies) in ADAPT.items():
        if applies and re.search(pattern, cmd):
            for old, new in subs:
                cmd = re.sub(old, new, cmd)
    return cmd


# -- the static checks -----------------------------------------------------------------------------------

def test_every_command_is_run_or_skipped():
    unknown = [f"{c.where}: {c.text}" for c in COMMANDS if not _skipped(c.text) and not _kind(_adapt(c.text))]
    assert not unknown, ("shell commands in the docs that no test runs: add a runner (RUN) or a reviewed "
                         "SKIP entry in tests/test_docs_shell.py:\n" + "\n".join(unknown))


def test_tables_have_no_stale_entries():
    texts = [c.text for c in COMMANDS]
    stale = [p for p in [*SKIP, *ADAPT] if not any(re.search(p, t) for t in texts)]
    assert not stale, f"SKIP / ADAPT entries that match no command in the docs any more: {stale}"


def test_skipped_commands_name_files_that_exist():
    """A command that is not run still names real scripts: its paths exist."""
    for c in COMMANDS:
        if not _skipped(c.text):
            continue
        for path in re.findall(r"(?<![\w/.-])((?:scripts|benchmarks|docs|tests)/[\w./-]+)", c.text):
            assert (ROOT / path).exists(), f"{c.where}: {path} does not exist"
        for module in re.findall(r"python -m ([\w.]+)", c.text):
            base = ROOT / module.replace(".", "/")
            assert (base / "__main__.py").is_file() or base.with_suffix(".py").is_file(), f"{c.where}: {module}"


# Fenced blocks by language: who executes them.
PYTHON_RUNNERS = {          # every ```python block of the doc, by this test file
    "README.md": "tests/test_readme.py",
    "docs/architectures.md": "tests/test_docs_architectures.py",
    "docs/analyses.md": "tests/test_docs_analyses.py",
    "docs/sweeps.md": "tests/test_docs_examples.py",
    "docs/circuits.md": "tests/test_docs_examples.py",
    "docs/sae.md": "tests/test_docs_examples.py",
}
YAML_CHECKS = {"docs/deploy.md": "test_deploy_envoy_config (below)"}
NOT_EXECUTED = {"text": "output (compared when it follows a command), diagrams and listings"}


def test_every_block_has_a_language_a_test_runs():
    problems = []
    for b in all_blocks():
        if b.lang in SHELL_LANGS or b.lang in NOT_EXECUTED:
            continue
        if b.lang == "python":
            runner = PYTHON_RUNNERS.get(b.doc)
            if runner is None or Path(b.doc).name not in (ROOT / runner).read_text():
                problems.append(f"{b.where}: a python block no test runs (add its doc to a runner and to "
                                f"PYTHON_RUNNERS)")
        elif b.lang == "yaml":
            if b.doc not in YAML_CHECKS:
                problems.append(f"{b.where}: a yaml block nothing checks")
        else:
            problems.append(f"{b.where}: a block in {b.lang or 'no language'!r}: tag it (bash, python, text, "
                            f"...) so that a test can run or compare it")
    assert not problems, "\n".join(problems)


def test_inline_tdb_commands_parse(monkeypatch, capsys):
    """`tdb ...` commands written inline in the prose are valid command lines of the real CLI (parsed, with
    the commands themselves stubbed out)."""
    from tdb_server import cli

    for name in ("_serve", "_dashboard", "_dap"):
        monkeypatch.setattr(cli, name, lambda args: 0)
    found = 0
    for doc in docs():
        for m in re.finditer(r"`(?:\.venv/bin/)?tdb ((?:serve|dashboard|dap)(?=[ `])[^`]*)`", doc.read_text()):
            found += 1
            try:
                assert cli.main(m.group(1).split()) == 0
            except SystemExit as e:           # --help exits 0; a bad command line exits 2
                assert e.code == 0, f"{rel(doc)}: `tdb {m.group(1)}` is not a valid command line: " \
                                    f"{capsys.readouterr().err}"
    assert found


def test_deploy_envoy_config(bundled_server):
    """docs/deploy.md's Envoy configuration routes what tdb serves: the route prefix is the protocol's
    package, the hash header is the one every TdbClient sends, the health-checked service is SERVING."""
    import grpc
    import yaml
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    [block] = [b for b in all_blocks() if b.lang == "yaml" and b.doc == "docs/deploy.md"]
    cfg = yaml.safe_load(block.text)
    [route] = cfg["routes"]
    prefix = route["match"]["prefix"]
    packages = {m for p in (ROOT / "proto").rglob("*.proto") for m in re.findall(r"^package ([\w.]+);",
                                                                                  p.read_text(), re.MULTILINE)}
    assert prefix.strip("/").rstrip(".") in packages, (prefix, packages)
    header = route["route"]["hash_policy"][0]["header"]["header_name"]
    assert f'"{header}"' in (ROOT / "tdb_client" / "client.py").read_text()
    [cluster] = cfg["clusters"]
    assert cluster["name"] == route["route"]["cluster"]
    service = cluster["health_checks"][0]["grpc_health_check"]["service_name"]
    with grpc.insecure_channel(bundled_server) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# -- running the blocks ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost, and its key (the openssl command line)."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(d / "server.key"),
                    "-out", str(d / "server.crt")], check=True, capture_output=True, timeout=60)
    return d / "server.crt", d / "server.key"


class Live:
    """A long-running command in a process group of its own; stdout and stderr as lines."""

    def __init__(self, cmd: str, env: dict, *, stdin: bool = False):
        self.cmd = cmd
        # `timeout` (the leader of the new process group) ends the group even if this test process dies
        lifetime = ["timeout", "-k", "10", str(LIFETIME_S)] if shutil.which("timeout") else []
        self.proc = subprocess.Popen([*lifetime, "bash", "-c", cmd], cwd=ROOT, env=env, start_new_session=True,
                                     stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self.stdout_bytes: queue.Queue[bytes | None] = queue.Queue()
        self._open = 1 if stdin else 2
        threading.Thread(target=self._pump, args=(self.proc.stderr,), daemon=True).start()
        if not stdin:                         # with stdin, stdout is the DAP channel (read by a Dap)
            threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True).start()

    def _pump(self, stream) -> None:
        for raw in stream:
            with self._cv:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cv.notify_all()
        with self._cv:
            self._open -= 1
            self._cv.notify_all()

    def output(self) -> str:
        with self._cv:
            return "\n".join(self.lines)

    def wait_for(self, pattern: re.Pattern, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for line in self.lines:
                    m = pattern.search(line)
                    if m:
                        return m
                if (self._open == 0 and self.proc.poll() is not None) or time.monotonic() > deadline:
                    tail = "\n".join(self.lines[-40:])
                    raise AssertionError(f"`{self.cmd}`: no line matching {pattern.pattern!r} "
                                         f"(exit code {self.proc.poll()}); its output:\n{tail}")
                self._cv.wait(0.5)

    def stop(self) -> None:
        """SIGTERM to the group (the command stops its children itself), then SIGKILL to what is left."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)


def dap_conversation(dap: DapClient, server: str) -> None:
    """What an IDE does: launch on a running server, stop at a function breakpoint, look, continue."""
    caps = dap.body("initialize", {"clientID": "docs", "adapterID": "tdb", "linesStartAt1": True,
                                   "columnsStartAt1": True})
    assert caps["supportsFunctionBreakpoints"] and caps["supportsConfigurationDoneRequest"]
    dap.request("launch", {"server": server, "prompt": DEMO_PROMPT})
    dap.event("initialized")
    [bp] = dap.body("setFunctionBreakpoints", {"breakpoints": [{"name": "blocks.1.attn.out"}]})["breakpoints"]
    assert bp["verified"], bp
    dap.request("configurationDone")
    stopped = dap.event("stopped")["body"]
    frames = dap.body("stackTrace", {"threadId": stopped["threadId"]})["stackFrames"]
    assert [f["name"] for f in frames] == ["blocks.1.attn.out", "blocks.1.attn", "blocks.1", "model"]
    dap.request("continue", {"threadId": stopped["threadId"]})
    dap.event("terminated")
    dap.request("disconnect", {"terminateDebuggee": True})
    assert not dap.errors, dap.errors


@dataclass
class BlockRun:
    """What one block's commands share: the servers it started, the environment, what it could not run."""
    env: dict
    tls: tuple[Path, Path]
    token: str
    fallback: callable                       # -> the suite's bundled server, "127.0.0.1:PORT"
    live: list[Live] = field(default_factory=list)
    default_server: str | None = None        # the address a server started on the default port 50051 got
    missing: list[str] = field(default_factory=list)
    needs_50051: bool = False                # a later command of the block talks to 127.0.0.1:50051

    def stop(self, live: Live) -> None:
        """Stop a command that nothing later in the block needs (fewer processes share the CPUs)."""
        live.stop()
        self.live.remove(live)

    def server_for(self) -> str:
        return self.default_server or self.fallback()

    def prepare(self, c: Command) -> tuple[str, dict]:
        cmd = _adapt(c.text)
        cmd = re.sub(r"--host 0\.0\.0\.0\b", "--host 127.0.0.1", cmd)
        cmd = cmd.replace("server.crt", str(self.tls[0])).replace("server.key", str(self.tls[1]))
        if re.search(r"(localhost|127\.0\.0\.1):50051\b", cmd):
            port = self.server_for().rsplit(":", 1)[1]
            cmd = re.sub(r"(localhost|127\.0\.0\.1):50051\b", rf"\g<1>:{port}", cmd)
        env = dict(self.env)
        if "TDB_TOKEN" in cmd:
            env["TDB_TOKEN"] = self.token
        return cmd, env


def _free_port_flag(cmd: str, flag: str) -> str:
    if re.search(rf"{flag} \S+", cmd):
        return re.sub(rf"{flag} \S+", f"{flag} 0", cmd)
    return f"{cmd} {flag} 0"


def _check_expectations(c: Command, output: str) -> None:
    for line in c.expect:
        pattern = expect_pattern(line)
        assert pattern.search(output), f"{c.where}: `{c.text}` should print {line!r}; it printed:\n{output[-3000:]}"


def _run_server(run: BlockRun, c: Command, cmd: str, env: dict) -> None:
    from tdb_client import TdbClient, TdbError

    live = Live(_free_port_flag(cmd, "--port"), env)
    run.live.append(live)
    addr = live.wait_for(LISTENING, START_TIMEOUT["server"]).group(1)
    token = run.token if "TDB_TOKEN" in cmd or "--token" in cmd else ""
    roots = run.tls[0].read_bytes() if "--tls-cert" in cmd else None
    with TdbClient(addr, token=token, root_certificates=roots, timeout=60) as client:
        info = client.model_info()
    model = re.search(r"--model (\S+)", cmd)
    if model:
        assert info.name == Path(model.group(1)).name, (cmd, info)
    device = re.search(r"--device (\w+)", cmd)
    if device and device.group(1) != "auto":
        assert info.device.startswith(device.group(1)), (cmd, info)
    dtype = re.search(r"--dtype (\w+)", cmd)
    if dtype and dtype.group(1) != "auto":
        assert info.dtype == dtype.group(1), (cmd, info)
    if token:                                 # the token is required: a client without it is refused
        with TdbClient(addr, token="", root_certificates=roots, timeout=30) as anonymous:
            with pytest.raises(TdbError) as e:
                anonymous.model_info()
        assert e.value.code.name == "UNAUTHENTICATED", e.value
    _check_expectations(c, live.output())
    if not re.search(r"--port (?!50051\b)\S+", c.text) and not token and roots is None and run.needs_50051:
        run.default_server = addr             # later commands of the block talk to it
    else:
        run.stop(live)


def _run_dashboard(run: BlockRun, c: Command, cmd: str, env: dict) -> None:
    from tdb_client import TdbClient

    live = Live(_free_port_flag(cmd, "--port"), env)
    run.live.append(live)
    url = live.wait_for(DASHBOARD, START_TIMEOUT["dashboard"]).group(1)
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200 and "<html" in r.read().decode(errors="replace").lower()
    base = url.split("/?", 1)[0]
    with urllib.request.urlopen(f"{base}/_stcore/health", timeout=30) as r:
        assert r.read().decode().strip() == "ok"
    server = re.search(r"[?&]server=([^&]+)", url).group(1)
    with TdbClient(server, token="", timeout=60) as client:
        assert client.model_info().n_layers > 0
    _check_expectations(c, live.output())
    run.stop(live)


def _run_dap(run: BlockRun, c: Command, cmd: str, env: dict, kind: str) -> None:
    if kind == "dap-tcp":
        live = Live(_free_port_flag(cmd, "--listen"), env)
        run.live.append(live)
        host, port = live.wait_for(DAP_LISTENING, START_TIMEOUT["dap-tcp"]).group(1).rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            dap_conversation(DapClient(sock.makefile("rb"), sock.makefile("wb")), run.server_for())
    else:
        live = Live(cmd, env, stdin=True)
        run.live.append(live)
        dap_conversation(DapClient(live.proc.stdout, live.proc.stdin), run.server_for())
    _check_expectations(c, live.output())
    run.stop(live)


def _run_once(run: BlockRun, c: Command, cmd: str, env: dict, kind: str) -> None:
    if kind == "grpcurl" and not shutil.which("grpcurl", path=env["PATH"]):
        run.missing.append(f"{c.where}: grpcurl (scripts/install_grpcurl.sh)")
        return
    r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=ONCE_TIMEOUT, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{c.where}: `{cmd}` exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    _check_expectations(c, r.stdout + r.stderr)
    if c.output is not None and r.stdout.rstrip() != c.output.rstrip():
        diff = difflib.unified_diff(c.output.rstrip().splitlines(), r.stdout.rstrip().splitlines(),
                                    "quoted in the doc", "printed today", lineterm="")
        pytest.fail(f"{c.where}: the output quoted in the doc is not what `{c.text}` prints:\n" + "\n".join(diff))
    if kind == "grpcurl" and re.search(r" list$", cmd):
        assert {"tdb.v1.Debugger", "tdb.v1.Analysis", "grpc.health.v1.Health"} <= set(r.stdout.split()), r.stdout
    if "ln -s" in cmd:                        # the VS Code extension folder is linked under its id
        link = Path(re.search(r"~/(\S+)$", cmd).group(1))
        target = Path(env["HOME"]) / link
        manifest = json.loads((target / "package.json").read_text())
        assert target.resolve() == (ROOT / "ide" / "vscode").resolve()
        assert link.name == f"{manifest['publisher']}.{manifest['name']}-{manifest['version']}", link


@pytest.mark.timeout(600)
@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[b.where for b in SHELL_BLOCKS])
def test_shell_block_runs(block, request, tls_pair, tmp_path):
    venv_bin = ROOT / ".venv" / "bin"
    if any(c.text.startswith(".venv/bin/") for c in COMMANDS if c.block == block):
        assert (venv_bin / "tdb").exists(), "no .venv/bin/tdb: run `bash scripts/setup.sh` (the README's set-up)"
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TDB_TOKEN"}
    env.update(HOME=str(home), PATH=f"{venv_bin}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
                                    f"{env.get('PATH', '')}")
    run = BlockRun(env=env, tls=tls_pair, token=secrets.token_hex(16),
                   fallback=lambda: request.getfixturevalue("bundled_server"))
    ran = 0
    cmds = [c for c in COMMANDS if c.block == block]
    try:
        for i, c in enumerate(cmds):
            if _skipped(c.text):
                continue
            run.needs_50051 = any(re.search(r"(localhost|127\.0\.0\.1):50051\b", later.text) for later in cmds[i + 1:])
            cmd, cmd_env = run.prepare(c)
            kind = _kind(cmd)
            assert kind, f"{c.where}: no runner for `{c.text}`"
            if kind == "server":
                _run_server(run, c, cmd, cmd_env)
            elif kind == "dashboard":
                _run_dashboard(run, c, cmd, cmd_env)
            elif kind.startswith("dap"):
                _run_dap(run, c, cmd, cmd_env, kind)
            else:
                _run_once(run, c, cmd, cmd_env, kind)
            ran += 1
    finally:
        for live in reversed(run.live):
            live.stop()
    if run.missing:
        msg = "not installed, so not run: " + "; ".join(run.missing)
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    if not ran:
        pytest.skip("every command is in SKIP: " + "; ".join(sorted({_skipped(c.text) for c in cmds})))
