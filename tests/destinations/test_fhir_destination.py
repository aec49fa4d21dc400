"""FHIRDestination against the real FHIR test server, and against a scripted one for the
answers a real server cannot be made to give (503, 429, hangs, TLS trouble)."""

import datetime
import email.utils
import json
import os
import shutil
import socket
import tempfile
import time
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from interface_engine.destinations import Result
from interface_engine.destinations import fhir as fhir_module
from interface_engine.destinations.fhir import MAX_RESPONSE, FHIRDestination
from tests.fhir_server import CLOSE, HANG, STALL, FakeHTTPServer, Reply, request

TIMEOUT = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outcome(text: str, expression: str | None = None, code: str = "invalid") -> bytes:
    issue = {"severity": "error", "code": code, "diagnostics": text}
    if expression:
        issue["expression"] = [expression]
    return json.dumps({"resourceType": "OperationOutcome", "issue": [issue]}).encode()


def transaction(patient_id: str, observation_id: str, *, gender: str = "female",
                family: str = "Testfamily") -> bytes:
    """A small transaction Bundle of the kind the engine sends: PUT by id, so replays are safe."""
    patient = {"resourceType": "Patient", "id": patient_id, "gender": gender,
               "name": [{"family": family, "given": ["Ada"]}],
               "identifier": [{"system": "urn:oid:1.2.3.4", "value": patient_id}]}
    observation = {"resourceType": "Observation", "id": observation_id, "status": "final",
                   "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                   "subject": {"reference": f"Patient/{patient_id}"},
                   "valueQuantity": {"value": 72, "unit": "/min"}}
    return json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"Patient/{patient_id}", "resource": patient,
         "request": {"method": "PUT", "url": f"Patient/{patient_id}"}},
        {"fullUrl": f"Observation/{observation_id}", "resource": observation,
         "request": {"method": "PUT", "url": f"Observation/{observation_id}"}},
    ]}).encode()


class RealFHIRServerTests(unittest.TestCase):
    """What a real FHIR server answers, read as the runtime will read it."""

    @pytest.fixture(autouse=True)
    def _server(self, fhir_server):
        self.base = fhir_server

    def setUp(self):
        self.dest = FHIRDestination("fhir", self.base, timeout=30.0)
        self.addCleanup(self.dest.close)

    def count(self, query: str) -> int:
        status, bundle = request("GET", f"{self.base}/{query}&_summary=count")
        self.assertEqual(status, 200)
        return bundle["total"]

    async def test_a_transaction_is_delivered_and_its_answer_kept(self):
        pid, oid = str(uuid.uuid4()), str(uuid.uuid4())
        result = await self.dest.deliver(transaction(pid, oid))
        self.assertTrue(result.ok, result.error)
        self.assertIsNone(result.error)
        answer = json.loads(result.response)
        self.assertEqual(answer["resourceType"], "Bundle")
        self.assertEqual(answer["type"], "transaction-response")
        self.assertEqual(len(answer["entry"]), 2)
        self.assertTrue(all(e["response"]["status"].startswith("20") for e in answer["entry"]))
        status, observation = request("GET", f"{self.base}/Observation/{oid}")
        self.assertEqual(status, 200)
        self.assertEqual(observation["subject"]["reference"], f"Patient/{pid}")

    async def test_sending_the_same_bundle_again_leaves_one_patient(self):
        pid, oid = str(uuid.uuid4()), str(uuid.uuid4())
        payload = transaction(pid, oid)
        for _ in range(2):
            result = await self.dest.deliver(payload)
            self.assertTrue(result.ok, result.error)
        self.assertEqual(self.count(f"Patient?_id={pid}"), 1)
        self.assertEqual(self.count(f"Patient?identifier=urn:oid:1.2.3.4|{pid}"), 1)
        self.assertEqual(self.count(f"Observation?subject=Patient/{pid}"), 1)

    async def test_an_invalid_resource_is_a_400_that_is_not_retried(self):
        pid, oid = str(uuid.uuid4()), str(uuid.uuid4())
        result = await self.dest.deliver(transaction(pid, oid, gender="x"))
        self.assertFalse(result.ok)
        self.assertFalse(result.retry)
        self.assertIsNone(result.retry_after)
        self.assertTrue(result.error.startswith('HTTP 400: Invalid code "x"'), result.error)
        self.assertIn("(Bundle.entry[0].resource.gender)", result.error)
        self.assertLessEqual(len(result.error), len("HTTP 400: ") + 200)
        self.assertEqual(json.loads(result.response)["resourceType"], "OperationOutcome")
        # All or nothing: the valid Observation of the same Bundle was not kept either.
        self.assertEqual(request("GET", f"{self.base}/Observation/{oid}")[0], 404)
        self.assertEqual(request("GET", f"{self.base}/Patient/{pid}")[0], 404)

    async def test_one_connection_carries_consecutive_deliveries(self):
        for _ in range(3):
            result = await self.dest.deliver(transaction(str(uuid.uuid4()), str(uuid.uuid4())))
            self.assertTrue(result.ok, result.error)


