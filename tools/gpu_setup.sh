#!/usr/bin/env bash
# Sourced at the start of a device call (tools/*.sh): gguf from a carried wheel, lstream importable
# from this checkout, the synthetic 8B models, and llama.cpp (a carried build, else built here).
# Carry: .carry/ with gguf-*.whl, llama.cpp-src.tgz and, once built, llama-cuda.tar.xz.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry*/gguf-*.whl >/dev/null 2>&1
mkdir -p /tmp/p && ln -sfn "$PWD" /tmp/p/lstream
export PYTHONPATH=/tmp/site:/tmp/p
M=/root/models; mkdir -p $M
synth() {  # synth NAME PRESET TYPE [args]: write once per machine
  local f=$M/$1.gguf; shift
  [ -f $f ] && return
  mkdir -p $M/part && python3 -m lstream.tools.synth_model "$@" $M/part/$(basename $f) 2>&1 | tail -1
  mv $M/part/$(basename $f) $f  # whole or absent: a section run beside a background synth never reads half
}
llama_cpp() {  # a CUDA llama.cpp for sm_90 in /root/lc/bin (shared libs: one copy of ggml-cuda)
  [ -x /root/lc/bin/llama-bench ] && return
  mkdir -p /root/lc
  if ls .carry*/llama-cuda.tar.xz.* >/dev/null 2>&1; then cat .carry*/llama-cuda.tar.xz.* | tar xJf - -C /root/lc; return; fi
  local t0=$(date +%s)
  tar xzf .carry/llama.cpp-src.tgz -C /root/lc && cd /root/lc && \
  cmake -B build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF >/dev/null && \
  cmake --build build --target llama-bench llama-server -j 16 >/root/lc/build.log 2>&1
  mkdir -p bin && cp -a build/bin/llama-bench build/bin/llama-server build/bin/*.so* bin/ && strip bin/* 2>/dev/null
  cd - >/dev/null
  echo "llama.cpp built in $(( $(date +%s) - t0 )) s"
  # back through $OUT in parts under the 16 MiB file limit; carried as .carry/llama-cuda.tar.xz.*
  (cd /root/lc && tar cf - bin | xz -T16 -6 | split -b 15M - $OUT/llama-cuda.tar.xz.) && ls -la $OUT/
}
LB="env LD_LIBRARY_PATH=/root/lc/bin /root/lc/bin/llama-bench"
LS="env LD_LIBRARY_PATH=/root/lc/bin /root/lc/bin/llama-server"
