"""Downstream MLLP receiver for the end-to-end benchmark: ACKs everything, records arrivals.

It answers every frame at once with AA and MSA-2 = the frame's MSH-10, and
records, for each frame, its MSH-10 and the moment it arrived
(`time.monotonic()`, a system-wide clock on Linux, so the harness can set it
against its own send times).  It is a single asyncio process driven by
protocol callbacks and parses no more than the MSH segment's first ten
fields, so that it takes as little CPU as possible from the engine it
measures; the harness reads its CPU use from /proc.

A second port takes one-line commands from the harness:

    stats   ->  {"frames": F, "unique": U, "connections": C}
    dump    ->  {"ids": [...], "t": [...]}   every frame in arrival order
    reset   ->  ok                           forget what arrived so far

Run by `e2e.py`; by hand: python benchmarks/receiver.py --port P --control-port Q
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from array import array

START, END = b"\x0b", b"\x1c\r"


class Arrivals:
    """Every frame's control id and arrival time, in arrival order."""

    def __init__(self):
        self.ids: list[bytes] = []
        self.times = array("d")
        self.seen: set[bytes] = set()
        self.connections = 0
        self.acks = 0

    def reset(self):
        self.ids, self.times, self.seen = [], array("d"), set()


class Downstream(asyncio.Protocol):
    """One connection from the engine: answer each frame as soon as it is complete."""

    def __init__(self, arrivals: Arrivals, stamp: bytes):
        self.arrivals = arrivals
        self.stamp = stamp
        self.buffer = bytearray()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.arrivals.connections += 1

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buffer = self.buffer
        buffer += data
        answers = []
        arrivals = self.arrivals
        while (end := buffer.find(END)) >= 0:
            frame = bytes(buffer[:end])
            del buffer[: end + len(END)]
            start = frame.find(START)
            if start < 0:
                continue
            body = frame[start + 1:]
            sep = body[3:4] or b"|"
            header = body.split(b"\r", 1)[0].split(sep, 10)
            control_id = header[9] if len(header) > 9 else b""
            arrivals.ids.append(control_id)
            arrivals.times.append(now)
            arrivals.seen.add(control_id)
            arrivals.acks += 1
            sender_app = header[2] if len(header) > 2 else b""
            sender_fac = header[3] if len(header) > 3 else b""
            answers.append(b"".join((
                START, b"MSH", sep, b"^~\\&", sep, b"BENCHRECV", sep, b"BENCHRECVFAC", sep,
                sender_app, sep, sender_fac, sep, self.stamp, sep, sep, b"ACK", sep,
                b"R%d" % arrivals.acks, sep, b"P", sep, b"2.5.1\rMSA", sep, b"AA", sep,
                control_id, b"\r", END)))
        if answers:
            self.transport.write(b"".join(answers))


async def control(arrivals: Arrivals, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    try:
        while line := await reader.readline():
            command = line.strip().decode()
            if command == "stats":
                reply = {"frames": len(arrivals.ids), "unique": len(arrivals.seen),
                         "connections": arrivals.connections}
            elif command == "dump":
                reply = {"ids": [i.decode(errors="replace") for i in arrivals.ids],
                         "t": arrivals.times.tolist()}
            elif command == "reset":
                arrivals.reset()
                reply = "ok"
            else:
                reply = {"error": f"unknown command {command!r}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(host: str, port: int, control_port: int) -> None:
    loop = asyncio.get_running_loop()
    arrivals = Arrivals()
    stamp = time.strftime("%Y%m%d%H%M%S").encode()
    # The control port first: the harness takes the MLLP port accepting as "ready".
    await asyncio.start_server(lambda r, w: control(arrivals, r, w), host, control_port)
    server = await loop.create_server(lambda: Downstream(arrivals, stamp), host, port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="MLLP port the engine delivers to")
    parser.add_argument("--control-port", type=int, required=True, help="port for the harness's commands")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.host, args.port, args.control_port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
