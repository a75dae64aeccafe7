#!/usr/bin/env bash
# Side-by-side device call: lstream (default policy unless a row says otherwise) and llama.cpp's
# llama-bench (carried build, -fa 0 and 1: its best per row) on the same synthetic models, in one call.
# Sections by argument: tests readme ab pre kprof gemv gemvsweep oldnew qgemm ownrows tg33 cpuattn profile pprofile
# decode depth prefill ubsweep copybound lgab ngl16 act8 cpudec serve large moe moecache moegpu moegtg moedec moehost mixprof ngl0 membw moesmall moepp moeprof moek moeold cpumoe moe8 shareab hostbw hops moetl moetg hopab moetgs cpupf fetch bg bgwait (llama.cpp carried as .carry2/llama-cuda.tar.xz.*, else
# built: 6 minutes). Output: $OUT/sbs.log.
. tools/gpu_setup.sh
exec > >(tee -a $OUT/sbs.log) 2>&1
for sec in "$@"; do case $sec in  # the 8B file only for the sections that read it (~50 s to write)
  moe*|hops|hopab|tests|cpumoe|membw|hostbw|bg|bgwait|cpupf|fetch) ;; *) synth l8b llama3-8b Q4_0; break ;; esac; done
B="python3 -m lstream.cli bench -m $M/l8b.gguf"
# llama.cpp's best load mode (-lm none: weights read into its own host buffers for the copies of
# offloaded ops; with the default memory map a 2026-12-02 call made 1210 / 690 t/s at -ngl 16 / 0
# -ub 512 pp2048, against #15's 4741 / 2782 with -lm none)
L="$LB -m $M/l8b.gguf -o md -lm ${LLM:-none}"
T0=$(date +%s)
s() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }
for sec in "$@"; do case $sec in
tests)
  s "GPU tests"
  export LSTREAM_SMOL=$(ls $PWD/.carry*/smollm2-8l.gguf | head -1)  # python -m lstream.tools.truncate_gguf SMOLLM2 F --layers 8
  python3 -c "import transformers, tokenizers, torch, triton; print('transformers', transformers.__version__, 'tokenizers', tokenizers.__version__, 'torch', torch.__version__, 'triton', triton.__version__)"
  timeout ${GPU_TESTS_S:-240} python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --tb=short ${GPU_TESTS:-tests/} 2>&1 | tee $OUT/gpu-tests.log | tail -25 ;;
