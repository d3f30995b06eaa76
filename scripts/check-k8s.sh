#!/usr/bin/env bash
# Validates the Kubernetes manifests in deploy/k8s offline: yamllint, then every resource file
# against the Kubernetes schemas (kubernetes-validate, strict: unknown fields are errors), and
# the kustomizations' listed resources against the files present. Where kubectl is installed,
# the rendered kustomization (`kubectl kustomize`) is validated too. Installs what it needs from
# PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v kubernetes-validate >/dev/null || ! command -v yamllint >/dev/null; then
  pip install -q "kubernetes-validate==1.*" yamllint
fi
yamllint -d '{extends: default, rules: {line-length: {max: 120}, document-start: disable, comments: {min-spaces-from-content: 1}}}' deploy/k8s
for dir in deploy/k8s/*/; do
  kust="$dir/kustomization.yaml"
  [ -f "$kust" ] || { echo "$dir: no kustomization.yaml" >&2; exit 1; }
  # Every manifest is listed, and every listed one exists.
  listed=$(python3 -c "import sys, yaml; print('\n'.join(yaml.safe_load(open(sys.argv[1]))['resources']))" "$kust" | sort)
  present=$(cd "$dir" && ls ./*.yaml | sed 's|^\./||' | grep -v '^kustomization.yaml$' | sort)
  if [ "$listed" != "$present" ]; then
    echo "$kust lists: $listed; the directory has: $present" >&2
    exit 1
  fi
  (cd "$dir" && kubernetes-validate --strict --quiet $listed)
  if command -v kubectl >/dev/null && kubectl kustomize "$dir" >/tmp/ha-edge-k8s-render.yaml 2>/dev/null; then
    kubernetes-validate --strict --quiet /tmp/ha-edge-k8s-render.yaml
    echo "$dir: rendered and validated ($(grep -c '^kind:' /tmp/ha-edge-k8s-render.yaml) resources)"
  else
    echo "$dir: $(echo "$listed" | wc -l) manifests validated"
  fi
done
