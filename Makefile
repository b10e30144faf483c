# Set-up: `make demo` runs the main job, `make test` runs the tests.
# Both create (or reuse) the project's virtual environment in .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow bench venv clean mutate

venv: $(STAMP)

# torch is pinned to the CPU build through constraints.txt; the package itself accepts torch>=2.10 (security floor, see pyproject.toml).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/simmstnet demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --durations=15

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

# ----------------------------------------------------------------------------- mutation testing
# `make mutate` (not part of `test` or CI): mutmut over the modules whose claims matter most, one
# module at a time, each in its own copy under $(MUTATE_DIR)/<module> (src/ is never touched) and
# tested only by its own test files (TESTS.<module>; slow tests excluded), fastest test first
# (tests/conftest.py), so a caught mutant stops at the first, quickest failing test.
# The default list has about 10,000 mutants: all of them take many hours on 2 cores, so the
# default runs a systematic sample that finishes in under an hour (docs/results/mutation.md).
# One module:  make mutate MODULES=src/simmstnet/eval/metrics.py
# Other tests for a module:  make mutate MODULES=M TESTS.M="tests/a.py tests/b.py"
# Every mutant of a module:  make mutate MODULES=M MUTATE_SAMPLE=all
# Read the survivors:  cd $(MUTATE_DIR)/<module> && ../../../$(VENV)/bin/mutmut show <name>
MUTATE_DIR  ?= build/mutate
MUTATE_JOBS ?= 2
# The sample: the last digits of the mutant numbers to run. The default 7 runs mutants 7, 17,
# 27, ... of every mutated function (~10 %, spread over all functions); MUTATE_SAMPLE=37 runs
# 3, 7, 13, 17, ... (~20 %); MUTATE_SAMPLE=all runs every mutant. The modules in MUTATE_HALF,
# whose tests train models (a surviving mutant there costs a minute or two), keep half of the
# sample: the numbers whose tens digit is even (7, 27, 47, ..., 107, ...). The summary counts
# the others as "not checked".
MUTATE_SAMPLE ?= 7
MUTATE_HALF ?= src/simmstnet/train/trainer.py src/simmstnet/train/sim2real.py \
               src/simmstnet/train/sim2real_loop.py
mutate_filter = $(if $(filter all,$(MUTATE_SAMPLE)),,$(if $(filter $(1),$(MUTATE_HALF)),'*__mutmut_[$(MUTATE_SAMPLE)]' '*__mutmut_*[02468][$(MUTATE_SAMPLE)]','*__mutmut_*[$(MUTATE_SAMPLE)]'))
MUTATE_SHARED_DATA ?= $(or $(SIMMSTNET_SHARED_DATA),$(abspath ../shared/data))
MODULES ?= src/simmstnet/data/windows.py src/simmstnet/data/scaling.py src/simmstnet/data/grid.py \
           src/simmstnet/data/telecom_italia.py src/simmstnet/train/trainer.py \
           src/simmstnet/train/loss_weighting.py src/simmstnet/train/checkpoint.py \
           src/simmstnet/eval/forecast.py src/simmstnet/eval/metrics.py src/simmstnet/sim/realism.py \
           src/simmstnet/train/sim2real.py src/simmstnet/train/cutting_planes.py \
           src/simmstnet/train/sim2real_loop.py
TESTS.src/simmstnet/data/windows.py        ?= tests/test_windows.py tests/test_season.py tests/test_guard_data.py
TESTS.src/simmstnet/data/scaling.py        ?= tests/test_scaling.py
TESTS.src/simmstnet/data/grid.py           ?= tests/test_grid.py tests/test_guard_data.py
TESTS.src/simmstnet/data/telecom_italia.py ?= tests/test_telecom_italia.py tests/test_guard_data.py
TESTS.src/simmstnet/train/trainer.py       ?= tests/test_guard_trainer_units.py tests/test_trainer.py tests/test_resume.py tests/test_guard_trainer.py
TESTS.src/simmstnet/train/loss_weighting.py ?= tests/test_loss_weighting.py tests/test_guard_eval.py
TESTS.src/simmstnet/train/checkpoint.py    ?= tests/test_resume.py tests/test_guard_trainer.py
TESTS.src/simmstnet/eval/forecast.py       ?= tests/test_predict.py tests/test_intervals.py tests/test_guard_eval.py
TESTS.src/simmstnet/eval/metrics.py        ?= tests/test_metrics.py tests/test_guard_eval.py
TESTS.src/simmstnet/sim/realism.py         ?= tests/test_sim_realism.py tests/test_guard_sim.py
TESTS.src/simmstnet/train/sim2real.py      ?= tests/test_guard_sim2real.py tests/test_sim2real.py tests/test_sim2real_train.py
TESTS.src/simmstnet/train/cutting_planes.py ?= tests/test_sim2real.py
TESTS.src/simmstnet/train/sim2real_loop.py ?= tests/test_sim2real_train.py tests/test_resume.py tests/test_guard_trainer.py

