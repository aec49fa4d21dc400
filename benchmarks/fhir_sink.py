"""A FHIR endpoint that does no FHIR: it answers every POST at once with a transaction-response.

The end-to-end FHIR benchmark runs against it to see the engine's own ceiling,
where a real server's validation and storage cost nothing. HTTP/1.1 with
keep-alive, as the engine's FHIR destination uses; it counts the bundles it got
and reports the count on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

RESPONSE_BODY = b'{"resourceType":"Bundle","type":"transaction-response","entry":[]}'
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n"
            b"Content-Length: " + str(len(RESPONSE_BODY)).encode() + b"\r\n\r\n" + RESPONSE_BODY)


class Sink(asyncio.Protocol):
    received = 0

    def connection_made(self, transport):
        self.transport = transport
        self.buffer = bytearray()

    def data_received(self, data: bytes):
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            length = 0
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[:end + 4 + length]
            Sink.received += 1
            self.transport.write(RESPONSE)


async def serve(port: int):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Sink, "127.0.0.1", port)
    print(f"FHIR sink ready at http://127.0.0.1:{server.sockets[0].getsockname()[1]}/fhir", flush=True)
    stopped = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stopped.set_result, None)
    await stopped
    print(f"bundles received: {Sink.received}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args(argv).port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
