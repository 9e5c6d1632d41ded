#!/usr/bin/env bash
# The whole image, every stage of deploy/Dockerfile (scripts/setup and the
# build inside the build stage), then image_test.py's checks on it. About
# 15 minutes on a 2-core machine, so not part of scripts/test, whose
# deploy_image_test builds only the runtime stage from the binaries built on
# the host. CUDA=OFF: NVIDIA's repository cannot be reached here; pass
# CUDA=ON CUDA_REPO=URL where it can.
#
#   tests/deploy/build_image.sh            # after scripts/build (muonctl is the test's client)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
cache=${MUON_IMAGE_CACHE:-/var/tmp/muon-image-test}
image=localhost/muon-test/muon-server:full
base=localhost/muon-test/debian12:base

/usr/bin/python3 tests/deploy/image_test.py --prepare
export CONTAINERS_CONF=$cache/containers.conf CONTAINERS_STORAGE_CONF=$cache/storage.conf

# The build context: the files git tracks or would track, without build*/.
context=$(mktemp -d "$cache/context.XXXXXX")
trap 'rm -rf "$context"' EXIT
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$context"

start=$(date +%s)
podman build --format docker --network host -f "$context/deploy/Dockerfile" \
  --build-arg "CUDA=${CUDA:-OFF}" ${CUDA_REPO:+--build-arg "CUDA_REPO=$CUDA_REPO"} \
  --build-arg "DEBIAN_IMAGE=$base" --build-arg "DEBIAN_SLIM_IMAGE=$base" \
  -t "$image" "$context"
echo "build_image: built $image in $(( $(date +%s) - start )) s"
podman image inspect --format '{{.Size}}' "$image" | awk '{printf "build_image: %.0f MB\n", $1 / 1e6}'

MUON_IMAGE=$image MUONCTL_BIN=$root/build/bin/muonctl MUON_SOURCE=$root \
  /usr/bin/python3 tests/deploy/image_test.py -v