# Writes the copy's pyproject.toml: the pytest options and [tool.mutmut] of ours, with
# only_mutate and the test selection set to one module and its tests.
define MUTATE_CONFIG_PY
import json, sys, tomllib
src, dst, module, *tests = sys.argv[1:]
tool = tomllib.load(open(src, "rb"))["tool"]
mut = dict(tool["mutmut"], only_mutate=[module], pytest_add_cli_args_test_selection=tests)
def table(name, d):
    return f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in d.items())
open(dst, "w").write(table("tool.pytest.ini_options", tool["pytest"]["ini_options"]) + "\n"
                     + table("tool.mutmut", mut))
endef
export MUTATE_CONFIG_PY

# Survivor count of one finished copy, from mutmut's own results.
define MUTATE_COUNT_PY
import collections, subprocess, sys
out = subprocess.run([sys.argv[1], "results", "--all", "true"], capture_output=True, text=True).stdout
n = collections.Counter(line.rsplit(": ", 1)[1].strip() for line in out.splitlines() if ": " in line)
print(f"{sys.argv[2]}: {sum(n.values())} mutants, " + ", ".join(f"{v} {k}" for k, v in sorted(n.items()))
      + f"; {int(sys.argv[3])} s")
endef
export MUTATE_COUNT_PY

mutate_name = $(subst /,.,$(patsubst src/simmstnet/%.py,%,$(1)))
define mutate_one
@test -n "$(TESTS.$(1))" || { echo "no test files for $(1): set TESTS.$(1)"; exit 2; }
@echo "== mutmut $(1) with $(TESTS.$(1))"
rm -rf $(MUTATE_DIR)/$(call mutate_name,$(1))
mkdir -p $(MUTATE_DIR)/$(call mutate_name,$(1))
cp -r src tests $(MUTATE_DIR)/$(call mutate_name,$(1))/
find $(MUTATE_DIR)/$(call mutate_name,$(1)) \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
$(PY) -c "$$MUTATE_CONFIG_PY" pyproject.toml $(MUTATE_DIR)/$(call mutate_name,$(1))/pyproject.toml $(1) $(TESTS.$(1))
date +%s > $(MUTATE_DIR)/$(call mutate_name,$(1))/started
cd $(MUTATE_DIR)/$(call mutate_name,$(1)) && OMP_NUM_THREADS=1 SIMMSTNET_SHARED_DATA=$(MUTATE_SHARED_DATA) SIMMSTNET_MUTATE_DURATIONS=$(abspath $(MUTATE_DIR))/$(call mutate_name,$(1))/mutants/mutmut-stats.json $(abspath $(VENV))/bin/mutmut run --max-children $(MUTATE_JOBS) $(call mutate_filter,$(1)) > mutmut-run.log 2>&1 || { tail -20 mutmut-run.log; exit 1; }
cd $(MUTATE_DIR)/$(call mutate_name,$(1)) && $(abspath $(PY)) -c "$$MUTATE_COUNT_PY" $(abspath $(VENV))/bin/mutmut $(1) $$(( $$(date +%s) - $$(cat started) )) | tee -a $(abspath $(MUTATE_DIR))/summary.txt

endef

mutate: $(STAMP)
	@mkdir -p $(MUTATE_DIR) && rm -f $(MUTATE_DIR)/summary.txt
	$(foreach m,$(MODULES),$(call mutate_one,$(m)))
	@echo "survivors per module: $(MUTATE_DIR)/summary.txt; list them with mutmut results in $(MUTATE_DIR)/<module>"
