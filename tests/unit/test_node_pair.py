"""A node's key and certificate are replaced so that a crash never leaves a mismatched pair."""
import os
from datetime import timedelta

from netweft import pki
from netweft.pki.nodepair import files, repair_node_pair, save_node_pair


def make_pair(ca):
    key = pki.new_node_key()
    cert = pki.sign_node_cert(ca, pki.make_csr(key), "node1", "worker", "c1", timedelta(hours=1))
    return pki.key_to_pem(key), cert


def matches(d) -> bool:
    f = files(d)
    cert = pki.load_cert(pki.load_pem(f["cert"]))
    key = pki.load_private_key(pki.load_pem(f["key"]))
    return key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_save_then_crash_between_writes_is_repaired(tmp_path):
    ca = pki.create_root_ca("c1")
    d = str(tmp_path)
    save_node_pair(d, *make_pair(ca))
    assert matches(d) and not os.path.exists(files(d)["key"] + ".new")
    # A crash after the new certificate landed but before the new key replaced the old one:
    key2, cert2 = make_pair(ca)
    pki.save_pem(files(d)["key"] + ".new", key2, private=True)
    pki.save_pem(files(d)["cert"], cert2)
    assert not matches(d)
    repair_node_pair(d)
    assert matches(d) and not os.path.exists(files(d)["key"] + ".new")


def test_crash_before_certificate_keeps_old_pair(tmp_path):
    ca = pki.create_root_ca("c1")
    d = str(tmp_path)
    save_node_pair(d, *make_pair(ca))
    key2, _ = make_pair(ca)
    pki.save_pem(files(d)["key"] + ".new", key2, private=True)  # crash: the certificate never came
    repair_node_pair(d)
    assert matches(d) and not os.path.exists(files(d)["key"] + ".new")
