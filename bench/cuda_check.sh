#!/usr/bin/env bash
# The CUDA path, end to end, on a machine with a GPU (no CI machine has one).
#
#   bash bench/cuda_check.sh TASK04_DIR FOLDS_JSON DATA_ROOT OUT_DIR [PYTEST_ARGS...]
#
# TASK04_DIR: an MSD Task04 folder (dataset.json, imagesTr, labelsTr); a subset will do: the
# shipped model is scored on those of its held-out cases (fold 0 of the bundle's split,
# datasets/Task04_Hippocampus/folds.json) found there. FOLDS_JSON: the split of TASK04_DIR for the
# short training runs (validation on its fold 0). DATA_ROOT: holds dicom/ (the four series).
# OUT_DIR: metrics and cuda_check.json. PYTEST_ARGS: e.g. -n 8 (pytest-xdist; PYTEST_THREADS=2
# then); PYTEST_PATHS: test files instead of all of tests/. DEVICE: cuda (default; the script
# stops unless torch sees a GPU) or cpu (a dry run of the script: CUDA hidden from every step).
# Each step prints "== step: rc=N, S s"; the script exits non-zero if any step failed. Steps:
#   1. the shipped 3D bundle on those held-out cases, --device cuda and --device cpu: Dice of
#      each (medfcn evaluate) and voxel agreement of the two mask sets; the same on the DICOM series
#   2. model compute per hippocampus volume on the GPU (fp32 and fp16 autocast, as the bundle
#      infers on CUDA) and peak GPU memory of the whole-head series
#   3. medfcn train on CUDA (3D: 2 epochs, then --resume to 3; 2D: 1 epoch); best_model.pt loads
#      onto the CPU without map_location; medfcn package and the packaged bundle on the CPU
#   4. 2 minutes of training on fold 0 (issue 25's GPU path), the cached cases on the GPU
#      (data_on_device auto) and not: epochs, best Dice, GPU busy % (nvidia-smi, every 0.5 s)
#   5. the test suite (pytest) with the GPU visible
set -uo pipefail
TASK=${1:?TASK04_DIR}; FOLDS=${2:?FOLDS_JSON}; DATA=${3:?DATA_ROOT}; OUT=${4:?OUT_DIR}
PY=${PYTHON:-python3}; DEV=${DEVICE:-cuda}
HERE=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's medfcn, installed or not
case $DEV in
    cpu) export CUDA_VISIBLE_DEVICES= ;;
    cuda) "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || { echo "no GPU seen"; exit 2; } ;;
    *) echo "DEVICE must be cuda or cpu, not $DEV"; exit 2 ;;
esac
mkdir -p "$OUT"; rm -rf "$OUT"/eval_* "$OUT/cuda_check.json"; W=$(mktemp -d); FAILED=0
trap 'rm -rf "$W"' EXIT
step() {  # step NAME TIMEOUT_S CMD...: run, print rc and seconds, remember failures
    local name=$1 limit=$2; shift 2; local t0=$SECONDS
    [ "$1" = medfcn ] && set -- "$PY" -m "$@"  # the CLI run by $PY, console script or not
    echo "== $name"; timeout "$limit" "$@"; local rc=$?
    echo "== $name: rc=$rc, $((SECONDS - t0)) s"; [ "$rc" = 0 ] || FAILED=1
}

[ "$DEV" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)" || exit 2

# the shipped model's held-out cases in TASK04_DIR, as two folders of links
"$PY" - "$TASK" "$HERE/datasets/Task04_Hippocampus/folds.json" "$W" <<'EOF'
import json, os, sys
task, folds, w = sys.argv[1:]
for sub in ("images", "labels"):
    os.makedirs(f"{w}/{sub}")
for case in json.load(open(folds))["folds"][0]:
    if os.path.exists(f"{task}/labelsTr/{case}.nii.gz"):
        for sub, tr in (("images", "imagesTr"), ("labels", "labelsTr")):
            os.symlink(os.path.abspath(f"{task}/{tr}/{case}.nii.gz"), f"{w}/{sub}/{case}.nii.gz")
print(len(os.listdir(f"{w}/labels")), "held-out cases of the shipped model")
EOF
[ $? = 0 ] || exit 2

B3=$HERE/bundles/hippocampus_fcn; B2=$HERE/bundles/hippocampus_fcn_2d
SERIES=("$DATA"/dicom/PGBM-00{2,3,6}_HippoCrop "$DATA"/dicom/PGBM-003_T1post)
for dev in $(printf "%s\n" "$DEV" cpu | uniq); do
    step "infer held-out ($dev)" 120 medfcn infer "$B3" "$W/images" --out "$W/$dev" --device "$dev"
    step "evaluate held-out ($dev)" 120 medfcn evaluate "$W/$dev" "$W/labels" --out "$OUT/eval_$dev"
    step "infer DICOM ($dev)" 120 medfcn infer "$B3" "${SERIES[@]}" --out "$W/dicom_$dev" --device "$dev"
done

