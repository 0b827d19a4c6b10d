"""What a test gets for a service fixture: ``Service`` in pytest (unsandboxed tests and fixtures),
``PodMember`` in a sandbox of the pod."""

from __future__ import annotations

import subprocess
from typing import Any, Protocol

from ..errors import ServiceError
from ..runtime import test_process
from ..spec import SandboxSpec
from .definition import ServiceDefinition


class Instance(Protocol):
    """What a handle needs of a service's instance (pod.py's Instance)."""

    definition: ServiceDefinition

    @property
    def running(self) -> bool: ...

    @property
    def exit_code(self) -> int | None: ...

    @property
    def stopped(self) -> bool: ...

    def published_port(self, port: int) -> int: ...

    def log_text(self) -> str: ...

    def exec(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]: ...

    def restart(self) -> None: ...

    def stop(self) -> None: ...


LOG_TAIL = 40  # lines of a service's log in errors and report sections


def command_line(argv: Any) -> list[str]:
    """``argv`` of an exec(), checked: a non-empty list of str (a string would run its letters)."""
    if isinstance(argv, str) or not argv or not all(isinstance(a, str) for a in argv):
        raise TypeError(f"exec: a non-empty list of str arguments, not {argv!r}")
    return list(argv)


def last_lines(text: str, lines: int | None) -> str:
    """The last ``lines`` lines of a log (all of it for None)."""
    return text if lines is None else "".join(text.splitlines(keepends=True)[-lines:])


CALLS = ("logs", "exec", "restart", "stop", "state")  # what a caller elsewhere may ask of a service


def perform(instance: Instance, call: str, argv: Any, timeout: float) -> dict[str, Any]:
    """One call on a service this process runs, for a caller elsewhere (a sandboxed test, another xdist
    worker); the answer as ``completed`` and the other handles read it."""
    if call == "logs":
        return {"text": instance.log_text()}
    if call == "state":
        return {"running": instance.running, "stopped": instance.stopped, "exit_code": instance.exit_code}
    if call == "exec":
        done = instance.exec(command_line(argv), timeout)
        return {"code": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
    if call == "restart":
        instance.restart()
        return {}
    if call == "stop":
        instance.stop()
        return {}
    return {"error": f"unknown call {call!r}: one of {', '.join(CALLS)}"}


def completed(argv: list[str], answer: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """An exec() answered by pytest or by another xdist worker, as ``subprocess.run`` returns it."""
    return subprocess.CompletedProcess(argv, int(answer["code"]), str(answer["stdout"]), str(answer["stderr"]))


class Service:
    """A running service, seen from pytest: reached through its published ports on host loopback. The
    same object inherited by a sandbox (a fixture pytest set up before forking it) acts as a ``PodMember``."""

    def __init__(self, instance: Instance) -> None:
        self._instance = instance
        self.name = instance.definition.name

    def _sandboxed(self) -> PodMember | None:
        if not test_process.in_sandbox():
            return None
        return PodMember(self._instance.definition, test_process.ACTIVE_SPEC)

    def address(self, port: int) -> tuple[str, int]:
        """(host, port) to connect to ``port`` of the service from here: host loopback and its published
        port from pytest, (name, port) from a sandbox of the pod."""
        member = self._sandboxed()
        if member is not None:
            return member.address(port)
        return "127.0.0.1", self._instance.published_port(port)

    def url(self, port: int, scheme: str = "http") -> str:
        host, published = self.address(port)
        return f"{scheme}://{host}:{published}"

    @property
    def running(self) -> bool:
        """True while its process runs."""
        member = self._sandboxed()
        return member.running if member is not None else self._instance.running

    @property
    def exit_code(self) -> int | None:
        """How the service's last process ended (a signal as -N), None while it runs."""
        member = self._sandboxed()
        return member.exit_code if member is not None else self._instance.exit_code

    def logs(self, tail: int | None = None) -> str:
        """What the service wrote to stdout and stderr since its first start (restarts append)."""
        member = self._sandboxed()
        if member is not None:
            return member.logs(tail)
        text = self._instance.log_text()
        return last_lines(text, tail)

    def exec(self, argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the service's sandbox (its namespaces, root and environment); output as text."""
        member = self._sandboxed()
        if member is not None:
            return member.exec(argv, timeout)
        return self._instance.exec(argv, timeout)

    def restart(self) -> None:
        """Stop the service and start it again (same published ports), then wait until it is ready."""
        member = self._sandboxed()
        if member is not None:
            member.restart()
            return
        self._instance.restart()

    def stop(self) -> None:
        """Stop it now (SIGTERM, then SIGKILL after its stop_timeout); its logs stay readable."""
        member = self._sandboxed()
        if member is not None:
            member.stop()
            return
        self._instance.stop()

    def __repr__(self) -> str:
        member = self._sandboxed()
        if member is not None:
            return repr(member)
        state = "running" if self.running else f"exited ({self.exit_code})"
        return f"<Service {self.name!r} {state}>"


class PodMember:
    """A service seen from a sandboxed test of the pod: reached by its name, on the ports it listens on."""

    def __init__(self, definition: ServiceDefinition, spec: SandboxSpec | None) -> None:
        self._definition = definition
        self._network = spec.network if spec is not None else "none"
        self.name = definition.name

    def address(self, port: int) -> tuple[str, int]:
        """(name, port): the pod's /etc/hosts has the name."""
        if self._network != "pod":
            raise ServiceError(
                f"service {self.name!r} is reached from a sandbox on the pod network: this test's has "
                f"network={self._network!r} (use @pytest.mark.container(network='pod'))"
            )
        return self.name, port

    def url(self, port: int, scheme: str = "http") -> str:
        host, port = self.address(port)
        return f"{scheme}://{host}:{port}"

    def _call(self, call: str, argv: list[str] | None = None, timeout: float = 0.0) -> dict[str, Any]:
        """pytest owns the service: the call goes to it on the test's line (pod.answer)."""
        answer = test_process.ask_pytest(
            {"type": "service-call", "name": self.name, "call": call, "argv": argv or [], "timeout": timeout}
        )
        if "error" in answer:
            raise ServiceError(f"service {self.name!r}: {call}: {answer['error']}")
        return answer

    @property
    def running(self) -> bool:
        return bool(self._call("state").get("running"))

    @property
    def exit_code(self) -> int | None:
        code = self._call("state").get("exit_code")
        return int(code) if code is not None else None

    def logs(self, tail: int | None = None) -> str:
        text = str(self._call("logs").get("text", ""))
        return last_lines(text, tail)

    def exec(self, argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        argv = command_line(argv)
        return completed(argv, self._call("exec", argv, timeout))

    def restart(self) -> None:
        self._call("restart")

    def stop(self) -> None:
        self._call("stop")

    def __repr__(self) -> str:
        return f"<Service {self.name!r} in the pod>"
