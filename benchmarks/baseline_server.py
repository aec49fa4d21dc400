"""Bare python-hl7 MLLP server: the reference point for ingest throughput.

It parses every message and answers an AA ACK, storing nothing, so it
shows what a plain asyncio MLLP endpoint costs on this machine.  The
engine is compared against it because both pay for the same socket and
parsing work, and only the engine pays for durability.
"""

import argparse
import asyncio
import signal

import hl7.mllp


async def handle(reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
    try:
        while True:
            message = await reader.readmessage()  # already parsed by hl7.parse
            writer.writemessage(message.create_ack())
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the sender closed the connection
    finally:
        writer.close()


async def serve(host: str, port: int) -> None:
    server = await hl7.mllp.start_hl7_server(handle, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
