# make test — create .venv if missing, install cxrsynth with its test extras, run pytest (every test: the definition of done).
# make test-fast — the same without the tests marked slow (end-to-end runs of more than a few seconds): under 2 minutes.
# make install — the venv with cxrsynth, its test and plots extras, and .dvc/plots-template.html (the offline `dvc plots show` page).
# make demo — the main job: the DVC pipeline (the paper's study) on the embedded phantom data, ending with report/index.html.
# make device-kit — wheels the GPU machine's image lacks, for scripts/bench-gpu.sh.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install install-mediffusion test test-fast demo device-kit clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,plots]'
	touch $(STAMP)

# The page `dvc plots show` fills, named in .dvc/config.local (plots.html_template): vega inlined
# from vl-convert-python so the plots draw offline; generated (0.9 MB), ignored by git.
PLOTS_PAGE = .dvc/plots-template.html
$(PLOTS_PAGE): $(STAMP)
	$(BIN)/cxrsynth study plots-template

install: $(STAMP) $(PLOTS_PAGE)

# The real `mediffusion` package, only for the import-equivalence test (CI runs it).
install-mediffusion: $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -r requirements-mediffusion.txt

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

demo: $(STAMP) $(PLOTS_PAGE)
	$(BIN)/cxrsynth study check
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	$(BIN)/cxrsynth query "SELECT dataset, origin, split, count(*) AS images, count(DISTINCT patient_id) AS patients FROM images GROUP BY ALL ORDER BY ALL"
	$(BIN)/cxrsynth study summary
	@echo "report: report/index.html"

# The GPU device machine's image has torch, timm, typer, rich, pandas (KINDS.md) but not
# diffusers: carry these pure-Python wheels as .whl/ (git-ignored) with the call.
device-kit:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -c constraints.txt -d .whl diffusers importlib_metadata

clean:
	rm -rf data report manifests/*.parquet .dvc/cache
