"""The Python client against a secured and observed tokensamplerd (path in $TOKENSAMPLERD): TLS
and mutual TLS with certificates made by the openssl CLI for this run, bearer tokens (health
exempt), the health-only port, and the metrics endpoint scraped over HTTP."""

import os
import shutil
import subprocess
import tempfile
import unittest
import urllib.request

import grpc
import numpy as np

import tokensampler

LOGITS = np.array([[1, 2, 3, 4], [4, 3, 2, 1]], np.float32)
GREEDY = {"temperature": 0}


def make_pki(directory):
    """A CA, a server certificate for 127.0.0.1 signed by it, a client certificate signed by it,
    and a client certificate from an unrelated CA. Returns {name: path}."""
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other_ca"):
        openssl("req", "-x509", *key, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                "-subj", f"/CN=tokensampler test {ca}",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign")
    for name, ca, extensions in (
            ("server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                             "extendedKeyUsage=serverAuth\n"),
            ("client", "ca", "extendedKeyUsage=clientAuth\n"),
            ("other_client", "other_ca", "extendedKeyUsage=clientAuth\n")):
        with open(os.path.join(directory, f"{name}.ext"), "w", encoding="ascii") as f:
            f.write(extensions)
        openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {name: os.path.join(directory, name) for name in (
        "ca.pem", "other_ca.pem", "server.pem", "server.key", "client.pem", "client.key",
        "other_client.pem", "other_client.key")}


def read(path):
    with open(path, "rb") as f:
        return f.read()


class SecuredServerTest(unittest.TestCase):
    """One daemon: mutual TLS on TCP, a token everywhere, a health-only port."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="ts_pki_")
        cls.pki = make_pki(cls.dir)
        token_file = os.path.join(cls.dir, "tokens")
        with open(token_file, "w", encoding="ascii") as f:
            f.write("py-secret\n")
        cls.daemon = tokensampler.Daemon(os.environ["TOKENSAMPLERD"], tcp=True, args=[
            "--threads=1", "--health_listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
            f"--tls_cert={cls.pki['server.pem']}", f"--tls_key={cls.pki['server.key']}",
            f"--tls_client_ca={cls.pki['ca.pem']}", f"--auth_token_file={token_file}"])
        cls.daemon.start()
        cls.tcp = cls.daemon.addresses[1]

    @classmethod
    def tearDownClass(cls):
        exit_code = cls.daemon.stop()
        shutil.rmtree(cls.dir, ignore_errors=True)
        if exit_code != 0:
            raise AssertionError(f"tokensamplerd exited with {exit_code}:\n{cls.daemon.stderr()}")

    def client(self, target=None, **kwargs):
        return tokensampler.Client(target or self.tcp, timeout=20, **kwargs)

    def mtls(self, **kwargs):
        return dict(root_certificates=read(self.pki["ca.pem"]),
                    certificate_chain=read(self.pki["client.pem"]),
                    private_key=read(self.pki["client.key"]), **kwargs)

    def assert_fails(self, code, client):
        with client, self.assertRaises(tokensampler.TokenSamplerError) as caught:
            client.sample(LOGITS, GREEDY)
        self.assertEqual(caught.exception.code, code, caught.exception.details)
        return caught.exception

    def test_mutual_tls_and_token_sample(self):
        with self.client(**self.mtls(token="py-secret")) as client:
            np.testing.assert_array_equal(client.sample(LOGITS, GREEDY).token_ids, [[3], [0]])

    def test_missing_or_wrong_token_is_unauthenticated(self):
        error = self.assert_fails(grpc.StatusCode.UNAUTHENTICATED, self.client(**self.mtls()))
        self.assertIn("missing bearer token", error.details)
        error = self.assert_fails(grpc.StatusCode.UNAUTHENTICATED,
                                  self.client(**self.mtls(token="py-secreT")))
        self.assertEqual(error.details, "invalid bearer token")

    def test_tls_without_a_client_certificate_or_from_another_ca_cannot_connect(self):
        self.assert_fails(grpc.StatusCode.UNAVAILABLE,
                          self.client(root_certificates=read(self.pki["ca.pem"]),
                                      token="py-secret"))
        self.assert_fails(grpc.StatusCode.UNAVAILABLE, self.client(
            root_certificates=read(self.pki["ca.pem"]),
            certificate_chain=read(self.pki["other_client.pem"]),
            private_key=read(self.pki["other_client.key"]), token="py-secret"))
        self.assert_fails(grpc.StatusCode.UNAVAILABLE, self.client(token="py-secret"))  # plaintext

    def test_unix_socket_is_plaintext_but_needs_the_token(self):
        self.assert_fails(grpc.StatusCode.UNAUTHENTICATED, self.client(self.daemon.target))
        with self.client(self.daemon.target, token="py-secret") as client:
            self.assertEqual(client.sample(LOGITS, GREEDY).token_ids[0, 0], 3)

    def test_session_needs_the_token(self):
        with self.client(self.daemon.target) as client, client.session() as session:
            with self.assertRaises(tokensampler.TokenSamplerError) as caught:
                session.add([1], GREEDY)
            self.assertEqual(caught.exception.code, grpc.StatusCode.UNAUTHENTICATED)
        with self.client(**self.mtls(token="py-secret")) as client, client.session() as session:
            session.add([1, 2], GREEDY)
            np.testing.assert_array_equal(session.step(LOGITS, [1, 2]).token_ids, [3, 0])

    def test_health_needs_no_token_and_has_its_own_port(self):
        with self.client(self.daemon.target) as client:
            self.assertTrue(client.health())
        with self.client(self.daemon.health_addresses[0]) as probe:
            self.assertTrue(probe.health())
            self.assertTrue(probe.health("tokensampler.v1.Sampler"))
            with self.assertRaises(tokensampler.TokenSamplerError) as caught:
                probe.sample(LOGITS, GREEDY)
            self.assertEqual(caught.exception.code, grpc.StatusCode.UNIMPLEMENTED)

    def test_metrics_count_the_refusals(self):
        self.assert_fails(grpc.StatusCode.UNAUTHENTICATED, self.client(self.daemon.target))
        url = f"http://{self.daemon.metrics_address}/metrics"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=20) as response:
            text = response.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        self.assertGreaterEqual(
            samples['tokensampler_rejected_total{reason="unauthenticated",rpc="Sample"}'], 1)
        self.assertEqual(samples["tokensampler_serving"], 1)

    def test_bad_client_options_raise_value_error(self):
        with self.assertRaises(ValueError):
            tokensampler.Client(self.tcp, certificate_chain=b"x")
        with self.assertRaises(ValueError):
            tokensampler.Client(self.tcp, token="two\nlines")


if __name__ == "__main__":
    unittest.main()
