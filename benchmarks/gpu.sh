#!/usr/bin/env bash
# The CUDA checks and GPU benchmarks of BENCHMARKS.md ("On a GPU"), as one script per part, each step bounded by a
# timeout so that a slow or failing step cannot eat the others' time. Logs go to $OUT (default runs/gpu).
#
#   benchmarks/gpu.sh smoke   CIFAR_ROOT          every command once on CUDA, the recipes on wrn-28-10 for a few
#                                                  iterations, NCCL with one rank, step costs of wrn-28-10
#   benchmarks/gpu.sh recipes CIFAR_ROOT SECONDS  CIFAR-10 wrn-28-10: jempp and sadajem for SECONDS of training each,
#                                                  then each one's baseline for as many epochs (benchmarks/recipes.py)
#   benchmarks/gpu.sh sadajem CIFAR_ROOT SECONDS  SADA-JEM's warm-up divergence (BENCHMARKS.md, "Again on an NVIDIA
#                                                  H100"): the recipe in fp32, then bf16 with the energy penalty of the
#                                                  Fashion-MNIST preset, each against its SAM baseline
#   benchmarks/gpu.sh compile                     step costs of wrn-28-10 with torch.compile
#   benchmarks/gpu.sh density CIFAR_ROOT OOD_DIR "MODEL:SEED ..."
#                                                  the density preset (configs/cifar10-density.toml) on each network
#                                                  and seed against its baseline (benchmarks/quality.py), all at once
#                                                  on the one GPU; OOD: interp, uniform, constant and OOD_DIR.
#                                                  MODEL:SEED:NAME adds the flags in $V_NAME to that run only, e.g.
#                                                  V_noisy="--sgld-std 0.025" ... "cnn-16:0 cnn-16:0:noisy"
#   benchmarks/gpu.sh quality DATASET ROOT CONFIG "MODEL:SEED[:NAME] ..."
#                                                  the same for any dataset and config file (the dataset's default OOD
#                                                  sets), e.g. fashion-mnist with configs/fashion-mnist-density-silu.toml;
#                                                  WEIGHTS=1 also sends back each run's best.pt. Sizing (H200,
#                                                  2026-12-04): Fashion-MNIST JEMs of 13 epochs are GPU-bound when
#                                                  many share it — twelve at once ran ~10.4 iterations/s each (the
#                                                  GPU 99% busy) and none of their 5 473 iterations finished in 500 s;
#                                                  two at once beside their baselines took 150 s each (pairs). About
#                                                  six quality runs fit a 10-minute call (estimated from these rates)
#   benchmarks/gpu.sh pairs DATASET ROOT CONFIG "SEED[:NAME] ..."
#                                                  accuracy only: each seed's JEM (CONFIG, plus $V_NAME) and its
#                                                  baseline (the same with --p-x-weight 0), all at once; a table of
#                                                  test accuracies, health and rollbacks
#   benchmarks/gpu.sh subset CIFAR_ROOT CIFAR100_TEST DEST NTRAIN NTEST NOOD
#                                                  (run here, not there) NTRAIN / NTEST images per class and NOOD of
#                                                  CIFAR-100's test images, drawn with seed 0, copied into DEST/cifar10
#                                                  and DEST/cifar100: what fits the device's 64 MiB upload
#
# The device has no `unzip`: unpack a zipped subset with `python3 -m zipfile -e SUBSET.zip DIR`.
# Send a subset as one archive (`tar -czf .gpudata/sub.tgz -C DEST cifar10 cifar100`, carry `.gpudata`, unpack with
# `tar -xzf` there): 60 MB of loose PNGs were refused as more than the 64 MiB upload (2026-12-04).
#
# CIFAR_ROOT holds {train,test}/<class>/*.png (the PNG copy in ../shared/data, or a subset of it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
RUNS=${RUNS:-/tmp/jemtorch-gpu}
mkdir -p "$OUT" "$RUNS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEV=${DEV:-cuda}          # DEV=cpu MODEL=cnn-8 try the script out on a CPU
MODEL=${MODEL:-wrn-28-10}
JEM="$PY -m jemtorch"
vflags() {  # vflags NAME RUN: the flags in $V_NAME for that run (none for an empty NAME); fails when $V_NAME is unset
    [ -z "$1" ] && return 0
    local var=V_$1
    [ -n "${!var:-}" ] || { echo "no flags \$$var for $2" >&2; return 1; }
    echo "${!var}"
}
step() {  # step SECONDS NAME command...: run, log, never stop the script
    local limit=$1 name=$2; shift 2
    echo "=== $name ($(date +%T), limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - t0)) s"
}

