# make demo: create .venv, install, segment the real Kampala and Landsat scenes and the CMU-1 slide end to end
#            with the segment-scenes Prefect flow (local Prefect server on SQLite under work/, local Ray cluster).
# make test: create .venv, install, run ruff, mypy and the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data
DEMO_OUT ?= demo-out
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck install zoo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/deeplab run-flow $(DATA)/kampala-buildings/scene/kampala_z21_rgb.tif \
		--model models/zoo/buildings-kampala.safetensors --out $(DEMO_OUT) --vectorize
	$(BIN)/deeplab run-flow $(DATA)/landsat/RGB.byte.tif \
		--model models/zoo/landcover-dubai.safetensors --out $(DEMO_OUT) --probabilities
	$(BIN)/deeplab run-flow $(DATA)/wsi/CMU-1-Small-Region.svs \
		--model models/zoo/he-stain-cmu.safetensors --out $(DEMO_OUT) --vectorize
	@echo "outputs: $(DEMO_OUT)/kampala_z21_rgb/ (mask.tif, polygons.gpkg, quicklook.png, report.json)"
	@echo "         $(DEMO_OUT)/RGB.byte/ (mask.tif, probabilities.tif, quicklook.png, report.json)"
	@echo "         $(DEMO_OUT)/CMU-1-Small-Region/ (mask.ome.tif, polygons.geojson for QuPath, quicklook.png, report.json)"
	@echo "         $(DEMO_OUT)/manifest.json (every run; a second make demo skips every unchanged scene)"

lint: $(STAMP)
	$(BIN)/ruff check pipeline models flows tests bench infra
	$(BIN)/ruff format --check pipeline models flows tests bench infra

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest -q --durations=15

zoo: $(STAMP)
	DEEPLAB=$(BIN)/deeplab models/zoo/train_zoo.sh all

clean:
	rm -rf $(VENV) $(DEMO_OUT) work
