"""TLS for MLLP, both ways: TLS 1.2 or 1.3 only, AEAD suites only, certificates from files.

A listener with `client_ca` set is an authenticated node in the IHE ATNA sense:
the client must present a certificate signed by that CA, and, with
`allowed_subjects`, one of the names listed. All of it is decided inside the
handshake, so a refused peer never sends a byte that reaches the HL7 parser.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from .config import Section

#: TLS 1.2 suites with authenticated encryption; every TLS 1.3 suite is AEAD already.
AEAD_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"
VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

# OpenSSL's X509_V_ERR_* numbers for the refusals an operator needs to tell apart.
_VERIFY_ERRORS = {
    9: "client certificate is not yet valid",
    10: "client certificate has expired",
    18: "client certificate is self-signed",
    19: "client certificate chain ends in an untrusted self-signed certificate",
    20: "client certificate is not signed by the configured CA",
    21: "client certificate is not signed by the configured CA",
    23: "client certificate has been revoked",
    7: "client certificate signature does not verify",
}


class TLSConfigError(ValueError):
    """A certificate or key file cannot be used; the text names the file."""


@dataclass(frozen=True, slots=True)
class ServerTLS:
    cert: str
    key: str
    client_ca: str | None = None
    allowed_subjects: tuple[str, ...] = ()
    min_version: str = "1.2"


@dataclass(frozen=True, slots=True)
class ClientTLS:
    ca: str | None = None             # None: the system's trusted CAs
    cert: str | None = None           # a client certificate, for a listener that asks for one
    key: str | None = None
    server_name: str | None = None    # the name the server's certificate must carry; default: host
    min_version: str = "1.2"


def read_server(section: Section) -> ServerTLS | None:
    """A listener's optional [tls] table; the files are checked now, not at the first connection."""
    if not section.data:
        return None
    allowed = section.strings("allowed_subjects", None) if "allowed_subjects" in section.data else ()
    config = ServerTLS(cert=section.str("cert", None), key=section.str("key", None),
                       client_ca=section.text("client_ca", None), allowed_subjects=tuple(allowed),
                       min_version=section.str("min_version", "1.2", tuple(VERSIONS)))
    if config.allowed_subjects and not config.client_ca:
        section.fail("allowed_subjects", "needs client_ca: only a verified client certificate has a subject to check")
    section.done()
    _check(section, lambda: server_context(config))
    return config


def read_client(section: Section) -> ClientTLS | None:
    """An MLLP destination's optional [tls] table."""
    if not section.data:
        return None
    config = ClientTLS(ca=section.text("ca", None), cert=section.text("cert", None),
                       key=section.text("key", None), server_name=section.text("server_name", None),
                       min_version=section.str("min_version", "1.2", tuple(VERSIONS)))
    if (config.cert is None) != (config.key is None):
        section.fail("cert" if config.cert is None else "key", "cert and key go together")
    section.done()
    _check(section, lambda: client_options(config, "localhost"))
    return config


def _check(section: Section, build):
    try:
        build()
    except TLSConfigError as e:
        section.fail(e.args[1], e.args[0])


def _load(what: str, key: str, loader):
    try:
        return loader()
    except OSError as e:
        raise TLSConfigError(f"cannot read {what}: {e.strerror or e}", key) from None
    except (SSL.Error, crypto.Error, ValueError, TypeError):
        raise TLSConfigError(f"not a usable PEM {what}", key) from None


