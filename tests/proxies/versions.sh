# Pinned versions of the proxies that tests/proxies/build.sh builds from the
# Go module proxy. Changing one changes the cache directory it lands in.
#
# Traefik: v3.6.12, not the newest v3.7.x. v3.7.13 needs 15 module versions
# that the module proxy reachable here refuses ("403 Forbidden: This module
# version is not available"): the containous/go-http-auth fork at
# v0.4.1-0.20260804094822-b975dcaa8c48 (the basic/digest auth middlewares)
# and 14 DNS provider SDKs that go-acme/lego/v5 v5.4.1 imports. Its go.mod
# also replaces github.com/traefik/traefik/dynamic/ext with
# ./pkg/config/dynamic/ext, a nested module that module zips leave out.
# Every module v3.6.12 needs is served.
TRAEFIK_VERSION=v3.6.12   # github.com/traefik/traefik/v3
