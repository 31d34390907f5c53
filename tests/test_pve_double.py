"""The Proxmox API double itself: TLS, auth, the schema check, tasks and errors, through
proxmoxer unchanged. The provider tests build on these answers, so they must hold.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from components import wait_until
from proxmoxer import ProxmoxAPI
from proxmoxer.core import ResourceException
from pve import PveDouble
from pve.double import DEFAULT_TEMPLATE
from pve.schema import SCHEMA_FILE, perl_regex

UPID = re.compile(r"UPID:(?P<node>[^:]+):[0-9A-F]{8}:[0-9A-F]{8}:[0-9A-F]{8}:"
                  r"(?P<type>[^:]+):(?P<id>[^:]*):(?P<user>[^:]+):")
SHARED_SCHEMA = Path(__file__).resolve().parents[1] / ".." / "shared" / "pve" / SCHEMA_FILE.name


@pytest.fixture
def pve(tmp_path: Path) -> Iterator[PveDouble]:
    with PveDouble(tmp_path, task_seconds=0.2) as double:
        yield double


@pytest.fixture
def api(pve: PveDouble) -> ProxmoxAPI:
    secret = pve.add_token("root@pam", "zlh")
    return ProxmoxAPI("127.0.0.1", port=pve.port, user="root@pam", token_name="zlh",
                      token_value=secret, verify_ssl=str(pve.ca_path))


def create_params(vmid: int, **extra: Any) -> dict[str, Any]:
    return {"vmid": vmid, "ostemplate": DEFAULT_TEMPLATE, "rootfs": "local-lvm:4",
            "hostname": "mc1", "net0": "name=eth0,bridge=vmbr0,ip=dhcp", **extra}


def wait_task(api: ProxmoxAPI, node: str, upid: str) -> dict[str, Any]:
    def stopped() -> dict[str, Any] | None:
        status: dict[str, Any] = api.nodes(node).tasks(upid).status.get()
        return status if status["status"] == "stopped" else None

    return wait_until(stopped, 10, f"task {upid}")


def make_ct(api: ProxmoxAPI, vmid: int = 100, **extra: Any) -> None:
    upid = api.nodes("pve1").lxc.post(**create_params(vmid, **extra))
    assert wait_task(api, "pve1", upid)["exitstatus"] == "OK"


def test_the_schema_in_the_repo_is_the_published_one() -> None:
    # CI copies shared/ beside the clone; where it is present, the two must agree.
    if SHARED_SCHEMA.is_file():
        assert SHARED_SCHEMA.read_bytes() == SCHEMA_FILE.read_bytes()
    assert "/nodes/{node}/lxc" in SCHEMA_FILE.read_text()


def test_tls_is_verified_against_the_test_ca(pve: PveDouble) -> None:
    url = f"https://127.0.0.1:{pve.port}/api2/json/version"
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(url, timeout=5)
    answer = requests.get(url, timeout=5, verify=str(pve.ca_path))
    assert answer.status_code == 401 and answer.reason == "No ticket"


def test_token_auth_and_a_wrong_token(pve: PveDouble, api: ProxmoxAPI) -> None:
    assert api.version.get()["release"] == "9.1"
    wrong = ProxmoxAPI("127.0.0.1", port=pve.port, user="root@pam", token_name="zlh",
                       token_value="nope", verify_ssl=str(pve.ca_path))
    with pytest.raises(ResourceException) as caught:
        wrong.version.get()
    assert caught.value.status_code == 401 and caught.value.content == "invalid token value!"


def test_ticket_auth_needs_the_csrf_token_on_writes(pve: PveDouble) -> None:
    pve.add_user("root@pam", "secret-pw")
    api = ProxmoxAPI("127.0.0.1", port=pve.port, user="root@pam", password="secret-pw",
                     verify_ssl=str(pve.ca_path))
    make_ct(api)
    ticket, _csrf = api.get_tokens()
    answer = requests.post(
        f"https://127.0.0.1:{pve.port}/api2/json/nodes/pve1/lxc/100/status/start",
        cookies={"PVEAuthCookie": ticket}, verify=str(pve.ca_path), timeout=5,
    )
    assert (answer.status_code, answer.reason) == (401, "Permission denied - invalid csrf token")


def test_an_expired_ticket_is_refused(pve: PveDouble) -> None:
    pve.add_user("root@pam", "secret-pw")
    api = ProxmoxAPI("127.0.0.1", port=pve.port, user="root@pam", password="secret-pw",
                     verify_ssl=str(pve.ca_path))
    assert api.nodes.get()
    pve.revoke_tickets()
    with pytest.raises(ResourceException) as caught:
        api.nodes.get()
    assert caught.value.status_code == 401 and caught.value.content == "invalid PVE ticket"


@pytest.mark.parametrize(
    ("extra", "key", "reason"),
    [
        ({"bogus": 1}, "bogus", "property is not defined in schema"),
        ({"cmode": "serial"}, "cmode", "does not have a value in the enumeration"),
        ({"cores": 9000}, "cores", "value must have a maximum value of 8192"),
        ({"vmid": 99}, "vmid", "value must have a minimum value of 100"),
        ({"memory": "lots"}, "memory", "type check ('integer') failed"),
        ({"onboot": "maybe"}, "onboot", "type check ('boolean') failed"),
        ({"net0": "name=eth0,bridge=vm br0"}, "net0", "bridge: value does not match"),
        ({"net0": "name=eth0,colour=red"}, "net0", "colour: property is not defined"),
        ({"net0": "bridge=vmbr0"}, "net0", "name: property is missing"),
        ({"net0": "name=eth0,ip=10.0.0.300/24"}, "net0", "valid pve-ipv4-config"),
        ({"tags": "zlh;bad tag!"}, "tags", "valid pve-tag-list"),
    ],
    ids=["unknown-key", "bad-enum", "above-maximum", "below-minimum", "not-an-integer",
         "not-a-boolean", "pattern-in-property-string", "unknown-sub-key",
         "missing-sub-key", "bad-ip", "bad-tag"],
)
def test_the_schema_check_bites(api: ProxmoxAPI, extra: dict[str, Any], key: str,
                                reason: str) -> None:
    with pytest.raises(ResourceException) as caught:
        api.nodes("pve1").lxc.post(**(create_params(100) | extra))
    assert caught.value.status_code == 400
    assert caught.value.content == "Parameter verification failed."
    assert reason in caught.value.errors[key]


def test_a_missing_required_key_and_path_parameters_are_checked(api: ProxmoxAPI) -> None:
    with pytest.raises(ResourceException) as caught:
        api.nodes("pve1").lxc.post(vmid=100, rootfs="local-lvm:4")
    assert caught.value.errors == {"ostemplate": "property is missing and it is not optional"}
    with pytest.raises(ResourceException) as caught:
        api.nodes("pve1").lxc("abc").status.current.get()
    assert "type check ('integer') failed" in caught.value.errors["vmid"]


def test_perl_patterns_are_translated() -> None:
    assert perl_regex(r"(?^:\d+(?:;\d+)*)").fullmatch("10;20")
    assert not perl_regex(r"(?^:\d+(?:;\d+)*)").fullmatch("10;x")


def test_a_task_runs_then_stops_with_a_real_upid(api: ProxmoxAPI) -> None:
    upid = api.nodes("pve1").lxc.post(**create_params(100))
    match = UPID.fullmatch(upid)
    assert match and match.group("type", "id", "user") == ("vzcreate", "100", "root@pam!zlh")
    assert api.nodes("pve1").tasks(upid).status.get()["status"] == "running"
    assert wait_task(api, "pve1", upid)["exitstatus"] == "OK"
    assert api.nodes("pve1").tasks(upid).log.get()[-1]["t"] == "TASK OK"


def test_the_task_list_filters_as_proxmox_does(pve: PveDouble, api: ProxmoxAPI) -> None:
    make_ct(api, 100)
    make_ct(api, 101)
    pve.fail_next("vzstart", "startup for container '100' failed")
    failed = api.nodes("pve1").lxc(100).status.start.post()
    wait_task(api, "pve1", failed)

    created = api.nodes("pve1").tasks.get(vmid=100, typefilter="vzcreate")
    assert [(t["type"], t["id"], t["status"]) for t in created] == [("vzcreate", "100", "OK")]
    assert set(created[0]) == {"upid", "node", "pid", "pstart", "starttime", "type", "id",
                               "user", "status", "endtime"}
    assert api.nodes("pve1").tasks(created[0]["upid"]).log.get()[-1]["t"] == "TASK OK"
    # Newest first; a failed task's status is its error.
    every = api.nodes("pve1").tasks.get()
    assert [t["type"] for t in every] == ["vzstart", "vzcreate", "vzcreate"]
    assert every[0]["status"] == "startup for container '100' failed"
    assert [t["upid"] for t in api.nodes("pve1").tasks.get(errors=1)] == [failed]
    assert api.nodes("pve1").tasks.get(source="active") == []

    with pytest.raises(ResourceException) as caught:
        api.nodes("pve1").tasks.get(vmid=5, source="everything")
    assert caught.value.status_code == 400
    assert set(caught.value.errors) == {"vmid", "source"}


def test_scripted_task_failure_and_warnings(pve: PveDouble, api: ProxmoxAPI) -> None:
    make_ct(api)
    pve.fail_next("vzstart", "startup for container '100' failed")
    upid = api.nodes("pve1").lxc(100).status.start.post()
    assert wait_task(api, "pve1", upid)["exitstatus"] == "startup for container '100' failed"
    assert api.nodes("pve1").tasks(upid).log.get()[-1]["t"] == \
        "TASK ERROR: startup for container '100' failed"

    pve.warn_next("vzstart", 2)
    upid = api.nodes("pve1").lxc(100).status.start.post()
    assert wait_task(api, "pve1", upid)["exitstatus"] == "WARNINGS: 2"


def test_proxmox_errors_are_500_with_the_message_as_reason(pve: PveDouble,
                                                           api: ProxmoxAPI) -> None:
    make_ct(api)
    cases = [
        (lambda: api.nodes("pve1").lxc.post(**create_params(100)),
         "CT 100 already exists on node 'pve1'"),
        (lambda: api.nodes("pve1").lxc.post(**create_params(101, rootfs="nosuch:4")),
         "storage 'nosuch' does not exist"),
        (lambda: api.nodes("pve1").lxc.post(**create_params(101, rootfs="local:4")),
         "storage 'local' does not support container directories"),
    ]
    for call, message in cases:
        with pytest.raises(ResourceException) as caught:
            call()
        assert (caught.value.status_code, caught.value.content) == (500, message)

    wait_task(api, "pve1", api.nodes("pve1").lxc(100).status.start.post())
    with pytest.raises(ResourceException) as caught:
        api.nodes("pve1").lxc(100).delete(purge=1)
    assert caught.value.content == "CT 100 is running - destroy failed"
    pve.lock(100, "backup")
    with pytest.raises(ResourceException) as caught:
        api.nodes("pve1").lxc(100).status.stop.post()
    assert caught.value.content == "CT is locked (backup)"
    pve.lock(100, None)
    assert wait_task(api, "pve1", api.nodes("pve1").lxc(100).delete(purge=1, force=1))[
        "exitstatus"] == "OK"
    assert api.cluster.resources.get(type="vm") == []


def test_a_missing_template_fails_the_create_task(api: ProxmoxAPI) -> None:
    upid = api.nodes("pve1").lxc.post(
        **create_params(100, ostemplate="local:vztmpl/nope.tar.zst"))
    assert wait_task(api, "pve1", upid)["exitstatus"] == \
        "unable to create CT 100 - volume 'local:vztmpl/nope.tar.zst' does not exist"
    assert api.cluster.nextid.get() == 100  # the failed create left nothing behind


def test_interfaces_follow_the_plan(pve: PveDouble, api: ProxmoxAPI) -> None:
    make_ct(api)
    assert api.nodes("pve1").lxc(100).interfaces.get() is None
    pve.interface_plan = ["empty", "link-local", "address"]
    wait_task(api, "pve1", api.nodes("pve1").lxc(100).status.start.post())
    seen = [api.nodes("pve1").lxc(100).interfaces.get() for _ in range(3)]
    assert seen[0] == []
    assert "inet" not in seen[1][1] and seen[1][1]["inet6"].startswith("fe80::")
    assert seen[2][1]["inet"] == "127.77.0.101/24"


def test_storage_content_lists_templates(api: ProxmoxAPI) -> None:
    content = api.nodes("pve1").storage("local").content.get(content="vztmpl")
    assert [v["volid"] for v in content] == [DEFAULT_TEMPLATE]
    with pytest.raises(ResourceException) as caught:
        api.nodes("pve1").storage("nosuch").content.get()
    assert caught.value.content == "storage 'nosuch' does not exist"


def test_snapshot_and_rollback(api: ProxmoxAPI) -> None:
    make_ct(api, memory=512)
    wait_task(api, "pve1", api.nodes("pve1").lxc(100).snapshot.post(snapname="before"))
    assert [s["name"] for s in api.nodes("pve1").lxc(100).snapshot.get()] == \
        ["before", "current"]
    with pytest.raises(ResourceException) as caught:
        api.nodes("pve1").lxc(100).snapshot.post(snapname="before")
    assert caught.value.content == "snapshot name 'before' already used"
    upid = api.nodes("pve1").lxc(100).snapshot("before").rollback.post()
    assert wait_task(api, "pve1", upid)["exitstatus"] == "OK"
    assert api.nodes("pve1").lxc(100).config.get()["memory"] == "512"


def test_snapshot_names_are_checked_as_proxmox_checks_them(api: ProxmoxAPI) -> None:
    make_ct(api, memory=512)
    # pve-configid ignores case, as Proxmox's /i pattern does.
    wait_task(api, "pve1", api.nodes("pve1").lxc(100).snapshot.post(snapname="BeforeUpdate"))
    for reserved in ("current", "vzdump"):
        with pytest.raises(ResourceException) as caught:
            api.nodes("pve1").lxc(100).snapshot.post(snapname=reserved)
        assert (caught.value.status_code, caught.value.content) == (
            500, f"unable to use snapshot name '{reserved}' (reserved name)")
    assert [s["name"] for s in api.nodes("pve1").lxc(100).snapshot.get()] == \
        ["BeforeUpdate", "current"]
