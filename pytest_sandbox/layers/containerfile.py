"""Containerfile (Dockerfile syntax) parsing into a list of instructions.

Supported: FROM, RUN, COPY, ENV, WORKDIR, USER, LABEL, ARG, CMD, ENTRYPOINT, EXPOSE.
Anything else is an error naming the file and line, raised before anything builds.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from collections.abc import Mapping

from ..errors import SandboxError

SUPPORTED = ("FROM", "RUN", "COPY", "ENV", "WORKDIR", "USER", "LABEL", "ARG", "CMD", "ENTRYPOINT", "EXPOSE")
_FLAGS = {"COPY": ("from", "chown", "chmod", "libs"), "RUN": ("network",)}
SWITCHES = ("libs",)  # flags without a value
_VAR = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<op>[-+])(?P<word>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


class ContainerfileError(SandboxError):
    """A Containerfile cannot be built as written."""

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path, self.line, self.message = path, line, message


@dataclasses.dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str  # the raw argument text (continuations joined)
    line: int
    flags: tuple[tuple[str, str], ...] = ()
    json_form: tuple[str, ...] | None = None  # exec form (["a", "b"]) when given

    def flag(self, name: str) -> str | None:
        return dict(self.flags).get(name)

    @property
    def text(self) -> str:
        flags = " ".join(f"--{k}={v}" for k, v in self.flags)
        body = json.dumps(list(self.json_form)) if self.json_form is not None else self.args
        return f"{self.keyword} {flags + ' ' if flags else ''}{body}"


def substitute(text: str, variables: Mapping[str, str]) -> str:
    """$VAR, ${VAR}, ${VAR:-default}, ${VAR:+alt} as Docker expands them outside RUN."""

    def repl(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("plain")
        value = variables.get(name, "")
        op = match.group("op")
        if op == "-":
            return value or match.group("word")
        if op == "+":
            return match.group("word") if value else ""
        return value

    return _VAR.sub(repl, text.replace("\\$", "\0")).replace("\0", "$")


def _logical_lines(text: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        stripped = line.lstrip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped, as Docker does
        if not buffer:
            start = number
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        out.append((start, buffer.strip()))
        buffer = ""
    if buffer:
        out.append((start, buffer.strip()))
    return out


def _split_flags(path: str, line: int, keyword: str, args: str) -> tuple[tuple[tuple[str, str], ...], str]:
    flags: list[tuple[str, str]] = []
    while args.startswith("--"):
        word, _, rest = args.partition(" ")
        name, sep, value = word[2:].partition("=")
        allowed = _FLAGS.get(keyword, ())
        if name in SWITCHES and name in allowed and not sep:
            sep, value = "=", "true"
        if name not in allowed or not sep:
            hint = ", ".join(f"--{a}=..." for a in allowed) or "none"
            raise ContainerfileError(path, line, f"{keyword}: unsupported flag {word!r} (allowed: {hint})")
        flags.append((name, value))
        args = rest.lstrip()
    return tuple(flags), args


def _json_form(args: str) -> tuple[str, ...] | None:
    if not args.startswith("["):
        return None
    try:
        value = json.loads(args)
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def parse(text: str, path: str) -> list[Instruction]:
    instructions: list[Instruction] = []
    for line, content in _logical_lines(text):
        keyword, _, args = content.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword not in SUPPORTED:
            raise ContainerfileError(
                path, line, f"unsupported instruction {keyword!r}; supported: {', '.join(SUPPORTED)}"
            )
        if keyword == "FROM":
            args = re.sub(r"\s+#.*$", "", args)
        flags, args = _split_flags(path, line, keyword, args)
        if not args and keyword not in ("CMD", "ENTRYPOINT"):
            raise ContainerfileError(path, line, f"{keyword} needs an argument")
        instructions.append(Instruction(keyword, args, line, flags, _json_form(args)))
    if not instructions:
        raise ContainerfileError(path, 1, "empty Containerfile: it must start with FROM")
    if instructions[0].keyword != "FROM" and not all(i.keyword == "ARG" for i in instructions[:1]):
        raise ContainerfileError(path, instructions[0].line, "the first instruction must be FROM (or ARG)")
    froms = [i for i in instructions if i.keyword == "FROM"]
    if not froms:
        raise ContainerfileError(path, instructions[0].line, "no FROM instruction")
    if len(froms) > 1:
        raise ContainerfileError(path, froms[1].line, "multi-stage builds (a second FROM) are not supported")
    for ins in instructions:
        _check(ins, path)
    return instructions


def _check(ins: Instruction, path: str) -> None:
    if ins.keyword == "FROM":
        parts = ins.args.split()
        if len(parts) not in (1, 3) or (len(parts) == 3 and parts[1].upper() != "AS"):
            raise ContainerfileError(path, ins.line, f"FROM takes one image (optionally 'AS name'), got {ins.args!r}")
    elif ins.keyword == "COPY":
        sources = ins.json_form if ins.json_form is not None else tuple(shlex.split(ins.args))
        if len(sources) < 2:
            raise ContainerfileError(path, ins.line, "COPY needs at least one source and a destination")
        if ins.flag("from") not in (None, "host"):
            raise ContainerfileError(
                path, ins.line, "COPY --from= takes only 'host' (multi-stage builds are not supported)"
            )
        if ins.flag("libs") is not None and ins.flag("from") != "host":
            raise ContainerfileError(
                path, ins.line, "COPY --libs goes with --from=host (host programs and the shared libraries they load)"
            )
        mode = ins.flag("chmod")
        if mode is not None and not re.fullmatch(r"[0-7]{3,4}", mode):
            raise ContainerfileError(path, ins.line, f"COPY --chmod={mode!r}: use an octal mode such as 0755")
    elif ins.keyword == "RUN":
        if ins.flag("network") not in (None, "none", "host", "default"):
            raise ContainerfileError(path, ins.line, "RUN --network= takes none or host")
    elif ins.keyword in ("ENV", "LABEL"):
        pairs(ins, path)
    elif ins.keyword == "EXPOSE":
        for port in ins.args.split():
            if not re.fullmatch(r"\d{1,5}(/(tcp|udp|sctp))?", port):
                raise ContainerfileError(path, ins.line, f"EXPOSE {port!r}: use PORT or PORT/tcp|udp")


def pairs(ins: Instruction, path: str) -> list[tuple[str, str]]:
    """``KEY=VALUE ...`` (or the legacy ``KEY VALUE``) of ENV, LABEL and ARG."""
    try:
        words = shlex.split(ins.args)
    except ValueError as exc:
        raise ContainerfileError(path, ins.line, f"{ins.keyword}: {exc}") from None
    if ins.keyword == "ENV" and words and "=" not in words[0]:
        key, _, value = ins.args.partition(" ")
        return [(key, value.strip())]
    out = []
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise ContainerfileError(path, ins.line, f"{ins.keyword}: expected KEY=VALUE, got {word!r}")
        out.append((key, value))
    return out
