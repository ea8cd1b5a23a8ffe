# The two commands of the README:  `make book`  and  `make test`.  Both create/use .venv/ at the repo root.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: book test setup clean measure repository

setup: $(STAMP)

# torch is pinned to the local CPU wheel first, so nothing later pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[book,test,multi-gpu]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

## Execute every notebook on the embedded model and build the book to _build/html (warnings are errors).
book: $(STAMP)
	@grep -q 'url: https://github.com/your-org/visedit' _config.yml && echo "notice: _config.yml's repository.url is still the placeholder github.com/your-org/visedit; the Colab/Binder launch buttons, source links and the notebooks' install cell point nowhere until the publisher sets it with \`make repository URL=https://github.com/ORG/REPO\`." || true
	VISEDIT_BOOK=1 VISEDIT_STATIC=1 $(BIN)/jupyter-book build . -W -n --keep-going
	@echo "Book built: $(CURDIR)/_build/html/index.html"

## Unit, integration and notebook (nbval) tests.
test: $(STAMP)
	$(BIN)/python -m pytest -q tests
	VISEDIT_STATIC=1 $(BIN)/python -m pytest -q --nbval notebooks --nbval-sanitize-with tests/nbval_sanitize.cfg

## Size of the built site and each page's load time in headless Chromium (needs `make book` first).
measure:
	$(BIN)/python book/_ext/measure_site.py _build/html

## Name the published repository: _config.yml's repository.url and every notebook's install cell.
repository:
	@test -n "$(URL)" || { echo "usage: make repository URL=https://github.com/ORG/REPO"; exit 2; }
	$(PY) book/_ext/set_repository.py $(URL)

clean:
	rm -rf _build