quality_runs() {  # quality_runs TAG DATASET ROOT CONFIG OOD "MODEL:SEED[:NAME] ...": benchmarks/quality.py per run, all at once
    local tag=$1 dataset=$2 root=$3 config=$4 ood=$5 runs=$6
    {
        nvidia-smi -L || true
        $PY -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
        # decode the data once into the image cache, so that the runs started together do not each decode them
        step 120 "decode" $PY -c "from jemtorch.data import load_dataset; print(load_dataset('$dataset', '$root').x_train.shape)"
        local names=() r model seed variant flags name
        for r in $runs; do
            IFS=: read -r model seed variant <<< "$r"
            flags=$(vflags "${variant:-}" "$r") || exit 2
            name=$tag-$model-s$seed${variant:+-$variant}; names+=("$name")
            step ${LIMIT:-420} "$tag $r" $PY benchmarks/quality.py --dataset "$dataset" --data-root "$root" \
                ${ood:+--ood "$ood"} --seeds "$seed" --out "$RUNS/$name" ${QARGS:-} \
                -- --config "$config" --model "$model" --device $DEV --no-progress ${EXTRA:-} \
                $flags > "$RUNS/$name.log" 2>&1 &
        done
        wait
        for name in "${names[@]}"; do tail -n 60 "$RUNS/$name.log"; done
    } 2>&1 | tee "$OUT/$tag.log"
    # at most 8 files come back from the device, 16 MiB each: the runs' logs and records in one archive, the
    # figures of the JEMs' evaluations in a second, and with WEIGHTS=1 each run's best.pt in a third
    (cd "$RUNS" && tar -czf "$OUT/$tag-runs.tar.gz" --exclude='*.pt' --exclude='*.safetensors' --exclude='report.html' \
        --exclude='samples' --exclude='eval/*.png' --exclude='samples_*.png' "$tag"-*
     find "$tag"-* -path '*/jem/eval/*.png' | tar -czf "$OUT/$tag-figures.tar.gz" -T -
     [ -z "${WEIGHTS:-}" ] || find "$tag"-* -name best.pt | tar -czf "$OUT/$tag-weights.tar.gz" -T -)
    return 0
}

case "${1:-}" in
smoke)
    cifar=$2
    {
        nvidia-smi -L || true
        $PY -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
        step 90 "digits JEM on cuda" $JEM train --device $DEV --epochs 2 --no-progress --out "$RUNS/digits"
        step 90 "eval" $JEM eval "$RUNS/digits" --device $DEV --n 300 --n-gen 100 --sample-steps 20 --no-progress
        step 90 "attack" $JEM attack "$RUNS/digits" --device $DEV --n 64 --steps 5 --eps 0,2/255,8/255 \
            --refine-steps 0,2 --no-progress
        step 60 "distal" $JEM distal "$RUNS/digits" --class 3 --device $DEV --n 4 --steps 20
        step 60 "export" $JEM export "$RUNS/digits" --out "$RUNS/digits-export" --onnx
        step 90 "NCCL, one rank" $PY -m torch.distributed.run --nproc-per-node 1 -m jemtorch train --device $DEV \
            --epochs 1 --no-progress --out "$RUNS/digits-nccl"
        for recipe in jempp sadajem; do
            step 150 "cifar wrn-28-10 $recipe" $JEM train --dataset imagefolder --data-root "$cifar" \
                --model $MODEL --recipe "$recipe" --device $DEV --amp bf16 --channels-last --max-iters 20 \
                --no-progress --out "$RUNS/cifar-$recipe"
        done
        for recipe in jempp sadajem; do
            step 120 "step cost $recipe" $PY benchmarks/step_cost.py --device $DEV --cases $MODEL:3x32x32 \
                --k 5 --batch 64 --rounds 3 --steps 3 --recipe "$recipe" --amp bf16 --channels-last
        done
        step 120 "step cost jem K=20" $PY benchmarks/step_cost.py --device $DEV --cases $MODEL:3x32x32 --k 20 \
            --batch 64 --rounds 3 --steps 2 --amp bf16 --channels-last
    } 2>&1 | tee "$OUT/smoke.log"
    tar -czf "$OUT/smoke-runs.tar.gz" -C "$RUNS" --exclude='*.pt' --exclude='*.safetensors' --exclude='*.onnx*' . ;;
recipes)
    cifar=$2 seconds=$3
    step $((4 * seconds + 240)) "recipes" $PY benchmarks/recipes.py --dataset imagefolder --data-root "$cifar" \
        --model $MODEL --device $DEV --recipes jempp sadajem --time-limit "$seconds" --eval \
        --out "$RUNS/recipes" -- --amp bf16 --channels-last 2>&1 | tee "$OUT/recipes.log"
    cp "$RUNS/recipes/recipes.md" "$RUNS/recipes/recipes.json" "$OUT/" 2>/dev/null
    tar -czf "$OUT/recipes-runs.tar.gz" -C "$RUNS/recipes" --exclude='*.pt' --exclude='samples' --exclude='report.html' . ;;
