"""Daemon: runs a local tokensamplerd as a child process, for tests, examples and scripts.

    with tokensampler.Daemon("build/service/tokensamplerd") as daemon:
        client = tokensampler.Client(daemon.target)

It listens on a Unix socket in a private temporary directory (plus 127.0.0.1:<free port> with
tcp=True), learns the bound addresses from --port_file, and stops with SIGTERM (graceful drain).
On Linux the daemon also gets SIGTERM when the thread that started it exits (util-linux's
`setpriv --pdeathsig`, where installed), so a killed test leaves no daemon behind. Every wait is
bounded. Thread-compatible.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from tokensampler.client import Client, TokenSamplerError


def _term_with_parent():
    """The command prefix that makes the daemon get SIGTERM when the thread that started it exits
    (Linux PR_SET_PDEATHSIG, set by setpriv before it execs the daemon), or [] where there is no
    setpriv. Not a `preexec_fn`: that runs Python in the forked child of a process with threads
    (gRPC's), and the child deadlocked on a lock a gRPC thread held at the fork."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "TERM"] if setpriv else []


class Daemon:
    def __init__(self, binary, *, tcp=False, args=(), timeout=30.0):
        """`binary`: path of tokensamplerd. `args`: extra flags (e.g. "--threads=2").
        `timeout`: seconds to wait for the daemon to serve, and later to exit."""
        if not binary or not os.access(binary, os.X_OK):
            raise ValueError(f"not an executable tokensamplerd: {binary!r}")
        self.binary = binary
        self.addresses = []  # bound gRPC addresses, "unix:/…" first, port 0 resolved
        self.health_addresses = []  # --health_listen addresses, if any were given in `args`
        self.metrics_address = None  # --metrics_listen address, if given in `args`
        self._tcp = tcp
        self._args = list(args)
        self._timeout = timeout
        self._dir = None
        self._process = None
        self._final_stderr = None

    @property
    def target(self):
        """The Unix socket address, for Client(target)."""
        return self.addresses[0]

    @property
    def pid(self):
        """The daemon's process id while it runs (for /proc, e.g. its memory), else None."""
        return None if self._process is None else self._process.pid

    def stderr(self):
        """What the daemon printed to stderr so far (one line per lifecycle event)."""
        if self._final_stderr is not None:
            return self._final_stderr
        with open(os.path.join(self._dir, "stderr.txt"), encoding="utf-8", errors="replace") as f:
            return f.read()

    def start(self):
        """Starts the daemon and returns once it reports SERVING. Raises RuntimeError (with its
        stderr) when it exits early or does not serve within the timeout (it is then killed)."""
        self._dir = tempfile.mkdtemp(prefix="ts_")  # short: socket paths must stay < 108 bytes
        port_file = os.path.join(self._dir, "ports.txt")
        listen = [f"--listen=unix:{os.path.join(self._dir, 'ts.sock')}"]
        if self._tcp:
            listen.append("--listen=127.0.0.1:0")
        with open(os.path.join(self._dir, "stderr.txt"), "wb") as stderr:
            self._process = subprocess.Popen(
                [*_term_with_parent(), self.binary, *listen, f"--port_file={port_file}",
                 *self._args],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + self._timeout
        while not os.path.exists(port_file):
            if self._process.poll() is not None:
                self._fail(f"exited with {self._process.returncode} before serving")
            if time.monotonic() > deadline:
                self._fail(f"did not serve within {self._timeout} s")
            time.sleep(0.01)
        with open(port_file, encoding="utf-8") as f:
            for line in f.read().split():
                if line.startswith("health="):
                    self.health_addresses.append(line[len("health="):])
                elif line.startswith("metrics="):
                    self.metrics_address = line[len("metrics="):]
                else:
                    self.addresses.append(line)
        with Client(self.target) as client:
            try:
                serving = client.health(wait_for_ready=True,
                                        timeout=max(1.0, deadline - time.monotonic()))
            except TokenSamplerError as error:
                self._fail(f"failed its health check: {error}")
            if not serving:
                self._fail("is not SERVING")
        return self

    def stop(self, sig=signal.SIGTERM):
        """Sends `sig`, waits for the exit and returns the exit code (negative: killed by that
        signal). Kills the daemon and raises RuntimeError when it outlives the timeout."""
        if self._process is None:
            raise RuntimeError("tokensamplerd is not running")
        self._process.send_signal(sig)
        return self.wait()

    def wait(self):
        """Waits for the daemon to exit (by a signal sent some other way) and returns the exit code
        (negative: killed by that signal). Kills it and raises RuntimeError when it outlives the
        timeout."""
        if self._process is None:
            raise RuntimeError("tokensamplerd is not running")
        try:
            return self._process.wait(self._timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
            raise RuntimeError(f"tokensamplerd did not exit within {self._timeout} s") from None
        finally:
            self._clean_up()

    def _fail(self, what):
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._clean_up()
        raise RuntimeError(f"tokensamplerd {what}; stderr:\n{self.stderr()}")

    def _clean_up(self):
        self._final_stderr = self.stderr()
        self._process = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        if self._process is not None:
            self.stop()
