#!/usr/bin/env bash
# First device calls of a session, in two parts that fit a call each (the machine stays warm
# between them, so the models and the llama.cpp build persist):
#   a: the machine, llama.cpp built (its binary comes back in $OUT), the 8B model, host bandwidth,
#      llama.cpp's decode baseline;   b: lstream's decode at each -ngl, splits, threads, the GEMV
#      kernels and where a resident step's GPU time goes.
. tools/gpu_setup.sh
exec > >(tee $OUT/probe-$1.log) 2>&1
LB=/root/lc/bin/llama-bench
B="python3 -m lstream.cli.main bench -m $M/l8b.gguf"
if [ "$1" = a ]; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket|NUMA node\(s\)|L3" | cut -c1-120
  lscpu | grep -o "avx512[a-z_]*\|amx[a-z_]*\|avx_vnni" | sort -u | tr '\n' ' '; echo
  free -g | head -2
  llama_cpp
  synth l8b llama3-8b Q4_0
  python3 -m lstream.tools.host_bandwidth --gib 4 --threads 1,4,8,16
  $LB -m $M/l8b.gguf -p 0 -n 32 -ngl 0,16,33 -r 3 -o md
  $LB -m $M/l8b.gguf -p 0 -n 32 -d 4096 -ngl 16,33 -r 2 -o md
else
  $B -p 0 -n 32 -ngl 33,16,0 -r 3 -v 2>&1 | grep -v "samples_ns"
  $B -p 0 -n 32 -ngl 16 -r 3 --policy split:4,split:8 2>&1
  $B -p 0 -n 32 -ngl 0 -r 2 -t 8,16 --policy threshold 2>&1
  python3 -m lstream.tools.bench_gemv 2>&1 | tail -25
  python3 -m lstream.tools.profile_decode $M/l8b.gguf -ngl 33 -n 8 --top 25 --kernels 2>&1 | tail -60
fi
