"""Services: real servers in sandboxes of the session's pod, reached by name from pod tests and through
published ports from pytest; readiness, failures, restarts, scopes, volumes, and nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import processes_with, run_cli, start_pytest_until_running, wait_gone

from pytest_sandbox import wait
from pytest_sandbox.runtime import ports

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed here")
needs_nginx = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed here")
POSTGRES = "/usr/lib/postgresql/15/bin"
needs_postgres = pytest.mark.skipif(not os.path.exists(f"{POSTGRES}/postgres"), reason="PostgreSQL 15 is not installed")


@pytest.fixture(autouse=True)
def _own_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Named volumes of these tests live in a store of their own."""
    monkeypatch.setenv("PYTEST_SANDBOX_STORE", str(tmp_path / "store"))


REDIS = """
    import socket, subprocess
    import pytest
    from pytest_sandbox import service, wait

    cache = service("cache", command=["redis-server", "--port", "6379", "--save", "", "--bind", "127.0.0.1"],
                    ports=[6379], ready=wait.listening(6379) & wait.log(r"Ready to accept"))

    def ping(host, port):
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"PING\\r\\n")
            return s.recv(100)
"""


@needs_redis
@pytest.mark.parametrize("first", ["host", "pod"])
def test_a_redis_service_is_reached_by_name_in_the_pod_and_through_its_published_port(
    pytester: pytest.Pytester, first: str
) -> None:
    host_test = """
        def test_host(cache):
            host, port = cache.address(6379)
            assert host == "127.0.0.1" and port != 6379
            assert ping(host, port) == b"+PONG\\r\\n"
            assert cache.exec(["redis-cli", "ping"]).stdout == "PONG\\n"
            assert "Ready to accept connections" in cache.logs()
    """
    pod_test = """
        @pytest.mark.container
        def test_pod(cache):
            assert cache.address(6379) == ("cache", 6379)
            assert ping("cache", 6379) == b"+PONG\\r\\n"
            assert open("/etc/hostname").read() != "cache"  # a member of the pod, not the service
            with pytest.raises(OSError):  # the host's network is not the pod's
                socket.create_connection(("10.255.255.1", 9), timeout=0.5)
    """
    tests = [host_test, pod_test] if first == "host" else [pod_test, host_test]
    pytester.makepyfile(test_redis="".join(textwrap.dedent(part) for part in (REDIS, *tests)))
    result = pytester.runpytest_subprocess("-v")
    result.assert_outcomes(passed=2)


@needs_redis
def test_under_sandbox_all_every_test_reaches_it_by_name(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_redis=textwrap.dedent(REDIS)
        + """
def test_one(cache):
    assert ping(*cache.address(6379)) == b"+PONG\\r\\n"

def test_two(cache):
    assert cache.address(6379) == ("cache", 6379)
    assert ping("cache", 6379) == b"+PONG\\r\\n"
"""
    )
    pytester.runpytest_subprocess("--sandbox=all").assert_outcomes(passed=2)


STARTS = """
    import pathlib
    from pytest_sandbox import service, wait

    COUNT = pathlib.Path(__file__).parent / "count"
    counted = service("counted", command=["sh", "-c", "echo start >> /var/tmp/count/starts; echo up; exec sleep 300"],
                      volumes={str(COUNT): "/var/tmp/count"}, scope="{scope}", ready=wait.log("^up$"))
"""


@pytest.mark.parametrize(("scope", "starts"), [("session", 1), ("module", 2), ("class", 3), ("function", 3)])
def test_a_service_starts_once_per_scope(pytester: pytest.Pytester, scope: str, starts: int) -> None:
    (pytester.path / "count").mkdir()
    pytester.makeconftest(STARTS.replace("{scope}", scope))
    pytester.makepyfile(
        test_a="def test_a1(counted): pass\n\ndef test_a2(counted): pass\n",
        test_b="import pytest\n\n@pytest.mark.container\nclass TestB:\n    def test_b(self, counted): pass\n",
    )
    pytester.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=3)
    assert (pytester.path / "count" / "starts").read_text().count("start") == starts


