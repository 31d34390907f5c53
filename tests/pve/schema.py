"""Check API requests against Proxmox's published schema, as pve-manager's JSONSchema does.

The schema (`apidata-lxc-subset.json`) maps each path template (`/nodes/{node}/lxc`) and
method to its parameters: type, optional, enum, minimum/maximum, minLength/maxLength,
pattern, and `format` (a named format, or a dict describing a property string such as
`net0: name=eth0,bridge=vmbr0,ip=dhcp`). Request values arrive as text (query string or
form body); path parameters count as parameters. Keys written `net[n]` in the schema
match `net0`, `net1`, ...

The messages follow Proxmox's wording, so a test sees what an operator would see.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

SCHEMA_FILE = Path(__file__).with_name("apidata-lxc-subset.json")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
INTEGER = re.compile(r"[+-]?\d+")
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class SchemaError(Exception):
    """Parameter verification failed: `errors` maps each bad key to its reason."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("Parameter verification failed.")
        self.errors = errors


@dataclass(frozen=True)
class Endpoint:
    template: str
    method: str
    info: dict[str, Any]

    @property
    def properties(self) -> dict[str, Any]:
        return dict(self.info.get("parameters", {}).get("properties", {}))


class Schema:
    """The published API description, indexed by path template."""

    def __init__(self, path: Path = SCHEMA_FILE) -> None:
        data = json.loads(path.read_text())
        self.paths: dict[str, dict[str, Any]] = data["paths"]
        self._patterns = [(self._compile(t), t) for t in self.paths]

    @staticmethod
    def _compile(template: str) -> re.Pattern[str]:
        parts = re.split(r"(\{[^}]+\})", template)
        regex = "".join(
            f"(?P<{p[1:-1]}>[^/]+)" if p.startswith("{") else re.escape(p) for p in parts
        )
        return re.compile(regex)

    def find(self, path: str) -> tuple[str, dict[str, str]] | None:
        """The template matching `path` and the path parameters it binds."""
        for pattern, template in self._patterns:
            match = pattern.fullmatch(path)
            if match:
                return template, match.groupdict()
        return None

    def endpoint(self, template: str, method: str) -> Endpoint | None:
        info = self.paths.get(template, {}).get(method)
        return None if info is None else Endpoint(template, method, info)

    def check(self, endpoint: Endpoint, params: dict[str, str]) -> None:
        """Raise SchemaError unless `params` satisfy the endpoint's parameter schema."""
        errors: dict[str, str] = {}
        properties = endpoint.properties
        for key, value in params.items():
            prop = _property_for(properties, key)
            if prop is None:
                errors[key] = ("property is not defined in schema and the schema does not "
                               "allow additional properties")
                continue
            problem = check_value(prop, value)
            if problem:
                errors[key] = problem
        for key, prop in properties.items():
            if "[n]" not in key and not prop.get("optional") and key not in params:
                errors[key] = "property is missing and it is not optional"
        if errors:
            raise SchemaError(errors)


def _property_for(properties: dict[str, Any], key: str) -> dict[str, Any] | None:
    if key in properties:
        return dict(properties[key])
    match = re.fullmatch(r"([a-z]+)(\d+)", key)
    if match and f"{match.group(1)}[n]" in properties:
        return dict(properties[f"{match.group(1)}[n]"])
    return None


def check_value(prop: dict[str, Any], value: str) -> str | None:
    """The reason `value` does not fit `prop`, or None."""
    kind = prop.get("type", "string")
    checker = _TYPE_CHECKS.get(kind)
    if checker is None:
        return None  # array/object parameters do not occur in form data of this subset
    return checker(prop, value)


def _check_boolean(prop: dict[str, Any], value: str) -> str | None:
    if value.lower() in TRUE_WORDS + FALSE_WORDS:
        return None
    return f"type check ('boolean') failed - got '{value}'"


def _check_integer(prop: dict[str, Any], value: str) -> str | None:
    if not INTEGER.fullmatch(value):
        return f"type check ('integer') failed - got '{value}'"
    return _check_range(prop, int(value))


def _check_number(prop: dict[str, Any], value: str) -> str | None:
    if not NUMBER.fullmatch(value):
        return f"type check ('number') failed - got '{value}'"
    return _check_range(prop, float(value))


def _check_range(prop: dict[str, Any], number: float) -> str | None:
    if "minimum" in prop and number < prop["minimum"]:
        return f"value must have a minimum value of {prop['minimum']}"
    if "maximum" in prop and number > prop["maximum"]:
        return f"value must have a maximum value of {prop['maximum']}"
    return None


