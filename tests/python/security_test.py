"""TLS, mutual TLS and the admin token through the Python client and
RemoteMuon, against a real muon-server. Certificates come from the openssl CLI."""
import os
import subprocess
import tempfile
import unittest

import grpc
import numpy as np
import torch

from muon_client import MuonClient, MuonServerError, ParamSpec, RemoteMuon, Timeouts
from server_fixture import ServerProcess

ADMIN = "py-admin-7c1e"


def _openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certificates(d):
    """ca.pem signs server.pem (127.0.0.1, localhost) and client.pem;
    other-ca.pem signs other-client.pem."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    with open(os.path.join(d, "client.ext"), "w") as f:
        f.write("extendedKeyUsage=clientAuth\n")
    p = lambda name: os.path.join(d, name)
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", *ec, "-days", "2", "-subj", f"/CN={ca}", "-addext",
                 "basicConstraints=critical,CA:TRUE", "-keyout", p(ca + ".key"),
                 "-out", p(ca + ".pem"))
    for name, ca, ext in (("server", "ca", "server.ext"), ("client", "ca", "client.ext"),
                          ("other-client", "other-ca", "client.ext")):
        _openssl("req", *ec, "-subj", f"/CN={name}", "-keyout", p(name + ".key"),
                 "-out", p(name + ".csr"))
        _openssl("x509", "-req", "-days", "2", "-in", p(name + ".csr"), "-CA", p(ca + ".pem"),
                 "-CAkey", p(ca + ".key"), "-CAcreateserial", "-extfile", p(ext),
                 "-out", p(name + ".pem"))
    return p


class SecurityTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()
        cls.path = staticmethod(make_certificates(cls.dir.name))
        cls.server = ServerProcess(f"--tls_cert={cls.path('server.pem')}",
                                   f"--tls_key={cls.path('server.key')}",
                                   f"--tls_client_ca={cls.path('ca.pem')}",
                                   f"--admin_token={ADMIN}")

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        cls.dir.cleanup()

    def client(self, **kw):
        c = MuonClient(self.server.address, **kw)
        self.addCleanup(c.close)
        return c

    def mutual(self, **kw):
        return self.client(root_certificates=self.path("ca.pem"),
                           certificate_chain=self.path("client.pem"),
                           private_key=self.path("client.key"), **kw)

    def test_mutual_tls_with_paths_and_with_bytes(self):
        session = self.mutual().create_session([ParamSpec("w", (16, 8))])
        self.assertEqual(session.step({0: np.ones((16, 8), np.float32)}).step, 1)
        session.delete()
        read = lambda name: open(self.path(name), "rb").read()
        by_bytes = self.client(root_certificates=read("ca.pem"),
                               certificate_chain=read("client.pem"),
                               private_key=read("client.key"), server_name="localhost")
        by_bytes.create_session([ParamSpec("w", (4, 4))]).delete()

    def test_refused_without_the_right_client_certificate(self):
        # A refused handshake looks like a server not up yet: the client
        # retries it for the connect timeout, then names the last error.
        fast = Timeouts(connect=1.0)
        attempts = {
            "plaintext": self.client(timeouts=fast),
            "no client certificate": self.client(root_certificates=self.path("ca.pem"),
                                                 timeouts=fast),
            "certificate from another CA": self.client(
                root_certificates=self.path("ca.pem"),
                certificate_chain=self.path("other-client.pem"),
                private_key=self.path("other-client.key"), timeouts=fast),
        }
        for what, client in attempts.items():
            with self.subTest(what), self.assertRaises(MuonServerError) as ctx:
                client.create_session([ParamSpec("w", (4, 4))])
            self.assertEqual(ctx.exception.code, grpc.StatusCode.UNAVAILABLE)
            self.assertIn("not reachable", ctx.exception.details)

    def test_half_a_client_certificate_is_refused_locally(self):
        with self.assertRaises(ValueError):
            MuonClient(self.server.address, certificate_chain=self.path("client.pem"))

    def test_admin_token_lists_sessions(self):
        session = self.mutual().create_session([ParamSpec("w", (4, 4))])
        with self.assertRaises(MuonServerError) as ctx:
            self.mutual().list_sessions()
        self.assertEqual(ctx.exception.code, grpc.StatusCode.UNAUTHENTICATED)
        with self.assertRaises(MuonServerError) as ctx:
            self.mutual().list_sessions(admin_token="wrong")
        self.assertEqual(ctx.exception.code, grpc.StatusCode.PERMISSION_DENIED)
        ids = [s.session_id for s in self.mutual(admin_token=ADMIN).list_sessions()]
        self.assertIn(session.session_id, ids)
        session.delete()

    def test_remote_muon_over_mutual_tls(self):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        before = model.weight.detach().clone()
        opt = RemoteMuon(model.parameters(), server=self.server.address,
                         root_certificates=self.path("ca.pem"),
                         certificate_chain=self.path("client.pem"),
                         private_key=self.path("client.key"))
        model(torch.randn(16, 8)).pow(2).mean().backward()
        opt.step()
        self.assertFalse(torch.equal(before, model.weight))
        opt.delete_sessions()


if __name__ == "__main__":
    unittest.main()
