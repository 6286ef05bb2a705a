"""Validation of names, aliases, version specs and entry paths: the path-escape guards."""

from __future__ import annotations

import re
from typing import NamedTuple

from .errors import InvalidName

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
# At most 18 digits: every v<N> fits the catalog's 64-bit integers.
VERSION_RE = re.compile(r"v(0|[1-9][0-9]{0,17})\Z")
MAX_NAME = 128
MAX_COMPONENT_BYTES = 255


def check_name(name: object, what: str = "artifact name") -> str:
    """Return `name` if it is a valid artifact name, else raise InvalidName."""
    if not isinstance(name, str):
        raise InvalidName(f"{what} must be a string, not {type(name).__name__}")
    if len(name) > MAX_NAME:
        raise InvalidName(f"{what} {name[:40]!r}... is longer than {MAX_NAME} characters")
    if not NAME_RE.match(name):
        raise InvalidName(
            f"bad {what} {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return name


def check_alias(alias: object) -> str:
    """Return `alias` if it is a valid alias (a name that is not `v<N>`)."""
    check_name(alias, "alias")
    assert isinstance(alias, str)
    if VERSION_RE.match(alias):
        raise InvalidName(f"bad alias {alias!r}: v<N> is reserved for versions")
    return alias


class Spec(NamedTuple):
    """A parsed `NAME[:VERSION_OR_ALIAS]`; `version` is an int for `v<N>`, else the alias."""

    name: str
    version: int | None
    alias: str | None


def parse_spec(spec: object) -> Spec:
    """Parse `name`, `name:vN` or `name:alias`; a bare name means `latest`."""
    if not isinstance(spec, str):
        raise InvalidName(f"artifact spec must be a string, not {type(spec).__name__}")
    name, sep, rest = spec.partition(":")
    check_name(name)
    if not sep:
        return Spec(name, None, "latest")
    m = VERSION_RE.match(rest)
    if m:
        return Spec(name, int(m.group(1)), None)
    check_name(rest, "alias")
    return Spec(name, None, rest)


def check_entry_path(path: object) -> str:
    """Return the normalised entry path, or raise InvalidName if it could escape its version.

    Entry paths are relative POSIX paths: no empty, '.' or '..' component, no leading '/',
    no NUL, each component at most 255 bytes. A leading './' is dropped, since users write it.
    """
    if not isinstance(path, str):
        raise InvalidName(f"entry path must be a string, not {type(path).__name__}")
    if len(path) <= MAX_COMPONENT_BYTES and path.isascii() and "\x00" not in path:
        # The common case in one pass of string searches (a tree's 20,000 paths: 0.1 s
        # component by component); ASCII is one byte a character, so no component is too long.
        s = f"/{path}/"
        if "//" not in s and "/./" not in s and "/../" not in s:
            return path
    return _check_parts(path)


def _check_parts(path: str) -> str:
    """check_entry_path component by component (every path the fast test does not pass)."""
    p = path
    while p.startswith("./"):
        p = p[2:]
    if not p:
        raise InvalidName(f"bad entry path {path!r}: empty")
    if "\x00" in p:
        raise InvalidName(f"bad entry path {path!r}: contains NUL")
    if p.startswith("/"):
        raise InvalidName(f"bad entry path {path!r}: must be relative")
    parts = p.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidName(f"bad entry path {path!r}: empty, '.' or '..' component")
        try:
            encoded = part.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidName(f"bad entry path {path!r}: not valid UTF-8") from None
        if len(encoded) > MAX_COMPONENT_BYTES:
            raise InvalidName(f"bad entry path {path!r}: a component is longer than 255 bytes")
    return p


def join_entry(prefix: str | None, rel: str) -> str:
    """Join an optional name prefix and a relative path into a checked entry path."""
    return check_entry_path(f"{prefix.rstrip('/')}/{rel}" if prefix else rel)
