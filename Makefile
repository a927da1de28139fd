# The course's commands. Each target installs what it needs into .venv/ first (once).
#
#   make lab                 set up, then open the course in JupyterLab
#   make test                set up, then lint and run every test: library, kernels, notebooks, exercises
#   make lesson LESSON=41    one lesson only: its notebook, its exercise checks, its library and kernel tests
#   make check LESSON=00     check your own answers in exercises/ (all lessons without LESSON=)
#   make doctor              check this machine: versions, GPU, one tiny kernel ([OK]/[FAIL] lines)
#   make html                render every lesson with its outputs to build/html/ (open index.html)
#   make strip               remove outputs from the notebooks before committing

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# JupyterLab refuses to run as root unless told; containers often run as root
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: setup lab test lesson check doctor html strip clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $(STAMP)

lab: setup
	$(VENV)/bin/jupyter lab $(ROOT_FLAG) --LabApp.default_url=/lab/tree/notebooks/00_attention_from_scratch.ipynb

test: setup
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile tests --nbval-lax --nbval-current-env notebooks

lesson: setup
	@test -n "$(LESSON)" || { echo "make lesson: say which, e.g. make lesson LESSON=41"; exit 2; }
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile --nbval-lax --nbval-current-env \
	    $$($(PY) scripts/lesson.py $(LESSON))

check: setup
	$(PY) -m pytest -q --tb=no -rN tests/exercises/$(if $(LESSON),test_$(LESSON)_*.py,) --against exercises

doctor: setup
	$(PY) -m attnlib.tools.doctor

html: setup
	$(PY) scripts/build_html.py --out build/html

strip: setup
	$(VENV)/bin/jupyter nbconvert --clear-output --inplace notebooks/*.ipynb

clean:
	rm -rf $(VENV) .pytest_cache