def _check_string(prop: dict[str, Any], value: str) -> str | None:
    if "minLength" in prop and len(value) < prop["minLength"]:
        return f"value must be at least {prop['minLength']} characters long"
    if "maxLength" in prop and len(value) > prop["maxLength"]:
        return f"value may only be {prop['maxLength']} characters long"
    if "enum" in prop and value not in prop["enum"]:
        return f"value '{value}' does not have a value in the enumeration " \
               f"'{', '.join(prop['enum'])}'"
    if "pattern" in prop and not perl_regex(prop["pattern"]).fullmatch(value):
        return "value does not match the regex pattern"
    fmt = prop.get("format")
    if isinstance(fmt, dict):
        return _check_property_string(fmt, value)
    if isinstance(fmt, str) and fmt in NAMED_FORMATS and not NAMED_FORMATS[fmt](value):
        return f"value does not look like a valid {fmt}"
    return None


@cache
def perl_regex(pattern: str) -> re.Pattern[str]:
    """A schema pattern as a Python regex: Perl's `(?^:...)` group becomes `(?:...)`."""
    return re.compile(pattern.replace("(?^:", "(?:"))


def _check_property_string(fmt: dict[str, Any], value: str) -> str | None:
    """Check `key=value,key=value` (the default key may be given bare)."""
    default_key = next((k for k, p in fmt.items() if p.get("default_key")), None)
    seen: dict[str, str] = {}
    for part in value.split(","):
        key, sep, sub_value = part.partition("=")
        if not sep:
            if default_key is None or default_key in seen:
                return f"invalid format - value without key, but schema does not define a " \
                       f"default key: '{part}'"
            key, sub_value = default_key, part
        if key not in fmt:
            return f"invalid format - {key}: property is not defined in schema"
        if key in seen:
            return f"invalid format - duplicate key in comma-separated list property: {key}"
        seen[key] = sub_value
        problem = check_value(fmt[key], sub_value)
        if problem:
            return f"invalid format - {key}: {problem}"
    missing = [k for k, p in fmt.items() if not p.get("optional") and k not in seen]
    if missing:
        return f"invalid format - {missing[0]}: property is missing and it is not optional"
    return None


def parse_property_string(value: str, default_key: str | None = None) -> dict[str, str]:
    """`name=eth0,bridge=vmbr0` -> dict; a bare first value goes to `default_key`."""
    result: dict[str, str] = {}
    for part in value.split(","):
        key, sep, sub_value = part.partition("=")
        if sep:
            result[key] = sub_value
        elif default_key:
            result[default_key] = part
    return result


def _ip(value: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(value).version == version
    except ValueError:
        return False


def _cidr(value: str, version: int) -> bool:
    try:
        return ipaddress.ip_interface(value).version == version and "/" in value
    except ValueError:
        return False


def _tag_list(value: str) -> bool:
    tags = [t for t in re.split(r"[;, ]", value) if t]
    return all(re.fullmatch(r"[a-z0-9_][a-z0-9_\-+.]*", t, re.IGNORECASE) for t in tags)


def _dns_name(value: str) -> bool:
    label = r"[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?"
    return re.fullmatch(rf"{label}(\.{label})*", value) is not None


def _mp_volume(value: str) -> bool:
    # STORAGE:SIZE (a new volume), STORAGE:VOLUME, or an absolute host path.
    return value.startswith("/") or re.fullmatch(r"[a-z][a-z0-9\-_.]*[a-z0-9]:\S+", value) \
        is not None


STORAGE_ID = re.compile(r"[a-z][a-z0-9\-_.]*[a-z0-9]", re.IGNORECASE)
CONFIG_ID = re.compile(r"[a-z][a-z0-9_]+", re.IGNORECASE)

NAMED_FORMATS: dict[str, Callable[[str], bool]] = {
    "pve-node": lambda v: re.fullmatch(r"[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?", v) is not None,
    # Proxmox's patterns for these two end in /i: upper case passes.
    "pve-storage-id": lambda v: STORAGE_ID.fullmatch(v) is not None,
    "pve-configid": lambda v: CONFIG_ID.fullmatch(v) is not None,
    "pve-tag-list": _tag_list,
    "dns-name": _dns_name,
    "ipv4": lambda v: _ip(v, 4),
    "ipv6": lambda v: _ip(v, 6),
    "mac-addr": lambda v: re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", v) is not None,
    "pve-ipv4-config": lambda v: v in ("dhcp", "manual") or _cidr(v, 4),
    "pve-ipv6-config": lambda v: v in ("dhcp", "auto", "manual") or _cidr(v, 6),
    "pve-lxc-mp-string": _mp_volume,
    "pve-volume-id": lambda v: re.fullmatch(r"[a-z][a-z0-9\-_.]*[a-z0-9]:.+", v) is not None,
    "disk-size": lambda v: re.fullmatch(r"\d+(\.\d+)?[KMGT]?", v) is not None,
}

_TYPE_CHECKS: dict[str, Callable[[dict[str, Any], str], str | None]] = {
    "boolean": _check_boolean,
    "integer": _check_integer,
    "number": _check_number,
    "string": _check_string,
}
