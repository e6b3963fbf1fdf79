#!/usr/bin/env bash
# Build, register and run the beam-captions Flex Template on Dataflow (GPU only on the caption steps).
#
#   templates/dataflow/launch.sh image                      # build and push the image (Cloud Build)
#   templates/dataflow/launch.sh template                   # write the template spec (image + metadata.json)
#   templates/dataflow/launch.sh run INPUT OUTPUT [NAME=VALUE ...]   # start a job (INPUT '-': none)
#
# INPUT and OUTPUT are gs:// paths; NAME=VALUE are further template parameters, named like the CLI flags
# with underscores (metadata.json): generate_previews=true, captioning_window_size=128,
# vllm_kwargs={"max_model_len": 16384}, enhance_captions=true, ...
#
# Settings come from the environment (defaults after the colon):
#   PROJECT (required)   REGION: us-central1   BUCKET (required, gs://name for staging and the spec)
#   REPOSITORY: beam-captions (Artifact Registry Docker repository)   TAG: latest
#   IMAGE: $REGION-docker.pkg.dev/$PROJECT/$REPOSITORY/beam-captions:$TAG
#   TEMPLATE: $BUCKET/templates/beam-captions.json
#   BUILDER: cloudbuild (or docker: build and push with the local docker engine)
#   MODEL_DIR: $BUCKET/models/captioner   the captioner's weights (a gs:// prefix each worker machine copies
#              once, or /models/captioner when baked into the image with CAPTION_MODEL)
#   CAPTION_MODEL, ENHANCE_MODEL: (none)   Hugging Face ids to bake into the image under /models
#   ACCELERATOR: type:nvidia-l4;count:1;machine_type:g2-standard-8;install-nvidia-driver:5xx
#                the resource hint of the GPU steps (right fitting: only those steps get GPU workers); with
#                the default dataflow_layout=fused they decode too: size machine_type by the README's
#                CPU cores per GPU (g2-standard-8 keeps up with about 10,000 1080p windows per GPU-hour)
#   CPU_MACHINE_TYPE: n2-standard-8 (workers of every other step)   MAX_WORKERS: 20
#   LAUNCHER_MACHINE_TYPE: n2-standard-4 (the launcher pulls this large image)
#   JOB_NAME: beam-captions-<UTC time>   SERVICE_ACCOUNT: (project default)
#
# Streaming: `run INPUT OUTPUT streaming=true` watches INPUT for new clips; for Pub/Sub notifications of
# a bucket give `run - OUTPUT streaming=true input_subscription=projects/P/subscriptions/S`. Either adds
# --enable-streaming-engine (Dataflow right-fits streaming jobs only with horizontal autoscaling, which
# Streaming Engine jobs have by default).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE="$ROOT/templates/dataflow"

die() { echo "launch.sh: $*" >&2; exit 2; }

: "${REGION:=us-central1}"
: "${REPOSITORY:=beam-captions}"
: "${TAG:=latest}"
: "${BUILDER:=cloudbuild}"
: "${CAPTION_MODEL:=}"
: "${ENHANCE_MODEL:=}"
: "${ACCELERATOR:=type:nvidia-l4;count:1;machine_type:g2-standard-8;install-nvidia-driver:5xx}"
: "${CPU_MACHINE_TYPE:=n2-standard-8}"
: "${MAX_WORKERS:=20}"
: "${LAUNCHER_MACHINE_TYPE:=n2-standard-4}"
: "${BEAM_VERSION:=2.78.0}"

need_project() {
  [ -n "${PROJECT:-}" ] || die "set PROJECT (the Google Cloud project id)"
  : "${IMAGE:=$REGION-docker.pkg.dev/$PROJECT/$REPOSITORY/beam-captions:$TAG}"
}
need_bucket() {
  [ -n "${BUCKET:-}" ] || die "set BUCKET (gs://bucket for staging, temp files and the template spec)"
  case "$BUCKET" in gs://*) ;; *) die "BUCKET must start with gs:// (got '$BUCKET')" ;; esac
  BUCKET=${BUCKET%/}
  : "${TEMPLATE:=$BUCKET/templates/beam-captions.json}"
  : "${MODEL_DIR:=$BUCKET/models/captioner}"
}

