#!/usr/bin/env python3
"""Checks deploy/: the Kubernetes manifests against the Kubernetes schemas (kubernetes-validate,
strict: an unknown field is an error) and against each other and the server, and the Containerfile
by rules a container build here cannot check (no container registry is reachable from CI, so the
image is not built: see README, "Deploy a fleet").

    python tools/check_deploy.py [deploy]     # with kubernetes-validate and PyYAML installed

Exits non-zero naming every problem found.
"""
import pathlib
import re
import shlex
import subprocess
import sys

import yaml

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "deploy")
repo = pathlib.Path(__file__).resolve().parent.parent
problems = []


def need(ok, msg):
    if not ok:
        problems.append(msg)


# --- Kubernetes -----------------------------------------------------------------------------------
k8s = root / "k8s"
kust = yaml.safe_load((k8s / "kustomization.yaml").read_text())
listed = kust.get("resources", [])
present = sorted(p.name for p in k8s.glob("*.yaml") if p.name != "kustomization.yaml")
need(sorted(listed) == present, f"kustomization resources {sorted(listed)} != manifests {present}")
files = [str(k8s / f) for f in listed]
r = subprocess.run(["kubernetes-validate", "--strict", "--quiet", *files], capture_output=True, text=True)
need(r.returncode == 0, "kubernetes-validate: " + (r.stdout + r.stderr).strip())

docs = {}
for f in listed:
    for d in yaml.safe_load_all((k8s / f).read_text()):
        docs[d["kind"]] = d
for kind in ["Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap", "PersistentVolumeClaim"]:
    need(kind in docs, f"no {kind} among the manifests")
dep = docs["Deployment"]
labels = dep["spec"]["template"]["metadata"]["labels"]
need(dep["spec"]["selector"]["matchLabels"].items() <= labels.items(), "Deployment selector does not match its pods")
need(docs["Service"]["spec"]["selector"].items() <= labels.items(), "Service selector does not match the pods")
need(docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items(), "PDB selector does not match the pods")
need(docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"], "HPA targets another Deployment")

pod = dep["spec"]["template"]["spec"]
c = pod["containers"][0]
need(c["readinessProbe"]["httpGet"]["path"] == "/ready", "readiness probe is not /ready")
need(c["livenessProbe"]["httpGet"]["path"] == "/health", "liveness probe is not /health")
need(c["resources"]["limits"].get("nvidia.com/gpu") is not None, "no nvidia.com/gpu limit")
need(pod["securityContext"].get("runAsNonRoot") is True, "pods may run as root")
need(c["securityContext"].get("readOnlyRootFilesystem") is True, "root file system is writable")
export = [m for m in c["volumeMounts"] if m["mountPath"] == "/export"]
need(export and export[0].get("readOnly") is True, "the export is not mounted read-only")
limits = docs["ConfigMap"]["data"]
timeout = float(limits["QADAPT_REQUEST_TIMEOUT"])
pause = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
grace = pod["terminationGracePeriodSeconds"]
need(grace >= timeout + pause, f"terminationGracePeriodSeconds {grace} < request timeout {timeout} + preStop {pause}: a drain would be cut short")
# Every $(VAR) in the arguments comes from the ConfigMap, and every metric the HPA scales on exists.
for arg in c["args"]:
    for var in re.findall(r"\$\((\w+)\)", arg):
        need(var in limits, f"argument {arg} reads {var}, which the ConfigMap lacks")
metrics_src = (repo / "crates/runtime/src/serve/metrics.rs").read_text()
for m in docs["HorizontalPodAutoscaler"]["spec"]["metrics"]:
    name = m["pods"]["metric"]["name"]
    need(f'"{name}"' in metrics_src, f"HPA metric {name} is not one /metrics exports")

# --- Containerfile --------------------------------------------------------------------------------
text = (root / "Containerfile").read_text()
lines = re.sub(r"\\\n", " ", text).splitlines()
instr = [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if len(l.split(None, 1)) > 1 else "")
         for l in lines if l.strip() and not l.lstrip().startswith("#")]
stages = [a.split()[-1] for k, a in instr if k == "FROM" and " AS " in f" {a.upper()} "]
need(len([k for k, _ in instr if k == "FROM"]) >= 2, "not a multi-stage build")
for k, a in instr:
    if k == "COPY" and "--from=" in a:
        src = re.search(r"--from=(\S+)", a).group(1)
        need(src in stages, f"COPY --from={src}: no such stage")
    if k == "ADD":
        need("http" not in a, f"ADD of a URL: {a}")
final = instr[max(i for i, (k, _) in enumerate(instr) if k == "FROM"):]
kinds = [k for k, _ in final]
for k in ["USER", "HEALTHCHECK", "ENTRYPOINT", "EXPOSE"]:
    need(k in kinds, f"the final stage has no {k}")
user = [a for k, a in final if k == "USER"]
need(user and user[-1].split(":")[0] not in ("0", "root"), "the final stage runs as root")
entry = [a for k, a in final if k == "ENTRYPOINT"]
need(entry and entry[-1].startswith("[") and "qadapt-run" in entry[-1], "ENTRYPOINT is not qadapt-run in exec form")
hc = [a for k, a in final if k == "HEALTHCHECK"]
need(hc and "/health" in hc[-1], "HEALTHCHECK does not ask /health")
need("VARIANT" in text and "cpu" in text, "no CPU variant")
need((repo / ".containerignore").exists() and "target/" in (repo / ".containerignore").read_text(),
     ".containerignore does not keep target/ out of the build context")

if problems:
    for p in problems:
        print(f"deploy: {p}", file=sys.stderr)
    sys.exit(1)
print(f"deploy: {len(files)} manifests valid against the Kubernetes schemas and consistent; Containerfile passes its rules")
