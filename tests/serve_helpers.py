"""A `latentdiff serve` subprocess on a free loopback port, for the browser, load and restart tests."""

import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import latentdiff


@contextmanager
def running_server(model, out, *extra, timeout: float = 90.0):
    """Start `latentdiff serve --model MODEL --port 0 --out OUT EXTRA...`; yield (base URL, process)."""
    env = {**os.environ, "PYTHONPATH": str(Path(latentdiff.__file__).parents[1]), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop("LATENTDIFF_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "latentdiff", "serve", "--model", str(model), "--port", "0",
                             "--out", str(out), "--device", "cpu", *map(str, extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url, t0, lines = None, time.monotonic(), []
        while url is None:
            line = proc.stdout.readline()
            lines.append(line)
            found = re.search(r"at (http://[^ ]+/) ", line)
            if found:
                url = found.group(1).rstrip("/")
            elif not line and proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise RuntimeError("the server did not start:\n" + "".join(lines))
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