build_image() {
  need_project
  case "$BUILDER" in
    cloudbuild)
      # Substitution values may hold commas: '^~^' makes '~' the separator instead.
      gcloud builds submit "$ROOT" \
        --project="$PROJECT" \
        --config="$HERE/cloudbuild.yaml" \
        --substitutions="^~^_IMAGE=$IMAGE~_CAPTION_MODEL=$CAPTION_MODEL~_ENHANCE_MODEL=$ENHANCE_MODEL~_BEAM_VERSION=$BEAM_VERSION"
      ;;
    docker)
      DOCKER_BUILDKIT=1 docker build "$ROOT" \
        --file "$HERE/Dockerfile" \
        --tag "$IMAGE" \
        --build-arg "BEAM_VERSION=$BEAM_VERSION" \
        --build-arg "CAPTION_MODEL=$CAPTION_MODEL" \
        --build-arg "ENHANCE_MODEL=$ENHANCE_MODEL"
      docker push "$IMAGE"
      ;;
    *) die "BUILDER must be cloudbuild or docker (got '$BUILDER')" ;;
  esac
}

build_template() {
  need_project
  need_bucket
  # metadata.json is generated from the CLI's parser: refuse a stale one.
  python3 "$HERE/make_metadata.py" --check
  gcloud dataflow flex-template build "$TEMPLATE" \
    --project="$PROJECT" \
    --image="$IMAGE" \
    --sdk-language=PYTHON \
    --metadata-file="$HERE/metadata.json"
}

run_job() {
  need_project
  need_bucket
  [ "$#" -ge 2 ] || die "usage: launch.sh run INPUT OUTPUT [NAME=VALUE ...]"
  local input=$1 output=$2
  shift 2
  local -a params=("output=$output")
  if [ "$input" != "-" ]; then params+=("input=$input"); fi
  params+=(
    "generate_captions=true"
    "model_dir=$MODEL_DIR"
    "accelerator=$ACCELERATOR"
    # Beam options: the workers run this same image, which holds the Beam SDK.
    "sdk_container_image=$IMAGE"
    "sdk_location=container"
    # One vLLM engine per GPU worker: Dataflow starts one SDK process per vCPU; they share one engine.
    "share_model_across_processes=true"
    # One decoder thread per clip: every SDK process decodes, each seeing all of the worker's cores.
    "decode_threads=1"
  )
  local streaming=no
  local extra i replaced
  for extra in "$@"; do  # NAME=VALUE: adds a parameter, or replaces the default of the same name
    case "$extra" in *=*) ;; *) die "expected NAME=VALUE, got '$extra'" ;; esac
    replaced=no
    for i in "${!params[@]}"; do
      if [ "${params[$i]%%=*}" = "${extra%%=*}" ]; then params[i]=$extra; replaced=yes; fi
    done
    [ "$replaced" = yes ] || params+=("$extra")
    if [ "$extra" = "streaming=true" ]; then streaming=yes; fi
  done

  local joined="" item
  for item in "${params[@]}"; do
    case "$item" in *"~"*) die "a parameter value may not contain '~': $item" ;; esac
    joined+="${joined:+~}$item"
  done

  local -a flags=(
    --project="$PROJECT"
    --region="$REGION"
    --template-file-gcs-location="$TEMPLATE"
    --temp-location="$BUCKET/tmp"
    --staging-location="$BUCKET/staging"
    --worker-machine-type="$CPU_MACHINE_TYPE"
    --launcher-machine-type="$LAUNCHER_MACHINE_TYPE"
    --max-workers="$MAX_WORKERS"
    --parameters="^~^$joined"
  )
  if [ "$streaming" = yes ]; then
    flags+=(--enable-streaming-engine)
  fi
  if [ -n "${SERVICE_ACCOUNT:-}" ]; then
    flags+=(--service-account-email="$SERVICE_ACCOUNT")
  fi
  gcloud dataflow flex-template run "${JOB_NAME:-beam-captions-$(date -u +%Y%m%d-%H%M%S)}" "${flags[@]}"
}

case "${1:-}" in
  image) build_image ;;
  template) build_template ;;
  run) shift; run_job "$@" ;;
  *) die "usage: launch.sh image | template | run INPUT OUTPUT [NAME=VALUE ...]" ;;
esac