@implementer(IOpenSSLServerConnectionCreator)
class ServerConnectionCreator:
    """One context for the listener; tells each refused connection why verification refused it."""

    def __init__(self, config: ServerTLS):
        self.config = config
        self._context = server_context(config, self._verify)

    def serverConnectionForTLS(self, tls_protocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)

    def _verify(self, connection, certificate, error_number, depth, ok) -> bool:
        protocol = connection.get_app_data()
        if not ok:
            _refuse(protocol, _VERIFY_ERRORS.get(error_number, f"client certificate refused "
                                                              f"(verify error {error_number})"))
            return False
        if depth == 0 and self.config.allowed_subjects:
            subject = certificate.to_cryptography().subject
            names = {subject.rfc4514_string()} | {
                a.value for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
            if not names & set(self.config.allowed_subjects):
                _refuse(protocol, "client certificate subject is not on the allow-list")
                return False
        return True


class TLSListenerFactory(TLSMemoryBIOFactory):
    """TLS around the MLLP factory, keeping its right to refuse a connection (caps) at accept."""

    noisy = False

    def __init__(self, config: ServerTLS, wrapped):
        super().__init__(ServerConnectionCreator(config), False, wrapped)

    def buildProtocol(self, addr):
        wrapped = self.wrappedFactory.buildProtocol(addr)
        return None if wrapped is None else self.protocol(self, wrapped)


def handshake_error(reason) -> str:
    """OpenSSL's reason for a failed handshake, in words."""
    errors = getattr(reason.value, "args", [None])[0]
    if isinstance(errors, list) and errors and isinstance(errors[-1], tuple):
        return str(errors[-1][-1]) or "TLS handshake failed"
    return str(reason.value) or type(reason.value).__name__


def _refuse(tls_protocol, reason: str):
    wrapped = getattr(tls_protocol, "wrappedProtocol", None)
    if wrapped is not None:
        wrapped.tls_refusal = reason


def server_context(config: ServerTLS, verify=None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(VERSIONS[config.min_version])
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_TICKET)
    ctx.set_cipher_list(AEAD_CIPHERS.encode())
    _load("certificate", "cert", lambda: open(config.cert, "rb").close())
    _load("certificate", "cert", lambda: ctx.use_certificate_chain_file(config.cert))
    key = _load("private key", "key", lambda: serialization.load_pem_private_key(
        open(config.key, "rb").read(), password=None))
    try:
        ctx.use_privatekey(key)
        ctx.check_privatekey()
    except SSL.Error:
        raise TLSConfigError(f"the private key does not match the certificate {config.cert}", "key") from None
    if config.client_ca:
        _load("CA certificate", "client_ca", lambda: open(config.client_ca, "rb").close())
        _load("CA certificate", "client_ca", lambda: ctx.load_verify_locations(config.client_ca))
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                       verify or (lambda _c, _x, _e, _d, ok: bool(ok)))
        # Session resumption would skip the client check on a later connection.
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return ctx


def client_options(config: ClientTLS, host: str):
    """Twisted's client TLS options: the server's certificate and name are always verified."""
    from twisted.internet import ssl
    from twisted.internet.ssl import TLSVersion

    if config.ca:
        pem = _load("CA certificate", "ca", lambda: open(config.ca, "rb").read())
        roots = [ssl.Certificate.loadPEM(block) for block in _pem_blocks(pem, "ca")]
        trust = ssl.trustRootFromCertificates(roots)
    else:
        trust = ssl.platformTrust()
    client_cert = None
    if config.cert:
        cert = _load("certificate", "cert", lambda: open(config.cert, "rb").read())
        key = _load("private key", "key", lambda: open(config.key, "rb").read())
        client_cert = _load("certificate and key", "cert",
                            lambda: ssl.PrivateCertificate.loadPEM(cert + b"\n" + key))
    minimum = TLSVersion.TLSv1_3 if config.min_version == "1.3" else TLSVersion.TLSv1_2
    return ssl.optionsForClientTLS(
        config.server_name or host, trustRoot=trust, clientCertificate=client_cert,
        extraCertificateOptions={"raiseMinimumTo": minimum,
                                 "acceptableCiphers": ssl.AcceptableCiphers.fromOpenSSLCipherString(AEAD_CIPHERS)})


def _pem_blocks(pem: bytes, key: str) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    blocks = [part + marker for part in pem.split(marker) if b"-----BEGIN CERTIFICATE-----" in part]
    if not blocks:
        raise TLSConfigError("not a usable PEM CA certificate", key)
    return blocks
