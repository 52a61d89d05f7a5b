.PHONY: demo test bench lint

# Set up the environment and embed the demo data into ./warehouse/demo.
demo:
	scripts/demo.sh

# Build what the tests need, then run the whole suite.
test:
	scripts/test.sh

# Whole job vs bare sentence-transformers on the demo corpus (ratios).
bench:
	scripts/bootstrap.sh && .venv/bin/python bench/job.py

# ruff, then mypy (config in pyproject.toml); builds .venv first where there is none.
lint:
	scripts/bootstrap.sh
	.venv/bin/ruff check pipeline jobs bench tests airflow_dags scripts
	.venv/bin/mypy
