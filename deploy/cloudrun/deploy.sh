#!/usr/bin/env bash
# Deploy livecall to Cloud Run.
#
#   PROJECT=my-project REGION=europe-west1 IMAGE=europe-west1-docker.pkg.dev/my-project/livecall/livecall:v1 \
#     deploy/cloudrun/deploy.sh
#
# The image is built beforehand (docker build -f deploy/Dockerfile …, or Cloud Build).
# Secrets come from Secret Manager (--set-secrets), never as literals on the command line;
# create them once, e.g.:  printf %s "$KEY" | gcloud secrets create livecall-gemini-api-key --data-file=-
# DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail

PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null || true)}"
REGION="${REGION:-us-central1}"
SERVICE="${SERVICE:-livecall}"
IMAGE="${IMAGE:-${REGION}-docker.pkg.dev/${PROJECT}/livecall/livecall:latest}"
SERVICE_ACCOUNT="${SERVICE_ACCOUNT:-}"     # runtime identity; needs secretAccessor on the secrets
# Requests per instance: each call is one WebSocket request. Two vCPUs run two workers
# (LIVECALL_WORKERS, one event loop per core), each admitting 75 calls: the per-core figure
# measured by `livecall bench load` (docs/benchmarks.md, "Sizing"); re-derive it there
# before changing the size.
WORKERS="${WORKERS:-2}"
CONCURRENCY="${CONCURRENCY:-$((75 * WORKERS + 10))}"
# livecall's own admission limit, a little under CONCURRENCY so that a full instance still
# answers webhooks (with "busy"), health checks and the API instead of queueing them.
MAX_CALLS="${MAX_CALLS:-$((CONCURRENCY - 10))}"
MAX_INSTANCES="${MAX_INSTANCES:-20}"
# Secret Manager names (NAME:VERSION), mapped to the variables livecall reads.
GEMINI_SECRET="${GEMINI_SECRET:-livecall-gemini-api-key:latest}"
TWILIO_SECRET="${TWILIO_SECRET:-livecall-twilio-auth-token:latest}"
API_TOKEN_SECRET="${API_TOKEN_SECRET:-livecall-api-token:latest}"
DATABASE_SECRET="${DATABASE_SECRET:-livecall-database-url:latest}"
REDIS_SECRET="${REDIS_SECRET:-}"           # e.g. livecall-redis-url:latest (Memorystore)
# Private networking for Cloud SQL / Memorystore (Direct VPC egress), optional.
NETWORK="${NETWORK:-}"
SUBNET="${SUBNET:-}"
PUBLIC_URL="${PUBLIC_URL:-}"               # set if a custom domain fronts the service
# Persistent storage for the call records spool and the recordings (a Filestore share, NFS):
# Cloud Run's own filesystem is in memory and dies with the instance, so without it records
# spooled during a database outage are lost with an instance that is killed.
NFS_SERVER="${NFS_SERVER:-}"               # e.g. 10.0.0.2 (Filestore IP, reached via NETWORK)
NFS_PATH="${NFS_PATH:-/livecall}"

if [[ -z "${PROJECT}" ]]; then
  echo "deploy.sh: set PROJECT (or 'gcloud config set project …')" >&2
  exit 2
fi

run() {
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

secrets="GEMINI_API_KEY=${GEMINI_SECRET},TWILIO_AUTH_TOKEN=${TWILIO_SECRET}"
secrets+=",LIVECALL_API_TOKEN=${API_TOKEN_SECRET},DATABASE_URL=${DATABASE_SECRET}"
if [[ -n "${REDIS_SECRET}" ]]; then
  secrets+=",REDIS_URL=${REDIS_SECRET}"
fi

env_vars="LOG_FORMAT=json,MAX_CONCURRENT_CALLS=${MAX_CALLS},LIVECALL_WORKERS=${WORKERS}"
if [[ -n "${NFS_SERVER}" ]]; then
  env_vars+=",SPOOL_DIR=/data/spool,RECORDINGS_DIR=/data/recordings"
fi

args=(
  run deploy "${SERVICE}"
  --project "${PROJECT}"
  --region "${REGION}"
  --image "${IMAGE}"
  --port 8080
  # One process, many calls: the whole point of the asyncio design.
  --concurrency "${CONCURRENCY}"
  # Audio pumps, database writers and heartbeats run between and around requests: CPU must
  # never be throttled, or every call on the instance stutters.
  --no-cpu-throttling
  --cpu "${WORKERS}"
  --memory 2Gi
  # A warm instance answers the first ring at once (Twilio gives up on a slow webhook).
  --min-instances 1
  --max-instances "${MAX_INSTANCES}"
  # A media stream is one WebSocket request: it may last as long as the call (60 min max).
  # On scale-in or a new revision, Cloud Run sends SIGTERM and waits only ~10 s before
  # SIGKILL: livecall drains on SIGTERM (refuses new calls, ends live ones politely).
  --timeout 3600
  # Keeps a browser (dashboard, API client) on one instance. Twilio sends no cookies, so the
  # webhook and its stream may land on different instances: livecall does not rely on it.
  --session-affinity
  --cpu-boost
  --execution-environment gen2
  --set-secrets "${secrets}"
  --set-env-vars "${env_vars}"
  --allow-unauthenticated  # Twilio must reach /twiml; every request is signature-checked
)
if [[ -n "${NFS_SERVER}" ]]; then
  # spool and recordings on the share (SPOOL_DIR and RECORDINGS_DIR point into it above)
  args+=(
    --add-volume "name=livecall-data,type=nfs,location=${NFS_SERVER}:${NFS_PATH}"
    --add-volume-mount "volume=livecall-data,mount-path=/data"
  )
else
  echo "deploy.sh: no NFS_SERVER: the records spool and recordings live in the instance's" \
    "memory and die with it (set NFS_SERVER=<Filestore IP> to keep them)" >&2
fi
if [[ -n "${SERVICE_ACCOUNT}" ]]; then
  args+=(--service-account "${SERVICE_ACCOUNT}")
fi
if [[ -n "${NETWORK}" ]]; then
  args+=(--network "${NETWORK}" --vpc-egress private-ranges-only)
  if [[ -n "${SUBNET}" ]]; then
    args+=(--subnet "${SUBNET}")
  fi
fi

run gcloud "${args[@]}"

# Twilio signs each request with the URL it called: livecall must know its public URL.
if [[ -z "${PUBLIC_URL}" ]]; then
  if [[ -n "${DRY_RUN:-}" ]]; then
    PUBLIC_URL="https://${SERVICE}-dry-run.a.run.app"
  else
    PUBLIC_URL="$(gcloud run services describe "${SERVICE}" --project "${PROJECT}" \
      --region "${REGION}" --format 'value(status.url)')"
  fi
fi
run gcloud run services update "${SERVICE}" --project "${PROJECT}" --region "${REGION}" \
  --update-env-vars "PUBLIC_URL=${PUBLIC_URL}"

echo "Deployed ${SERVICE}: point the Twilio number's voice webhook at ${PUBLIC_URL}/twiml" >&2
