# Training image for sslight-dali.
#
# The NGC PyTorch image already ships torch, torchvision, NVIDIA DALI (the CUDA 13 build) and NVIDIA
# apex, built together for its CUDA/cuDNN, with the packages torch and torchvision depend on (numpy,
# Pillow, sympy, ...). None of these is reinstalled here. Everything else in requirements.txt is
# installed at its pin, under the same constraints.txt that `make` uses, less the lines for those.
#
# Build and run (the "video" capability exposes the hardware JPEG decoder of A100/H100 to DALI):
#   docker build -t sslight-dali .
#   docker run --rm --gpus 'all,"capabilities=compute,utility,video"' --ipc=host \
#       -v /data/imagenet:/data -v "$PWD/runs:/workspace/runs" \
#       sslight-dali train dino/resnet18_sslight data.root=/data
FROM nvcr.io/nvidia/pytorch:25.10-py3

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /workspace

# Dependencies first (a cached layer). The first grep drops exactly the lines the base image provides
# (torch, torchvision, numpy, pillow, nvidia-dali-cuda*); every other pinned line of requirements.txt is
# installed. The second keeps the constraints off torch's and torchvision's dependencies and the
# NVIDIA/CUDA libraries, so pip never replaces what the base image built together to satisfy a pin.
# Never `pip install apex`: the PyPI package of that name is unrelated to NVIDIA apex.
COPY requirements.txt constraints.txt ./
RUN grep -vE '^(torch|torchvision|numpy|pillow|nvidia-dali-cuda[0-9]+)==' requirements.txt > /tmp/requirements-image.txt \
 && grep -viE '^(torch|torchvision|triton|numpy|pillow|sympy|mpmath|networkx|jinja2|markupsafe|filelock|fsspec|typing.extensions|setuptools|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==' \
      constraints.txt > /tmp/constraints-image.txt \
 && pip install -r /tmp/requirements-image.txt -c /tmp/constraints-image.txt \
 && rm /tmp/requirements-image.txt /tmp/constraints-image.txt

# This package, with the shipped configs and recipes inside it (`sslight train dino/resnet18_sslight`
# works from any folder, the repository paths `configs/...` too), without touching the dependencies
# installed above.
COPY . .
RUN pip install --no-deps .

ENTRYPOINT ["sslight"]
CMD ["--help"]
