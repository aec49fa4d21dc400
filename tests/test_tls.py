"""TLS on MLLP against a test CA: who is served, who is refused (and why), on both sides of the wire."""

from __future__ import annotations

import select
import socket
import sqlite3
import time

import pytest
from OpenSSL import SSL

from interface_engine import hl7
from interface_engine.config import ConfigError
from interface_engine.mllp import MLLPClient
from interface_engine.mllp.client import MLLPError, tls_context
from tests.messages import adt_a01
from tests.pki import TestCA
from tests.test_channels_e2e import Setup
from tests.test_cli import assert_one_line_error, cli


@pytest.fixture
def pki(tmp_path):
    ca = TestCA(tmp_path / "pki")
    return {"ca": ca, "server": ca.issue("localhost", server=True), "client": ca.issue("lab-system"),
            "other_ca": TestCA(tmp_path / "pki" / "other", "Other CA")}


@pytest.fixture
def mtls_engine(engine_factory, pki):
    server = pki["server"]
    return engine_factory(listener={"tls": {
        "cert": str(server.cert), "key": str(server.key), "client_ca": str(pki["ca"].cert),
        "allowed_subjects": ["lab-system", "CN=ris,O=Example Test Hospital"]}})


def stored(engine) -> int:
    with sqlite3.connect(engine.store_url.removeprefix("sqlite:///")) as db:
        return db.execute("SELECT count(*) FROM messages").fetchone()[0]


def openssl_client(port: int, *, cert=None, key=None, ca=None, max_version=None, ciphers=None):
    """A raw pyOpenSSL client: it can present what Python's ssl refuses to (a key that does not match)."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    if max_version is not None:
        ctx.set_min_proto_version(SSL.TLS1_VERSION)
        ctx.set_max_proto_version(max_version)
    if ciphers:
        ctx.set_cipher_list(ciphers.encode())
    if key:
        ctx.use_privatekey_file(str(key))
    if cert:
        ctx.use_certificate_file(str(cert))
    if ca:
        ctx.load_verify_locations(str(ca))
    conn = Blocking(ctx, socket.create_connection(("127.0.0.1", port), timeout=5))
    conn.set_connect_state()
    return conn


class Blocking(SSL.Connection):
    """pyOpenSSL on a socket with a timeout is non-blocking; wait for the socket as a blocking client would."""

    def _wait(self, call, *args):
        deadline = time.monotonic() + 5
        while True:
            try:
                return call(self, *args)
            except (SSL.WantReadError, SSL.WantWriteError):
                if time.monotonic() > deadline:
                    raise TimeoutError("no TLS progress within 5 s") from None
                select.select([self.fileno()], [], [], 0.1)

    def do_handshake(self):
        return self._wait(SSL.Connection.do_handshake)

    def sendall(self, data):
        return self._wait(SSL.Connection.sendall, data)

    def recv(self, size):
        return self._wait(SSL.Connection.recv, size)


def try_hl7(conn) -> bytes:
    """Handshake, send a message, read the answer; what came back (b"" for nothing) or the TLS error."""
    try:
        conn.do_handshake()
        conn.sendall(b"\x0b" + adt_a01("TLS-REFUSED") + b"\x1c\r")
        return conn.recv(65536)
    except (SSL.Error, OSError) as e:
        return repr(e).encode()
    finally:
        conn.close()


def refusals(engine) -> list[tuple]:
    """The auth.failed events of the engine's audit trail: (listener, peer, detail)."""
    with sqlite3.connect(engine.store_url.removeprefix("sqlite:///")) as db:
        return db.execute("SELECT object_id, source, detail FROM audit_events "
                          "WHERE action = 'auth.failed' ORDER BY id").fetchall()


