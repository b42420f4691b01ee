"""The rendered Kubernetes overlays: each server Deployment's args, its Secrets and mounts, and the
objects around it (Service, PDB, ServiceMonitor, ScaledObject, PrometheusRule, the shipped Redis)."""

from __future__ import annotations

import argparse
import base64
import re
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import yaml
from antidistill.server.embedded.setup import EMBEDDED_PROFILE
from antidistill.server.gateway.config import check_state_url
from antidistill.server.gateway.metrics_key import METRICS_KEY_ENV
from antidistill.server.gateway.tier_checks import TierCheckError, check_profiles_and_lambda
from antidistill.server.startup.flags import parse_gradient
from antidistill.server.tiers import TiersError, load_tiers

from .common import DEPLOY, IMAGE_REPO, ArgsError, Checks, check_gateway_secret, parse_serve_args, subset, under

QUEUE_METRIC = "vllm:num_requests_waiting"
STATE_LABEL = "antidistill-redis"  # app.kubernetes.io/name of the shipped Redis (k8s/redis)


def check_tiers_text(c: Checks, where: str, text: str, ours: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiers.yaml"
        path.write_text(text)
        try:
            table = load_tiers(path)
        except TiersError as exc:
            c.expect(False, where, f"tiers file invalid: {exc}")
            return
    profiles = tuple(parse_gradient(g)[0] for g in ours.gradient) or (EMBEDDED_PROFILE,)
    try:  # the server's own start-up (and reload) check
        check_profiles_and_lambda(table, profiles, ours.max_lambda)
        c.expect(True, where, "tiers servable")
    except TierCheckError as exc:
        c.expect(False, where, f"tiers not servable: {exc}")


def is_state_object(doc: dict[str, Any]) -> bool:
    """Part of the shared limit state (k8s/redis): the Redis objects and the Secret with its URL."""
    labels = doc["metadata"].get("labels") or {}
    secret = doc["kind"] == "Secret" and doc["metadata"]["name"].startswith("antidistill-state")
    return secret or labels.get("app.kubernetes.io/name") == STATE_LABEL


def env_secret_value(container: dict[str, Any], value: str, secrets: dict[str, dict]) -> tuple[str | None, str]:
    """``$(VAR)`` in args → (the value from the container's env and the rendered Secret it names, or
    None if the Secret is not rendered here, i.e. created by the operator; where it came from)."""
    match = re.fullmatch(r"\$\((\w+)\)", value)
    if not match:
        return value, "literal"
    env = {e["name"]: e for e in container.get("env", [])}
    ref = env.get(match.group(1), {}).get("valueFrom", {}).get("secretKeyRef")
    if ref is None:
        return None, f"no env {match.group(1)} from a Secret"
    secret = secrets.get(ref["name"])
    if secret is None:
        return None, f"Secret {ref['name']} (not rendered)"
    return base64.b64decode(secret["data"][ref["key"]]).decode(), f"Secret {ref['name']}"


def check_state(c: Checks, where: str, container: dict, pod_labels: dict, ours: argparse.Namespace, docs: list[dict]):
    """--state is passed and reaches the Redis shipped beside it; only the server pods reach that Redis."""
    c.expect(ours.state is not None, where, "--state not passed (limits would be per replica)")
    if ours.state is None:
        return
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    url, source = env_secret_value(container, ours.state, secrets)
    c.expect(source != "literal" or "@" not in ours.state, where, "a Redis password written in the args")
    c.expect(url is not None or not secrets, where, f"--state {ours.state}: {source}")
    if url is None:
        return
    try:
        check_state_url(url)
    except ValueError as exc:
        c.expect(False, where, f"--state from {source}: {exc}")
        return
    split = urllib.parse.urlsplit(url)
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    svc = services.get(split.hostname or "")
    c.expect(svc is not None, where, f"--state host {split.hostname} is not the shipped Redis Service")
    redis_pods = [d for d in docs if d["kind"] == "Deployment"]
    if svc is None or len(redis_pods) != 1:
        c.expect(svc is None or len(redis_pods) == 1, where, "expected one Redis Deployment")
        return
    pod = redis_pods[0]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    c.expect(any(p["port"] == (split.port or 6379) for p in svc["spec"]["ports"]), where, "--state port != Service")
    c.expect(subset(svc["spec"]["selector"], labels), where, "Redis Service selector ⊄ Redis pod labels")
    (redis,) = pod["spec"]["containers"]
    c.expect(redis["securityContext"].get("readOnlyRootFilesystem") is True, where, "Redis readOnlyRootFilesystem")
    c.expect(pod["spec"]["securityContext"].get("runAsNonRoot") is True, where, "Redis runAsNonRoot")
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    c.expect(len(policies) == 1, where, "the Redis needs a NetworkPolicy (it has no password)")
    for policy in policies:
        spec = policy["spec"]
        c.expect(subset(spec["podSelector"]["matchLabels"], labels), where, "NetworkPolicy does not select Redis")
        sources = [f["podSelector"]["matchLabels"] for rule in spec["ingress"] for f in rule["from"]]
        c.expect(all(subset(src, pod_labels) for src in sources), where, "NetworkPolicy admits more than the server")


def check_metrics_key(c: Checks, where: str, env: dict[str, dict], monitors: list[dict], ours: argparse.Namespace):
    """The server's metrics key comes from a Secret (never the args), and every ServiceMonitor endpoint
    scrapes with that same Secret key: a scraper with another key gets 401s, one with none 403s."""
    ref = env.get(METRICS_KEY_ENV, {}).get("valueFrom", {}).get("secretKeyRef")
    c.expect(ref is not None and ours.metrics_key_file is None, where, f"{METRICS_KEY_ENV} not from a Secret")
    for sm in monitors:
        for endpoint in sm["spec"]["endpoints"]:
            auth = endpoint.get("authorization") or {}
            same = ref is not None and auth.get("credentials") == {"name": ref["name"], "key": ref["key"]}
            c.expect(auth.get("type", "Bearer") == "Bearer" and same, where, "ServiceMonitor scrapes without the key")


def check_overlay(c: Checks, name: str, docs: list[dict[str, Any]], vllm: argparse.ArgumentParser, version: str):
    where = f"overlay {name}"
    state_docs = [d for d in docs if is_state_object(d)]
    docs = [d for d in docs if not is_state_object(d)]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    kinds = ("Namespace", "Deployment", "Service", "PodDisruptionBudget", "PersistentVolumeClaim", "Secret")
    for kind in kinds:
        c.expect(len(by_kind.get(kind, [])) == 1, where, f"expected exactly one {kind}")
    if any(len(by_kind.get(kind, [])) != 1 for kind in kinds):
        return
    namespace = by_kind["Namespace"][0]["metadata"]["name"]
    for d in docs:
        if d["kind"] != "Namespace":
            c.expect(d["metadata"].get("namespace") == namespace, where, f"{d['kind']} not in namespace {namespace}")
    dep, svc, pdb = by_kind["Deployment"][0], by_kind["Service"][0], by_kind["PodDisruptionBudget"][0]
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    c.expect(subset(dep["spec"]["selector"]["matchLabels"], pod_labels), where, "Deployment selector ⊄ pod labels")
    c.expect(subset(svc["spec"]["selector"], pod_labels), where, "Service selector ⊄ pod labels")
    c.expect(subset(pdb["spec"]["selector"]["matchLabels"], pod_labels), where, "PDB selector ⊄ pod labels")

    spec = pod["spec"]
    (container,) = spec["containers"]
    try:
        ours, theirs = parse_serve_args(container["args"], vllm)
    except ArgsError as exc:
        c.expect(False, where, f"args: {exc}")
        return
    c.expect(True, where, "args parse")
    port = theirs.port
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    c.expect(named.get("http") == port, where, f"containerPort 'http' != --port {port}")
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    c.expect(svc_ports.get("http", {}).get("targetPort") == "http", where, "Service port http → targetPort http")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container.get(probe, {}).get("httpGet", {})
        c.expect(get.get("path") == "/health" and get.get("port") == "http", where, f"{probe} must GET /health on http")
    c.expect(
        container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 1200,
        where,
        "startupProbe allows < 20 min for model loading",
    )

    image, _, tag = container["image"].rpartition(":")
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    cpu_image = tag.endswith("-cpu")
    c.expect(image == IMAGE_REPO and tag in (version, f"{version}-cpu"), where, f"image {container['image']}")
    c.expect(cpu_image == (gpus is None), where, "GPU resources iff the GPU image")
    c.expect(cpu_image == ours.embedded_default, where, "--embedded-default iff the CPU image")
    if gpus is not None:
        c.expect(int(gpus) == theirs.tensor_parallel_size, where, f"{gpus} GPUs != --tensor-parallel-size")
        c.expect(container["resources"]["requests"].get("nvidia.com/gpu") == gpus, where, "GPU requests != limits")

    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    c.expect(all(m["name"] in volumes for m in mounts.values()), where, "a volumeMount names no volume")
    c.expect(spec["securityContext"].get("runAsNonRoot") is True, where, "runAsNonRoot")
    c.expect(container["securityContext"].get("readOnlyRootFilesystem") is True, where, "readOnlyRootFilesystem")
    c.expect(under("/tmp", mounts) and "/var/lib/antidistill" in mounts, where, "writable /tmp and HOME mounts")
    paths = [ours.tiers, *(parse_gradient(g)[1] for g in ours.gradient)]
    if ours.proxy:
        paths += [ours.proxy, theirs.model]
    for path in paths:
        c.expect(under(path, list(mounts)), where, f"{path} is on no mounted volume")
    secret = by_kind["Secret"][0]
    tiers_mount = next((p for p, m in mounts.items() if m["name"] == "tiers"), None)
    c.expect(volumes["tiers"]["secret"]["secretName"] == secret["metadata"]["name"], where, "tiers Secret name")
    c.expect(tiers_mount is not None and ours.tiers == f"{tiers_mount}/tiers.yaml", where, "--tiers not the Secret")
    c.expect("subPath" not in mounts.get(tiers_mount or "", {}), where, "tiers mounted with subPath: no updates")
    check_tiers_text(c, where, base64.b64decode(secret["data"]["tiers.yaml"]).decode(), ours)
    check_state(c, where, container, pod_labels, ours, state_docs)
    env = {e["name"]: e for e in container.get("env", [])}
    check_gateway_secret(c, where, env, ours)
    check_metrics_key(c, where, env, by_kind.get("ServiceMonitor", []), ours)

    for sm in by_kind.get("ServiceMonitor", []):
        c.expect(subset(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]), where, "ServiceMonitor sel")
        c.expect(
            all(e["port"] in svc_ports and e["path"] == "/metrics" for e in sm["spec"]["endpoints"]),
            where,
            "ServiceMonitor endpoints must scrape /metrics on a named Service port",
        )
    for so in by_kind.get("ScaledObject", []):
        c.expect(so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"], where, "ScaledObject target")
        c.expect(so["spec"]["minReplicaCount"] >= 1, where, "ScaledObject must not scale to zero")
        for trig in so["spec"]["triggers"]:
            query = trig["metadata"]["query"]
            c.expect(trig["type"] == "prometheus" and QUEUE_METRIC in query, where, f"trigger not on {QUEUE_METRIC}")
            c.expect(
                f'namespace="{namespace}"' in query and f'service="{svc["metadata"]["name"]}"' in query,
                where,
                "ScaledObject query must select this namespace and Service",
            )
    for rule in by_kind.get("PrometheusRule", []):
        wanted = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
        c.expect(rule["spec"] == wanted, where, "PrometheusRule spec differs from deploy/prometheus/rules.yml")
