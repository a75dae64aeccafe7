#!/usr/bin/env bash
# A device call that checks the code on the GPU: the GPU-marked tests (SmolLM2's first layers carried
# as $LSTREAM_SMOL), then where a resident decode step's time goes and lstream's decode and prefill on
# the synthetic 8B. Output: $OUT/check.log, $OUT/gpu-tests.log.
. tools/gpu_setup.sh
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/pexpect-*.whl .carry/ptyprocess-*.whl
exec > >(tee $OUT/check.log) 2>&1
export LSTREAM_SMOL=$PWD/.carry/smollm2-8l.gguf
t0=$(date +%s)
python3 -m pytest -q -m gpu tests/ -p no:cacheprovider --continue-on-collection-errors -x 2>&1 | tee $OUT/gpu-tests.log | tail -25
echo "gpu tests: $(( $(date +%s) - t0 )) s"
synth l8b llama3-8b Q4_0
B="python3 -m lstream.cli bench -m $M/l8b.gguf"
python3 -m lstream.tools.profile_decode $M/l8b.gguf -ngl 33 -n 8 --top 0 --kernels 2>&1 | grep -v "^ *$" | tail -24
$B -p 0 -n 32 -ngl 33,16,0 -r 3 -v 2>&1 | grep -v samples_ns
$B -p 0 -n 32 -d 4096 -ngl 33,16 -r 2 2>&1
$B -p 2048 -n 0 -ub 512,2048 -ngl 33,16,0 -r 3 2>&1
