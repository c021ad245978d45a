"""deploy/Dockerfile's runtime packages are exactly the ones the built binaries need.

Re-derives the list the way the Dockerfile's comment says: `ldd` on tokensamplerd and the
tokensampler CLI, then `dpkg -S` on each library (Debian 12's merged /usr: a library found under
/lib is owned under /usr/lib, so both spellings are tried). A library that no package owns (one
built here, say) is an error too: the runtime image would not have it.

Environment: TOKENSAMPLERD, TOKENSAMPLER_CLI (the built binaries), TOKENSAMPLER_SOURCE_DIR.
Run: /usr/bin/python3 -m unittest -v runtime_deps_test
"""

import os
import re
import subprocess
import unittest

SOURCE_DIR = os.environ.get(
    "TOKENSAMPLER_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", "..")
)
DOCKERFILE = os.path.join(SOURCE_DIR, "deploy", "Dockerfile")


def shared_libraries(binary):
    """Paths of the shared libraries `binary` loads (ldd), the dynamic loader and vDSO aside."""
    out = subprocess.run(
        ["ldd", binary], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    libraries = []
    for line in out.splitlines():
        match = re.match(r"\s*(\S+) => (\S+) \(0x", line)
        if match:
            libraries.append(match.group(2))
        elif "=> not found" in line:
            raise AssertionError(f"ldd {binary}: {line.strip()}")
    return libraries


def _spellings(library):
    """`library` as ldd printed it, resolved, and with and without the /usr prefix."""
    real = os.path.realpath(library)
    spellings = [library, real]
    for path in (library, real):
        if path.startswith("/lib/"):
            spellings.append("/usr" + path)
        elif path.startswith("/usr/lib/"):
            spellings.append(path[len("/usr") :])
    return spellings


def owners(paths):
    """{path: package} from one `dpkg -S` over all `paths` (each call reads dpkg's whole file
    database, so one call instead of one per library); paths no package owns are absent."""
    result = subprocess.run(
        ["dpkg", "-S", *sorted(set(paths))], capture_output=True, text=True, timeout=300
    )
    found = {}
    for line in result.stdout.splitlines():
        # "libssl3:amd64: /usr/lib/x86_64-linux-gnu/libssl.so.3"
        match = re.match(r"([^\s:,]+)(?::[a-z0-9]+)?: (/.*)$", line)
        if match:
            found[match.group(2)] = match.group(1)
    return found


def needed_packages(binaries):
    """{package: [libraries]} for `binaries`; raises naming a library no package owns."""
    libraries = sorted({library for binary in binaries for library in shared_libraries(binary)})
    found = owners(path for library in libraries for path in _spellings(library))
    packages = {}
    for library in libraries:
        package = next((found[p] for p in _spellings(library) if p in found), None)
        if package is None:
            raise AssertionError(
                f"{library} (loaded by {' or '.join(binaries)}) is owned by no Debian package"
            )
        packages.setdefault(package, []).append(os.path.basename(library))
    return packages


def dockerfile_packages(text):
    """The packages between the `# runtime-packages:begin` / `end` markers of the runtime stage."""
    match = re.search(r"# runtime-packages:begin\n(.*?)# runtime-packages:end", text, re.S)
    if not match:
        raise AssertionError("deploy/Dockerfile has no # runtime-packages:begin / end markers")
    block = match.group(1)
    install = re.search(r"apt-get install ([^&]*)", block)
    if not install:
        raise AssertionError("no `apt-get install` between the runtime-packages markers")
    words = install.group(1).replace("\\", " ").split()
    return sorted(word for word in words if not word.startswith("-"))


def compare(needed, listed):
    """Errors: packages needed but not listed, and listed but not needed."""
    errors = []
    for package in sorted(set(needed) - set(listed)):
        errors.append(
            f"deploy/Dockerfile misses {package} (for {', '.join(sorted(set(needed[package])))})"
        )
    for package in sorted(set(listed) - set(needed)):
        errors.append(f"deploy/Dockerfile installs {package}, which neither binary loads")
    return errors


class RuntimeDepsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.binaries = [os.environ.get("TOKENSAMPLERD"), os.environ.get("TOKENSAMPLER_CLI")]
        for binary in cls.binaries:
            if not binary or not os.access(binary, os.X_OK):
                raise unittest.SkipTest(f"set TOKENSAMPLERD and TOKENSAMPLER_CLI (got {binary!r})")
        with open(DOCKERFILE, encoding="utf-8") as f:
            cls.dockerfile = f.read()
        cls.needed = needed_packages(cls.binaries)

    def test_dockerfile_lists_exactly_the_needed_packages(self):
        self.assertEqual(compare(self.needed, dockerfile_packages(self.dockerfile)), [])

    def test_the_derivation_finds_the_libraries_we_know_of(self):
        # Guards the derivation itself: gRPC, oneTBB, Highway and prometheus-cpp must show up.
        for package in (
            "libgrpc++1.51",
            "libtbb12",
            "libhwy1",
            "libprometheus-cpp-pull1.0",
            "libc6",
        ):
            self.assertIn(package, self.needed)

    def test_a_missing_package_is_reported(self):
        broken = re.sub(r"^\s*libtbb12 \\\n", "", self.dockerfile, flags=re.M)
        self.assertNotEqual(broken, self.dockerfile)
        self.assertEqual(
            compare(self.needed, dockerfile_packages(broken)),
            [
                "deploy/Dockerfile misses libtbb12 "
                f"(for {', '.join(sorted(set(self.needed['libtbb12'])))})"
            ],
        )

    def test_an_extra_package_is_reported(self):
        broken = self.dockerfile.replace("      zlib1g \\\n", "      zlib1g \\\n      curl \\\n")
        self.assertNotEqual(broken, self.dockerfile)
        self.assertEqual(
            compare(self.needed, dockerfile_packages(broken)),
            ["deploy/Dockerfile installs curl, which neither binary loads"],
        )

    def test_runtime_stage_runs_tokensamplerd_as_non_root(self):
        self.assertRegex(self.dockerfile, r"(?m)^FROM debian:bookworm-slim AS runtime$")
        runtime = self.dockerfile.split("AS runtime", 1)[1]
        user = re.search(r"(?m)^USER (\d+):(\d+)$", runtime)
        self.assertIsNotNone(user, "runtime stage needs a numeric USER uid:gid")
        self.assertNotEqual(user.group(1), "0")
        self.assertRegex(runtime, r'(?m)^ENTRYPOINT \["/usr/local/bin/tokensamplerd"\]$')
        self.assertRegex(runtime, r"(?m)^COPY --from=build /src/build/service/tokensamplerd ")
        self.assertRegex(self.dockerfile, r"(?m)^FROM debian:bookworm AS build$")
        self.assertRegex(self.dockerfile, r"(?m)^RUN \./scripts/install-deps\.sh")
        self.assertRegex(self.dockerfile, r"(?m)^RUN .*\./scripts/build\.sh")


if __name__ == "__main__":
    unittest.main()
