"""Cross-file checks for deploy/ that schema validators cannot see (run by deploy/check.sh).

    python deploy/check_consistency.py RENDERED_DIR

RENDERED_DIR holds one ``<overlay>.yaml`` per rendered Kustomize overlay. Checked:

* every container's args parse as ``antidistill serve`` would (our flags, then vLLM 0.32's own parser),
  in the Kubernetes overlays, compose.yaml, compose.gpu.yaml and Dockerfile.cpu's CMD;
* ``--embedded-default`` sees the flags it fills in (``--host`` etc. as separate items, not ``--host=``);
* the tiers Secret parses with the server's own loader, within ``--max-lambda`` and the loaded profiles;
* ``--state`` is passed everywhere and its URL (from the Secret, or compose's default) names the Redis
  Service/service shipped beside it, which only the server pods may reach (NetworkPolicy);
* ``--trust-gateway`` never carries the secret itself: it comes from a Secret / the environment;
* the metrics key reaches the server and its scraper from one place: the Secret the Deployment's
  ``ANTIDISTILL_METRICS_KEY`` reads is the ServiceMonitor's scrape credential; in compose the operator's
  ``ANTIDISTILL_METRICS_KEY`` is both the server's variable and the secret Prometheus's
  ``credentials_file`` names;
* selectors and names line up: Deployment/Service/PDB/ServiceMonitor labels and ports, the probes on
  /health at the served port, the ScaledObject's target and queue-depth query, mounts and volumes;
* GPUs requested = ``--tensor-parallel-size``; image tags = the project version (``-cpu`` on CPU);
* the PrometheusRule's groups = prometheus/rules.yml; compose's scrape target, Grafana datasource and
  dashboard datasource uids agree; compose bind-mount sources exist.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import re
import shlex
import sys
import tempfile
import tomllib
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
sys.path.insert(0, str(ROOT))

from antidistill.server.gateway.config import check_state_url  # noqa: E402
from antidistill.server.gateway.metrics_key import METRICS_KEY_ENV  # noqa: E402
from antidistill.server.gateway.tier_checks import TierCheckError, check_profiles_and_lambda  # noqa: E402
from antidistill.server.gateway.trusted_gateway import SECRET_ENV  # noqa: E402
from antidistill.server.startup.serve import serve_parser  # noqa: E402
from antidistill.server.tiers import TiersError, load_tiers  # noqa: E402

IMAGE_REPO = "ghcr.io/example/antidistill"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}
QUEUE_METRIC = "vllm:num_requests_waiting"
STATE_LABEL = "antidistill-redis"  # app.kubernetes.io/name of the shipped Redis (k8s/redis)
# what antidistill.server.embedded.setup.embedded_default adds for each flag that is absent (it looks for the bare flag)
EMBEDDED_DEFAULTS = {
    "--model": "/var/lib/antidistill/cache/SmolLM2-135M-Instruct",
    "--dtype": "float32",
    "--host": "127.0.0.1",
    "--port": "8000",
    "--max-model-len": "2048",
    "--served-model-name": "smollm2-135m-instruct",
}


class Checks:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.passed = 0

    def expect(self, ok: bool, where: str, what: str) -> None:
        if ok:
            self.passed += 1
        else:
            self.failures.append(f"{where}: {what}")


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def vllm_parser() -> argparse.ArgumentParser:
    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError as exc:  # pragma: no cover - depends on the environment
        sys.exit(f"check_consistency: vLLM is not importable ({exc}); run it with the project venv (make venv)")
    return make_arg_parser(FlexibleArgumentParser(prog="antidistill serve"))


class ArgsError(Exception):
    pass


def parse_serve_args(args: list[str], vllm: argparse.ArgumentParser) -> tuple[argparse.Namespace, Any]:
    """(our namespace, vLLM's namespace) as `antidistill serve ARGS` would parse them, or ArgsError."""
    ours, rest = serve_parser().parse_known_args(args)
    if ours.embedded_default:
        glued = [a for a in rest if any(a.startswith(flag + "=") for flag in EMBEDDED_DEFAULTS)]
        if glued:
            raise ArgsError(f"--embedded-default does not see {glued}: write flag and value as separate items")
        rest = [*rest, *(x for flag, value in EMBEDDED_DEFAULTS.items() if flag not in rest for x in (flag, value))]
        rest += [] if "--enforce-eager" in rest else ["--enforce-eager"]
    elif not ours.proxy or not ours.gradient:
        raise ArgsError("--proxy and at least one --gradient NAME=PATH are required")
    for item in ours.gradient:
        name, sep, path = item.partition("=")
        if not (sep and name and path):
            raise ArgsError(f"--gradient {item!r}: expected NAME=PATH")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            theirs = vllm.parse_args(rest)
    except SystemExit:
        last = err.getvalue().strip().splitlines()[-1:] or ["?"]
        raise ArgsError(f"vLLM rejects {shlex.join(rest)}: {last[0]}") from None
    return ours, theirs


def subset(small: dict[str, str] | None, big: dict[str, str] | None) -> bool:
    return bool(small) and all((big or {}).get(k) == v for k, v in small.items())


def under(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def check_tiers_text(c: Checks, where: str, text: str, ours: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiers.yaml"
        path.write_text(text)
        try:
            table = load_tiers(path)
        except TiersError as exc:
            c.expect(False, where, f"tiers file invalid: {exc}")
            return
    profiles = tuple(g.partition("=")[0] for g in ours.gradient) or ("math",)  # embedded default: profile math
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


def check_gateway_secret(c: Checks, where: str, env: dict[str, dict], ours: argparse.Namespace) -> None:
    """Trusted-gateway mode reads its secret from a Secret, never from the args (the process list)."""
    if ours.trust_gateway is None:
        c.expect(SECRET_ENV not in env, where, f"{SECRET_ENV} set without --trust-gateway: the server refuses")
        return
    c.expect(ours.trust_gateway == "", where, "--trust-gateway SECRET in the args: use the Secret")
    c.expect("secretKeyRef" in env.get(SECRET_ENV, {}).get("valueFrom", {}), where, f"{SECRET_ENV} not from a Secret")


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


def check_compose_metrics_key(c: Checks, compose: dict[str, Any], prom: dict[str, Any]) -> None:
    """compose.yaml: the operator's ANTIDISTILL_METRICS_KEY is the server's variable and the secret that
    Prometheus's credentials_file reads (one value: nothing to keep in step)."""
    where = "compose.yaml"
    services = compose.get("services", {})
    env = services.get("antidistill", {}).get("environment", {})
    c.expect(str(env.get(METRICS_KEY_ENV, "")).startswith("${" + METRICS_KEY_ENV + ":?"), where, "metrics key env")
    secrets = {n: s for n, s in (compose.get("secrets") or {}).items() if s.get("environment") == METRICS_KEY_ENV}
    mounted = [n for n in services.get("prometheus", {}).get("secrets", []) if n in secrets]
    c.expect(len(mounted) == 1, where, f"Prometheus is not given the secret from {METRICS_KEY_ENV}")
    for job in prom["scrape_configs"]:
        creds = (job.get("authorization") or {}).get("credentials_file")
        c.expect(bool(mounted) and creds == f"/run/secrets/{mounted[0]}", "prometheus.yml", f"{job['job_name']} key")


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
    paths = [ours.tiers, *(g.partition("=")[2] for g in ours.gradient)]
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


class Reset(list):
    """Compose's ``!reset []``: an override file drops what the base file set for that key."""


class ComposeLoader(yaml.SafeLoader):
    """YAML as compose reads it: ``!reset`` marks a sequence as replacing the base file's."""


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset(loader.construct_sequence(node, deep=True)))


def compose_services(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=ComposeLoader).get("services", {})


def expand_default(value: str) -> str:
    """`${VAR:-default}` → default (what compose uses when VAR is unset)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def check_compose_gateway(c: Checks, services: dict[str, Any], server: dict, ours: argparse.Namespace, port: int):
    """compose.litellm.yaml: the secret reaches both sides from the operator's environment, LiteLLM
    forwards to the server's port and loads the signing callback beside its config."""
    where = "compose.litellm.yaml"
    env = server.get("environment", {})
    c.expect(ours.trust_gateway == "", where, "--trust-gateway SECRET in the command: use the environment")
    published = server.get("ports")
    c.expect(isinstance(published, Reset) and not published, where, "antidistill's port published: ports: !reset []")
    c.expect(str(env.get(SECRET_ENV, "")).startswith("${"), where, f"{SECRET_ENV} must come from the environment")
    litellm = services.get("litellm", {})
    lenv = litellm.get("environment", {})
    c.expect(lenv.get(SECRET_ENV) == env.get(SECRET_ENV), where, "LiteLLM and the server read different secrets")
    c.expect(lenv.get("ANTIDISTILL_API_BASE") == f"http://antidistill:{port}/v1", where, "LiteLLM api_base")
    mounts = {v.split(":")[1]: v.split(":")[0] for v in litellm.get("volumes", [])}
    args = litellm.get("command", [])
    config = args[args.index("--config") + 1] if "--config" in args else ""
    folder = mounts.get(str(Path(config).parent))
    c.expect(folder is not None and (DEPLOY / folder / Path(config).name).is_file(), where, "LiteLLM config mount")
    if folder is not None and (DEPLOY / folder / Path(config).name).is_file():
        settings = yaml.safe_load((DEPLOY / folder / Path(config).name).read_text())
        callback = settings["litellm_settings"]["callbacks"]
        module = callback.rpartition(".")[0].replace(".", "/") + ".py"
        c.expect((DEPLOY / folder / module).is_file(), where, f"callback {callback}: {module} not beside the config")
        bases = [m["litellm_params"]["api_base"] for m in settings["model_list"]]
        c.expect(all(b == "os.environ/ANTIDISTILL_API_BASE" for b in bases), where, "config api_base from env")


def check_compose(c: Checks, vllm: argparse.ArgumentParser, version: str) -> None:
    base, gpu = DEPLOY / "compose.yaml", DEPLOY / "compose.gpu.yaml"
    services = compose_services(base)
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    for path in (base, gpu, DEPLOY / "compose.litellm.yaml"):
        where = path.name
        for name, svc in compose_services(path).items():
            for vol in svc.get("volumes", []):
                source = expand_default(vol.split(":")[0])
                if source.startswith((".", "/")):
                    c.expect((DEPLOY / source).exists(), where, f"{name}: bind-mount source {source} missing")
        server = compose_services(path)["antidistill"]
        want = f"{IMAGE_REPO}:{version}" + ("-cpu" if path != gpu else "")
        image = server.get("image", services["antidistill"]["image"])  # an override may keep compose.yaml's
        c.expect(image == want, where, f"image {image} != {want}")
        try:
            ours, theirs = parse_serve_args([expand_default(str(a)) for a in server["command"]], vllm)
        except ArgsError as exc:
            c.expect(False, where, f"command: {exc}")
            continue
        c.expect(theirs.host == "0.0.0.0", where, "the server must listen on 0.0.0.0 inside the container")
        c.expect(f"antidistill:{theirs.port}" in targets, where, "prometheus.yml does not scrape antidistill")
        try:
            state = urllib.parse.urlsplit(check_state_url(ours.state or ""))
            c.expect(state.hostname in services, where, f"--state host {state.hostname} is no compose service")
        except ValueError as exc:
            c.expect(False, where, f"--state: {exc}")
        if path.name == "compose.litellm.yaml":
            check_compose_gateway(c, compose_services(path), server, ours, theirs.port)
        else:
            check_gateway_secret(c, where, server.get("environment", {}), ours)
        if ours.tiers:
            targets_in = [expand_default(v).split(":")[1] for v in server["volumes"]]
            c.expect(under(ours.tiers, targets_in), where, "--tiers not on a mounted volume")
    c.expect("8000:8000" in services["antidistill"]["ports"], "compose.yaml", "API published on 8000")
    check_compose_metrics_key(c, yaml.safe_load(base.read_text()), prom)
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    ds = datasources["datasources"][0]
    c.expect(ds["url"] == "http://prometheus:9090" and "prometheus" in services, "grafana", "datasource URL")
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/antidistill.yaml").read_text())
    dash_dir = provider["providers"][0]["options"]["path"]
    grafana_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    c.expect(grafana_mounts.get(dash_dir) == "./grafana/dashboards", "grafana", f"dashboards not mounted at {dash_dir}")
    uids = set(datasource_uids(json.loads((DEPLOY / "grafana/dashboards/antidistill.json").read_text())))
    c.expect(uids <= {ds["uid"], "-- Grafana --", "grafana"}, "grafana", f"dashboard datasource uids {uids}")


def datasource_uids(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("datasource"), dict) and "uid" in node["datasource"]:
            yield node["datasource"]["uid"]
        for v in node.values():
            yield from datasource_uids(v)
    elif isinstance(node, list):
        for v in node:
            yield from datasource_uids(v)


def check_dockerfiles(c: Checks, vllm: argparse.ArgumentParser, version: str) -> None:
    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = (ROOT / name).read_text()
        c.expect(f"ARG VERSION={version}\n" in text, name, f"ARG VERSION != project version {version}")
        c.expect('ENTRYPOINT ["/usr/bin/tini", "--", "antidistill", "serve"]' in text, name, "entrypoint")
        c.expect("USER 10001:10001" in text and "EXPOSE 8000" in text and "HEALTHCHECK" in text, name, "user/port")
        c.expect("/health" in text, name, "HEALTHCHECK must GET /health")
        if name == "Dockerfile":
            c.expect("VLLM_USE_V2_MODEL_RUNNER=0" in text, name, "the GPU image must pin the V1 model runner")
        cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
        if name == "Dockerfile.cpu" and cmd:
            try:
                _, theirs = parse_serve_args(json.loads(cmd.group(1)), vllm)
                c.expect(theirs.host == "0.0.0.0", name, "CMD must listen on 0.0.0.0")
            except ArgsError as exc:
                c.expect(False, name, f"CMD: {exc}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rendered", type=Path, help="directory of rendered overlays (<overlay>.yaml)")
    args = ap.parse_args(argv)
    version = project_version()
    vllm = vllm_parser()
    c = Checks()
    rendered = sorted(args.rendered.glob("*.yaml"))
    c.expect(bool(rendered), str(args.rendered), "no rendered overlays")
    for path in rendered:
        check_overlay(c, path.stem, [d for d in yaml.safe_load_all(path.read_text()) if d], vllm, version)
    check_compose(c, vllm, version)
    check_dockerfiles(c, vllm, version)
    for failure in c.failures:
        print(f"FAIL {failure}")
    scope = f"{len(rendered)} overlays, compose, Dockerfiles"
    print(f"consistency: {c.passed} checks passed, {len(c.failures)} failed ({scope})")
    return 1 if c.failures else 0


if __name__ == "__main__":
    sys.exit(main())
