#!/usr/bin/env bash
# Run `jpeft finetune` on a Cloud TPU VM or pod slice: create the TPU if needed, copy this repo and
# the config to every worker, install, run the same command on all workers, bring the output back
# from worker 0, delete the TPU. See tpu/README.md (not yet run on a real TPU by the authors).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: tpu/launch.sh --name NAME --zone ZONE --accelerator-type TYPE --config FILE.json
                     [--project P] [--version RUNTIME] [--bucket gs://BUCKET] [--mesh SPEC]
                     [--upload PATH]... [--setup 'COMMAND'] [--spot] [--keep] [--dry-run]
                     [-- extra `jpeft finetune` flags, which override the config file]

  --name NAME              TPU name; an existing READY TPU of that name is reused
  --zone ZONE              a zone with quota for TYPE, e.g. us-central2-b for v4
  --accelerator-type TYPE  v4-8, v4-32, v5litepod-8, v5litepod-16, v5p-8, v5p-32, v6e-8, ...
  --config FILE.json       `jpeft finetune` options, e.g. tpu/configs/llama3_8b_lora.json
  --project P              GCP project (default: the one gcloud is configured with)
  --version RUNTIME        TPU software version (default: chosen from the TPU generation)
  --bucket gs://BUCKET     checkpoints to gs://BUCKET/NAME/checkpoints, the output is also copied
                           to gs://BUCKET/NAME/output; needed for resumable multi-host runs
  --mesh SPEC              e.g. data=1,fsdp=16,model=1 (default: fsdp over all chips of the slice)
  --upload PATH            copy a local file or directory into the run directory (~/jpeft-run)
                           of every worker, e.g. --upload data; may be repeated
  --setup 'COMMAND'        shell command run in ~/jpeft-run on every worker before training,
                           e.g. to download the model weights
  --spot                   create a Spot TPU (cheaper, may be preempted: rerun to resume)
  --keep                   keep the TPU at the end (it is always kept when a step fails)
  --dry-run                print the commands instead of running them
USAGE
}

die() { echo "launch.sh: $*" >&2; exit 2; }

# JAX devices of a slice. The number in a v4/v5p type counts TensorCores, two per chip, and JAX
# sees one device per chip (megacore); the number in a v5e (v5litepod) or v6e type counts chips.
devices_for() {
  local type=$1 count=${1##*-}
  [[ $count =~ ^[0-9]+$ ]] || die "cannot read a size from accelerator type '$type'"
  case $type in
    v4-* | v5p-*) echo $((count / 2)) ;;
    v5litepod-* | v6e-*) echo "$count" ;;
    *) die "unsupported accelerator type '$type' (v4-N, v5p-N, v5litepod-N, v6e-N)" ;;
  esac
}

# Devices that fit on one VM: 4 chips per host on v4/v5p, up to 8 on single-host v5e/v6e.
single_host() {
  case $1 in
    v4-* | v5p-*) (($2 <= 4)) ;;
    *) (($2 <= 8)) ;;
  esac
}

default_version() {
  case $1 in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
  esac
}

# Print a command the way one would type it, quoting only what needs it.
quote() {
  local safe='^[A-Za-z0-9_./:=@,+%-]+$' squote="'\\''"
  if [[ $1 =~ $safe ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/$squote}"
  fi
}
show() {
  local out="+" arg
  for arg in "$@"; do out+=" $(quote "$arg")"; done
  echo "$out"
}
run() {
  show "$@"
  [[ $DRY_RUN == 1 ]] || "$@"
}

NAME="" ZONE="" TYPE="" CONFIG="" PROJECT="" VERSION="" BUCKET="" MESH="" SETUP=""
KEEP=0 DRY_RUN=0 SPOT=0
UPLOADS=() EXTRA=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --name) NAME=${2:?}; shift ;;
    --zone) ZONE=${2:?}; shift ;;
    --accelerator-type) TYPE=${2:?}; shift ;;
    --config) CONFIG=${2:?}; shift ;;
    --project) PROJECT=${2:?}; shift ;;
    --version) VERSION=${2:?}; shift ;;
    --bucket) BUCKET=${2:?}; BUCKET=${BUCKET%/}; shift ;;
    --mesh) MESH=${2:?}; shift ;;
    --upload) UPLOADS+=("${2:?}"); shift ;;
    --setup) SETUP=${2:?}; shift ;;
    --spot) SPOT=1 ;;
    --keep) KEEP=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
  shift
done
[[ -n $NAME && -n $ZONE && -n $TYPE && -n $CONFIG ]] ||
  { usage >&2; die "--name, --zone, --accelerator-type and --config are required"; }
