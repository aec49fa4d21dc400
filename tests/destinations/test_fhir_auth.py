"""Secret references and the FHIR destination's authentication, against a scripted FHIR server
and token endpoint that check what a real authorisation server would."""

import base64
import json
import os
import shutil
import tempfile
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from interface_engine import secrets
from interface_engine.destinations import Result
from interface_engine.destinations.auth import BearerToken, ClientCredentials, NoAuth, SmartBackendServices
from interface_engine.destinations.fhir import FHIRDestination
from tests.fhir_server import HANG, FakeHTTPServer, Reply, Seen

SECRET = "s3cr3t:with/odd+chars"
CLIENT_ID = "engine:1"
TIMEOUT = 0.5
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def token_answer(token: str, expires_in=3600) -> Reply:
    body = {"access_token": token, "token_type": "Bearer"}
    if expires_in is not None:
        body["expires_in"] = expires_in
    return Reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})


def b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def temporary_directory(case: unittest.TestCase) -> str:
    path = tempfile.mkdtemp(prefix="ie-fhir-auth-")
    case.addCleanup(shutil.rmtree, path, True)
    return path


class Env:
    """Set environment variables for one test."""

    def __init__(self, case: unittest.TestCase):
        self.case = case

    def __setitem__(self, name: str, value: str):
        old = os.environ.get(name)
        os.environ[name] = value
        self.case.addCleanup(self._restore, name, old)

    @staticmethod
    def _restore(name: str, old: str | None):
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


class SecretReferenceTests(unittest.TestCase):
    def setUp(self):
        self.env = Env(self)
        self.dir = temporary_directory(self)

    def test_env_and_file_references_resolve_stripped(self):
        self.env["IE_TEST_SECRET"] = f"  {SECRET}\n"
        self.assertEqual(secrets.resolve("env:IE_TEST_SECRET", what="auth.client_secret"), SECRET)
        path = os.path.join(self.dir, "secret")
        with open(path, "w") as f:
            f.write(SECRET + "\n")
        self.assertEqual(secrets.resolve(f"file:{path}", what="auth.client_secret"), SECRET)

    def test_a_literal_is_refused_without_being_repeated(self):
        for literal in (SECRET, "", "env:", "file:", "Bearer abc"):
            with self.assertRaises(secrets.SecretError) as raised:
                secrets.resolve(literal, what="auth.token")
            self.assertEqual(str(raised.exception), "auth.token: expected a reference such as "
                                                    "env:NAME or file:/path, not a literal secret")

    def test_a_missing_variable_or_file_is_named(self):
        os.environ.pop("IE_TEST_NO_SUCH_VAR", None)
        with self.assertRaises(secrets.SecretError) as raised:
            secrets.resolve("env:IE_TEST_NO_SUCH_VAR", what="auth.client_secret")
        self.assertEqual(str(raised.exception),
                         "auth.client_secret: environment variable IE_TEST_NO_SUCH_VAR is not set")
        missing = os.path.join(self.dir, "none")
        with self.assertRaises(secrets.SecretError) as raised:
            secrets.resolve(f"file:{missing}", what="auth.private_key")
        self.assertEqual(str(raised.exception),
                         f"auth.private_key: cannot read {missing}: No such file or directory")

    def test_empty_values_are_refused(self):
        self.env["IE_TEST_EMPTY"] = "  "
        self.assertRaises(secrets.SecretError, secrets.resolve, "env:IE_TEST_EMPTY", what="x")
        path = os.path.join(self.dir, "empty")
        open(path, "w").close()
        self.assertRaises(secrets.SecretError, secrets.resolve, f"file:{path}", what="x")

    def test_is_reference(self):
        self.assertTrue(secrets.is_reference("env:X"))
        self.assertTrue(secrets.is_reference("file:/run/secrets/x"))
        for value in ("env:", "file:", "X", "ENV:X", None, 3):
            self.assertFalse(secrets.is_reference(value), value)


class AuthTestCase(unittest.TestCase):
    """A scripted FHIR server and token endpoint on one port; a Clock for token lifetimes."""

    def setUp(self):
        self.env = Env(self)
        self.server = FakeHTTPServer().start()
        self.addCleanup(self.server.stop)
        self.token_url = self.server.url("/token")
        self.clock = Clock()
        self.clock.advance(time.time())  # starts at the wall clock, like JWT times
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def destination(self, auth) -> FHIRDestination:
        dest = FHIRDestination("fhir", self.server.url(), auth=auth, timeout=TIMEOUT)
        self.addCleanup(dest.close)
        return dest

    def fhir_requests(self) -> list[Seen]:
        return [r for r in self.server.requests if r.path == "/fhir"]

    def token_requests(self) -> list[Seen]:
        return [r for r in self.server.requests if r.path == "/token"]

    def bearers(self) -> list[str | None]:
        return [r.headers.get("authorization") for r in self.fhir_requests()]

    def assert_never_logged(self, *texts: str):
        logged = "\n".join(formatEvent(e) for e in self.events)
        for text in texts:
            self.assertNotIn(text, logged)


class BearerTokenTests(AuthTestCase):
    async def test_the_token_is_sent_as_a_bearer(self):
        self.env["IE_TEST_TOKEN"] = "static-token-1"
        dest = self.destination(BearerToken("env:IE_TEST_TOKEN"))
        for _ in range(2):
            self.assertTrue((await dest.deliver(b"{}")).ok)
        self.assertEqual(self.bearers(), ["Bearer static-token-1"] * 2)
        self.assert_never_logged("static-token-1")

    async def test_no_auth_sends_no_authorization(self):
        self.assertTrue((await self.destination(NoAuth()).deliver(b"{}")).ok)
        self.assertEqual(self.bearers(), [None])

    def test_a_token_that_could_split_a_header_is_refused(self):
        self.env["IE_TEST_TOKEN"] = "abc\r\nX-Injected: 1"
        with self.assertRaises(secrets.SecretError) as raised:
            BearerToken("env:IE_TEST_TOKEN")
        self.assertNotIn("abc", str(raised.exception))
        self.assertRaises(secrets.SecretError, BearerToken, "static-token-literal")


class ClientCredentialsTests(AuthTestCase):
    def setUp(self):
        super().setUp()
        self.env["IE_TEST_CLIENT_SECRET"] = SECRET
        self.issued = 0
        self.server.script["/token"] = self.token_endpoint

    def token_endpoint(self, seen: Seen) -> Reply:
        scheme, _, credentials = seen.headers.get("authorization", "").partition(" ")
        user, _, password = base64.b64decode(credentials).decode().partition(":")
        # RFC 6749 §2.3.1: both parts form-urlencoded before base64.
        if scheme != "Basic" or (user, password) != ("engine%3A1", "s3cr3t%3Awith%2Fodd%2Bchars"):
            return Reply(401, b'{"error":"invalid_client"}')
        if seen.headers["content-type"] != "application/x-www-form-urlencoded":
            return Reply(400, b'{"error":"invalid_request"}')
        if seen.form() != {"grant_type": "client_credentials", "scope": "system/*.write"}:
            return Reply(400, b'{"error":"invalid_request"}')
        self.issued += 1
        return token_answer(f"cc-token-{self.issued}")

    def auth(self, **kwargs):
        return ClientCredentials(self.token_url, CLIENT_ID, "env:IE_TEST_CLIENT_SECRET",
                                 scope="system/*.write", clock=self.clock, **kwargs)

    async def test_the_token_is_fetched_once_and_cached_until_near_expiry(self):
        dest = self.destination(self.auth())
        for _ in range(3):
            self.assertTrue((await dest.deliver(b"{}")).ok)
        self.assertEqual(len(self.token_requests()), 1)
        self.clock.advance(3600 - 60 - 1)  # renewed 60 s (at most 10 %) before it expires
        self.assertTrue((await dest.deliver(b"{}")).ok)
        self.assertEqual(len(self.token_requests()), 1)
        self.clock.advance(2)
        self.assertTrue((await dest.deliver(b"{}")).ok)
        self.assertEqual(len(self.token_requests()), 2)
        self.assertEqual(self.bearers(), ["Bearer cc-token-1"] * 4 + ["Bearer cc-token-2"])
        self.assert_never_logged("cc-token-", SECRET, "engine%3A1:")

    async def test_a_short_lived_token_is_renewed_at_ninety_percent_of_its_life(self):
        self.server.script["/token"] = [token_answer("short-1", 100), token_answer("short-2", 100)]
        dest = self.destination(self.auth())
        self.assertTrue((await dest.deliver(b"{}")).ok)
        self.clock.advance(89)
        self.assertTrue((await dest.deliver(b"{}")).ok)
        self.clock.advance(2)
        self.assertTrue((await dest.deliver(b"{}")).ok)
        self.assertEqual(self.bearers(), ["Bearer short-1", "Bearer short-1", "Bearer short-2"])

    async def test_a_401_drops_the_token_and_the_next_attempt_fetches_a_new_one(self):
        self.server.script["/fhir"] = [Reply(401, b"")]
        dest = self.destination(self.auth())
        result = await dest.deliver(b"{}")
        self.assertEqual(result, Result(ok=False, response=b"", error="HTTP 401: not authorised", retry=True))
        self.assertTrue((await dest.deliver(b"{}")).ok)
        self.assertEqual(self.bearers(), ["Bearer cc-token-1", "Bearer cc-token-2"])
        self.assertEqual(len(self.token_requests()), 2)

    async def test_a_refused_client_is_a_retryable_failure_that_names_no_secret(self):
        self.env["IE_TEST_CLIENT_SECRET"] = "wrong-secret-value"
        self.server.script["/token"] = [Reply(401, json.dumps(
            {"error": "invalid_client", "error_description": "client authentication failed"}).encode())]
        result = await self.destination(self.auth()).deliver(b"{}")
        self.assertEqual(result, Result(ok=False, retry=True, error="token endpoint answered HTTP 401: "
                                        "invalid_client (client authentication failed)"))
        self.assertEqual(self.fhir_requests(), [])
        self.assert_never_logged("wrong-secret-value")

    async def test_token_endpoint_trouble_is_retryable_and_keeps_retry_after(self):
        self.server.script["/token"] = [Reply(503, b"<html>down</html>", {"Retry-After": "30"}),
                                        Reply(500, b""), HANG]
        dest = self.destination(self.auth())
        self.assertEqual(await dest.deliver(b"{}"), Result(
            ok=False, retry=True, error="token endpoint answered HTTP 503", retry_after=30.0))
        self.assertEqual((await dest.deliver(b"{}")).error, "token endpoint answered HTTP 500")
        started = time.monotonic()
        self.assertEqual(await dest.deliver(b"{}"), Result(
            ok=False, retry=True, error=f"token endpoint: no answer within {TIMEOUT:g}s"))
        self.assertLess(time.monotonic() - started, TIMEOUT + 1.0)
        self.assertEqual(self.fhir_requests(), [])

    async def test_an_unreachable_token_endpoint(self):
        await self.server.stop()
        self.server.start()  # another port: the token URL now points nowhere
        result = await self.destination(self.auth()).deliver(b"{}")
        self.assertEqual((result.ok, result.retry), (False, True))
        self.assertTrue(result.error.startswith("token endpoint: connection refused by 127.0.0.1:"),
                        result.error)

    async def test_a_malformed_token_answer_is_refused_without_quoting_it(self):
        answers = [Reply(200, b"not json leaked-1"),
                   Reply(200, b'{"token_type":"Bearer","note":"leaked-2"}'),
                   Reply(200, b'{"access_token":"leaked-3","token_type":"mac"}'),
                   Reply(200, b'{"access_token":"leaked 4","token_type":"Bearer"}'),
                   Reply(200, b'{"access_token":"leaked-5","token_type":"bearer","expires_in":"soon"}')]
        self.server.script["/token"] = list(answers)
        dest = self.destination(self.auth())
        errors = [(await dest.deliver(b"{}")).error for _ in answers]
        self.assertEqual(errors, ["token endpoint: the answer is not JSON",
                                  "token endpoint: no usable access_token in the answer",
                                  "token endpoint: token_type is not Bearer",
                                  "token endpoint: no usable access_token in the answer",
                                  "token endpoint: expires_in is not a number"])
        self.assertEqual(self.fhir_requests(), [])
        self.assert_never_logged("leaked")

    async def test_no_expires_in_means_a_default_lifetime(self):
        self.server.script["/token"] = [token_answer("no-exp-1", None), token_answer("no-exp-2", None)]
        dest = self.destination(self.auth())
        self.assertTrue((await dest.deliver(b"{}")).ok)
        self.clock.advance(250)
        self.assertTrue((await dest.deliver(b"{}")).ok)
        self.clock.advance(30)
        self.assertTrue((await dest.deliver(b"{}")).ok)
        self.assertEqual(len(self.token_requests()), 2)

    def test_no_scope_is_sent_when_none_is_configured(self):
        auth = ClientCredentials(self.token_url, CLIENT_ID, "env:IE_TEST_CLIENT_SECRET")
        headers, fields = auth._request()
        self.assertEqual(fields, {"grant_type": "client_credentials"})

    def test_a_token_url_in_clear_is_refused_unless_on_this_machine(self):
        with self.assertRaises(ValueError) as raised:
            ClientCredentials("http://auth.example.org/token", CLIENT_ID, "env:IE_TEST_CLIENT_SECRET")
        self.assertIn("in clear", str(raised.exception))
        ClientCredentials("https://auth.example.org/token", CLIENT_ID, "env:IE_TEST_CLIENT_SECRET")
        ClientCredentials("http://[::1]:8080/token", CLIENT_ID, "env:IE_TEST_CLIENT_SECRET")

    def test_a_literal_secret_is_refused_without_being_repeated(self):
        with self.assertRaises(secrets.SecretError) as raised:
            ClientCredentials(self.token_url, CLIENT_ID, "literal-secret-value")
        self.assertNotIn("literal-secret-value", str(raised.exception))
        self.assertIn("auth.client_secret", str(raised.exception))


