#!/usr/bin/env bash
# The toy-cat example on a real (single-node) Kubernetes cluster in Docker, with kind: the
# operator and trainer images built from this repository, MinIO, the Helm chart, and the
# tiny model that `make demo` trains (CPU only: no GPU needed).
#
#   scripts/kind-demo.sh            # create the cluster (if needed), build, install, train
#   scripts/kind-demo.sh --delete   # delete the kind cluster
#
# Needs: docker, kind, kubectl, helm, and `make` having installed .venv (for the tiny
# model and the upload). The trainer image is a CUDA build of several GB: the first run
# takes a while.
#
# NOT RUN IN CI: this repository's CI machines have no Docker. It follows exactly the steps
# of docs/quickstart.md and of the simulated cluster in tests/e2e/ (which CI does run);
# report anything that differs.
set -euo pipefail

CLUSTER=${KIND_CLUSTER:-dreambooth}
TAG=${TAG:-kind-demo}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY="$ROOT/.venv/bin/python"
WORK="$ROOT/runs/kind-demo"
MINIO_USER=admin
MINIO_PASSWORD=${MINIO_PASSWORD:-kind-demo-$(date +%s)}

say() { printf '\n\033[1;32m==> %s\033[0m\n' "$*"; }
need() { command -v "$1" >/dev/null 2>&1 || { echo "error: $1 is not installed" >&2; exit 1; }; }

if [ "${1:-}" = "--delete" ]; then
  kind delete cluster --name "$CLUSTER"
  exit 0
fi
for tool in docker kind kubectl helm; do need "$tool"; done
[ -x "$PY" ] || { echo "error: run 'make' first (it installs .venv)" >&2; exit 1; }

say "kind cluster '$CLUSTER'"
if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --wait 120s
fi
kubectl config use-context "kind-$CLUSTER" >/dev/null

say "images (operator: small; trainer: CUDA torch, several GB)"
docker build --target operator -t "dreambooth-operator:$TAG" "$ROOT"
docker build --target trainer -t "dreambooth-trainer:$TAG" "$ROOT"
kind load docker-image --name "$CLUSTER" "dreambooth-operator:$TAG" "dreambooth-trainer:$TAG"

say "MinIO in namespace minio"
kubectl create namespace minio --dry-run=client -o yaml | kubectl apply -f -
kubectl -n minio create secret generic minio-root \
  --from-literal=MINIO_ROOT_USER="$MINIO_USER" --from-literal=MINIO_ROOT_PASSWORD="$MINIO_PASSWORD" \
  --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -f - <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: minio, namespace: minio}
spec:
  replicas: 1
  selector: {matchLabels: {app: minio}}
  template:
    metadata: {labels: {app: minio}}
    spec:
      containers:
        - name: minio
          image: quay.io/minio/minio:latest
          args: [server, /data]
          envFrom: [{secretRef: {name: minio-root}}]
          ports: [{containerPort: 9000}]
          readinessProbe: {httpGet: {path: /minio/health/ready, port: 9000}}
          volumeMounts: [{name: data, mountPath: /data}]
      volumes: [{name: data, emptyDir: {}}]
---
apiVersion: v1
kind: Service
metadata: {name: minio, namespace: minio}
spec:
  selector: {app: minio}
  ports: [{port: 9000, targetPort: 9000}]
EOF
kubectl -n minio rollout status deploy/minio --timeout=180s
# the credentials of a running MinIO are those it started with
MINIO_PASSWORD=$(kubectl -n minio get secret minio-root -o jsonpath='{.data.MINIO_ROOT_PASSWORD}' | base64 -d)

say "the tiny model and four toy-cat photos, uploaded where examples/toy-cat.yaml looks"
mkdir -p "$WORK"
kubectl -n minio port-forward svc/minio 19000:9000 >"$WORK/port-forward.log" 2>&1 &
FORWARD=$!
trap 'kill $FORWARD 2>/dev/null || true' EXIT
sleep 3
MINIO_USER=$MINIO_USER MINIO_PASSWORD=$MINIO_PASSWORD WORK=$WORK "$PY" - <<'EOF'
import os
from pathlib import Path

from minio import Minio

from dreambooth.demo import draw_toy_cats
from dreambooth.trainer.storage import S3Settings, open_storage
from dreambooth.trainer.tiny import build_tiny_model

work = Path(os.environ["WORK"])
settings = S3Settings(endpoint="127.0.0.1:19000", secure=False, region="us-east-1",
                      access_key=os.environ["MINIO_USER"], secret_key=os.environ["MINIO_PASSWORD"])
client = Minio(settings.endpoint, settings.access_key, settings.secret_key, secure=False)
for bucket in ("models", "training-data", "dreambooth"):
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
model = work / "sd15"
if not (model / "model_index.json").is_file():
    build_tiny_model(model, resolution=64)
draw_toy_cats(work / "toy-cat")
open_storage("s3://models/sd15/", settings).upload_dir(model)
open_storage("s3://training-data/toy-cat/", settings).upload_dir(work / "toy-cat")
print("uploaded s3://models/sd15/ and s3://training-data/toy-cat/")
EOF

say "the credentials Secret and the operator (Helm chart)"
kubectl create secret generic minio-credentials \
  --from-literal=AWS_ACCESS_KEY_ID="$MINIO_USER" --from-literal=AWS_SECRET_ACCESS_KEY="$MINIO_PASSWORD" \
  --dry-run=client -o yaml | kubectl apply -f -
helm upgrade --install dreambooth-operator "$ROOT/charts/dreambooth-operator" \
  -n dreambooth-system --create-namespace \
  --set image.repository=dreambooth-operator,image.tag="$TAG",image.pullPolicy=Never \
  --set trainer.image.repository=dreambooth-trainer,trainer.image.tag="$TAG" \
  --set storage.endpoint=minio.minio.svc:9000,storage.secure=false \
  --set storage.outputRoot=s3://dreambooth,storage.credentialsSecret=minio-credentials \
  --set operator.pollIntervalSeconds=2
kubectl -n dreambooth-system rollout status deploy/dreambooth-operator --timeout=180s

say "kubectl apply: examples/toy-cat.yaml with tiny settings (CPU, a 64-pixel model)"
kubectl delete dbj toy-cat --ignore-not-found --wait=true
"$PY" - <<'EOF' | kubectl apply -f -
import yaml

doc = yaml.safe_load(open("examples/toy-cat.yaml"))
doc["spec"].update(
    training={"steps": 100, "batchSize": 1, "resolution": 64, "learningRate": 1e-3},
    checkpointing={"everySteps": 25},
    resources={"gpusPerNode": 0},
)
doc["spec"]["validation"].update(everySteps=50, inferenceSteps=4, imagesPerPrompt=1)
print(yaml.safe_dump(doc))
EOF

say "watching (Ctrl-C stops watching, not the job)"
kubectl get dbj toy-cat -w &
WATCH=$!
trap 'kill $FORWARD $WATCH 2>/dev/null || true' EXIT
kubectl wait dbj/toy-cat --for=jsonpath='{.status.phase}'=Succeeded --timeout=30m
kill $WATCH 2>/dev/null || true

say "done"
kubectl get dbj toy-cat -o jsonpath='{.status.outputs}{"\n"}'
kubectl describe dbj toy-cat | sed -n '/Events:/,$p'
echo "outputs: s3://dreambooth/default/toy-cat/ (kubectl -n minio port-forward svc/minio 9000)"
echo "delete the cluster: scripts/kind-demo.sh --delete"
