#!/usr/bin/env bash
# End-to-end on a throwaway kind cluster with MinIO, on the CPU:
#   create the cluster -> build and load the CPU image -> deploy MinIO and the base ->
#   upload the examples -> relit-k8s submit (--gpus-per-pod 0 --parallelism 2) ->
#   wait for the Job -> check the outputs with relit-k8s status -> delete the cluster.
#
# Needs: docker, kind (v0.33, whose node images are pinned below by digest), kubectl, and
# relit-k8s installed here (pip install -e .).
# Usage: scripts/kind-e2e.sh            (KEEP_CLUSTER=1 keeps the cluster for poking around)
set -euo pipefail

cd "$(dirname "$0")/.."
CLUSTER=${CLUSTER:-relit-e2e}
IMAGE=${IMAGE:-relit-k8s:dev-cpu}
NS=relit
PORT=${PORT:-19000}
ITERATIONS=${ITERATIONS:-2}
# The node image by digest, from the release notes of kind v0.33.0 (a tag alone may name a
# build made for another kind release). Kubernetes 1.37, the newest that relit-k8s supports.
NODE_IMAGE=${NODE_IMAGE:-kindest/node:v1.37.0@sha256:a1ed56cfb0e7b93589bdf97c8cd566405a265939e3620fc4f5de89adff580ae5}

for tool in docker kind kubectl relit-k8s; do
  command -v "$tool" >/dev/null || { echo "error: $tool is not installed" >&2; exit 2; }
done

forward_pid=""
cleanup() {
  [ -n "$forward_pid" ] && kill "$forward_pid" 2>/dev/null || true
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

echo "== kind cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --config manifests/dev/kind.yaml --image "$NODE_IMAGE" \
  --wait 120s
kubectl config use-context "kind-$CLUSTER"

echo "== CPU image $IMAGE"
scripts/build-image.sh --tag "$IMAGE"  # the same build as CI's (tests/test_image.py)
kind load docker-image "$IMAGE" --name "$CLUSTER"

echo "== MinIO, namespace, RBAC, S3 secret"
kubectl apply -k manifests/dev
kubectl -n "$NS" rollout status deployment/minio --timeout=180s
kubectl -n "$NS" wait --for=condition=complete job/create-bucket --timeout=180s

echo "== upload the examples through a port-forward"
kubectl -n "$NS" port-forward svc/minio "$PORT:9000" >/dev/null 2>&1 &
forward_pid=$!
export AWS_ENDPOINT_URL="http://127.0.0.1:$PORT" AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=relit-dev AWS_SECRET_ACCESS_KEY=relit-dev-secret
for _ in $(seq 30); do
  python3 -c "import boto3; boto3.client('s3').list_buckets()" 2>/dev/null && break
  sleep 1
done
python3 - <<'EOF'
import pathlib, boto3
s3 = boto3.client("s3")
for folder, prefix in (("examples/images", "in"), ("examples/refs", "refs")):
    for path in sorted(pathlib.Path(folder).iterdir()):
        if path.is_file() and not path.name.startswith("."):
            s3.upload_file(str(path), "relit", f"{prefix}/{path.name}")
            print("uploaded", f"s3://relit/{prefix}/{path.name}")
EOF

echo "== submit"
submit_out=$(relit-k8s submit --input s3://relit/in --refs s3://relit/refs \
  --output s3://relit/out --iterations "$ITERATIONS" --image "$IMAGE" --namespace "$NS" \
  --gpus-per-pod 0 --parallelism 2 --cpu 500m --memory 2Gi \
  --s3-endpoint http://minio:9000 --s3-region us-east-1 --image-pull-policy Never)
echo "$submit_out"
run_id=$(echo "$submit_out" | sed -n 's/^run \([a-z0-9-]*\): Job .*/\1/p')
[ -n "$run_id" ] || { echo "error: no run id in the submit output" >&2; exit 1; }

echo "== wait for Job $run_id"
# complete or failed, whichever comes first: a failing run ends the script at once
kubectl -n "$NS" wait --for=condition=complete "job/$run_id" --timeout=900s &
complete_pid=$!
kubectl -n "$NS" wait --for=condition=failed "job/$run_id" --timeout=900s &
failed_pid=$!
ended=""
while [ -z "$ended" ]; do
  if ! kill -0 "$complete_pid" 2>/dev/null; then
    wait "$complete_pid" && ended=complete || ended=timeout
  elif ! kill -0 "$failed_pid" 2>/dev/null; then
    wait "$failed_pid" && ended=failed || ended=timeout
  else
    sleep 2
  fi
done
kill "$complete_pid" "$failed_pid" 2>/dev/null || true
echo "Job $run_id: $ended"
if [ "$ended" != complete ]; then
  kubectl -n "$NS" describe "job/$run_id" || true
  relit-k8s logs "$run_id" --namespace "$NS" --tail 50 || true
  exit 1
fi

echo "== check"
relit-k8s status "$run_id" --output s3://relit/out --namespace "$NS"
relit-k8s status "$run_id" --output s3://relit/out --namespace "$NS" -o json > /tmp/relit-e2e-status.json
python3 - "$ITERATIONS" <<'EOF'
import json, sys
s = json.load(open("/tmp/relit-e2e-status.json"))
expected = 4 * 3 * int(sys.argv[1])
assert s["state"] == "done", s["state"]
assert s["items_done"] + s["items_skipped"] == expected and s["items_failed"] == 0, s
assert s["job"]["state"] == "complete", s["job"]
print(f"e2e ok: {expected} outputs, Job complete")
EOF
relit-k8s logs "$run_id" --namespace "$NS" --index 0 --tail 5
