# mmcontrast on a GPU node: `docker run --gpus all -v $PWD:/work IMAGE train configs/demo.yaml`.
# CUDA 13 runtime + cuDNN 9, matching the CUDA 13 torch wheels pinned in constraints.txt (they bring
# their own CUDA libraries; the base image supplies the matching user-space stack and driver hooks).
# CUDA 13 needs an NVIDIA driver >= 580 on the host. For an older driver build against CUDA 12:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t mmcontrast:cu12 .
# (torch and torchvision then come from that index, at the pinned versions, without the cu13 wheels).
ARG BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}
ARG TORCH_INDEX_URL=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's Python 3.12 (the pinned numpy/scipy need >= 3.11). Versions are not pinned here:
# the base tag fixes the Ubuntu release, and exact Debian versions leave its archive with every
# security update, which would break the build; what matters is pinned by constraints.txt.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /opt/mmcontrast
# Packaging files first, then the package: editing tests, configs or docs does not reinstall.
COPY setup.cfg pyproject.toml constraints.txt README.md ./
COPY mmcontrast ./mmcontrast
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        grep -v -E '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' constraints.txt > /tmp/constraints.txt \
        && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" \
            "torch==$(grep '^torch==' constraints.txt | cut -d= -f3)" \
            "torchvision==$(grep '^torchvision==' constraints.txt | cut -d= -f3)"; \
    else cp constraints.txt /tmp/constraints.txt; fi \
    && pip install --no-cache-dir -c /tmp/constraints.txt . \
    && mmcontrast --help > /dev/null

COPY configs ./configs
COPY launch ./launch

# Runs as an unprivileged user, named by number so any runtime can resolve it (uid 1000 is
# Ubuntu 24.04's own "ubuntu" user).
RUN groupadd --gid 10001 mmcontrast \
    && useradd --create-home --uid 10001 --gid 10001 --shell /bin/bash mmcontrast \
    && mkdir -p /work \
    && chown 10001:10001 /work
USER 10001:10001
WORKDIR /work

ENTRYPOINT ["mmcontrast"]
CMD ["--help"]
