"""A real `selfextend serve` process for the benchmark scripts: on 127.0.0.1, a free port, its
URL read from the line it prints when ready; stopped with SIGTERM (also as a context manager)."""

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

SELFEXTEND = Path(sys.executable).with_name("selfextend")


class Server:
    def __init__(self, model=None, extra=()):
        command = [str(SELFEXTEND), "serve", "--port", "0", *extra] + (["-m", model] if model else [])
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()
        line = self.process.stdout.readline()
        match = re.search(r"at (http://\S+/v1)", line)
        if not match:
            self.process.kill()
            sys.exit(f"the server did not start: {line!r} {''.join(self.log)}")
        self.url = match.group(1)

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
