# The two commands: `make demo` and `make test`. Both run the idempotent set-up first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export NLTK_DATA := $(CURDIR)/.nltk_data

.PHONY: setup demo test test-quick bench lint screenshots clean

setup:
	@infra/setup.sh

KEEP_RUNNING ?=
demo: setup
	@SYNSETFORGE_DEMO_KEEP_RUNNING=$(KEEP_RUNNING) $(PY) -m pipeline.demo

test: setup
	@$(PY) -m pytest -q

test-quick: setup
	@$(PY) -m pytest -q -m "not slow"

bench: setup
	@infra/setup-bench.sh
	@$(PY) benchmarks/run_all.py

# The README's pictures: the browser tests render them into test-artifacts/docs/; this copies them into docs/.
SCREENSHOT_TESTS := tests/test_browser_crowd.py tests/test_browser_grid.py tests/test_boxes_browser.py \
	tests/test_release_report.py tests/test_airflow_scheduler.py tests/test_challenge_browser.py \
	tests/test_crowd_onboarding.py tests/test_det_browser.py
screenshots: setup
	@$(PY) -m pytest -q $(SCREENSHOT_TESTS)
	@cp -v test-artifacts/docs/*.png docs/

lint: setup
	@$(VENV)/bin/ruff check pipeline crowd challenge dags tests benchmarks infra/deploy/check.py
	@$(PY) infra/deploy/check.py

clean:
	rm -rf $(VENV) .venv-labelstudio .venv-bench-* .nltk_data demo-output test-artifacts