def wait_for_log(engine, text: str, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while text not in engine.log():
        if time.monotonic() > deadline:
            raise AssertionError(f"not in the engine log: {text!r}\n{engine.log()[-2000:]}")
        time.sleep(0.05)


def test_a_client_with_a_valid_certificate_is_served_over_aead(mtls_engine, pki):
    conn = openssl_client(mtls_engine.port, cert=pki["client"].cert, key=pki["client"].key, ca=pki["ca"].cert)
    conn.do_handshake()
    assert conn.get_protocol_version_name() in ("TLSv1.2", "TLSv1.3")
    assert any(aead in conn.get_cipher_name() for aead in ("GCM", "CHACHA20"))
    conn.sendall(b"\x0b" + adt_a01("TLS-OK") + b"\x1c\r")
    answer = conn.recv(65536)
    conn.close()
    assert hl7.parse(answer.strip(b"\x0b\x1c\r"))["MSA-1"] == "AA"
    assert stored(mtls_engine) == 1


@pytest.mark.parametrize("client, reason", [
    ("none", "peer did not return a certificate"),
    ("expired", "client certificate has expired"),
    ("self_signed", "client certificate is self-signed"),
    ("unknown_ca", "client certificate is not signed by the configured CA"),
    ("wrong_key", "refused TLS connection from 127.0.0.1"),
    ("not_allowed", "client certificate subject is not on the allow-list"),
])
def test_each_bad_client_is_refused_before_any_hl7_is_read(mtls_engine, pki, client, reason):
    ca = pki["ca"]
    issued = {"none": None, "expired": ca.issue("lab-system", expired=True),
              "self_signed": ca.self_signed("lab-system"),
              "unknown_ca": pki["other_ca"].issue("lab-system"),
              "wrong_key": ca.wrong_key(pki["client"]),
              "not_allowed": ca.issue("billing-system")}[client]
    conn = openssl_client(mtls_engine.port, cert=issued and issued.cert, key=issued and issued.key,
                          ca=ca.cert)
    answer = try_hl7(conn)
    assert b"MSA" not in answer
    wait_for_log(mtls_engine, reason)
    assert "refused TLS connection from 127.0.0.1 on test" in mtls_engine.log()
    assert stored(mtls_engine) == 0
    assert "TLS-REFUSED" not in mtls_engine.log()
    wait_until(lambda: refusals(mtls_engine), "the refusal in the audit trail")
    [(listener, peer, detail)] = refusals(mtls_engine)
    assert (listener, peer) == ("test", "127.0.0.1")
    if client != "wrong_key":
        assert reason in detail


def wait_until(condition, what: str, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_burst_of_refusals_is_one_audit_event(mtls_engine, pki):
    for _ in range(5):
        try_hl7(openssl_client(mtls_engine.port, ca=pki["ca"].cert))
    wait_for_log(mtls_engine, "peer did not return a certificate")
    wait_until(lambda: mtls_engine.log().count("refused TLS connection") == 5, "five refusals logged")
    wait_until(lambda: refusals(mtls_engine), "the refusal in the audit trail")
    time.sleep(0.3)
    assert len(refusals(mtls_engine)) == 1  # the other four are counted when the minute is over


def test_a_subject_allowed_by_its_full_name_is_served(mtls_engine, pki):
    ris = pki["ca"].issue("ris")
    conn = openssl_client(mtls_engine.port, cert=ris.cert, key=ris.key, ca=pki["ca"].cert)
    assert b"MSA|AA" in try_hl7(conn)


@pytest.mark.parametrize("version", [SSL.TLS1_VERSION, SSL.TLS1_1_VERSION])
def test_tls_1_0_and_1_1_are_refused(mtls_engine, pki, version):
    conn = openssl_client(mtls_engine.port, cert=pki["client"].cert, key=pki["client"].key,
                          max_version=version, ciphers="DEFAULT:@SECLEVEL=0")
    answer = try_hl7(conn)
    assert b"protocol version" in answer or b"unsupported protocol" in answer, answer
    wait_for_log(mtls_engine, "refused TLS connection")
    assert stored(mtls_engine) == 0


def test_suites_without_authenticated_encryption_are_refused(mtls_engine, pki):
    conn = openssl_client(mtls_engine.port, cert=pki["client"].cert, key=pki["client"].key,
                          max_version=SSL.TLS1_2_VERSION,
                          ciphers="ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA")
    answer = try_hl7(conn)
    assert b"handshake failure" in answer, answer
    wait_for_log(mtls_engine, "no shared cipher")
    assert stored(mtls_engine) == 0


def test_a_stalled_handshake_is_closed_on_the_frame_deadline(engine_factory, pki):
    server = pki["server"]
    engine = engine_factory(listener={"frame_timeout": "300ms",
                                      "tls": {"cert": str(server.cert), "key": str(server.key)}})
    with socket.create_connection(("127.0.0.1", engine.port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01")  # the start of a ClientHello, and nothing more
        started = time.monotonic()
        try:
            assert s.recv(100) == b""  # closed by the engine...
        except ConnectionResetError:
            pass  # ...or aborted
        assert time.monotonic() - started < 4
    wait_for_log(engine, "no TLS handshake within 0.3s")


def test_send_speaks_tls_with_a_client_certificate(mtls_engine, pki, tmp_path):
    message = tmp_path / "adt.hl7"
    message.write_bytes(adt_a01("TLS-SEND"))
    good = cli("send", message, "--port", mtls_engine.port, "--ca", pki["ca"].cert,
               "--server-name", "localhost", "--cert", pki["client"].cert, "--key", pki["client"].key)
    assert good.returncode == 0, good.stderr
    assert "\tAA\tTLS-SEND" in good.stdout
    # Without the right CA the engine's certificate is not trusted: no message leaves the client.
    untrusted = cli("send", message, "--port", mtls_engine.port, "--ca", pki["other_ca"].cert,
                    "--cert", pki["client"].cert, "--key", pki["client"].key)
    assert_one_line_error(untrusted, "TLS handshake with 127.0.0.1", "failed")
    assert stored(mtls_engine) == 1


def test_the_blocking_client_verifies_the_server_name(mtls_engine, pki):
    context = tls_context(str(pki["ca"].cert), str(pki["client"].cert), str(pki["client"].key))
    with pytest.raises(MLLPError, match="TLS handshake .* failed"):
        with MLLPClient("127.0.0.1", mtls_engine.port, tls=context, server_name="not-the-server.example"):
            pass


def destination_channel(port: int, tls: str) -> str:
    return f"""
name = "tls-out"
[source]
type = "mllp"
listener = "test"
[[destinations]]
name = "downstream"
type = "mllp"
host = "127.0.0.1"
port = {port}
ack_timeout = "2s"
connect_timeout = "2s"
[destinations.tls]
{tls}
[destinations.retry]
backoff = "200ms"
max_backoff = "500ms"
"""


@pytest.fixture
def downstream(engine_factory, pki, tmp_path):
    """Another engine as the downstream system, listening with mutual TLS."""
    server = pki["server"]
    (tmp_path / "down").mkdir()
    return engine_factory(workdir=tmp_path / "down", listener={"tls": {
        "cert": str(server.cert), "key": str(server.key), "client_ca": str(pki["ca"].cert)}})


def test_an_mllp_destination_delivers_over_mutual_tls(tmp_path, engine_factory, pki, downstream):
    (tmp_path / "up").mkdir()
    setup = Setup(tmp_path / "up", engine_factory)
    client = pki["client"]
    setup.channel("tls-out", destination_channel(downstream.port, f'ca = "{pki["ca"].cert}"\n'
                                                 f'cert = "{client.cert}"\nkey = "{client.key}"'))
    setup.start()
    assert setup.send(adt_a01("TLS-FWD"))[0][0] == "AA"
    setup.wait(lambda: stored(downstream) == 1, what="the message at the downstream engine")
    setup.wait(lambda: setup.store.count_deliveries(state="sent") == 1, what="the delivery sent")


@pytest.mark.parametrize("tls, why", [
    ('ca = "{other}"\ncert = "{cert}"\nkey = "{key}"', "certificate verify failed"),
    ('ca = "{ca}"\ncert = "{cert}"\nkey = "{key}"\nserver_name = "elsewhere.example"', "TLS handshake"),
])
def test_an_mllp_destination_refuses_a_server_it_cannot_verify(tmp_path, engine_factory, pki, downstream,
                                                                tls, why):
    (tmp_path / "up").mkdir()
    setup = Setup(tmp_path / "up", engine_factory)
    client = pki["client"]
    setup.channel("tls-out", destination_channel(downstream.port, tls.format(
        other=pki["other_ca"].cert, ca=pki["ca"].cert, cert=client.cert, key=client.key)))
    setup.start()
    assert setup.send(adt_a01("TLS-BAD"))[0][0] == "AA"
    setup.wait(lambda: any(why in (a["error"] or "") for d in setup.store.deliveries_of(1)
                           for a in d["attempt_log"]), what=f"an attempt failing with {why!r}")
    assert stored(downstream) == 0


@pytest.mark.parametrize("tls, error", [
    ({"cert": "missing.pem", "key": "k.pem"}, "listeners[0].tls.cert: cannot read certificate"),
    ({"key": "k.pem"}, "listeners[0].tls.cert: required key is missing"),
    ({"cert": "{cert}", "key": "{other_key}"}, "listeners[0].tls.key: the private key does not match"),
    ({"cert": "{cert}", "key": "{key}", "allowed_subjects": ["x"]}, "tls.allowed_subjects: needs client_ca"),
    ({"cert": "{cert}", "key": "{key}", "min_version": "1.1"}, "tls.min_version: expected one of 1.2, 1.3"),
])
def test_tls_config_errors_name_the_key(tmp_path, pki, tls, error):
    from interface_engine.config import parse

    server = pki["server"]
    other = pki["ca"].wrong_key(server)
    values = {k: ([x.format(cert=server.cert, key=server.key, other_key=other.key) for x in v]
                  if isinstance(v, list) else v.format(cert=server.cert, key=server.key, other_key=other.key))
              for k, v in tls.items()}
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]")):
        parse({"listeners": [{"name": "x", "tls": values}]}, "engine.toml")
