#!/usr/bin/env bash
# A device call that checks the code on the GPU: llama.cpp built in the background (it comes back in
# $OUT in parts, to carry next time), the GPU-marked tests (SmolLM2's first layers carried as
# $LSTREAM_SMOL), where a resident decode step's time goes, and lstream's decode on the synthetic 8B.
# Output: $OUT/check.log, $OUT/gpu-tests.log.
. tools/gpu_setup.sh
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/pexpect-*.whl .carry/ptyprocess-*.whl
exec > >(tee $OUT/check.log) 2>&1
nice -n 15 bash -c '. tools/gpu_setup.sh; llama_cpp' > /tmp/llama_build.out 2>&1 &
BUILD=$!
export LSTREAM_SMOL=$PWD/.carry/smollm2-8l.gguf
t0=$(date +%s)
timeout ${GPU_TESTS_S:-300} python3 -m pytest -q -m gpu tests/ -p no:cacheprovider -rfE 2>&1 | tee $OUT/gpu-tests.log | tail -40
echo "gpu tests: $(( $(date +%s) - t0 )) s"
synth l8b llama3-8b Q4_0
B="python3 -m lstream.cli bench -m $M/l8b.gguf"
timeout 60 python3 -m lstream.tools.profile_decode $M/l8b.gguf -ngl 33 -n 8 --top 0 --kernels 2>&1 | grep -v "^ *$" | tail -24
timeout 120 $B -p 0 -n 32 -ngl 33,16,0 -r 2 2>&1 | grep -v samples_ns
wait $BUILD; cat /tmp/llama_build.out
echo "total: $(( $(date +%s) - t0 )) s"