def test_http_readiness_and_a_read_only_host_path(pytester: pytest.Pytester) -> None:
    (pytester.path / "www").mkdir()
    (pytester.path / "www" / "index.html").write_text("hello from the host")
    pytester.makepyfile(
        f"""
        import pathlib, urllib.request
        import pytest
        from pytest_sandbox import service, wait

        web = service("web", command=[{sys.executable!r}, "-m", "http.server", "8000", "--bind", "127.0.0.1",
                                      "--directory", "/var/tmp/www"],
                      volumes={{str(pathlib.Path(__file__).parent / "www"): "/var/tmp/www:ro"}}, ports=[8000],
                      ready=wait.http(8000, "/index.html"))

        def test_host(web):
            with urllib.request.urlopen(web.url(8000) + "/index.html", timeout=10) as response:
                assert response.read() == b"hello from the host"
            assert web.exec(["sh", "-c", "echo x > /var/tmp/www/new"]).returncode != 0  # read-only

        @pytest.mark.container
        def test_pod(web):
            with urllib.request.urlopen("http://web:8000/index.html", timeout=10) as response:
                assert response.read() == b"hello from the host"
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=2)


def test_a_service_that_exits_at_start_fails_its_tests_with_its_status_and_log(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from pytest_sandbox import service, wait
        broken = service("broken", command=["sh", "-c", "echo cannot open config >&2; exit 3"],
                         ready=wait.listening(9))

        def test_one(broken):
            pass

        def test_two(broken):
            pass
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*service 'broken' exited before it was ready (exit code 3)*", "cannot open config"])


def test_a_service_not_ready_in_time_is_stopped_and_reported(pytester: pytest.Pytester, token: str) -> None:
    pytester.makepyfile(
        f"""
        import pytest
        from pytest_sandbox import service, wait
        slow = service("slow", command=["sh", "-c", "echo starting; exec sleep 300"], env={{"MARK": "{token}"}},
                       ready=wait.log("never says this"), ready_timeout=0.5)

        def test_it(slow):
            pass

        @pytest.mark.container
        def test_sandboxed(slow):
            pass
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=2)  # the second test hears the same: no second wait
    assert result.stdout.str().count("service 'slow' was not ready (log('never says this')) within 0.5 s") >= 2
    assert not wait_gone(token)


