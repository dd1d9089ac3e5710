# The imagine image for Kubernetes (KubeRay): Ray's own image with this project installed.
#
#   docker build -t registry.example.com/imagine:0.1.0-gpu .
#   docker build --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311 -t registry.example.com/imagine:0.1.0-cpu .
#
# The default base is Ray's CUDA image (`-gpu`), which also runs the CPU-only head; the CPU variant is only
# smaller. RAY_VERSION must match the Ray that the project is tested with (`pip show ray`) and `ray_version` in
# k8s/cluster.yaml; tests/k8s checks all three.
#
# Model weights: the built-in model ships inside the package (pipeline/builtin, written by
# `python -m pipeline.builtin.train all` before the build), so `model: null` works with nothing mounted. Other
# models are not baked in: k8s/cluster.yaml mounts them from a volume or fetches them from S3 when a pod
# starts (`models:`). To bake a model in instead, build FROM this image, COPY the folder (with its
# pipeline.json) to e.g. /models/mine, and list it in k8s/cluster.yaml as `{path: /models/mine, image: {}}`.
ARG RAY_VERSION=2.60.0
ARG RAY_IMAGE=rayproject/ray:${RAY_VERSION}-py311-gpu
FROM ${RAY_IMAGE}
ARG RAY_VERSION

WORKDIR /home/ray/imagine
# Dependencies first, so that a code change does not reinstall torch.
COPY --chown=ray:users pyproject.toml constraints.txt README.md ./
RUN mkdir -p pipeline deployments cluster \
    && touch pipeline/__init__.py deployments/__init__.py cluster/__init__.py \
    && pip install --no-cache-dir -c constraints.txt . "ray[serve]==${RAY_VERSION}" \
    && pip uninstall -y imagine
COPY --chown=ray:users pipeline pipeline
COPY --chown=ray:users deployments deployments
COPY --chown=ray:users cluster cluster
# The project itself, pinned to the base image's Ray so pip never swaps it.
RUN pip install --no-cache-dir --no-deps -c constraints.txt . \
    && python -c "import deployments.app, cluster.k8s"
