#!/bin/sh
# One-shot set-up for the compose deployment (the `bootstrap` service runs it; safe to run again: it
# creates only what is missing). What each step means is in deploy/README.md, "PKI set-up".
#
#   /pki            the network CA (ca.key stays in this volume) and every issued certificate
#   /registry       the registry's folder: its signing key is created here on first open
#   /keys/<name>    what each service mounts: tls/ (cert.pem, key.pem, ca.pem), identity/ (nodes),
#                   registry.pub.json (the registry's public key: nodes verify tokens and catalogs with it)
set -eu

NODES="${MEMFED_NODES:-node-a node-b node-c}"
OPERATOR="${MEMFED_OPERATOR:-admin}"

[ -e /pki/ca.pem ] || memfed pki init --dir /pki --name "memfed network CA"

issue() {  # NAME: a certificate whose CN (and a SAN) is NAME, the compose service name
    [ -e "/pki/$1/cert.pem" ] || memfed pki issue "$1" --dir /pki --days 825
}
issue registry
issue "$OPERATOR"
for n in $NODES; do issue "$n"; done

# The registry's key: opening the registry (here, an audit check of its empty log) creates it.
memfed audit verify --dir /registry >/dev/null

install_tls() {  # NAME -> /keys/NAME/tls
    mkdir -p "/keys/$1/tls"
    cp "/pki/$1/cert.pem" "/pki/$1/key.pem" "/pki/$1/ca.pem" "/keys/$1/tls/"
    chmod 600 "/keys/$1/tls/key.pem"
}
install_tls registry
install_tls "$OPERATOR"
for n in $NODES; do
    install_tls "$n"
    [ -e "/keys/$n/identity/identity.pub.json" ] || memfed identity init --dir "/keys/$n/identity" --name "$n"
    cp /registry/key/identity.pub.json "/keys/$n/registry.pub.json"
done
cp /registry/key/identity.pub.json "/keys/$OPERATOR/registry.pub.json"
# The services run as uid 10001 (the images' memfed user); private keys stay 0600.
[ "$(id -u)" != 0 ] || chown -R 10001 /pki /registry /keys
echo "bootstrap done: CA in /pki, certificates for registry, $OPERATOR and $NODES"