[[ -f $CONFIG ]] || die "no config file '$CONFIG'"
[[ -z $BUCKET || $BUCKET == gs://* ]] || die "--bucket must look like gs://BUCKET[/PATH]"
for path in ${UPLOADS[@]+"${UPLOADS[@]}"}; do
  [[ -e $path ]] || die "no file or directory '$path' to upload"
done
[[ $DRY_RUN == 1 ]] || command -v gcloud >/dev/null || die "gcloud is not installed"

DEVICES=$(devices_for "$TYPE")
VERSION=${VERSION:-$(default_version "$TYPE")}
MESH=${MESH:-data=1,fsdp=$DEVICES,model=1}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GFLAGS=(--zone="$ZONE")
[[ -z $PROJECT ]] || GFLAGS+=(--project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)

if [[ -n $BUCKET ]]; then
  CHECKPOINTS=" --checkpoint-dir $(quote "$BUCKET/$NAME/checkpoints")"
elif single_host "$TYPE" "$DEVICES"; then
  # On the VM's disk (gone when the TPU is deleted); $PWD expands on the worker: orbax wants an
  # absolute path.
  # shellcheck disable=SC2016
  CHECKPOINTS=' --checkpoint-dir "$PWD/checkpoints"'
else
  CHECKPOINTS=""
  echo "launch.sh: warning: $TYPE has several hosts and no --bucket was given, so no" \
    "checkpoints are written (they need storage all hosts share)" >&2
fi
if [[ -n $(git -C "$ROOT" status --porcelain --untracked-files=no) ]]; then
  echo "launch.sh: warning: uncommitted changes are not copied (git archive HEAD)" >&2
fi
echo "# $TYPE: $DEVICES JAX devices, mesh $MESH, runtime $VERSION"

# 1. The TPU: reuse a READY one, recreate a preempted one, create it when absent.
STATE=""
if [[ $DRY_RUN == 1 ]]; then
  show "${TPU[@]}" describe "$NAME" "${GFLAGS[@]}" --format='value(state)'
  echo "# (dry run: assuming it does not exist)"
else
  STATE=$("${TPU[@]}" describe "$NAME" "${GFLAGS[@]}" --format='value(state)' 2>/dev/null || true)
fi
case $STATE in
  "" | READY) ;;
  PREEMPTED | TERMINATED) run "${TPU[@]}" delete "$NAME" "${GFLAGS[@]}" --quiet; STATE="" ;;
  *) die "TPU $NAME is $STATE; wait until it is READY, or delete it" ;;
esac
if [[ -z $STATE ]]; then
  CREATE=("${TPU[@]}" create "$NAME" "${GFLAGS[@]}" --accelerator-type="$TYPE" --version="$VERSION")
  [[ $SPOT == 0 ]] || CREATE+=(--spot)
  run "${CREATE[@]}"
fi

# 2. Copy the repo (HEAD) and the config to every worker; install jax[tpu] and jpeft in a venv.
# The TPU images ship Python 3.10 and jpeft needs 3.11+, so uv provides a Python 3.12 venv;
# gcsfs lets orbax write checkpoints to gs:// paths.
WORK=$(mktemp -d)
finish() {
  local status=$?
  rm -rf "$WORK"
  if ((status != 0)) && [[ $DRY_RUN == 0 ]]; then
    echo "launch.sh: failed; the TPU $NAME is kept: rerun the same command (it resumes from the" \
      "latest checkpoint) or delete it: gcloud compute tpus tpu-vm delete $NAME --zone=$ZONE" >&2
  fi
}
trap finish EXIT
run git -C "$ROOT" archive --format=tar.gz -o "$WORK/jpeft.tar.gz" HEAD
run cp "$CONFIG" "$WORK/jpeft-config.json"
run "${TPU[@]}" scp "$WORK/jpeft.tar.gz" "$WORK/jpeft-config.json" "$NAME:" --worker=all \
  "${GFLAGS[@]}"
INSTALL="set -e; rm -rf jpeft; mkdir -p jpeft jpeft-run; tar -xzf jpeft.tar.gz -C jpeft"
INSTALL+="; mv jpeft-config.json jpeft-run/config.json; export PATH=\$HOME/.local/bin:\$PATH"
INSTALL+="; command -v uv >/dev/null || python3 -m pip install -q --user uv"
INSTALL+=" || python3 -m pip install -q --user --break-system-packages uv"
INSTALL+="; [ -x jpeft-venv/bin/python ] || uv venv -q --seed --python 3.12 jpeft-venv"
INSTALL+="; jpeft-venv/bin/pip install -q -U 'jax[tpu]' && jpeft-venv/bin/pip install -q -e ./jpeft gcsfs"
run "${TPU[@]}" ssh "$NAME" --worker=all "${GFLAGS[@]}" --command="$INSTALL"
for path in ${UPLOADS[@]+"${UPLOADS[@]}"}; do
  run "${TPU[@]}" scp --recurse "$path" "$NAME:jpeft-run/" --worker=all "${GFLAGS[@]}"
done

# 3. The same training command on every worker; jax.distributed finds the other hosts itself.
TRAIN="cd jpeft-run && export PATH=\$HOME/jpeft-venv/bin:\$PATH &&"
[[ -z $SETUP ]] || TRAIN+=" { $SETUP; } &&"
TRAIN+=" jpeft finetune --distributed --config config.json --mesh $(quote "$MESH")$CHECKPOINTS"
TRAIN+=" --output-dir $(quote "out/$NAME")"
for arg in ${EXTRA[@]+"${EXTRA[@]}"}; do TRAIN+=" $(quote "$arg")"; done
run "${TPU[@]}" ssh "$NAME" --worker=all "${GFLAGS[@]}" --command="$TRAIN"

# 4. Bring the output (adapter/, metrics.json, loss.png) back from worker 0, and to the bucket.
run mkdir -p jpeft-output
run "${TPU[@]}" scp --recurse "$NAME:jpeft-run/out/$NAME" jpeft-output/ --worker=0 "${GFLAGS[@]}"
if [[ -n $BUCKET ]]; then
  run "${TPU[@]}" ssh "$NAME" --worker=0 "${GFLAGS[@]}" \
    --command="gsutil -m rsync -r jpeft-run/out/$NAME $BUCKET/$NAME/output"
fi
echo "# adapter: jpeft-output/$NAME/adapter${BUCKET:+ and $BUCKET/$NAME/output/adapter}"

# 5. Delete the TPU unless --keep.
if [[ $KEEP == 0 ]]; then
  run "${TPU[@]}" delete "$NAME" "${GFLAGS[@]}" --quiet
else
  echo "# kept: delete it with: gcloud compute tpus tpu-vm delete $NAME --zone=$ZONE"
fi
