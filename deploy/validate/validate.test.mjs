// node --test deploy/validate/validate.test.mjs   (env: TOKENSAMPLERD, optionally KUSTOMIZE)
//
// The overlays as committed pass every check; each purpose-broken variant below is rejected with
// the error it should get. The variants are mutations of the rendered objects, one per check,
// plus overlays written on top of the committed ones (so the rendered output is what is checked)
// and a broken YAML text.
import assert from "node:assert/strict";
import { chmodSync, mkdtempSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import {
  checkDockerfile,
  checkKustomizeVersion,
  checkObjects,
  KUSTOMIZE_VERSION,
  kustomizeCommand,
  PINNED_KUSTOMIZE,
  parseYaml,
  podSpecs,
  readFlags,
  readText,
  render,
  schemaErrors,
} from "./lib.mjs";

const deploy = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const kustomize = kustomizeCommand();
const tokensamplerd = process.env.TOKENSAMPLERD;
const overlays = { base: "base", sidecar: "overlays/sidecar", shared: "overlays/shared" };

let flags;
let dockerfile;
const rendered = {};
let scratch;

before(() => {
  assert.ok(tokensamplerd, "set TOKENSAMPLERD to the built tokensamplerd");
  checkKustomizeVersion(kustomize);
  flags = readFlags(tokensamplerd);
  dockerfile = readText(path.join(deploy, "Dockerfile"));
  for (const [name, dir] of Object.entries(overlays))
    rendered[name] = render(kustomize, path.join(deploy, dir));
  scratch = mkdtempSync(path.join(tmpdir(), "tokensampler-deploy-"));
});
after(() => rmSync(scratch, { recursive: true, force: true }));

const clone = (value) => structuredClone(value);
const find = (objects, kind) => objects.find((o) => o.kind === kind);
const pod = (objects) => podSpecs(objects)[0].spec;
const sidecar = (objects) => pod(objects).initContainers.find((c) => c.name === "tokensamplerd");
const worker = (objects) => pod(objects).containers.find((c) => c.name === "model-worker");
const daemon = (objects) => pod(objects).containers.find((c) => c.name === "tokensamplerd");
const env = (container, name) => container.env.find((e) => e.name === name);

describe("committed overlays", () => {
  for (const name of Object.keys(overlays)) {
    test(`${name} passes every check`, async () => {
      assert.deepEqual(await checkObjects(rendered[name], flags, dockerfile), []);
    });
  }
  test("the shared overlay renders the objects the issue asks for", () => {
    assert.deepEqual(rendered.shared.map((o) => o.kind).sort(), [
      "Deployment",
      "HorizontalPodAutoscaler",
      "PodDisruptionBudget",
      "Service",
    ]);
  });
  test("the sidecar runs as a native sidecar next to the worker", () => {
    assert.equal(sidecar(rendered.sidecar).restartPolicy, "Always");
    assert.ok(worker(rendered.sidecar));
  });
});

// The overlays are rendered with the kustomize that package-lock.json pins; another one (KUSTOMIZE)
// must be new enough for `labels` and `patches`.
describe("kustomize", () => {
  // A stand-in kustomize whose `version` prints `output`.
  const fake = (name, output) => {
    const file = path.join(scratch, name);
    writeFileSync(file, `#!/bin/sh\nprintf '%s\\n' '${output}'\n`);
    chmodSync(file, 0o755);
    return file;
  };
  test(`the pinned kustomize is v${KUSTOMIZE_VERSION}`, () => {
    assert.deepEqual(
      checkKustomizeVersion(PINNED_KUSTOMIZE),
      KUSTOMIZE_VERSION.split(".").map(Number),
    );
  });
  test("a kustomize older than 4.5 is rejected", () => {
    const old = fake("kustomize-4.4.1", "{Version:kustomize/v4.4.1 GitCommit:x GoOs:linux}");
    assert.throws(
      () => checkKustomizeVersion(old),
      /is kustomize v4\.4\.1; the overlays need Kustomize >= 4\.5\.0/,
    );
  });
  test("a kustomize 5 is accepted", () => {
    assert.deepEqual(checkKustomizeVersion(fake("kustomize-5", "v5.5.0")), [5, 5, 0]);
  });
  test("a missing kustomize is named", () => {
    const missing = path.join(scratch, "no-such-kustomize");
    assert.throws(
      () => checkKustomizeVersion(missing),
      /no-such-kustomize version` failed .*KUSTOMIZE must name a kustomize binary >= 4\.5\.0/,
    );
  });
});

// [overlay, what is broken, mutation, expected error]
const mutations = [
  [
    "sidecar",
    "probe on a port nobody listens on",
    (o) => {
      sidecar(o).livenessProbe.grpc.port = 8082;
    },
    /livenessProbe port 8082 is not a port the container exposes/,
  ],
  [
    "sidecar",
    "health port removed from the ports",
    (o) => {
      sidecar(o).ports = sidecar(o).ports.filter((p) => p.name !== "health");
    },
    /--health_listen port 8081 is not among the container's ports/,
  ],
  [
    "shared",
    "probe on the data port",
    (o) => {
      daemon(o).readinessProbe.grpc.port = 50051;
    },
    /readinessProbe port 50051 is not a --health_listen port/,
  ],
  [
    "shared",
    "http probe instead of grpc",
    (o) => {
      daemon(o).startupProbe = { httpGet: { path: "/", port: 8081 } };
    },
    /startupProbe must be a grpc probe/,
  ],
  [
    "sidecar",
    "worker pointed at another socket",
    (o) => {
      env(worker(o), "TOKENSAMPLER_TARGET").value = "unix:/run/tokensampler/other.sock";
    },
    /unix:\/run\/tokensampler\/other.sock is not the socket tokensamplerd listens on/,
  ],
  [
    "sidecar",
    "worker without the socket volume",
    (o) => {
      worker(o).volumeMounts = worker(o).volumeMounts.filter(
        (m) => m.name !== "tokensampler-socket",
      );
    },
    /no other container mounts the socket volume|is not the socket tokensamplerd listens on/,
  ],
  [
    "sidecar",
    "socket outside any volume",
    (o) => {
      env(sidecar(o), "TOKENSAMPLER_LISTEN").value = "unix:/tmp/ts.sock";
    },
    /\/tmp\/ts.sock is on no volume of the container/,
  ],
  [
    "sidecar",
    "sidecar mounts a volume the pod lacks",
    (o) => {
      sidecar(o).volumeMounts[0].name = "sockets";
    },
    /volumeMount sockets names no volume of the pod/,
  ],
  [
    "sidecar",
    "shared memory only in the sidecar",
    (o) => {
      worker(o).volumeMounts = worker(o).volumeMounts.filter((m) => m.name !== "shm");
    },
    /memory volume shm is mounted only in tokensamplerd/,
  ],
  [
    "sidecar",
    "shared memory at different paths",
    (o) => {
      worker(o).volumeMounts.find((m) => m.name === "shm").mountPath = "/shm";
    },
    /memory volume shm is at \/dev\/shm in tokensamplerd but at \/shm in model-worker/,
  ],
  [
    "sidecar",
    "sidecar without restartPolicy: Always",
    (o) => {
      delete sidecar(o).restartPolicy;
    },
    /needs restartPolicy: Always/,
  ],
  [
    "sidecar",
    "grace period shorter than the drain",
    (o) => {
      pod(o).terminationGracePeriodSeconds = 20;
    },
    /terminationGracePeriodSeconds 20 is less than preStop 0 s \+ --drain_seconds 20 s \+ 5 s to exit = 25 s/,
  ],
  [
    "shared",
    "preStop longer than the grace period allows",
    (o) => {
      daemon(o).lifecycle.preStop.sleep.seconds = 10;
    },
    /terminationGracePeriodSeconds 30 is less than preStop 10 s \+ --drain_seconds 20 s/,
  ],
  [
    "shared",
    "drain raised by an argument (the command line wins)",
    (o) => {
      daemon(o).args = ["--drain_seconds=60"];
    },
    /--drain_seconds 60 s/,
  ],
  [
    "shared",
    "a misspelt variable",
    (o) => {
      env(daemon(o), "TOKENSAMPLER_DRAIN_SECONDS").name = "TOKENSAMPLER_DRAIN_SECOND";
    },
    /env TOKENSAMPLER_DRAIN_SECOND names no tokensamplerd flag/,
  ],
  [
    "shared",
    "a value tokensamplerd cannot parse",
    (o) => {
      daemon(o).env.push({ name: "TOKENSAMPLER_THREADS", value: "two" });
    },
    /tokensamplerd rejects its configuration: .*TOKENSAMPLER_THREADS.*two/,
  ],
  [
    "shared",
    "an argument that is no flag",
    (o) => {
      daemon(o).args = ["--drain=5"];
    },
    /tokensamplerd has no flag --drain/,
  ],
  [
    "shared",
    "a bad argument value",
    (o) => {
      daemon(o).args = ["--max_message_bytes=lots"];
    },
    /tokensamplerd rejects its configuration: .*max_message_bytes/,
  ],
  [
    "shared",
    "the data port not exposed",
    (o) => {
      daemon(o).ports = daemon(o).ports.filter((p) => p.name !== "grpc");
    },
    /--listen 0.0.0.0:50051: port 50051 is not among the container's ports/,
  ],
  [
    "shared",
    "loopback listener",
    (o) => {
      env(daemon(o), "TOKENSAMPLER_LISTEN").value = "127.0.0.1:50051";
    },
    /is loopback/,
  ],
  [
    "shared",
    "writable root file system",
    (o) => {
      daemon(o).securityContext.readOnlyRootFilesystem = false;
    },
    /readOnlyRootFilesystem is not true/,
  ],
  [
    "shared",
    "capabilities kept",
    (o) => {
      delete daemon(o).securityContext.capabilities;
    },
    /capabilities.drop does not include ALL/,
  ],
  [
    "shared",
    "root user",
    (o) => {
      pod(o).securityContext.runAsUser = 0;
    },
    /runAsUser is 0/,
  ],
  [
    "shared",
    "no seccomp profile",
    (o) => {
      delete pod(o).securityContext.seccompProfile;
    },
    /seccompProfile is unset/,
  ],
  [
    "shared",
    "service links on",
    (o) => {
      delete pod(o).enableServiceLinks;
    },
    /enableServiceLinks must be false/,
  ],
  [
    "shared",
    "no memory request",
    (o) => {
      delete daemon(o).resources.requests.memory;
    },
    /container tokensamplerd: no resources.requests.memory/,
  ],
  [
    "shared",
    "no CPU request",
    (o) => {
      delete daemon(o).resources.requests.cpu;
    },
    /cpu utilisation needs resources.requests.cpu on Deployment\/tokensampler container tokensamplerd/,
  ],
  [
    "shared",
    "metrics annotation on another port",
    (o) => {
      podSpecs(o)[0].template.metadata.annotations["prometheus.io/port"] = "9091";
    },
    /prometheus.io\/port 9091 is not the --metrics_listen port 9090/,
  ],
  [
    "shared",
    "Service selecting no pod",
    (o) => {
      find(o, "Service").spec.selector["app.kubernetes.io/name"] = "tokensamplr";
    },
    /Service\/tokensampler: selector .* selects no rendered pod/,
  ],
  [
    "shared",
    "Service on a port name the pod lacks",
    (o) => {
      find(o, "Service").spec.ports[0].targetPort = "grcp";
    },
    /targets grcp, which no container of Deployment\/tokensampler exposes/,
  ],
  [
    "shared",
    "Service with a cluster IP",
    (o) => {
      delete find(o, "Service").spec.clusterIP;
    },
    /must be headless/,
  ],
  [
    "shared",
    "PDB selecting no pod",
    (o) => {
      find(o, "PodDisruptionBudget").spec.selector.matchLabels["app.kubernetes.io/component"] =
        "sidecar";
    },
    /PodDisruptionBudget\/tokensampler: selector .* selects no rendered pod/,
  ],
  [
    "shared",
    "PDB that blocks every eviction",
    (o) => {
      const pdb = find(o, "PodDisruptionBudget");
      delete pdb.spec.maxUnavailable;
      pdb.spec.minAvailable = 2;
    },
    /minAvailable 2 >= HorizontalPodAutoscaler\/tokensampler minReplicas 2/,
  ],
  [
    "shared",
    "HPA on a Deployment that is not rendered",
    (o) => {
      find(o, "HorizontalPodAutoscaler").spec.scaleTargetRef.name = "sampler";
    },
    /scaleTargetRef apps\/v1 Deployment\/sampler is not a rendered workload/,
  ],
  [
    "shared",
    "Deployment selector not matching its pods",
    (o) => {
      find(o, "Deployment").spec.selector.matchLabels["app.kubernetes.io/name"] = "x";
    },
    /spec.selector .* does not match the pod template's labels/,
  ],
  [
    "shared",
    "schema: a port as text",
    (o) => {
      daemon(o).ports[0].containerPort = "50051";
    },
    /schema: \/spec\/template\/spec\/containers\/0\/ports\/0\/containerPort must be integer/,
  ],
  [
    "shared",
    "schema: a missing required field",
    (o) => {
      delete find(o, "HorizontalPodAutoscaler").spec.maxReplicas;
    },
    /HorizontalPodAutoscaler\/tokensampler: schema: \/spec must have required property maxReplicas/,
  ],
  [
    "sidecar",
    "schema: a misspelt field",
    (o) => {
      sidecar(o).restartPolicyy = sidecar(o).restartPolicy;
    },
    /\/spec\/template\/spec\/initContainers\/0\/restartPolicyy is not a field of the Kubernetes schema/,
  ],
  [
    "shared",
    "schema: an unknown kind",
    (o) => {
      o.push({ apiVersion: "v1", kind: "Servce", metadata: { name: "x" } });
    },
    /no Kubernetes schema for apiVersion v1 kind Servce/,
  ],
  [
    "shared",
    "no tokensamplerd at all",
    (o) => {
      daemon(o).image = "nginx";
      daemon(o).name = "web";
    },
    /no container runs tokensamplerd/,
  ],
];

describe("purpose-broken manifests are rejected", () => {
  for (const [overlay, what, mutate, expected] of mutations) {
    test(`${overlay}: ${what}`, async () => {
      const objects = clone(rendered[overlay]);
      mutate(objects);
      const errors = await checkObjects(objects, flags, dockerfile);
      assert.ok(
        errors.some((e) => expected.test(e)),
        `expected ${expected} among:\n${errors.join("\n")}`,
      );
    });
  }

  test("Dockerfile without the health port in EXPOSE", () => {
    const broken = dockerfile.replace(/^(EXPOSE .*)\b8081\b/m, "$1");
    assert.notEqual(broken, dockerfile);
    const errors = checkDockerfile(broken, podSpecs(rendered.shared));
    assert.ok(
      errors.some((e) => /EXPOSE does not list port 8081/.test(e)),
      errors.join("\n"),
    );
  });

  test("broken YAML is rejected", () => {
    assert.throws(
      () => parseYaml("a: [1, 2\nb: c\n", "broken.yaml"),
      /broken.yaml: YAML document 0/,
    );
  });

  test("schema errors name the object and the field", async () => {
    const errors = await schemaErrors({
      apiVersion: "policy/v1",
      kind: "PodDisruptionBudget",
      metadata: { name: "p" },
      spec: { maxUnavailable: 1, selectr: {} },
    });
    assert.deepEqual(errors, [
      "PodDisruptionBudget/p: /spec/selectr is not a field of the Kubernetes schema",
    ]);
  });

  // Overlays written on top of the committed ones: Kustomize renders them, and the rendered
  // result is what fails.
  const overlaysOnTop = [
    [
      "sidecar",
      "worker socket path patched",
      `- op: replace\n  path: /spec/template/spec/containers/0/env/0/value\n  value: unix:/run/tokensampler/ts.sock\n`,
      /unix:\/run\/tokensampler\/ts.sock is not the socket tokensamplerd listens on/,
    ],
    [
      "shared",
      "grace period patched",
      `- op: replace\n  path: /spec/template/spec/terminationGracePeriodSeconds\n  value: 25\n`,
      /terminationGracePeriodSeconds 25 is less than preStop 5 s \+ --drain_seconds 20 s \+ 5 s to exit = 30 s/,
    ],
  ];
  for (const [overlay, what, patch, expected] of overlaysOnTop) {
    test(`kustomize overlay on ${overlay}: ${what}`, async () => {
      const dir = path.join(scratch, `${overlay}-${what.replace(/\W+/g, "-")}`);
      mkdirSync(dir, { recursive: true });
      writeFileSync(path.join(dir, "patch.yaml"), patch);
      writeFileSync(
        path.join(dir, "kustomization.yaml"),
        `apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ${path.relative(dir, path.join(deploy, overlays[overlay]))}\n` +
          `patches:\n  - path: patch.yaml\n    target:\n      kind: Deployment\n`,
      );
      const errors = await checkObjects(render(kustomize, dir), flags, dockerfile);
      assert.ok(
        errors.some((e) => expected.test(e)),
        `expected ${expected} among:\n${errors.join("\n")}`,
      );
    });
  }
});
