"""Cross-file checks for deploy/ that schema validators cannot see (run by deploy/check.sh).

    python deploy/check_consistency.py RENDERED_DIR

RENDERED_DIR holds one ``<overlay>.yaml`` per rendered Kustomize overlay. Checked:

* every container's args parse as ``antidistill serve`` would (our flags, then vLLM 0.32's own parser),
  in the Kubernetes overlays, compose.yaml, compose.gpu.yaml and Dockerfile.cpu's CMD;
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

The checks live in ``deploy/consistency/`` (``common``: args as the server parses them; ``kubernetes``;
``compose``); this script runs them with the Dockerfiles' and prints the tally.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml
from consistency.common import ROOT, ArgsError, Checks, parse_serve_args, project_version, vllm_parser
from consistency.compose import check_compose
from consistency.kubernetes import check_overlay


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
