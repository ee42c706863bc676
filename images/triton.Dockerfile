# Triton server that serves the model repository written by the pipeline.
# NGC_RELEASE must equal the one in tensorrt.Dockerfile (plans are not portable across
# TensorRT versions); 26.08 ships Triton 2.73, the tritonclient version in constraints.txt.
ARG NGC_RELEASE=26.08
FROM nvcr.io/nvidia/tritonserver:${NGC_RELEASE}-py3

COPY --chmod=0755 images/triton-entrypoint.sh /usr/local/bin/triton-entrypoint.sh

# The NGC image already has the unprivileged user triton-server (uid 1000).
USER 1000
ENTRYPOINT ["/usr/local/bin/triton-entrypoint.sh"]
