# make demo: create .venv, install, segment the real Kampala scene (as published, EPSG:4326, and warped to its UTM
#            zone, EPSG:32636) and the CMU-1 slide end to end with the segment-scenes Prefect flow (local Prefect
#            server on SQLite under work/, local Ray cluster). bench/pins.py runs the same scenes and options.
#            Without ../shared/data the inputs are fetched from their public origins first (sha256-pinned,
#            `deeplab fetch-demo work/data`).
# make test: create .venv, install, run ruff, mypy and the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= $(if $(wildcard ../shared/data/kampala-buildings),../shared/data,work/data)
FETCHED := work/data
DEMO_OUT ?= demo-out
STAMP := $(VENV)/.installed
DEMO_UTM := work/demo/kampala_utm36n.tif

.PHONY: demo test lint typecheck install zoo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

$(FETCHED)/kampala-buildings/scene/kampala_z21_rgb.tif $(FETCHED)/wsi/CMU-1-Small-Region.svs: | $(STAMP)
	$(BIN)/deeplab fetch-demo $(FETCHED)

$(DEMO_UTM): $(STAMP) $(DATA)/kampala-buildings/scene/kampala_z21_rgb.tif
	mkdir -p $(dir $@)
	$(BIN)/deeplab warp $(DATA)/kampala-buildings/scene/kampala_z21_rgb.tif --crs EPSG:32636 --out $@

demo: $(STAMP) $(DEMO_UTM) $(DATA)/wsi/CMU-1-Small-Region.svs
	$(BIN)/deeplab run-flow $(DATA)/kampala-buildings/scene/kampala_z21_rgb.tif \
		--model models/zoo/buildings-kampala.safetensors --out $(DEMO_OUT) --vectorize
	$(BIN)/deeplab run-flow $(DEMO_UTM) \
		--model models/zoo/buildings-kampala.safetensors --out $(DEMO_OUT) --probabilities --vectorize
	$(BIN)/deeplab run-flow $(DATA)/wsi/CMU-1-Small-Region.svs \
		--model models/zoo/he-stain-cmu.safetensors --out $(DEMO_OUT) --vectorize --ome-zarr
	@echo "outputs: $(DEMO_OUT)/index.html (every scene: quicklook, class areas, timings, links; open it in a browser)"
	@echo "         $(DEMO_OUT)/catalog.json (STAC catalog of the scenes' item.json)"
	@echo "         $(DEMO_OUT)/kampala_z21_rgb/ (mask.tif, polygons.gpkg, quicklook.png, report.json, item.json)"
	@echo "         $(DEMO_OUT)/kampala_utm36n/ (mask.tif, probabilities.tif, polygons.gpkg, quicklook.png, report.json, item.json)"
	@echo "         $(DEMO_OUT)/CMU-1-Small-Region/ (mask.ome.tif, slide.ome.zarr, polygons.geojson for QuPath, quicklook.png, report.json, item.json)"
	@echo "         $(DEMO_OUT)/manifest.json (every run; a second make demo skips every unchanged scene)"

lint: $(STAMP)
	$(BIN)/ruff check deeplab_common pipeline models flows tests bench infra
	$(BIN)/ruff format --check deeplab_common pipeline models flows tests bench infra

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest -q --durations=15

zoo: $(STAMP)
	DEEPLAB=$(BIN)/deeplab models/zoo/train_zoo.sh all

clean:
	rm -rf $(VENV) $(DEMO_OUT) work
