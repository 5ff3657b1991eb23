"""Test certificates for the TLS tests (test_server_tls.py, test_viewer_browser.py): a CA and
certificates it signs, made with the `openssl` CLI into a test's tmp directory (P-256 keys,
valid two days). Nothing here talks to the network.
"""

import shutil
import ssl
import subprocess

import pytest

OPENSSL = shutil.which("openssl")


def _openssl(*args, cwd):
    subprocess.run([OPENSSL] + list(args), cwd=str(cwd), check=True, capture_output=True,
                   timeout=60)


def make_ca(d, name):
    """A self-signed CA (P-256): (cert path, key path)."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "%s.key" % name, "-out", "%s.pem" % name, "-days", "2",
             "-subj", "/CN=%s" % name, cwd=d)
    return d / ("%s.pem" % name), d / ("%s.key" % name)


def make_cert(d, ca, name, client=False):
    """A certificate for 127.0.0.1 / localhost (or a client certificate) signed by `ca`."""
    ca_pem, ca_key = ca
    ext = d / ("%s.ext" % name)
    ext.write_text("extendedKeyUsage=clientAuth\n" if client else
                   "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "%s.key" % name, "-out", "%s.csr" % name, "-subj", "/CN=%s" % name,
             cwd=d)
    _openssl("x509", "-req", "-in", "%s.csr" % name, "-CA", str(ca_pem), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", "%s.pem" % name, "-days", "2", "-extfile", str(ext),
             cwd=d)
    return d / ("%s.pem" % name), d / ("%s.key" % name)


def make_pki(tmp_path):
    """A test CA with a server certificate for 127.0.0.1 (CN server-1), and another CA."""
    if not OPENSSL:
        pytest.fail("the openssl CLI is missing (scripts/install-deps.sh installs it)",
                    pytrace=False)
    d = tmp_path / "pki"
    d.mkdir()
    ca = make_ca(d, "test-ca")
    other_ca = make_ca(d, "other-ca")
    return {"dir": d, "ca": ca, "other_ca": other_ca,
            "server": make_cert(d, ca, "server-1")}


def client_ctx(ca_pem, cert=None):
    ctx = ssl.create_default_context(cafile=str(ca_pem))
    if cert:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx
