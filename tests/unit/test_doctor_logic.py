"""doctor's findings that need no cluster: kernel features and certificate expiry, one line each with what to do."""
from datetime import datetime, timedelta, timezone

from netweft import pki
from netweft.daemon import doctor
from netweft.pki.nodepair import files

ALL = {"bridge": None, "vxlan": None, "wireguard": "Operation not supported", "nftables": None,
       "nftables_bridge": None, "br_netfilter": "loaded", "wireguard_go": "/usr/bin/wireguard-go"}


def test_a_complete_kernel_is_all_ok_and_names_the_wireguard_kind():
    out = doctor.kernel_findings(ALL)
    assert all(f.level == "ok" for f in out)
    assert any("WireGuard: userspace (/usr/bin/wireguard-go)" in f.message for f in out)
    assert doctor.kernel_findings({**ALL, "wireguard": None})[-1].message == "WireGuard: kernel module"


def test_a_missing_feature_fails_with_what_to_do():
    out = doctor.kernel_findings({**ALL, "vxlan": "Operation not supported", "wireguard_go": None})
    bad = [f for f in out if f.level != "ok"]
    assert [f.message.split(":")[0] for f in bad] == ["VXLAN", "WireGuard"]
    assert "load the vxlan module" in bad[0].message and "install wireguard-go" in bad[1].message


def make_node_files(tmp_path, lifetime: timedelta):
    ca = pki.create_root_ca("cluster1")
    key = pki.new_node_key()
    cert = pki.sign_node_cert(ca, pki.make_csr(key), "node1", "worker", "cluster1", lifetime)
    f = files(str(tmp_path))
    pki.save_pem(f["ca"], ca.cert_pem)
    pki.save_pem(f["cert"], cert)
    return pki.cert_identity(cert)


def test_certificate_valid_overdue_and_expired(tmp_path):
    ident = make_node_files(tmp_path, timedelta(days=10))
    assert [f.level for f in doctor.certificate_findings(str(tmp_path))] == ["ok"]
    late = ident.not_after - timedelta(days=1)
    out = doctor.certificate_findings(str(tmp_path), now=late)
    assert out[0].level == "warn" and "not renewed" in out[0].message
    out = doctor.certificate_findings(str(tmp_path), now=ident.not_after + timedelta(seconds=1))
    assert out[0].level == "fail" and "expired" in out[0].message and "swarm join" in out[0].message


def test_an_unreadable_certificate_is_one_failure(tmp_path):
    out = doctor.certificate_findings(str(tmp_path / "none"), now=datetime.now(timezone.utc))
    assert len(out) == 1 and out[0].level == "fail" and "join the swarm again" in out[0].message
