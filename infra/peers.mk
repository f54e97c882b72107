# The real peers the tests run against, from Debian packages (included by the root Makefile,
# whose `test` target depends on $(TEST_TOOLS)):
#
#   prometheus               prometheus, promtool   tests/infra: alert rules, dashboard queries
#   prometheus-pushgateway   prometheus-pushgateway run-due's pushed metrics
#   prometheus-alertmanager  prometheus-alertmanager notifications' Alertmanager sink
#   chromium, chromium-driver chromium, chromedriver the status page in a real browser
#
# Where a binary is missing, one `apt-get update` and one `apt-get install` get all of them (as
# root, or through `sudo -n`); where apt-get is not allowed, one error line names the packages.
# Already installed: a few `command -v`, instant. The tests never skip a missing peer: they fail
# and name this step.

PEER_PACKAGES := prometheus prometheus-pushgateway prometheus-alertmanager chromium chromium-driver
PEER_BINARIES := prometheus promtool prometheus-pushgateway prometheus-alertmanager chromium chromedriver

TEST_TOOLS += peers

.PHONY: peers

peers:
	@missing=""; \
	for b in $(PEER_BINARIES); do command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	    echo "peers: missing$$missing; installing $(PEER_PACKAGES) with apt-get"; \
	    as_root=""; [ "$$(id -u)" = 0 ] || as_root="sudo -n"; \
	    { [ -z "$$as_root" ] || command -v sudo >/dev/null 2>&1; } && \
	    { $$as_root apt-get update -qq && \
	      DEBIAN_FRONTEND=noninteractive $$as_root apt-get install -y -qq --no-install-recommends \
	          $(PEER_PACKAGES); } >/dev/null \
	    || { echo "error: the test peers are missing and apt-get may not install them here: run 'apt-get install -y --no-install-recommends $(PEER_PACKAGES)' as root, then make test again" >&2; exit 1; }; \
	fi
