#!/usr/bin/env python3
"""A loopback SMTP server for the scenario tests (Debian's python3-aiosmtpd).

Usage: sink.py HOST PORT DIR. Every message the server accepts (after the end of DATA) is saved as
DIR/NNNNNN.eml, written to a temporary name, fsynced and renamed, so a test never reads half a file.
It does not deduplicate anything: the tests count what arrives. Prints "listening" when ready.
"""
import os
import sys
import threading

from aiosmtpd.controller import Controller


class Sink:
    def __init__(self, directory):
        self.directory = directory
        self.lock = threading.Lock()
        self.n = len([f for f in os.listdir(directory) if f.endswith(".eml")])

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.n += 1
            n = self.n
        tmp = os.path.join(self.directory, f".{n:06}.tmp")
        with open(tmp, "wb") as f:
            f.write(envelope.original_content or envelope.content)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(self.directory, f"{n:06}.eml"))
        return "250 OK saved"


def main():
    host, port, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    os.makedirs(directory, exist_ok=True)
    controller = Controller(Sink(directory), hostname=host, port=port)
    controller.start()
    print("listening", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