def test_a_missing_program_is_reported(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from pytest_sandbox import service
        nothing = service("nothing", command=["/no/such/program"])

        def test_it(nothing):
            pass
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    assert "service 'nothing' did not start (exit code 127)" in result.stdout.str()
    assert "cannot run ['/no/such/program']: [Errno 2] No such file or directory" in result.stdout.str()


ECHO_SERVER = """
import socket
print("serving", flush=True)
server = socket.create_server(("127.0.0.1", 7000))
while True:
    connection, _ = server.accept()
    connection.sendall(connection.recv(100).upper())
    connection.close()
"""


def test_a_restart_waits_for_the_new_process_log_line(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """wait.log after restart() looks at what the new process writes: the first start's "up" is in the log
    already, and the second start says it only after a second."""
    marks = tmp_path / "marks"
    marks.mkdir()
    pytester.makepyfile(f"""
        from pytest_sandbox import service, wait

        SLOW_SECOND = "[ -e /tmp/marks/once ] && sleep 1; touch /tmp/marks/once; echo up; exec sleep 300"
        echo = service("echo", command=["sh", "-c", SLOW_SECOND], volumes={{{str(marks)!r}: "/tmp/marks"}},
                       ready=wait.log("^up$"), stop_timeout=1)

        def test_restart(echo):
            echo.restart()
            assert echo.logs().count("up") == 2
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_restart_keeps_the_published_port_and_the_log(pytester: pytest.Pytester) -> None:
    (pytester.path / "echo_server.py").write_text(ECHO_SERVER)
    pytester.makepyfile(
        f"""
        import pathlib, socket
        from pytest_sandbox import service, wait
        echo = service("echo", command=[{sys.executable!r}, str(pathlib.Path(__file__).parent / "echo_server.py")],
                       ports=[7000])

        def talk(address):
            with socket.create_connection(address, timeout=10) as s:
                s.sendall(b"hi")
                return s.recv(100)

        def test_restart(echo):
            before = echo.address(7000)
            assert talk(before) == b"HI"
            echo.restart()
            assert echo.address(7000) == before
            assert talk(before) == b"HI"
            assert echo.logs().count("serving") == 2
            echo.stop()
            assert not echo.running and echo.exit_code == -15
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_a_failing_test_gets_the_services_recent_log(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from pytest_sandbox import service, wait
        chatty = service("chatty", command=["sh", "-c", "echo line-from-the-service; exec sleep 300"],
                         ready=wait.log("line-from"))

        def test_host(chatty):
            assert False

        @pytest.mark.container
        def test_pod(chatty):
            assert False
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=2)
    assert result.stdout.str().count("service chatty log") == 2
    assert result.stdout.str().count("line-from-the-service") >= 2


def test_setup_runs_while_the_named_volume_is_empty_and_data_survives_runs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from pytest_sandbox import service, volume, wait
        keeper = service("keeper", command=["sh", "-c", "echo run >> /var/tmp/data/runs; echo up; exec sleep 300"],
                         setup=["echo init >> /var/tmp/data/inits"], volumes={volume("keep"): "/var/tmp/data"},
                         ready=wait.log("^up$"))

        def test_it(keeper):
            out = keeper.exec(["sh", "-c", "cat /var/tmp/data/inits; cat /var/tmp/data/runs"]).stdout
            print("DATA", out.split())
        """
    )
    first = pytester.runpytest_subprocess("-s")
    first.assert_outcomes(passed=1)
    assert "DATA ['init', 'run']" in first.stdout.str()
    second = pytester.runpytest_subprocess("-s")
    second.assert_outcomes(passed=1)
    assert "DATA ['init', 'run', 'run']" in second.stdout.str()


def test_a_service_writes_nowhere_but_its_volumes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os
        from pytest_sandbox import service
        writer = service("writer", command=["sh", "-c", "echo x > $PWD/written-by-service; exec sleep 300"])

        def test_it(writer):
            assert writer.exec(["cat", os.getcwd() + "/written-by-service"]).stdout == "x\\n"
            assert not os.path.exists("written-by-service")
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
    assert not (pytester.path / "written-by-service").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ('"bad-name", command=["true"]', "invalid name='bad-name': a Python identifier"),
        ('"s", command="true"', "invalid command='true': expected a non-empty list"),
        ('"s", command=["true"], ports=[0]', "invalid ports=0: each port is an int from 1 to 65535"),
        ('"s", command=["true"], scope="forever"', "invalid scope='forever': allowed: function, class"),
        ('"s", command=["true"], memory="lots"', "invalid memory='lots'"),
        ('"s", command=["true"], ready="port 80"', "invalid ready='port 80': expected a wait.* condition"),
        ('"s", command=["true"], volumes={"../x": "/data"}', "invalid volumes="),
    ],
)
def test_bad_definitions_are_usage_errors_naming_the_file_and_field(
    pytester: pytest.Pytester, arguments: str, message: str
) -> None:
    pytester.makepyfile(
        test_bad=f"""
        from pytest_sandbox import service
        s = service({arguments})

        def test_it(s):
            pass
        """
    )
    result = pytester.runpytest_subprocess()
    assert result.ret != 0
    result.stdout.fnmatch_lines([f"*test_bad.py:2: service(*{message}*"])


def test_a_volume_target_the_service_cannot_have_is_a_usage_error_before_any_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from pytest_sandbox import service, volume
        s = service("s", command=["true"], volumes={volume("v"): "/no/such/dir"})

        def test_it(s):
            pass
        """
    )
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*service('s'): invalid volumes=*/no/such/dir does not exist on this host*"])


def test_killing_pytest_leaves_no_service_process_or_port(
    pytester: pytest.Pytester, token: str, tmp_path: Path
) -> None:
    pytester.makepyfile(
        f"""
        import time
        from pytest_sandbox import service
        sleeper = service("sleeper", command=["sh", "-c", "exec sleep 300"], env={{"MARK": "{token}"}})
        server = service("server", command=[{sys.executable!r}, "-m", "http.server", "7000", "--bind", "127.0.0.1"],
                         ports=[7000])

        def test_wait(sleeper, server):
            print("RUNNING", flush=True)
            time.sleep(300)
        """
    )
    interfaces = sorted(os.listdir("/sys/class/net"))
    proc = start_pytest_until_running(pytester.path)
    assert processes_with(token)
    assert sorted(os.listdir("/sys/class/net")) == interfaces  # the pod's bridge and veths are not the host's
    listed = json.loads(run_cli("services", "ls", "--json", cwd=pytester.path).stdout)
    assert [(r["pid"], sorted(s["name"] for s in r["services"])) for r in listed] == [(proc.pid, ["server", "sleeper"])]
    published = next(s for s in listed[0]["services"] if s["name"] == "server")["ports"]["7000"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not wait_gone(token, timeout=10)
    with pytest.raises(OSError):  # the published port went with pytest
        socket.create_connection(("127.0.0.1", published), timeout=1)
    assert json.loads(run_cli("services", "--json", cwd=pytester.path).stdout) == []  # its record is dropped
    assert os.listdir(tmp_path / "store" / "services") == []
    assert sorted(os.listdir("/sys/class/net")) == interfaces


@needs_postgres
@pytest.mark.rootless
def test_postgres_with_initdb_on_a_named_volume(pytester: pytest.Pytester) -> None:
    """PostgreSQL refuses to run as root: the plain user's lane runs this."""
    assert os.getuid() != 0
    pytester.makepyfile(
        f"""
        import subprocess
        import pytest
        from pytest_sandbox import service, volume, wait

        db = service("db", command=["{POSTGRES}/postgres", "-D", "/var/tmp/pg/data", "-k", "/tmp",
                                    "-c", "listen_addresses=127.0.0.1"],
                     setup=["{POSTGRES}/initdb -D /var/tmp/pg/data -A trust -U postgres"],
                     volumes={{volume("pgdata"): "/var/tmp/pg"}}, ports=[5432], ready=wait.listening(5432),
                     memory="512M")

        def test_host(db):
            result = db.exec(["psql", "-h", "127.0.0.1", "-U", "postgres", "-tAc", "select 41 + 1"])
            assert result.stdout.strip() == "42", result

        @pytest.mark.container
        def test_pod(db):
            result = subprocess.run(["psql", "-h", "db", "-U", "postgres", "-tAc", "select 1 + 1"],
                                    capture_output=True, text=True)
            assert result.stdout.strip() == "2", result
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=2)
    pytester.runpytest_subprocess().assert_outcomes(passed=2)  # the data directory is there: no initdb


def test_listening_ports_reads_the_tcp_table(tmp_path: Path) -> None:
    table = tmp_path / "tcp"
    table.write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1 1\n"
        "   1: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000  1000        0 2 1\n"
    )
    assert ports.listening_ports((str(table), str(tmp_path / "missing"))) == {0x18EB}


def test_conditions_compose_and_describe_themselves() -> None:
    condition = (wait.listening(5432) | wait.log("ready")) & wait.http(80, "/health", 204)
    assert repr(condition) == "wait.(listening(5432) | log('ready')) & http(80, '/health', status=204)"
    with pytest.raises(ValueError, match="port must be an int"):
        wait.listening(70000)
    with pytest.raises(ValueError, match="not a regular expression"):
        wait.log("(")
    with pytest.raises(TypeError, match="combines with another"):
        wait.listening(1) | "x"  # type: ignore[operator]


@needs_redis
def test_a_sandboxed_test_calls_its_services_through_pytest(pytester: pytest.Pytester) -> None:
    """logs(), exec(), restart() and stop() from a sandbox: pytest owns the service and answers the test."""
    pytester.makepyfile(
        test_redis=textwrap.dedent(REDIS)
        + """
from pytest_sandbox import ServiceError, service

other = service("other", command=["sleep", "300"])

def test_calls(cache):
    assert cache.exec(["redis-cli", "set", "k", "v"]).stdout == "OK\\n"
    assert cache.exec(["redis-cli", "get", "k"]).stdout == "v\\n"
    assert "Ready to accept connections" in cache.logs(tail=5)
    cache.restart()
    assert cache.exec(["redis-cli", "get", "k"]).stdout == "\\n"  # --save "": nothing kept
    assert ping("cache", 6379) == b"+PONG\\r\\n"

def test_only_its_own_services(cache):
    import pytest_sandbox.services.handles as handles
    intruder = handles.PodMember(other_definition(), None)
    with pytest.raises(ServiceError, match="does not use a service 'other'"):
        intruder.logs()

def other_definition():
    from pytest_sandbox.services.definition import REGISTRY
    return REGISTRY["other"]
"""
    )
    pytester.runpytest_subprocess("--sandbox=all").assert_outcomes(passed=2)


def test_a_test_writing_a_volume_a_service_holds_is_a_usage_error(pytester: pytest.Pytester) -> None:
    """The service holds its named volume while it runs: the test would wait for it forever."""
    pytester.makepyfile(
        """
        import pytest
        from pytest_sandbox import service, volume
        db = service("db", command=["sleep", "300"], volumes={volume("shared"): "/var/tmp/data"})

        @pytest.mark.container(volumes={volume("shared"): "/var/tmp/mine"})
        def test_it(db):
            pass
        """
    )
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_it: volumes: the named volume 'shared' is also mounted by *service('db')*"])


NGINX_CONF = """
user root root;  # as root: no chown of its temp dirs to nobody (a sandbox has no CAP_CHOWN); else ignored
daemon off;
master_process off;
pid /tmp/nginx.pid;
error_log stderr notice;
events {}
http {
    access_log /dev/stdout;
    client_body_temp_path /tmp/body;
    proxy_temp_path /tmp/proxy;
    fastcgi_temp_path /tmp/fastcgi;
    uwsgi_temp_path /tmp/uwsgi;
    scgi_temp_path /tmp/scgi;
    server {
        listen 127.0.0.1:8080;
        location / { return 200 "hello from nginx\\n"; }
    }
}
"""


@needs_nginx
def test_nginx_as_a_service(pytester: pytest.Pytester) -> None:
    (pytester.path / "nginx.conf").write_text(NGINX_CONF)
    pytester.makepyfile(
        """
        import pathlib, time, urllib.request
        import pytest
        from pytest_sandbox import service, wait

        CONF = str(pathlib.Path(__file__).parent / "nginx.conf")
        web = service("web", command=["nginx", "-c", CONF, "-e", "stderr"], ports=[8080], ready=wait.http(8080, "/"))

        def test_host(web):
            assert urllib.request.urlopen(web.url(8080), timeout=10).read() == b"hello from nginx\\n"
            deadline = time.monotonic() + 30  # nginx logs a request after it has sent the answer
            while "GET / HTTP/1.1" not in web.logs() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "GET / HTTP/1.1" in web.logs()

        @pytest.mark.container
        def test_pod(web):
            assert urllib.request.urlopen("http://web:8080/", timeout=10).read() == b"hello from nginx\\n"
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=2)


def test_a_from_host_image_runs_a_service(pytester: pytest.Pytester) -> None:
    """A FROM host image is the service's root: its files are there, the host's programs too."""
    images = pytester.path / "images"
    images.mkdir()
    (images / "marker").write_text("from-the-image\n")
    (images / "hosted.Containerfile").write_text("FROM host\nCOPY marker /usr/local/marker\n")  # RUN: not as a user
    pytester.makepyfile(
        """
        from pytest_sandbox import service, wait
        hosted = service("hosted", image="hosted", command=["sh", "-c", "cat /usr/local/marker; exec sleep 300"],
                         ready=wait.log("from-the-image"), ready_timeout=20)

        def test_hosted(hosted):
            assert hosted.exec(["cat", "/usr/local/marker"]).stdout == "from-the-image\\n"
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


BUSYBOX_WEB = """
    import urllib.request
    import pytest
    from pytest_sandbox import service, wait

    web = service("web", image="busybox", command=["httpd", "-f", "-v", "-p", "8080", "-h", "/www"],
                  setup=["mkdir -p /www && echo hello from busybox > /www/index.html"],
                  ports=[8080], ready=wait.http(8080, "/index.html"), stop_timeout=2)

    def test_host(web):
        with urllib.request.urlopen(web.url(8080) + "/index.html", timeout=10) as answer:
            assert answer.read() == b"hello from busybox\\n"
        assert web.exec(["cat", "/www/index.html"]).stdout == "hello from busybox\\n"  # in the image's root
        assert web.exec(["sh", "-c", "ls /usr/lib/python3* || echo no python here"]).stdout == "no python here\\n"
        assert web.exec(["id", "-u"]).stdout == "0\\n"  # the image's user
        assert "response:200" in web.logs()

    @pytest.mark.container
    def test_pod(web):
        with urllib.request.urlopen("http://web:8080/index.html", timeout=10) as answer:
            assert answer.read() == b"hello from busybox\\n"

    def test_stop_and_restart(web):
        web.restart()
        assert web.exec(["cat", "/www/index.html"]).stdout == "hello from busybox\\n"  # setup ran again
        web.stop()
        assert not web.running
"""


def test_a_service_in_an_image_runs_its_commands_in_the_images_root(pytester: pytest.Pytester) -> None:
    """Any image: the command, its setup, exec() and wait.command run in the image's root as its user, as
    sandbox.run() does, on the pod's network."""
    pytester.makepyfile(test_web=textwrap.dedent(BUSYBOX_WEB))
    result = pytester.runpytest_subprocess("-v", "-p", "no:randomly")
    result.assert_outcomes(passed=3)


def test_a_service_in_an_image_hears_sigterm_when_it_stops(pytester: pytest.Pytester) -> None:
    """stop() sends SIGTERM to the command in the image (pid 1 of its own pid namespace, as in a container):
    a command with a handler ends gracefully, well before stop_timeout's SIGKILL."""
    pytester.makepyfile("""
        import time
        from pytest_sandbox import service, wait

        LOOP = "trap 'echo got TERM; exit 3' TERM; echo up; while :; do sleep 0.05; done"
        trapper = service("trapper", image="busybox", stop_timeout=60, ready=wait.log("^up$"),
                          command=["sh", "-c", LOOP])

        def test_stop(trapper):
            started = time.monotonic()
            trapper.stop()
            assert time.monotonic() - started < 30
            assert "got TERM" in trapper.logs()
            assert trapper.exit_code == 3
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


NOTIFIER = """
import os, socket, time
time.sleep(0.3)
print("notifying", flush=True)
address = os.environ["NOTIFY_SOCKET"]
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
    sock.sendto(b"STATUS=almost\\nREADY=1\\n", "\\0" + address[1:] if address.startswith("@") else address)
time.sleep(300)
"""


def test_wait_notify_waits_for_sd_notify_ready(pytester: pytest.Pytester) -> None:
    (pytester.path / "notifier.py").write_text(NOTIFIER)
    pytester.makepyfile(
        f"""
        import pathlib
        from pytest_sandbox import service, wait
        notifier = service("notifier", command=[{sys.executable!r}, str(pathlib.Path(__file__).parent / "notifier.py")],
                           setup=["test -z \\"$NOTIFY_SOCKET\\""], ready=wait.notify())

        def test_ready_after_notify(notifier):
            assert "notifying" in notifier.logs()
            notifier.restart()  # a new socket for the new process
            assert notifier.logs().count("notifying") == 2
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


@needs_redis
def test_redis_says_ready_with_sd_notify(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from pytest_sandbox import service, wait
        cache = service("cache", command=["redis-server", "--port", "6379", "--save", "", "--bind", "127.0.0.1",
                                          "--supervised", "systemd"], ports=[6379], ready=wait.notify())

        def test_it(cache):
            assert cache.exec(["redis-cli", "ping"]).stdout == "PONG\\n"
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_a_service_asked_for_by_getfixturevalue_starts_too(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from pytest_sandbox import service, wait
        late = service("late", command=["sh", "-c", "echo up; exec sleep 300"], ready=wait.log("up"))

        def test_it(request):
            assert request.getfixturevalue("late").running
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


SHARED = """
    import os, pathlib, socket, time
    import pytest
    from pytest_sandbox import service, wait

    HERE = pathlib.Path(__file__).parent
    counted = service("counted", command=["sh", "-c", "echo start >> /var/tmp/count/starts; exec {python} {server}"],
                      volumes={str(HERE / "count"): "/var/tmp/count"}, ports=[7000], ready=wait.listening(7000))

    def talk(address):
        with socket.create_connection(address, timeout=10) as s:
            s.sendall(b"hi")
            return s.recv(100)

    @pytest.fixture(autouse=True)
    def spread():
        time.sleep(0.3)  # both workers get tests
"""

SHARED_TESTS = """
import os, pathlib
import pytest
from conftest import talk

WORKERS = pathlib.Path(__file__).parent / "workers"

@pytest.mark.parametrize("n", range(4))
def test_host(counted, n):
    assert talk(counted.address(7000)) == b"HI"
    assert "serving" in counted.logs()
    assert counted.exec(["sh", "-c", "echo $((6*7))"]).stdout == "42\\n"
    assert counted.running
    with open(WORKERS, "a") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")

@pytest.mark.container
@pytest.mark.parametrize("n", range(4))
def test_pod(counted, n):
    assert counted.address(7000) == ("counted", 7000)
    assert talk(("counted", 7000)) == b"HI"
    assert "serving" in counted.logs()
"""


@pytest.mark.parametrize("sandbox", ["marked", "all"])
def test_xdist_workers_share_one_start_of_a_session_service(pytester: pytest.Pytester, sandbox: str) -> None:
    """Under -n 2 a session service is started once per run: the first worker to need it starts it, the other
    reaches it through its published port (unsandboxed tests) or a relay in its own pod (sandboxed ones), and
    calls logs()/exec() through the worker that owns it. Nothing of it is left after the run."""
    pytest.importorskip("xdist")
    (pytester.path / "count").mkdir()
    (pytester.path / "echo_server.py").write_text(ECHO_SERVER)
    server = str(pytester.path / "echo_server.py")
    pytester.makeconftest(textwrap.dedent(SHARED).replace("{python}", sys.executable).replace("{server}", server))
    pytester.makepyfile(test_shared=SHARED_TESTS)
    result = pytester.runpytest_subprocess("-n", "2", f"--sandbox={sandbox}", "-p", "no:randomly")
    result.assert_outcomes(passed=8)
    assert (pytester.path / "count" / "starts").read_text().count("start") == 1
    if sandbox == "marked":  # the host tests ran on both workers, one of which did not start it
        assert set((pytester.path / "workers").read_text().split()) == {"gw0", "gw1"}
    assert not wait_gone(server, timeout=10)


def test_a_worker_that_does_not_own_a_shared_service_clears_its_volumes(tmp_path: Path) -> None:
    """Red team round 7: under xdist, a worker whose tests use a service another worker owns cleared nothing
    after them (the owner clears after its own tests): a set-user-ID program a process in the service made
    meanwhile stayed until the next clearing elsewhere."""
    import types
    from typing import Any, cast

    from pytest_sandbox import service
    from pytest_sandbox.services import fixture, shared
    from pytest_sandbox.volumes import VolumeStore

    volume = tmp_path / "volume"
    volume.mkdir()
    planted = volume / "planted"
    planted.write_bytes(b"#!/bin/sh\n")
    planted.chmod(0o4755)
    service("owned_elsewhere", command=["true"], volumes={str(volume): "/data"}, scope="session")
    pod = types.SimpleNamespace(connector=None, volumes=VolumeStore(str(tmp_path / "store")))
    record = {"worker": "gw1", "ports": {}}
    remote = shared.Remote(cast(Any, None), pod, fixture.REGISTRY["owned_elsewhere"], "session", record, "gone")
    remote.clear_setid_bits()
    assert planted.stat().st_mode & 0o7777 == 0o755
