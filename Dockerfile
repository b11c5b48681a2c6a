# An image with keras-biasinject and its test extra; `docker run IMAGE` runs the test suite.
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 TF_CPP_MIN_LOG_LEVEL=3
COPY pyproject.toml setup.cfg README.md ./
COPY keras_biasinject ./keras_biasinject
RUN pip install -e '.[test]'
COPY tests ./tests
COPY examples ./examples
CMD ["python", "-m", "pytest"]