sadajem)
    cifar=$2 seconds=$3
    for variant in fp32 bf16-penalty; do
        case $variant in
        fp32) flags=() ;;
        bf16-penalty) flags=(--amp bf16 --channels-last --energy-reg 0.1 --energy-reg-form batch-mean) ;;
        esac
        step $((2 * seconds + 150)) "sadajem $variant" $PY benchmarks/recipes.py --dataset imagefolder \
            --data-root "$cifar" --model $MODEL --device $DEV --recipes sadajem --time-limit "$seconds" --eval \
            --out "$RUNS/sadajem-$variant" -- "${flags[@]}" 2>&1 | tee "$OUT/sadajem-$variant.log"
        cp "$RUNS/sadajem-$variant/recipes.md" "$OUT/sadajem-$variant.md" 2>/dev/null
    done
    tar -czf "$OUT/sadajem-runs.tar.gz" -C "$RUNS" --exclude='*.pt' --exclude='samples' --exclude='report.html' \
        sadajem-fp32 sadajem-bf16-penalty ;;
compile)
    step 300 "step cost, compiled" $PY benchmarks/step_cost.py --device $DEV --cases $MODEL:3x32x32 --k 5 \
        --batch 64 --rounds 3 --steps 3 --recipe jempp --compile 2>&1 | tee "$OUT/compile.log" ;;
density)  # the CIFAR-10 density preset: quality imagefolder CIFAR_ROOT configs/cifar10-density.toml ...
    quality_runs density imagefolder "$2" configs/cifar10-density.toml "interp,uniform,constant,$3" "$4" ;;
quality)
    quality_runs quality "$2" "$3" "$4" "" "$5" ;;
pairs)
    dataset=$2 root=$3 config=$4 runs=$5
    {
        nvidia-smi -L || true
        for r in $runs; do
            IFS=: read -r seed variant <<< "$r"
            flags=$(vflags "${variant:-}" "$r") || exit 2
            name=s$seed${variant:+-$variant}
            for kind in jem baseline; do
                px=(); [ $kind = baseline ] && px=(--p-x-weight 0)
                step ${LIMIT:-420} "$kind $r" $JEM train --dataset "$dataset" --data-root "$root" --config "$config" \
                    --seed "$seed" --device $DEV --no-progress --out "$RUNS/$name/$kind" $flags "${px[@]}" \
                    > "$OUT/pairs-$name-$kind.log" 2>&1 &
            done
        done
        wait
        $PY - "$RUNS" $runs <<'PYEOF'
import json, sys
from pathlib import Path
print("| run | JEM test acc | baseline | JEM - baseline | healthy | rollbacks | JEM / baseline s |")
print("|---|---|---|---|---|---|---|")
for r in sys.argv[2:]:
    seed, _, variant = r.partition(":")
    d = Path(sys.argv[1]) / (f"s{seed}" + (f"-{variant}" if variant else ""))
    try:
        j, b = (json.loads((d / k / "summary.json").read_text()) for k in ("jem", "baseline"))
    except OSError as e:
        print(f"| {r} | not finished ({e.filename}) |"); continue
    print(f"| {r} | {100 * j['test_accuracy']:.2f}% | {100 * b['test_accuracy']:.2f}% | "
          f"{100 * (j['test_accuracy'] - b['test_accuracy']):+.2f} | {100 * j['health']['healthy_fraction']:.1f}% | "
          f"{j['rollbacks']} | {j['train_seconds']:.0f} / {b['train_seconds']:.0f} |")
PYEOF
    } 2>&1 | tee "$OUT/pairs.log"
    tar -czf "$OUT/pairs-runs.tar.gz" -C "$RUNS" --exclude='*.pt' --exclude='*.safetensors' --exclude='samples' . ;;
subset)
    cifar=$2 c100=$3 dest=$4
    $PY - "$cifar" "$c100" "$dest" "$5" "$6" "$7" <<'PYEOF'
import random, shutil, sys
from pathlib import Path
cifar, c100, dest, n_train, n_test, n_ood = sys.argv[1:]
rng = random.Random(0)
def copy(files, src, dst):
    for f in files:
        (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst / f.relative_to(src))
for split, n in (("train", int(n_train)), ("test", int(n_test))):
    for c in sorted(p for p in (Path(cifar) / split).iterdir() if p.is_dir()):
        copy(rng.sample(sorted(c.glob("*.png")), n), Path(cifar), Path(dest) / "cifar10")
copy(rng.sample(sorted(Path(c100).rglob("*.png")), int(n_ood)), Path(c100), Path(dest) / "cifar100")
PYEOF
    du -sh --apparent-size "$dest" ;;
*)
    echo "usage: benchmarks/gpu.sh smoke CIFAR_ROOT | quality DATASET ROOT CONFIG RUNS | pairs DATASET ROOT CONFIG RUNS | recipes CIFAR_ROOT SECONDS | sadajem CIFAR_ROOT SECONDS | compile | density CIFAR_ROOT OOD_DIR RUNS | subset CIFAR_ROOT CIFAR100_TEST DEST NTRAIN NTEST NOOD" >&2
    exit 2 ;;
esac
