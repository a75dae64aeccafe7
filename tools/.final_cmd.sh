. tools/gpu_setup.sh
synth l8b llama3-8b Q4_0
llama_cpp
B="python3 -m lstream.cli bench -m $M/l8b.gguf"; L="$LB -m $M/l8b.gguf -o md"
echo "== decode"; timeout 70 $L -p 0 -n 32 -ngl 33,16 -fa 1 -r 3; timeout 100 $B -p 0 -n 32 -ngl 33,16 -r 3 2>&1 | grep -v "^ *$"
echo "== depth"; timeout 60 $L -p 0 -n 32 -d 4096 -ngl 16 -fa 1 -r 2; timeout 90 $B -p 0 -n 32 -d 4096 -ngl 16 -r 2 2>&1 | grep -v "^ *$"
echo "== tests"; export LSTREAM_SMOL=$PWD/.carry/smollm2-8l.gguf
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE tests/test_split_decode.py tests/test_cuda_backend.py tests/test_moe_gpu.py tests/test_moe_kernels.py 2>&1 | tail -12
MOE_T=8,15,16 timeout 130 bash tools/h200_sbs.sh moesmall 2>&1 | grep -v "^wrote"
