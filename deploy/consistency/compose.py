"""The compose files (compose.yaml, compose.gpu.yaml, compose.litellm.yaml) with the Prometheus and
Grafana files they mount: the server's command, image, state URL, secrets, scrape and dashboard wiring."""

from __future__ import annotations

import argparse
import json
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from antidistill.server.gateway.config import check_state_url
from antidistill.server.gateway.metrics_key import METRICS_KEY_ENV
from antidistill.server.gateway.trusted_gateway import SECRET_ENV

from .common import DEPLOY, IMAGE_REPO, ArgsError, Checks, check_gateway_secret, parse_serve_args, under


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
