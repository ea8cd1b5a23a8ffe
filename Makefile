# The two commands of the README:  `make book`  and  `make test`.  Both create/use .venv/ at the repo root.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: book test setup clean

setup: $(STAMP)

# torch is pinned to the local CPU wheel first, so nothing later pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[book,test]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

## Execute every notebook on the embedded model and build the book to _build/html (warnings are errors).
book: $(STAMP)
	VISEDIT_BOOK=1 VISEDIT_STATIC=1 $(BIN)/jupyter-book build . -W -n --keep-going
	@echo "Book built: $(CURDIR)/_build/html/index.html"

## Unit, integration and notebook (nbval) tests.
test: $(STAMP)
	$(BIN)/python -m pytest -q tests
	VISEDIT_STATIC=1 $(BIN)/python -m pytest -q --nbval notebooks --nbval-sanitize-with tests/nbval_sanitize.cfg

clean:
	rm -rf _build
