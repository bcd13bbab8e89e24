#!/usr/bin/env bash
# Validates the Kubernetes manifests in deploy/k8s (validate.py says what is
# checked); exits non-zero on any problem.
#
#   deploy/k8s/validate.sh                      # schemas and cross-checks
#   KAPPA_CLOUD_BIN=target/debug/kappa-cloud deploy/k8s/validate.sh
#                                               # and `config check` of each pod's config
#
# The checker (kubernetes-validate, with the Kubernetes schemas bundled, so
# it needs no network once installed) goes into a virtualenv cached outside
# the clone, as .ci/run caches its tools. `kubectl kustomize` renders the
# kustomization when kubectl is installed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

version=1.37.0
venv="${KAPPA_TOOLS_CACHE:-$HOME/.cache/kappa-tools}/kubernetes-validate-$version"
if ! "$venv/bin/python" -c "import kubernetes_validate" 2>/dev/null; then
  echo "== installing kubernetes-validate $version into $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$version"
fi

args=()
bin="${KAPPA_CLOUD_BIN:-}"
if [ -n "$bin" ]; then
  [ -x "$bin" ] || { echo "KAPPA_CLOUD_BIN=$bin is not an executable" >&2; exit 2; }
  args+=(--cloud-bin "$bin")
fi
exec "$venv/bin/python" "$here/validate.py" "$here" "${args[@]}"
