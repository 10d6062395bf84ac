#!/usr/bin/env bash
# One-command launcher of the project.
#
#   ./run.sh M [ARGS...]   train the Muon baseline (train_gpt_M.py) on every GPU of this machine
#   ./run.sh A [ARGS...]   the same for the AdamW baseline (train_gpt_A.py)
#   ./run.sh test          install what the tests need, run `python -m pytest -q tests`
#
# Packages: requirements.txt for GPU runs (the versions the results were measured with),
# requirements-cpu.txt for CPU runs, requirements-test.txt for the tests; run.sh installs a file when
# one of its packages is missing, and notes installed versions that differ from its pins.
# M/A fetch the FineWeb shards the run reads
# (data/cached_fineweb10B.py skips those present) and start torchrun with one process per
# GPU; ARGS go to the training script. What is fetched follows ARGS: no training shard when
# they give --train_files, no validation shard when they give --val_files, and as many
# training shards as their --num_iterations/--batch_tokens need (else the baseline's count).
# With no GPU they run the tiny preset on CPU on the embedded sample (data/sample/) instead,
# without any download.
#
# Environment:
#   PYTHON        interpreter (default: python3, else python)
#   NGPU          processes per node (default: the GPUs `nvidia-smi -L` lists)
#   NNODES>1      multi-node: also NODE_RANK, RDZV_ENDPOINT (host:port), RDZV_ID (default speedrun)
#   NO_MULTICAST=1  keep NVLink multicast (NVLink SHARP) off in NCCL, PyTorch and NVSHMEM, for machines whose
#                 owners ask for it (shared hosts); off by default, since the gradient all-reduce of an
#                 8-GPU NVSwitch node uses it
#   RUN_SH_DRY=1  print the commands (prefixed by "+") instead of running them
#
# Ctrl-C or SIGTERM during a GPU run reaches the training processes alone (torchrun runs in a session of its
# own): they stop at a step boundary, save a checkpoint when checkpoints are on, one of them prints the line
# that says how to resume, and run.sh exits 130 or 143.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "run.sh: no Python interpreter found ('$PYTHON'); set PYTHON=/path/to/python" >&2
    exit 1
fi

# Variables run.sh sets for the run, shown by RUN_SH_DRY=1.
LAUNCH_ENV=()
if [[ "${NO_MULTICAST:-0}" == 1 ]]; then
    LAUNCH_ENV+=(NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1)
fi

usage() {
    cat <<'EOF'
usage: ./run.sh M|A [ARGS...]   train the Muon (M) or AdamW (A) baseline on all GPUs
                                (no GPU: tiny preset on CPU on data/sample/)
       ./run.sh test            install test requirements and run the test suite
environment: PYTHON, NGPU, NNODES/NODE_RANK/RDZV_ENDPOINT/RDZV_ID, NO_MULTICAST=1, RUN_SH_DRY=1
EOF
}

dry() { [[ "${RUN_SH_DRY:-0}" == 1 ]]; }

show() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
}

# Run a command, or only print it under RUN_SH_DRY=1.
run() {
    if dry; then show "$@"; else "$@"; fi
}

# Replace this shell by the command with LAUNCH_ENV (its exit code becomes ours), or print it under RUN_SH_DRY=1.
launch() {
    if dry; then show env ${LAUNCH_ENV[@]+"${LAUNCH_ENV[@]}"} "$@"; exit 0; fi
    exec env ${LAUNCH_ENV[@]+"${LAUNCH_ENV[@]}"} "$@"
}

# Run torchrun in a session of its own and pass Ctrl-C and SIGTERM to its training processes alone, which stop
# at a step boundary and exit 0 (so torchrun reports no failure); exit with the signal's code, or torchrun's.
launch_torchrun() {
    LAUNCH_ENV+=(RUN_SH_LAUNCHED=1)
    if dry; then show env "${LAUNCH_ENV[@]}" "$@"; exit 0; fi
    local stopped=""
    setsid env "${LAUNCH_ENV[@]}" "$@" &
    local pid=$!
    trap 'stopped=INT; pkill -INT -P "$pid" || true' INT
    trap 'stopped=TERM; pkill -TERM -P "$pid" || true' TERM
    local status=0
    while true; do
        wait "$pid" && status=0 || status=$?
        if ! kill -0 "$pid" 2>/dev/null; then break; fi
    done
    trap - INT TERM
    case "$stopped" in
        INT) exit 130 ;;
        TERM) exit 143 ;;
    esac
    exit "$status"
}

# The packages of requirements file $1 (and of the files it includes with -r) that are not installed, space
# separated; installed versions other than the pinned ones are noted on stderr.
missing_packages() {
    "$PYTHON" - "$1" <<'PY'
import sys
from importlib import metadata


def pins(path):
    for line in open(path):
        spec = line.split("#", 1)[0].strip()
        if spec.startswith("-r "):
            yield from pins(spec[3:].strip())
        elif spec:
            requirement, _, marker = spec.partition(";")
            name, _, version = requirement.partition("==")
            yield name.strip(), version.strip(), marker


missing = []
for name, pinned, marker in pins(sys.argv[1]):
    if "linux" in marker and not sys.platform.startswith("linux"):
        continue
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        missing.append(name)
        continue
    if pinned and installed.split("+")[0] != pinned:
        print(f"run.sh: note: {name} {installed} is installed; {sys.argv[1]} pins {pinned}", file=sys.stderr)
print(" ".join(missing))
PY
}