def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def p384_key():
    return ec.generate_private_key(ec.SECP384R1())


def pem(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


class SmartBackendServicesTests(AuthTestCase):
    """The token endpoint checks the client assertion as a SMART authorisation server does."""

    def setUp(self):
        super().setUp()
        self.server.script["/token"] = self.token_endpoint
        self.public_key = None
        self.seen_jti: set[str] = set()
        self.claims: list[dict] = []
        self.issued = 0

    def key_file(self, key) -> str:
        path = os.path.join(temporary_directory(self), "key.pem")
        with open(path, "w") as f:
            f.write(pem(key))
        self.public_key = key.public_key()
        return path

    def refuse(self, why: str) -> Reply:
        return Reply(400, json.dumps({"error": "invalid_client", "error_description": why}).encode())

    def token_endpoint(self, seen: Seen) -> Reply:
        form = seen.form()
        if "authorization" in seen.headers:
            return self.refuse("no client secret expected")
        if form.get("grant_type") != "client_credentials" or form.get("scope") != "system/*.write":
            return self.refuse("grant_type or scope")
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            return self.refuse("client_assertion_type")
        head, body, signature = form["client_assertion"].split(".")
        header, claims = json.loads(b64decode(head)), json.loads(b64decode(body))
        signed, signature = f"{head}.{body}".encode(), b64decode(signature)
        try:
            if header["alg"] == "RS384":
                self.public_key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA384())
            elif header["alg"] == "ES384":
                if len(signature) != 96:
                    return self.refuse("ES384 signature is not r||s")
                der = encode_dss_signature(int.from_bytes(signature[:48], "big"),
                                           int.from_bytes(signature[48:], "big"))
                self.public_key.verify(der, signed, ec.ECDSA(hashes.SHA384()))
            else:
                return self.refuse("alg")
        except InvalidSignature:
            return self.refuse("signature")
        if header.get("typ") != "JWT" or header.get("kid") != "key-2026":
            return self.refuse("typ or kid")
        now = self.clock.seconds()  # the client's clock: tests move it to age tokens
        if claims["iss"] != CLIENT_ID or claims["sub"] != CLIENT_ID or claims["aud"] != self.token_url:
            return self.refuse("iss, sub or aud")
        if not now < claims["exp"] <= now + 300:
            return self.refuse("exp")
        if len(claims["jti"]) < 16 or claims["jti"] in self.seen_jti:
            return self.refuse("jti")
        self.seen_jti.add(claims["jti"])
        self.claims.append(claims)
        self.issued += 1
        return token_answer(f"smart-token-{self.issued}", 300)

    def auth(self, key, algorithm: str, **kwargs):
        return SmartBackendServices(self.token_url, CLIENT_ID, f"file:{self.key_file(key)}",
                                    key_id="key-2026", algorithm=algorithm, clock=self.clock, **kwargs)

    async def check_signed_assertions_get_tokens(self, key, algorithm: str):
        dest = self.destination(self.auth(key, algorithm))
        result = await dest.deliver(b"{}")
        self.assertTrue(result.ok, result.error)
        self.assertTrue((await dest.deliver(b"{}")).ok)  # cached
        self.clock.advance(300 - 30 + 1)  # 10 % of 300 s before expiry
        result = await dest.deliver(b"{}")
        self.assertTrue(result.ok, result.error)
        self.assertEqual(self.bearers(), ["Bearer smart-token-1"] * 2 + ["Bearer smart-token-2"])
        self.assertEqual(len(self.claims), 2)  # each with its own jti, checked by the endpoint
        self.assert_never_logged("smart-token-", "PRIVATE KEY", self.token_requests()[0].form()["client_assertion"])

    async def test_rs384(self):
        await self.check_signed_assertions_get_tokens(rsa_key(), "RS384")

    async def test_es384(self):
        await self.check_signed_assertions_get_tokens(p384_key(), "ES384")

    async def test_a_wrong_key_is_refused_by_the_server_and_retryable(self):
        auth = self.auth(rsa_key(), "RS384")
        self.public_key = rsa_key().public_key()  # the server knows another key
        result = await self.destination(auth).deliver(b"{}")
        self.assertEqual(result, Result(ok=False, retry=True,
                                        error="token endpoint answered HTTP 400: invalid_client (signature)"))

    async def test_the_assertion_has_the_smart_claims(self):
        auth = self.auth(p384_key(), "ES384")
        head, body, _ = auth.assertion().split(".")
        self.assertEqual(json.loads(b64decode(head)), {"alg": "ES384", "typ": "JWT", "kid": "key-2026"})
        claims = json.loads(b64decode(body))
        now = int(self.clock.seconds())
        self.assertEqual((claims["iss"], claims["sub"], claims["aud"]), (CLIENT_ID, CLIENT_ID, self.token_url))
        self.assertTrue(now < claims["exp"] <= now + 300)
        self.assertNotEqual(claims["jti"], json.loads(b64decode(auth.assertion().split(".")[1]))["jti"])

    def test_keys_that_do_not_fit_the_algorithm_are_refused_without_showing_them(self):
        cases = [(p384_key(), "RS384"), (rsa_key(), "ES384"),
                 (ec.generate_private_key(ec.SECP256R1()), "ES384"),
                 (rsa.generate_private_key(public_exponent=65537, key_size=1024), "RS384")]
        for key, algorithm in cases:
            with self.assertRaises(secrets.SecretError) as raised:
                self.auth(key, algorithm)
            self.assertTrue(str(raised.exception).startswith("auth.private_key: "), raised.exception)
            self.assertNotIn("PRIVATE", str(raised.exception))
        self.env["IE_TEST_NOT_A_KEY"] = "-----BEGIN PRIVATE KEY-----\nnot-base64-secret\n-----END PRIVATE KEY-----"
        with self.assertRaises(secrets.SecretError) as raised:
            SmartBackendServices(self.token_url, CLIENT_ID, "env:IE_TEST_NOT_A_KEY")
        self.assertNotIn("not-base64-secret", str(raised.exception))
        self.assertRaises(ValueError, self.auth, rsa_key(), "HS256")