step "GPU vs CPU masks, GPU compute and memory" 180 "$PY" - "$W" "$OUT" "$B3" "$DATA" "$DEV" <<'EOF'
import glob, json, os, statistics, sys, time
import nibabel as nib, numpy as np, torch
from medfcn.infer import infer
from medfcn.networks import FCN  # noqa: F401  (the bundle's network_def names it)
from monai.bundle import ConfigParser
w, out, bundle, data, dev = sys.argv[1:]
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
report = {}
for kind in ("", "dicom_"):
    diff, total, cases = 0, 0, 0
    for g in sorted(glob.glob(f"{w}/{kind}{dev}/*.nii.gz")):
        a = np.asarray(nib.load(g).dataobj)
        b = np.asarray(nib.load(os.path.join(w, f"{kind}cpu", os.path.basename(g))).dataobj)
        assert a.shape == b.shape, g
        diff += int((a != b).sum()); total += a.size; cases += 1
    report[f"{kind or 'fold0_'}masks"] = {"cases": cases, "voxels_differing": diff, "fraction": diff / max(total, 1)}
for s in (f"eval_{dev}", "eval_cpu"):
    report[s] = json.load(open(f"{out}/{s}/metrics.json"))["summary"]
parser = ConfigParser(); parser.read_config([f"{bundle}/configs/common.json", f"{bundle}/configs/inference.json"])
net = parser.get_parsed_content("network_def").to(dev).eval()
net.load_state_dict(torch.load(f"{bundle}/models/model.pt", map_location=dev, weights_only=True))
x = torch.randn(1, 1, 48, 64, 48, device=dev)
half = torch.float16 if dev == "cuda" else torch.bfloat16  # what the bundle autocasts to there
for name, amp in (("fp32", False), ("autocast_" + str(half)[6:], True)):
    times = []
    with torch.inference_mode(), torch.autocast(dev, dtype=half, enabled=amp):
        for i in range(60):
            sync(); t0 = time.perf_counter(); net(x); sync()
            if i >= 10:
                times.append(1000 * (time.perf_counter() - t0))
    report[f"compute_ms_per_volume_{name}"] = statistics.median(times)
del net, x  # the peak below is the whole-head inference's alone
if dev == "cuda":
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
infer(bundle, [f"{data}/dicom/PGBM-003_T1post"], f"{w}/head", device=dev)
report["whole_head_infer_s"] = time.perf_counter() - t0
if dev == "cuda":
    report["whole_head_peak_gpu_MiB"] = torch.cuda.max_memory_allocated() / 2**20
print(json.dumps(report, indent=1)); json.dump(report, open(f"{out}/cuda_check.json", "w"), indent=1)
EOF

for b in 3 2; do
    bundle=$([ $b = 3 ] && echo "$B3" || echo "$B2"); run=$W/run${b}d
    step "train ${b}D ($DEV)" 180 medfcn train "$bundle" --data "$TASK" --folds "$FOLDS" --fold 0 \
        --epochs $((b == 3 ? 2 : 1)) --output "$run" --device "$DEV"
    [ $b = 3 ] && step "resume 3D to 3 epochs" 120 medfcn train "$bundle" --output "$run" --resume --epochs 3
    step "${b}D best_model.pt holds CPU tensors" 60 "$PY" -c "import sys, torch
weights = torch.load(sys.argv[1], weights_only=True)  # no map_location, as a user would
sys.exit(any(t.device.type != 'cpu' for t in weights.values()))" "$run/best_model.pt"
    step "package ${b}D run" 60 medfcn package "$run" --out "$W/pkg${b}d"
    step "packaged ${b}D bundle on the CPU" 60 medfcn infer "$W/pkg${b}d" "${SERIES[0]}" --out "$W/pkg${b}d_out" \
        --device cpu
done

# issue 25's GPU path: 2 minutes of training on fold 0 (the budget keeper ends it), with the
# cached cases on the GPU (data_on_device auto) and without; GPU busy % sampled every 0.5 s
for placement in auto false; do
    run=$W/fast_$placement; log=$OUT/gpu_util_$placement.csv; rm -f "$log"
    smi=""
    [ "$DEV" = cuda ] && { nvidia-smi -i 0 --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 \
        > "$log" & smi=$!; }
    step "2-minute training, data_on_device $placement" 400 medfcn train "$B3" --data "$TASK" --folds "$FOLDS" \
        --fold 0 --epochs 400 --set budget_minutes=2 --set val_interval=4 --set data_on_device=$placement \
        --output "$run" --device "$DEV"
    [ -n "$smi" ] && { kill "$smi"; wait "$smi" 2>/dev/null; }
    step "2-minute training summary ($placement)" 60 "$PY" - "$run" "$log" "$OUT/fast_$placement.json" <<'EOF'
import json, os, statistics, sys, torch
run, log, out = sys.argv[1:]
last = torch.load(f"{run}/last.pt", weights_only=True)
busy = [float(x) for x in open(log).read().split()] if os.path.exists(log) else []
report = {"epochs": last["trainer"]["iteration"] // last["trainer"]["epoch_length"], "best_mean_dice": last["best"]["best_metric"],
          "best_epoch": last["best"]["best_metric_epoch"], "training_seconds": last["budget"]["seconds"],
          "gpu_busy_percent_mean": statistics.mean(busy) if busy else None, "gpu_samples": len(busy)}
print(json.dumps(report, indent=1)); json.dump(report, open(out, "w"), indent=1)
EOF
done

step "pytest ($DEV visible)" 240 env OMP_NUM_THREADS="${PYTEST_THREADS:-$(nproc)}" \
    "$PY" -m pytest -q -p no:cacheprovider "${@:5}" ${PYTEST_PATHS:-"$HERE/tests"}
exit $FAILED