# Install requirements file $1 when one of its packages is missing.
ensure_requirements() {
    local out
    local -a missing
    out="$(missing_packages "$1")"
    read -r -a missing <<<"$out"
    if [[ "${#missing[@]}" -gt 0 ]]; then
        echo "run.sh: missing Python packages: ${missing[*]}; installing $1" >&2
        run "$PYTHON" -m pip install -r "$1"
    fi
}

count_gpus() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

# Fill FETCH_ARGS with the options of data/cached_fineweb10B.py that fetch only what the
# training ARGS ($2...) read, for baseline $1; leave it empty when they read no FineWeb shard.
fetch_args() {
    local variant="$1" train=1 val=1 tiny=0 arg
    local -a sizes=()
    shift
    while [[ $# -gt 0 ]]; do
        arg="$1"
        shift
        case "$arg" in
            --train_files | --train_files=*) train=0 ;;
            --val_files | --val_files=*) val=0 ;;
            --preset=tiny) tiny=1 ;;
            --preset)
                if [[ $# -gt 0 && "$1" == tiny ]]; then tiny=1; fi
                ;;
            --num_iterations=* | --batch_tokens=*) sizes+=("$arg") ;;
            --num_iterations | --batch_tokens)
                if [[ $# -gt 0 ]]; then sizes+=("$arg=$1"); fi
                ;;
        esac
    done
    FETCH_ARGS=()
    if [[ "$train" == 0 && "$val" == 0 ]]; then
        return
    fi
    if [[ "$tiny" == 1 ]]; then  # the preset trains on the embedded sample
        return
    fi
    FETCH_ARGS=(data/cached_fineweb10B.py --baseline "$variant")
    if [[ "$train" == 0 ]]; then
        FETCH_ARGS+=(--no_train)
    else
        FETCH_ARGS+=(${sizes[@]+"${sizes[@]}"})
    fi
    if [[ "$val" == 0 ]]; then
        FETCH_ARGS+=(--no_val)
    fi
}

train() {
    local variant="$1"
    shift
    local script="train_gpt_${variant}.py"
    local ngpu="${NGPU:-$(count_gpus)}"
    if ! [[ "$ngpu" =~ ^[0-9]+$ ]]; then
        echo "run.sh: NGPU must be a number, not '$ngpu'" >&2
        exit 2
    fi
    if [[ "$ngpu" -eq 0 ]]; then
        echo "run.sh: no GPU found (no nvidia-smi, or it lists no GPU): running the tiny preset of $script" \
            "on CPU on the embedded sample (data/sample/), no download." >&2
        ensure_requirements requirements-cpu.txt
        launch "$PYTHON" "$script" --preset=tiny "$@"
    fi
    local -a torchrun
    if command -v torchrun >/dev/null 2>&1; then
        torchrun=(torchrun)
    else
        torchrun=("$PYTHON" -m torch.distributed.run)
    fi
    local nnodes="${NNODES:-1}"
    if ! [[ "$nnodes" =~ ^[0-9]+$ && "$nnodes" -ge 1 ]]; then
        echo "run.sh: NNODES must be a number of nodes, not '$nnodes'" >&2
        exit 2
    fi
    if [[ "$nnodes" -gt 1 ]]; then
        if ! [[ "${NODE_RANK:-}" =~ ^[0-9]+$ && "${NODE_RANK:-}" -lt "$nnodes" ]]; then
            echo "run.sh: NNODES=$nnodes needs NODE_RANK, the rank of this node (0..$((nnodes - 1)))," \
                "not '${NODE_RANK:-}'" >&2
            exit 2
        fi
        if [[ -z "${RDZV_ENDPOINT:-}" ]]; then
            echo "run.sh: NNODES=$nnodes needs RDZV_ENDPOINT, host:port of the rendezvous (node 0, say)" >&2
            exit 2
        fi
        torchrun+=(--nnodes="$nnodes" --node_rank="$NODE_RANK" --rdzv-backend=c10d
            --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-speedrun}")
    else
        torchrun+=(--standalone)
    fi
    ensure_requirements requirements.txt
    fetch_args "$variant" "$@"
    if [[ "${#FETCH_ARGS[@]}" -gt 0 ]]; then
        run "$PYTHON" "${FETCH_ARGS[@]}"
    else
        echo "run.sh: --train_files and --val_files given: no FineWeb download" >&2
    fi
    echo "run.sh: $script on $ngpu GPU(s) per node, $nnodes node(s)" >&2
    launch_torchrun "${torchrun[@]}" --nproc_per_node="$ngpu" "$script" "$@"
}

case "${1:-}" in
    M | A)
        variant="$1"
        shift
        train "$variant" "$@"
        ;;
    test)
        shift
        ensure_requirements requirements-test.txt
        launch "$PYTHON" -m pytest -q tests "$@"
        ;;
    -h | --help)
        usage
        ;;
    *)
        usage >&2
        exit 2
        ;;
esac
