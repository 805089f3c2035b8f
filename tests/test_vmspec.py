"""The stored definition: read, renamed, re-networked and rendered for a restore."""

from __future__ import annotations

from pathlib import Path

import pytest

from liverestore.errors import LiverestoreError
from liverestore.hypervisor.vmspec import (
    DiskSource,
    default_spec,
    parse_domain,
    render_domain,
    restore_metadata,
    retarget,
)
from liverestore.testvm.domain import make_domain_xml

XML = make_domain_xml("web01", Path("/d/vda.raw"), Path("/d/sda.raw"), network="prod",
                        mac="52:54:00:00:00:01").replace("<name>web01</name>",
                        "<name>web01</name><uuid>11111111-2222-3333-4444-555555555555</uuid>")  # fmt: skip


def test_parse_reads_what_the_vm_is() -> None:
    s = parse_domain(XML)
    assert (s.name, s.vcpus, s.memory_mib, s.machine, s.domain_type) == ("web01", 2, 768, "pc", "qemu")
    assert [(d.target, d.bus, d.boot_order, d.source) for d in s.disks] == [
        ("vda", "virtio", 1, "/d/vda.raw"), ("sda", "sata", None, "/d/sda.raw")]  # fmt: skip
    assert [(n.kind, n.source, n.mac) for n in s.nics] == [("network", "prod", "52:54:00:00:00:01")]
    assert s.has_serial and not s.has_guest_agent


def test_retarget_new_name_gets_new_identity_and_networks_map() -> None:
    s = parse_domain(XML)
    same = retarget(s)
    assert same.uuid == s.uuid and same.nics == s.nics
    new = retarget(s, name="web02", network_map={"prod": "lab"})
    assert new.name == "web02" and new.uuid != s.uuid and new.nics[0].mac != "52:54:00:00:00:01"
    again = parse_domain(new.domain_xml or "")
    assert (again.name, again.uuid, again.nics[0].source, again.nics[0].mac) == (
        "web02", new.uuid, "lab", new.nics[0].mac)  # fmt: skip
    assert parse_domain(retarget(s, no_network=True).domain_xml or "").nics == ()
    with pytest.raises(LiverestoreError, match="no NIC"):
        retarget(s, network_map={"dev": "lab"})


def test_render_points_disks_at_the_agent_and_marks_the_domain() -> None:
    s = parse_domain(XML)
    xml = render_domain(s, {"vda": DiskSource(Path("/o/vda.qcow2"), "qcow2", "127.0.0.1", 10809, "web01/vda")},
                        serial_log=Path("/w/serial.log"), metadata={"id": "r1"})  # fmt: skip
    assert "backingStore type=\"network\"" in xml and 'name="web01/vda"' in xml and 'port="10809"' in xml
    assert "/d/vda.raw" not in xml and "/d/sda.raw" in xml  # only the disks named are replaced
    assert '<log file="/w/serial.log"' in xml
    assert restore_metadata(xml) == {"id": "r1"}
    final = render_domain(parse_domain(xml), {"vda": DiskSource(Path("/p/web01-vda.raw"))})
    assert restore_metadata(final) is None and "nbd" not in final and "/p/web01-vda.raw" in final
    assert parse_domain(final).disk("vda") is not None


def test_bare_disks_get_a_default_vm() -> None:
    s = default_spec("vm1", ["boot", "data"])
    assert [d.boot_order for d in s.disks] == [1, 2] and s.nics == () and s.domain_xml is None
    assert "<vcpu>1</vcpu>" in render_domain(s, {})


def test_bad_definitions_are_one_clear_error() -> None:
    with pytest.raises(LiverestoreError, match="not valid XML"):
        parse_domain("<domain>")
    with pytest.raises(LiverestoreError, match="not a libvirt <domain>"):
        parse_domain("<network/>")
    with pytest.raises(LiverestoreError, match="no <name>"):
        parse_domain("<domain type='qemu'/>")
    with pytest.raises(LiverestoreError, match="invalid number"):
        parse_domain("<domain type='qemu'><name>x</name><vcpu>two</vcpu></domain>")