class FHIRDestinationTests(unittest.TestCase):
    def setUp(self):
        self.server = self.start_server()
        self.dest = self.destination(self.server.url())

    def start_server(self, **kwargs) -> FakeHTTPServer:
        server = FakeHTTPServer(**kwargs).start()
        self.addCleanup(server.stop)
        return server

    def destination(self, url: str, **kwargs) -> FHIRDestination:
        dest = FHIRDestination("fhir", url, timeout=kwargs.pop("timeout", TIMEOUT), **kwargs)
        self.addCleanup(dest.close)  # last added, first run: before the server stops
        return dest

    def answer(self, *replies):
        self.server.script["/fhir"] = list(replies)

    async def test_posts_the_bundle_as_fhir_json_and_keeps_the_answer(self):
        payload = transaction("p1", "o1")
        self.answer(Reply(200, b'{"resourceType":"Bundle","type":"transaction-response"}'))
        result = await self.dest.deliver(payload)
        self.assertEqual(result, Result(ok=True, response=b'{"resourceType":"Bundle","type":"transaction-response"}'))
        [seen] = self.server.requests
        self.assertEqual((seen.method, seen.path, seen.body), ("POST", "/fhir", payload))
        self.assertEqual(seen.headers["content-type"], "application/fhir+json")
        self.assertEqual(seen.headers["accept"], "application/fhir+json")
        self.assertNotIn("authorization", seen.headers)

    async def test_a_trailing_slash_in_the_base_url_is_dropped(self):
        dest = self.destination(self.server.url("/fhir/"))
        self.assertTrue((await dest.deliver(b"{}")).ok)
        self.assertEqual(self.server.paths(), ["/fhir"])

    async def test_any_2xx_is_delivered(self):
        self.answer(Reply(201, b"created"), Reply(204))
        self.assertEqual(await self.dest.deliver(b"{}"), Result(ok=True, response=b"created"))
        self.assertEqual(await self.dest.deliver(b"{}"), Result(ok=True, response=b""))

    async def test_only_the_first_mib_of_an_answer_is_kept(self):
        big = b"x" * (MAX_RESPONSE + 12345)
        self.answer(Reply(200, big), Reply(400, big))
        result = await self.dest.deliver(b"{}")
        self.assertTrue(result.ok)
        self.assertEqual(result.response, big[:MAX_RESPONSE])
        result = await self.dest.deliver(b"{}")
        self.assertEqual(len(result.response), MAX_RESPONSE)
        self.assertEqual(result.error, "HTTP 400: Bad Request")
        self.assertEqual(self.server.connections, 1)  # the rest was read: the connection is kept

    async def test_a_4xx_is_not_retried_and_quotes_the_operation_outcome(self):
        body = outcome("Observation.status: value 'done' not in the required value set",
                       "Bundle.entry[1].resource.status")
        self.answer(Reply(422, body, {"Content-Type": "application/fhir+json"}))
        result = await self.dest.deliver(b"{}")
        self.assertEqual(result, Result(
            ok=False, response=body, retry=False,
            error="HTTP 422: Observation.status: value 'done' not in the required value set "
                  "(Bundle.entry[1].resource.status)"))

    async def test_details_text_when_there_are_no_diagnostics(self):
        body = json.dumps({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "invalid", "details": {"text": "bad reference"}}]}).encode()
        self.answer(Reply(400, body))
        self.assertEqual((await self.dest.deliver(b"{}")).error, "HTTP 400: bad reference")

    async def test_a_long_diagnostic_is_cut_to_one_short_line(self):
        self.answer(Reply(400, outcome("first line\nsecond " + "y" * 500, "Bundle.entry[0]")))
        result = await self.dest.deliver(b"{}")
        self.assertNotIn("\n", result.error)
        self.assertLessEqual(len(result.error), len("HTTP 400: ") + 200)
        self.assertTrue(result.error.startswith("HTTP 400: first line second yyy"))
        self.assertTrue(result.error.endswith("... (Bundle.entry[0])"), result.error)

    async def test_a_4xx_without_an_operation_outcome_gives_the_status_phrase(self):
        self.answer(Reply(404, b"<html>nothing here</html>"), Reply(403, b""))
        result = await self.dest.deliver(b"{}")
        self.assertEqual((result.ok, result.retry, result.error), (False, False, "HTTP 404: Not Found"))
        self.assertEqual(result.response, b"<html>nothing here</html>")
        self.assertEqual((await self.dest.deliver(b"{}")).error, "HTTP 403: Forbidden")

    async def test_503_with_retry_after_seconds(self):
        self.answer(Reply(503, b"", {"Retry-After": "7"}))
        result = await self.dest.deliver(b"{}")
        self.assertEqual(result, Result(ok=False, response=b"", error="HTTP 503: Service Unavailable",
                                        retry=True, retry_after=7.0))

    async def test_429_with_retry_after_as_an_http_date(self):
        when = email.utils.format_datetime(
            datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=120), usegmt=True)
        self.answer(Reply(429, b"", {"Retry-After": when}))
        result = await self.dest.deliver(b"{}")
        self.assertEqual((result.ok, result.retry, result.error), (False, True, "HTTP 429: Too Many Requests"))
        self.assertTrue(115 <= result.retry_after <= 120, result.retry_after)

    async def test_a_retry_after_in_the_past_or_unreadable(self):
        self.answer(Reply(503, b"", {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),
                    Reply(503, b"", {"Retry-After": "soon"}))
        self.assertEqual((await self.dest.deliver(b"{}")).retry_after, 0.0)
        self.assertIsNone((await self.dest.deliver(b"{}")).retry_after)

    async def test_500_and_408_are_retried(self):
        body = outcome("database unavailable")
        self.answer(Reply(500, body), Reply(408, b""))
        self.assertEqual(await self.dest.deliver(b"{}"), Result(
            ok=False, response=body, error="HTTP 500: database unavailable", retry=True))
        result = await self.dest.deliver(b"{}")
        self.assertEqual((result.retry, result.error), (True, "HTTP 408: Request Timeout"))

    async def test_401_without_auth_is_retried(self):
        self.answer(Reply(401, b""))
        self.assertEqual(await self.dest.deliver(b"{}"), Result(
            ok=False, response=b"", error="HTTP 401: not authorised", retry=True))

    async def test_redirects_are_not_followed(self):
        self.answer(Reply(301, b"", {"Location": "https://elsewhere.example/fhir"}),
                    Reply(307, b"", {"Location": "/other"}))
        result = await self.dest.deliver(b"{}")
        self.assertEqual((result.ok, result.retry), (False, False))
        self.assertEqual(result.error, "HTTP 301: unexpected answer to a transaction; the base URL has moved")
        result = await self.dest.deliver(b"{}")
        self.assertEqual((result.ok, result.retry), (False, True))
        self.assertEqual(self.server.paths(), ["/fhir", "/fhir"])

    async def test_a_server_that_never_answers_times_out_and_the_next_attempt_reconnects(self):
        self.answer(HANG)
        started = time.monotonic()
        result = await self.dest.deliver(b"{}")
        elapsed = time.monotonic() - started
        self.assertEqual(result, Result(ok=False, error=f"no answer within {TIMEOUT:g}s", retry=True))
        self.assertTrue(TIMEOUT <= elapsed < TIMEOUT + 1.0, elapsed)
        self.assertTrue((await self.dest.deliver(b"{}")).ok)
        self.assertEqual(self.server.connections, 2)

    async def test_an_answer_that_stops_halfway_times_out(self):
        self.answer(STALL)
        started = time.monotonic()
        result = await self.dest.deliver(b"{}")
        self.assertEqual(result.error, f"no answer within {TIMEOUT:g}s")
        self.assertLess(time.monotonic() - started, TIMEOUT + 1.0)
        self.assertTrue((await self.dest.deliver(b"{}")).ok)

    async def test_a_connection_that_never_completes_times_out(self):
        listener = socket.socket()  # never accepts: once its backlog is full, connections hang
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        for _ in range(3):
            filler = socket.socket()
            self.addCleanup(filler.close)
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
        dest = self.destination(f"http://127.0.0.1:{listener.getsockname()[1]}/fhir")
        started = time.monotonic()
        result = await dest.deliver(b"{}")
        self.assertEqual((result.ok, result.retry), (False, True))
        self.assertEqual(result.error, f"no answer within {TIMEOUT:g}s")
        self.assertLess(time.monotonic() - started, TIMEOUT + 1.5)

    async def test_nobody_listening_is_connection_refused_and_retried(self):
        port = free_port()
        dest = self.destination(f"http://127.0.0.1:{port}/fhir")
        self.assertEqual(await dest.deliver(b"{}"), Result(
            ok=False, error=f"connection refused by 127.0.0.1:{port}", retry=True))

    async def test_a_connection_dropped_without_an_answer_is_retried(self):
        self.answer(CLOSE)
        self.assertEqual(await self.dest.deliver(b"{}"), Result(
            ok=False, retry=True,
            error=f"connection to 127.0.0.1:{self.server.port} closed before the whole answer"))
        self.assertTrue((await self.dest.deliver(b"{}")).ok)

    async def test_consecutive_deliveries_share_one_connection(self):
        for _ in range(3):
            self.assertTrue((await self.dest.deliver(b"{}")).ok)
        self.assertEqual(self.server.connections, 1)

    async def test_a_restarted_server_is_reconnected_to(self):
        self.assertTrue((await self.dest.deliver(b"{}")).ok)
        port = self.server.port
        await self.server.stop()
        result = await self.dest.deliver(b"{}")
        self.assertEqual((result.ok, result.retry), (False, True))
        self.server.start(port)
        self.assertTrue((await self.dest.deliver(b"{}")).ok)
        self.assertEqual(self.server.connections, 2)

    def test_one_request_in_flight_at_a_time(self):
        self.answer(HANG)
        d = self.dest.deliver(b"{}")
        self.assertRaises(RuntimeError, self.dest.deliver, b"{}")
        return d

    async def test_close_ends_an_exchange_in_flight(self):
        self.answer(HANG)
        d = self.dest.deliver(b"{}")
        while not self.server.requests:
            await deferLater(0.01)
        await self.dest.close()
        result = await d
        self.assertEqual(result, Result(ok=False, error="destination closed during the exchange"))
        await self.dest.close()
        self.assertTrue((await self.dest.deliver(b"{}")).ok)

    async def test_an_unexpected_error_is_a_failed_result_not_an_errback(self):
        def broken(body):
            raise ZeroDivisionError("a bug quoting SECRETFAMILY")

        self.patch(fhir_module, "_issue_text", broken)
        self.answer(Reply(400, b"{}"))
        result = await self.dest.deliver(b"{}")
        self.assertEqual(result, Result(ok=False, error="internal error (ZeroDivisionError)"))
        self.assertTrue((await self.dest.deliver(b"{}")).ok)

    async def test_logs_never_hold_content(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.answer(Reply(400, outcome("Patient SECRETFAMILY rejected")), Reply(500, b"SECRETFAMILY"),
                    HANG, Reply(200, b"SECRETFAMILY"))
        for _ in range(4):
            await self.dest.deliver(transaction("p", "o", family="SECRETFAMILY"))
        logged = "\n".join(formatEvent(e) for e in events)
        self.assertNotIn("SECRETFAMILY", logged)

    def test_bad_urls_are_refused_when_the_destination_is_made(self):
        from interface_engine.destinations.auth import BearerToken

        for url in ("ftp://example.org/fhir", "example.org/fhir", "https://u:p@example.org/fhir",
                    "https://example.org/fhir?x=1"):
            self.assertRaises(ValueError, FHIRDestination, "fhir", url)
        os.environ["IE_TEST_FHIR_TOKEN"] = "tok"
        self.addCleanup(os.environ.pop, "IE_TEST_FHIR_TOKEN")
        with self.assertRaises(ValueError) as raised:
            FHIRDestination("fhir", "http://fhir.example.org/fhir", auth=BearerToken("env:IE_TEST_FHIR_TOKEN"))
        self.assertIn("in clear", str(raised.exception))
        FHIRDestination("fhir", "http://localhost:8080/fhir", auth=BearerToken("env:IE_TEST_FHIR_TOKEN"))


async def deferLater(seconds: float):
    from twisted.internet import reactor, task

    await task.deferLater(reactor, seconds)


def certificate(name: str, key, issuer_name=None, issuer_key=None, ca: bool = False, ip: str | None = None):
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer_name or subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        names = [x509.DNSName(name)]
        if ip:
            import ipaddress

            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


class TLSTests(unittest.TestCase):
    """Verification is always on: a private CA is trusted only through ca_file."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ie-fhir-tls-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = certificate("Test CA", self.ca_key, ca=True)
        self.ca_file = f"{self.tmp}/ca.pem"
        with open(self.ca_file, "wb") as f:
            f.write(self.ca.public_bytes(serialization.Encoding.PEM))

    def tls_server(self, name: str, ip: str | None) -> FakeHTTPServer:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = certificate(name, key, self.ca.subject, self.ca_key, ip=ip)
        server = FakeHTTPServer(tls=ssl.CertificateOptions(privateKey=key, certificate=cert)).start()
        self.addCleanup(server.stop)
        return server

    def destination(self, url: str, **kwargs) -> FHIRDestination:
        dest = FHIRDestination("fhir", url, timeout=5.0, **kwargs)
        self.addCleanup(dest.close)
        return dest

    async def test_a_certificate_from_the_ca_file_is_trusted(self):
        server = self.tls_server("localhost", "127.0.0.1")
        result = await self.destination(server.url(), ca_file=self.ca_file).deliver(b"{}")
        self.assertTrue(result.ok, result.error)
        self.assertEqual(len(server.requests), 1)

    async def test_an_unknown_ca_is_refused(self):
        server = self.tls_server("localhost", "127.0.0.1")
        result = await self.destination(server.url()).deliver(b"{}")
        self.assertEqual((result.ok, result.retry), (False, True))
        self.assertEqual(result.error, f"TLS certificate verification failed for 127.0.0.1:{server.port}: "
                                       "not signed by a trusted CA")
        self.assertEqual(server.requests, [])

    async def test_a_certificate_for_another_host_is_refused(self):
        server = self.tls_server("other.example", None)
        result = await self.destination(server.url(), ca_file=self.ca_file).deliver(b"{}")
        self.assertEqual((result.ok, result.retry), (False, True))
        self.assertEqual(result.error, f"TLS certificate verification failed for 127.0.0.1:{server.port}: "
                                       "it is not for 127.0.0.1")
        self.assertEqual(server.requests, [])

    def test_an_unreadable_ca_file_is_refused_when_made(self):
        with self.assertRaises(ValueError) as raised:
            FHIRDestination("fhir", "https://fhir.example.org/fhir", ca_file=f"{self.tmp}/none.pem")
        self.assertIn("none.pem", str(raised.exception))
        with open(f"{self.tmp}/empty.pem", "w") as f:
            f.write("not a certificate")
        self.assertRaises(ValueError, FHIRDestination, "fhir", "https://fhir.example.org/fhir",
                          ca_file=f"{self.tmp}/empty.pem")
