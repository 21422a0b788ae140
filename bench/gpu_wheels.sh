#!/usr/bin/env bash
# Wheels of labtune's dependencies that a GPU machine without a package index lacks, for its
# Python 3.12 on x86-64 Linux, into .whl/ (or $1). There:
#   python3 -m pip install -q --no-index --find-links .whl prefect datasets boto3 pydantic gguf bm25s
# pip resolves against what the machine has and takes only what is missing from .whl.
# The image's own packages are left out to stay within what travels (64 MiB): the list below is what
# the device tool's nvidia-h200 image held on 2026-11-17 (.library/device/KINDS.md). If pip there
# reports a package too old, delete its name from PRESENT and run this again.
set -euo pipefail
out=${1:-.whl}
python=${PYTHON:-.venv/bin/python}
PRESENT="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs build certifi
charset-normalizer click cloudpickle colorama contourpy cycler filelock fonttools frozenlist fsspec h11 hf-xet httpcore
httpx huggingface-hub humanize idna jinja2 joblib kiwisolver markdown markdown-it-py markupsafe matplotlib mdurl
msgpack multidict networkx numpy packaging pandas pathspec peft pillow pip pluggy prometheus-client propcache
protobuf psutil pyarrow pygments pyparsing python-dateutil pyyaml regex requests rich safetensors sentencepiece
setuptools shellingham six sympy tokenizers torch tqdm transformers triton typer typing-extensions urllib3 wheel
xxhash yarl zipp"
version() { "$python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p "$out"
tmp=$(mktemp -d)
platforms=""
for n in 17 24 27 28 31 34 35; do platforms="$platforms --platform manylinux_2_${n}_x86_64"; done
"$python" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp" \
  "prefect==$(version prefect)" "datasets==$(version datasets)" "boto3==$(version boto3)" \
  "pydantic==$(version pydantic)" gguf bm25s
for wheel in "$tmp"/*.whl; do
  name=$(basename "$wheel" | cut -d- -f1 | tr '_A-Z' '-a-z')
  case " $(echo $PRESENT) " in *" $name "*) continue ;; esac
  cp "$wheel" "$out/"
done
rm -rf "$tmp"
echo "$(ls "$out" | wc -l) wheels, $(du -sh "$out" | cut -f1), in $out"