readme)
  s "the README's examples with a GPU (SmolLM2's first 8 layers stand in for the 30-layer file)"
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/wheels/*.whl .carry/p*.whl 2>&1 | tail -2
  mkdir -p /tmp/lcache && ln -sf $PWD/.carry/smollm2-8l.gguf /tmp/lcache/SmolLM2-135M-Instruct.Q4_1.gguf
  LSTREAM_CACHE=/tmp/lcache timeout ${README_S:-200} python3 -m pytest -q -p no:cacheprovider -rfE tests/test_readme.py 2>&1 | tee $OUT/readme.log | tail -40 ;;
gemv)
  s "decode GEMV: GGUF blocks (Gluon) vs int8 on repacked rows, graph-timed"
  timeout 120 python3 -m lstream.tools.bench_gemv --types Q4_0,Q8_0 --shapes 4096x4096,1024x4096,28672x4096,4096x14336,128256x4096 --dtype bf16 --q8 --no-ref 2>&1 | tail -14 ;;
oldnew)
  s "old (0dc9b70, before the restructure) vs new, default policy, same model"
  mkdir -p /tmp/o && ln -sfn $PWD/.carry/old/lstream /tmp/o/lstream
  for i in $(seq ${OLDNEW_PAIRS:-2}); do
    PYTHONPATH=/tmp/site:/tmp/o timeout 200 python3 -m lstream.cli bench -m $M/l8b.gguf -p 512 -n 32 -ngl 33,16,0 -r 2 2>&1 | grep -v "^ *$"
    timeout 200 $B -p 512 -n 32 -ngl 33,16,0 -r 2 2>&1 | grep -v "^ *$"
  done ;;
pprofile)
  s "prefill: where the time of -p 2048 goes at -ub \${PP_UB:-512}, -ngl \${PP_NGL:-33}"
  for ub in ${PP_UB:-512}; do for ngl in ${PP_NGL:-33}; do
    timeout 150 python3 -m lstream.tools.profile_prefill $M/l8b.gguf -ngl $ngl -ub $ub -p 2048 --top ${PP_TOP:-30} 2>&1 | grep -v "^ *$" | tail -75
  done; done ;;
gemvsweep)
  s "int8 GEMV configs per decode shape (batch 1)"
  timeout ${SWEEP_S:-150} python3 -m lstream.tools.bench_gemv --types Q4_0 --shapes ${SWEEP_SHAPES:-4096x14336,28672x4096,6144x4096,4096x4096,128256x4096} --dtype bf16 --q8 --q8-sweep --no-ref --reps 15 2>&1 | tail -40 ;;
qgemm)
  s "prefill GEMM on quantized tiles vs dequantize + cuBLAS vs the bf16 cuBLAS ceiling"
  timeout ${QGEMM_S:-150} python3 -m lstream.tools.bench_qgemm --json $OUT/qgemm.json 2>&1 | tail -40 ;;
ownrows)
  s "lstream alone (no llama.cpp in this call): resident decode at depth 0 and 4096, prefill -ub 512/2048"
  timeout 150 $B -p 0 -n 32 -d 0,4096 -ngl 33 -r 2 2>&1 | grep -v "^ *$"
  timeout 100 $B -p 2048 -n 0 -ub ${OWN_UB:-512} -ngl ${OWN_NGL:-33} -r 2 2>&1 | grep -v "^ *$" ;;
ab)
  s "resident decode, alternated: default and each of \${AB_ENV} (one variable set per run)"
  for i in $(seq ${AB_ROUNDS:-2}); do
    timeout 60 $B -p 0 -n 32 -ngl ${AB_NGL:-33} -r 3 2>&1 | grep "tg32"
    for e in ${AB_ENV:-LSTREAM_ROPE_ATTN=0 LSTREAM_GLU=1 LSTREAM_ATTN_FUSED=1}; do
      env $e timeout 60 $B -p 0 -n 32 -ngl ${AB_NGL:-33} -r 3 2>&1 | grep "tg32" | sed "s/$/  ($e)/"
    done
  done ;;
pre)
  s "int8 GEMV with the next step's weights prefetched (default) and without (LSTREAM_GEMV_PRE=0), batch 1 and 2"
  for e in LSTREAM_GEMV_PRE=1 LSTREAM_GEMV_PRE=0; do echo "-- $e"
    env $e timeout 90 python3 -m lstream.tools.bench_gemv --types Q4_0,Q8_0,Q5_1 --shapes 4096x14336,1024x14336,4096x4096 \
      --batch 1,2 --dtype bf16 --q8 --no-ref --reps 20 2>&1 | tail -12
  done ;;
tg33)
  s "lstream alone: resident decode"
  timeout 100 $B -p 0 -n 32 -ngl 33 -r 3 2>&1 | grep -v "^ *$" ;;
cpuattn)
  llama_cpp
  s "host CPU and its decode attention (8B layer shape), mixed decode at depth by thread count"
  nproc; lscpu | grep -iE "model name|^core|^socket|thread|numa node\(s\)|L3"
  timeout 60 python3 -m lstream.tools.bench_cpu_attention --depths 512,4096 --threads 1,4,8,16 --reps 10
  timeout 150 $L -p 0 -n 32 -d 4096 -ngl 16 -fa 1 -t 8,16 -r 2
  timeout 200 $B -p 0 -n 32 -d 4096 -ngl 16 -t 8,16 -r 2 2>&1 | grep -v "^ *$"
  timeout 100 $B -p 0 -n 16 -d 4096 -ngl 16 -r 1 --profile 2>&1 | grep -v "^ *$" | tail -40 ;;
profile)
  s "resident step: where the GPU time goes"
  timeout 90 python3 -m lstream.tools.profile_decode $M/l8b.gguf -ngl 33 -n 8 --top 18 --kernels 2>&1 | grep -v "^ *$" | grep -v "function calls\|Ordered by\|ncalls\|{built-in\|{method" | tail -45 ;;
kprof)
  s "resident step's GPU kernel time: default and each of \${KP_ENV}"
  for e in LSTREAM_NONE=1 ${KP_ENV:-LSTREAM_GEMV_PRE=0 LSTREAM_ROPE_ATTN=0}; do echo "-- $e"
    env $e timeout 90 python3 -m lstream.tools.profile_decode $M/l8b.gguf -ngl 33 -n 8 --top 8 --kernels 2>&1 \
      | grep -E "GPU kernel time|us/step|graphs=True" | head -9
  done ;;
serve)
  llama_cpp
  s "serve: aggregate t/s at \${SV_C:-1,8,32,64} concurrent /v1/completions (48 tokens, greedy), lstream serve (-np 64) and llama-server (-np = concurrency), -ngl \${SV_NGL:-0 16}"
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry*/wheels/*.whl 2>&1 | tail -2
  up() { for _ in $(seq 400); do curl -sf "$1/health" >/dev/null && return 0; sleep 0.5; done; echo "no server at $1"; return 1; }
  lt() { timeout ${SV_S:-150} python3 tools/load_test.py --base-url $1/v1 -c $2 -r 1 -n 48 --completions --timeout 120 --json $OUT/$3.json --label $3 2>&1 | grep "clients x"; }
  for ngl in ${SV_NGL:-0 16}; do
    [ "${SV_LS:-1}" = 1 ] && { python3 -m lstream.cli serve -m $M/l8b.gguf --port 8181 -np 64 -c 16384 -ngl $ngl --verbose >$OUT/ls-serve-$ngl.log 2>&1 & P=$!
    up http://127.0.0.1:8181 && { echo "-- lstream serve -ngl $ngl"; lt http://127.0.0.1:8181 ${SV_C:-1,8,32,64} ls-ngl$ngl; }
    kill -INT $P; wait $P; grep "step of" $OUT/ls-serve-$ngl.log | cut -c1-220 | head -12; }
    for c in $(echo ${SV_LC:-${SV_C:-1,8,32,64}} | tr , ' '); do
      [ "$c" = 0 ] && continue  # SV_LC=0: no llama-server runs
      $LS -m $M/l8b.gguf --port 8182 -np $c -c $(( c * 256 > 4096 ? c * 256 : 4096 )) -ngl $ngl >$OUT/llama-serve-$ngl-$c.log 2>&1 & P=$!
      up http://127.0.0.1:8182 && { echo "-- llama-server -ngl $ngl -np $c"; lt http://127.0.0.1:8182 $c llama-ngl$ngl-c$c; }
      kill -INT $P; wait $P
    done
  done ;;
sprof)
  s "serve engine without HTTP (tools/profile_serve.py): t/s by requests, phases and cProfile, -ngl \${SP_NGL:-0}"
  for ngl in ${SP_NGL:-0}; do
    timeout ${SP_S:-200} python3 -m lstream.tools.profile_serve -m $M/l8b.gguf -ngl $ngl --requests ${SP_REQ:-1,8,32,64} -n 16 \
      --phases >$OUT/sprof-phases-$ngl.txt 2>&1; grep -E "requests x|^ total|streamed|Error|error" $OUT/sprof-phases-$ngl.txt
    timeout ${SP_S:-200} python3 -m lstream.tools.profile_serve -m $M/l8b.gguf -ngl $ngl --requests ${SP_CP:-1,64} -n 16 --top 25 \
      >$OUT/sprof-cprof-$ngl.txt 2>&1; grep -E "requests x|Error|error" $OUT/sprof-cprof-$ngl.txt
  done ;;
decode)
  llama_cpp
  s "decode -p 0 -n 32"
  timeout 150 $L -p 0 -n 32 -ngl ${DEC_NGL:-33,16,0} -fa ${LFA:-0,1} -r 3
  timeout ${DEC_S:-240} $B -p 0 -n 32 -ngl ${DEC_NGL:-33,16,0} -r 3 ${DEC_V:-} 2>&1 | grep -v "^lstream-bench: model\|^ *$" ;;
act8)
  s "mixed decode with int8 CPU activations (LSTREAM_CPU_ACT8=1), default policy, -ngl \${A8_NGL:-16,0}"
  env LSTREAM_CPU_ACT8=1 timeout 200 $B -p 0 -n 32 -ngl ${A8_NGL:-16,0} -r 3 -v 2>&1 | grep -E "tg32|split steps" ;;
cpudec)
  s "CPU-only decode (-ngl 0, threshold policy): int16 activations (default) and int8 (LSTREAM_CPU_ACT8=1)"
  for e in LSTREAM_NONE=1 LSTREAM_CPU_ACT8=1; do
    env $e timeout 100 $B -p 0 -n 32 -ngl 0 --policy threshold -r 2 2>&1 | grep tg32 | sed "s/$/  ($e)/"
  done ;;
depth)
  llama_cpp
  s "decode at depth 4096"
  timeout 120 $L -p 0 -n 32 -d 4096 -ngl 33,16 -fa 1 -r 2
  timeout 150 $B -p 0 -n 32 -d 4096 -ngl 33,16 -r 2 ${DEC_V:-} 2>&1 | grep -v "^lstream-bench: model\|^ *$" ;;
prefill)
  llama_cpp
  s "prefill -p 2048"
  timeout ${PF_S:-200} $L -p 2048 -n 0 -ub ${PF_UB:-512,2048} -b 2048 -ngl ${PF_NGL:-33,16,0} -fa 1 -r 2
  timeout ${PF_S:-200} $B -p 2048 -n 0 -ub ${PF_UB:-512,2048} -ngl ${PF_NGL:-33,16,0} -r ${PF_R:-2} 2>&1 ;;
copybound)
  s "copy-bound rate of -ngl 0 prompts (lstream's pinned arena -> a ring slot, the copy stream alone)"
  timeout 150 python3 -m lstream.tools.copy_bound $M/l8b.gguf -ngl 0 -p 2048 -r 5 2>&1 | grep -v "^ *$" ;;
lgab)
  s "streamed prefill: (layer, ubatch) graphs (default) against the eager layer-major path (LSTREAM_LAYER_GRAPHS=0)"
  for e in LSTREAM_LAYER_GRAPHS=0 LSTREAM_NONE=1; do
    env $e timeout ${PF_S:-200} $B -p 2048 -n 0 -ub ${PF_UB:-512,2048} -ngl ${LG_NGL:-16,0} -r 2 2>&1 | grep pp2048 | sed "s/$/  ($e)/"
  done ;;
ubsweep)
  llama_cpp
  s "prefill -p 2048 by ubatch size, all resident (#15's sweep): llama.cpp and lstream"
  timeout ${PF_S:-200} $L -p 2048 -n 0 -ub ${UB_LIST:-64,128,256,512,1024,2048} -b 2048 -ngl 33 -fa 1 -r 2
  timeout ${PF_S:-200} $B -p 2048 -n 0 -ub ${UB_LIST:-64,128,256,512,1024,2048} -ngl 33 -r 2 2>&1 ;;
ngl16)
  s "mixed decode -ngl \${N16_NGL:-16}: the default's measured split against fixed ones; CPU-only decode (-ngl 0 threshold)"
  timeout 250 $B -p 0 -n 32 -ngl ${N16_NGL:-16} --policy ${N16_POL:-auto,split:4,split:8,split:12} -r 2 -v 2>&1 | grep -E "tg32|split steps"
  timeout 100 $B -p 0 -n 32 -ngl 0 --policy threshold -r 2 2>&1 | grep tg32 ;;
large)
  s "activations past fp16: mixed decode of the scale-0.02 8B (every block scale 0.02)"
  synth l8b-large llama3-8b Q4_0 --scale 0.02
  [ -x /root/lc/bin/llama-bench ] && $LB -m $M/l8b-large.gguf -p 0 -n 16 -ngl 16 -r 1 -o md
  python3 -m lstream.cli bench -m $M/l8b-large.gguf -p 0 -n 16 -ngl ${LARGE_NGL:-33,16,0} -r 1 2>&1 ;;
moe)
  llama_cpp
  s "MoE qwen3-30b-a3b Q4_0, -ngl 99 with the experts of N layers on the host"
  synth q3moe qwen3-30b-a3b Q4_0
  timeout 200 $LB -m $M/q3moe.gguf -p 2048 -n 32 -ub 512,2048 -b 2048 -ngl 99 -ncmoe ${MOE_NC:-48,24,0} -fa 1 -r 2 -o md -lm ${LLM:-none}
  timeout ${MOE_S:-330} python3 -m lstream.cli bench -m $M/q3moe.gguf -p 2048 -n 32 -ub 512,2048 -ngl 99 -ncmoe ${MOE_NC:-48,24,0} -r 2 2>&1 ;;
moegpu)
  llama_cpp
  s "MoE qwen3-30b-a3b Q4_0 all on the GPU: prompts (-ub 512, 2048) and decode"
  synth q3moe qwen3-30b-a3b Q4_0
  timeout 150 $LB -m $M/q3moe.gguf -p 2048 -n 32 -ub 512,2048 -b 2048 -ngl 99 -fa 1 -r 2 -o md
  timeout 200 python3 -m lstream.cli bench -m $M/q3moe.gguf -p 2048 -n 32 -ub 512,2048 -ngl 99 -r 2 2>&1 | grep -v "^ *$" ;;
moegtg)
  llama_cpp
  s "MoE qwen3-30b-a3b Q4_0 all on the GPU, side by side: tg32 (and pp\${GTG_P} -ub 512)"
  synth q3moe qwen3-30b-a3b Q4_0
  timeout 100 $LB -m $M/q3moe.gguf -p ${GTG_P:-0} -n 32 -ub 512 -ngl 99 -fa 1 -r ${GTG_R:-5} -o md
  timeout ${GTG_S:-150} python3 -m lstream.cli bench -m $M/q3moe.gguf -p ${GTG_P:-0} -n 32 -ub 512 -ngl 99 -r ${GTG_R:-5} 2>&1 | grep -v "^ *$"
  [ -n "${GTG_AB:-}" ] && LSTREAM_MOE_REPACK=0 timeout ${GTG_S:-150} python3 -m lstream.cli bench -m $M/q3moe.gguf -p ${GTG_P:-0} \
    -n 32 -ub 512 -ngl 99 -r ${GTG_R:-5} 2>&1 | grep "pp\|tg" | sed "s/$/  (LSTREAM_MOE_REPACK=0)/" ;;
moedec)
  s "MoE all on the GPU (8-layer Qwen3-30B-A3B shape): where a decode step's GPU time goes"
  synth q3moe8 qwen3-30b-a3b Q4_0 --layers 8
  timeout 90 python3 -m lstream.tools.profile_decode $M/q3moe8.gguf -ngl 99 -n 8 --top 25 --kernels 2>&1 | grep -v "^ *$" | grep -v "function calls\|Ordered by\|ncalls\|{built-in\|{method" | tail -45 ;;
moetg)
  llama_cpp
  s "MoE decode side by side: -ncmoe \${MOE_NC:-48,24}; lstream's --moe-share \${MOE_SHARES:-0,3} by profile_hops, then its bench"
  synth q3moe qwen3-30b-a3b Q4_0
  timeout 150 $LB -m $M/q3moe.gguf -p 0 -n 32 -ngl 99 -ncmoe ${MOE_NC:-48,24} -fa 1 -r 3 -o md -lm ${LLM:-none}
  timeout ${HOPS48_S:-150} python3 -m lstream.tools.profile_hops $M/q3moe.gguf --ncmoe 48 -n 32 --shares ${MOE_SHARES:-0,3} 2>&1 | grep -v "^ *$" | grep -v "  [a-z_]* .* us x" | tail -8
  timeout ${MOETG_S:-200} python3 -m lstream.cli bench -m $M/q3moe.gguf -p 0 -n 32 -ngl 99 -ncmoe ${MOE_NC:-48,24} -r 3 2>&1 | grep -v "^ *$" ;;
hops)
  s "host-expert decode hops timed per phase (8-layer Qwen3-30B-A3B shape, -ncmoe 8): tools/profile_hops.py"
  synth q3moe8 qwen3-30b-a3b Q4_0 --layers 8
  timeout ${HOPS_S:-120} python3 -m lstream.tools.profile_hops $M/q3moe8.gguf --ncmoe 8 -n 32 --shares ${MOE_SHARES:-0,3} ${HOPS_T:+-t $HOPS_T} 2>&1 | grep -v "^ *$" | tail -40
  [ -n "${HOPS_AB:-}" ] && LSTREAM_SHARE_FETCH=0 timeout ${HOPS_S:-120} python3 -m lstream.tools.profile_hops $M/q3moe8.gguf --ncmoe 8 \
    -n 32 --shares ${MOE_SHARES:-0,3} 2>&1 | grep -v "^ *$" | grep -v "expert kernel alone" | tail -30 | sed "s/^/(LSTREAM_SHARE_FETCH=0) /" ;;
moetgs)
  llama_cpp
  s "MoE decode side by side on the full Qwen3-30B-A3B shape: -ncmoe \${MOE_NC:-48,24}; lstream with --moe-share \${TG_SHARES:-0,3}"
  synth q3moe qwen3-30b-a3b Q4_0
  timeout 150 $LB -m $M/q3moe.gguf -p 0 -n 32 -ngl 99 -ncmoe ${MOE_NC:-48,24} -fa 1 -r 3 -o md -lm ${LLM:-none} ${MOETG_T:+-t $MOETG_T}
  timeout ${MOETG_S:-240} python3 -m lstream.cli bench -m $M/q3moe.gguf -p 0 -n 32 -ngl 99 -ncmoe ${MOE_NC:-48,24} \
    --moe-share ${TG_SHARES:-0,3} -r 3 ${MOETG_T:+-t $MOETG_T} 2>&1 | grep -v "^ *$"
  [ -n "${FETCH_AB:-}" ] && LSTREAM_SHARE_FETCH=0 timeout ${MOETG_S:-240} python3 -m lstream.cli bench -m $M/q3moe.gguf -p 0 -n 32 \
    -ngl 99 -ncmoe ${MOE_NC:-48,24} --moe-share ${TG_SHARES:-0,3} -r 3 2>&1 | grep tg | sed "s/$/  (LSTREAM_SHARE_FETCH=0)/" ;;
fetch)
  s "routed experts from pinned memory to the device: the share's fetch kernel against 2-D copies"
  timeout 120 python3 -m lstream.tools.bench_fetch --gib 8 --n 4 2>&1 ;;
bg)  # llama.cpp's build and the full MoE file in the background (CPU-heavy: put timed CPU sections after bgwait)
  s "background: llama.cpp build, full Qwen3-30B-A3B-shaped file"
  (renice -n 10 $BASHPID >/dev/null; llama_cpp >$OUT/lcbuild.log 2>&1) & BGP="$!"
  (synth q3moe8 qwen3-30b-a3b Q4_0 --layers 8; synth q3moe qwen3-30b-a3b Q4_0) >$OUT/synth.log 2>&1 & BGP="$BGP $!" ;;
bgwait)
  s "waiting for the background jobs"; wait $BGP; s "background done"; cat $OUT/lcbuild.log $OUT/synth.log | tail -5 ;;
cpupf)
  s "host expert kernel by software prefetch distance (LSTREAM_CPU_PREFETCH \${PF_LIST:-0,2048,4096} bytes), alternated, 8-layer shape"
  synth q3moe8 qwen3-30b-a3b Q4_0 --layers 8
  for r in 1 2; do for pf in $(echo ${PF_LIST:-0,2048,4096} | tr , ' '); do
    LSTREAM_CPU_PREFETCH=$pf NUMBA_CACHE_DIR=/tmp/nc_pf$pf timeout 100 python3 -m lstream.tools.bench_cpu_moe \
      $M/q3moe8.gguf -t ${CM_T:-16} -n 400 --act ${PF_ACT:-8} 2>&1 | grep -v "^ *$" | sed "s/$/  (prefetch $pf)/"
  done; done ;;
hopab)
  llama_cpp
  s "host-expert decode: hops in one graph (default) against replayed segments (LSTREAM_HOP_GRAPHS=0), 8-layer shape, -ncmoe \${HA_NC:-8,4}; llama.cpp beside"
  synth q3moe8 qwen3-30b-a3b Q4_0 --layers 8
  timeout 100 $LB -m $M/q3moe8.gguf -p 0 -n 32 -ngl 99 -ncmoe ${HA_NC:-8,4} -fa 1 -r 3 -o md -lm ${LLM:-none}
  for e in LSTREAM_NONE=1 LSTREAM_HOP_GRAPHS=0; do
    env $e timeout 100 python3 -m lstream.cli bench -m $M/q3moe8.gguf -p 0 -n 32 -ngl 99 -ncmoe ${HA_NC:-8,4} -r 3 2>&1 | grep tg32 | sed "s/$/  ($e)/"
  done ;;
moetl)
  s "host-expert prompt on the device's clock (8-layer Qwen3-30B-A3B shape, -ncmoe 8): copies and expert GEMMs"
  synth q3moe8 qwen3-30b-a3b Q4_0 --layers 8
  for ub in $(echo ${MOE_UB:-512,2048} | tr , ' '); do
    timeout 120 python3 -m lstream.tools.profile_moe_prompt $M/q3moe8.gguf --ncmoe 8 -p 2048 -ub $ub --rows ${TL_ROWS:-30} 2>&1 | grep -v "^ *$" | tail -40
  done ;;
moehost)
  s "MoE with every layer's experts on the host (8-layer Qwen3-30B-A3B shape): decode phases per layer (--profile), host time (cProfile)"
  synth q3moe8 qwen3-30b-a3b Q4_0 --layers 8
  timeout 80 python3 -m lstream.cli bench -m $M/q3moe8.gguf -p 0 -n 16 -ngl 99 -ncmoe 8 -r 1 --profile -v 2>&1 | grep -v "^ *$" | tail -24
  timeout 90 python3 -m lstream.tools.profile_decode $M/q3moe8.gguf -ngl 99 --ncmoe 8 -n 16 --top ${MH_TOP:-22} 2>&1 | grep -v "^ *$" \
    | grep -v "function calls\|Ordered by\|ncalls\|List reduced" | tail -60 ;;
mixprof)
  s "mixed decode's host time: cProfile of graph-replayed steps at \${MP_RUNS:-16:split:14 0:split:30} (ngl:policy)"
  for a in ${MP_RUNS:-16:split:14 0:split:30}; do
    timeout ${MP_S:-90} python3 -m lstream.tools.profile_decode $M/l8b.gguf -ngl ${a%%:*} --policy ${a#*:} -n 16 --mixed --top ${MP_TOP:-20} 2>&1 \
      | grep -v "^ *$" | grep -v "function calls\|Ordered by\|List reduced" | tail -50
  done ;;
ngl0)
  s "-ngl 0 decode: splits near all-CPU with per-step times (-v), then auto (the bench's steps against the split measured at load)"
  timeout ${N0_S:-240} $B -p 0 -n 32 -ngl 0 -r 3 --policy ${N0_POL:-split:33,split:32,split:30,auto} -v 2>&1 | grep -v "^ *$" ;;
shareab)
  s "decode FFN share alternated in one process (tools/share_ab.py): \${SA_RUNS:-16:14 0:31} (ngl:split)"
  for a in ${SA_RUNS:-16:14 0:31}; do
    timeout ${SA_S:-150} python3 -m lstream.tools.share_ab $M/l8b.gguf -ngl ${a%%:*} --split ${a#*:} --shares ${SA_SHARES:-0,0.45} \
      -n 32 --rounds ${SA_ROUNDS:-3} ${SA_WAITS:-} 2>&1 | grep -v "^ *$"
  done ;;
hostbw)
  s "host reads and pinned copies, alone and together (tools/host_bandwidth.py)"
  timeout 120 python3 -m lstream.tools.host_bandwidth --gib 4 --threads 8,16 2>&1 ;;
membw)
  s "host memory read bandwidth (torch, float32 sum of 4 GiB, 16 and 8 threads)"
  timeout 60 python3 -c "
import time, torch
x = torch.ones(2**30, dtype=torch.float32)
for t in (16, 8):
    torch.set_num_threads(t); x.sum(); best = 1e9
    for _ in range(5):
        t0 = time.perf_counter(); x.sum(); best = min(best, time.perf_counter() - t0)
    print(f'{t} threads: {4 * 2**30 / best / 1e9:.1f} GB/s')
" ;;
moecache)
  llama_cpp
  s "MoE decode with every layer's experts on the host: --expert-cache \${MC_GIB:-0,4,12} GiB (VRAM LRU of routed experts), hit rate by --profile"
  synth q3moe qwen3-30b-a3b Q4_0
  timeout 120 $LB -m $M/q3moe.gguf -p 0 -n 32 -ngl 99 -ncmoe 48 -fa 1 -r 2 -o md -lm ${LLM:-none}
  for g in $(echo ${MC_GIB:-0,4,12} | tr , ' '); do
    timeout 150 python3 -m lstream.cli bench -m $M/q3moe.gguf -p 0 -n 32 -ngl 99 -ncmoe 48 --expert-cache $g -r 2 2>&1 | grep tg32 | sed "s/$/  (--expert-cache $g)/"
  done
  timeout 150 python3 -m lstream.cli bench -m $M/q3moe.gguf -p 0 -n 32 -ngl 99 -ncmoe 48 --expert-cache ${MC_PROF:-4} -r 1 --profile 2>&1 | grep -E "expert cache|total" ;;
moesmall)
  s "MoE with host experts on an 8-layer Qwen3-30B-A3B shape: a prompt and decode profiled, decode by CPU threads"
  synth q3moe8 qwen3-30b-a3b Q4_0 --layers 8
  timeout 80 python3 -W always -m lstream.cli bench -m $M/q3moe8.gguf -p 2048 -n 16 -ub 2048 -ngl 99 -ncmoe 8 -r 1 --profile -v 2>&1 | grep -v "^ *$" | tail -45
  timeout 150 python3 -m lstream.cli bench -m $M/q3moe8.gguf -p 0 -n 16 -ngl 99 -ncmoe 8 -t ${MOE_T:-4,8,12,15,16} -r 2 2>&1 | grep -v "^ *$" ;;
moepp)
  s "MoE all on the GPU (8-layer Qwen3-30B-A3B shape): where a -ub \${MOE_UB:-512} prompt's time goes"
  synth q3moe8 qwen3-30b-a3b Q4_0 --layers 8
  timeout 120 python3 -m lstream.tools.profile_prefill $M/q3moe8.gguf -ngl 99 -ub ${MOE_UB:-512} -p 2048 --top 25 2>&1 \
    | grep -v "^ *$" | tail -60 ;;
moeprof)
  s "MoE qwen3-30b-a3b Q4_0 -ncmoe 48: where a decode step and a prompt go"
  synth q3moe qwen3-30b-a3b Q4_0
  timeout 150 python3 -m lstream.cli bench -m $M/q3moe.gguf -p 2048 -n 16 -ub 2048 -ngl 99 -ncmoe 48 -r 1 --profile -v 2>&1 | grep -v "^ *$" | tail -80 ;;
moek)
  s "MoE kernels (moe_kernels.py): GPU tests, graph-timed against the old path, config sweeps"
  timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE tests/test_moe_kernels.py tests/test_moe_gpu.py 2>&1 | tail -15
  timeout 240 python3 -m lstream.tools.bench_moe --types Q4_0,Q4_0p,Q4_K,Q8_0 --json $OUT/bench_moe.json 2>&1
  timeout 300 python3 -m lstream.tools.bench_moe --types Q4_0 --sweep --no-old 2>&1 ;;
cpumoe)
  s "host expert compute alone (8-layer Qwen3-30B-A3B shape, CPU backend): int16 vs int8 activations, by threads"
  synth q3moe8 qwen3-30b-a3b Q4_0 --layers 8
  timeout 150 python3 -m lstream.tools.bench_cpu_moe $M/q3moe8.gguf -t ${CM_T:-16,8} -n 300 2>&1 | grep -v "^ *$" ;;
moe8)
  llama_cpp
  s "host-expert decode side by side on the 8-layer Qwen3-30B-A3B shape (-ncmoe 8): llama.cpp, lstream, lstream int16"
  synth q3moe8 qwen3-30b-a3b Q4_0 --layers 8
  timeout 100 $LB -m $M/q3moe8.gguf -p 0 -n 32 -ngl 99 -ncmoe 8 -fa 1 -r 3 -o md -lm ${LLM:-none}
  timeout 100 python3 -m lstream.cli bench -m $M/q3moe8.gguf -p 0 -n 32 -ngl 99 -ncmoe 8 -r 3 2>&1 | grep tg32
  LSTREAM_CPU_ACT8=0 timeout 100 python3 -m lstream.cli bench -m $M/q3moe8.gguf -p 0 -n 32 -ngl 99 -ncmoe 8 -r 3 2>&1 | grep tg32 | sed "s/$/  (LSTREAM_CPU_ACT8=0)/" ;;
moeold)
  s "MoE: the old expert path (LSTREAM_MOE_KERNELS=0)"
  synth q3moe qwen3-30b-a3b Q4_0
  LSTREAM_MOE_KERNELS=0 timeout 200 python3 -m lstream.cli bench -m $M/q3moe.gguf -p 2048 -n 32 -ub 512,2048 -ngl 99 -ncmoe 48,0 -r 2 2>&1 ;;
esac; done
s done
