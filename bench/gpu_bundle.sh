#!/usr/bin/env bash
# Pack what bench/gpu_check.py needs beyond a GPU machine's own PyTorch image into one archive, for a
# machine that reaches no package index (an air-gapped node, or a lent machine whose transfers are capped):
#
#   bash bench/gpu_bundle.sh [OUT_DIR]        # here, where pip reaches an index; default OUT_DIR: .whl
#   bash OUT_DIR/run_gpu_check.sh [ARGS...]   # there, from the repository root; ARGS go to gpu_check.py
#
# The image is assumed to hold PyTorch with CUDA, transformers, numpy, scipy, pandas, pyarrow, aiohttp,
# grpcio, protobuf, requests, pyyaml, click, matplotlib, tensorboard, safetensors, toolz and six (a common
# PyTorch image does; `python3 -m pip show NAME` there says). The archive holds the rest at the versions this
# project is tested with, built for PYTHON_VERSION (default 3.12): Ray (its Java jars, RLlib, Serve and LLM
# parts left out: 79 MB as a wheel, 53 MB for the whole archive with xz), faiss-cpu, soundfile (with cffi),
# soxr, Lhotse, pydantic and what Ray's dashboard imports. Measured: tests/bench/test_gpu_check.py's dry run
# under Python 3.12 with only this archive beside such an image ran every section (README, GPU check).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.whl}
PYV=${PYTHON_VERSION:-3.12}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
site="$work/site"
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
  platforms="$platforms --platform $p"
done
# shellcheck disable=SC2086
python3 -m pip install -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp $platforms \
  --target "$site" \
  ray==2.60.0 faiss-cpu==1.15.1 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 soxr==1.1.0 \
  lhotse==1.33.0 audioread==3.1.0 cytoolz==1.2.0 intervaltree==3.2.1 \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 \
  aiohttp-cors==0.8.1 colorful==0.5.8 opencensus==0.11.4 opencensus-context==0.1.3 google-api-core==2.44.0 \
  google-auth==2.63.0 googleapis-common-protos==1.76.0 proto-plus==1.29.0 pyasn1==0.6.5 pyasn1_modules==0.4.2 \
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-exporter-prometheus==0.66b2 \
  opentelemetry-proto==1.45.2 opentelemetry-semantic-conventions==0.66b2 py-spy==0.4.3 smart_open==9.0.4 \
  virtualenv==21.15.13 distlib==0.4.4 platformdirs==4.14.9 python-discovery==1.9.7 tensorboardX==2.6.5
# parts of the Ray wheel no spear job imports
rm -rf "$site"/ray/jars "$site"/ray/rllib "$site"/ray/serve "$site"/ray/llm
find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +
mkdir -p "$OUT"
tar -C "$work" -cf - site | xz -9 -T0 > "$OUT/site.tar.xz"
cat > "$OUT/run_gpu_check.sh" <<'EOF'
#!/usr/bin/env bash
# Run on the GPU machine from the repository root: unpack the archive, map the spear namespace, run the check.
set -u
here=$(cd "$(dirname "$0")" && pwd)
dest=${SPEAR_BUNDLE_DIR:-/tmp/spear-bundle}
mkdir -p "$dest/pkg/spear"
tar -xJf "$here/site.tar.xz" -C "$dest" || exit 3
for d in pipeline evaluation synthetic stages config cluster models schemas; do ln -sfn "$PWD/$d" "$dest/pkg/spear/$d"; done
export PYTHONPATH="$dest/pkg:$dest/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import ray, faiss, soundfile, soxr, torch, spear.pipeline.tokenize_job; print('[bundle] ray', ray.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 4
out=${OUT:-.}
exec python3 bench/gpu_check.py --out "$out/gpu_check.json" "$@"
EOF
chmod +x "$OUT/run_gpu_check.sh"
ls -la "$OUT/site.tar.xz" "$OUT/run_gpu_check.sh"
