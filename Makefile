# Conveniences over scripts/ (the scripts are what CI runs; make is optional).
.PHONY: check test demo bench
check: ; bash scripts/check
test: ; bash scripts/test
demo: ; bash scripts/demo
bench: ; bash scripts/bench
