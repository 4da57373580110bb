#!/bin/sh
# Create the credentials docker/docker-compose.yml reads, in docker/secrets/
# (git-ignored and docker-ignored: never commit them, never bake them in):
#
#   cluster_secret   the cluster secret every master and aux node shares; a
#                    compose secret, mounted at /run/secrets/cluster_secret
#                    and given with --cluster-secret-file
#   auth_token.env   DCACHE_AUTH_TOKEN=...: the client token of every dcache
#                    service (env_file); native clients send it in HELLO
#   http_token.env   DCACHE_HTTP_TOKEN=...: the HTTP shim's token (env_file);
#                    HTTP clients send 'Authorization: Bearer TOKEN'
#
# With --tls, also the certificates docker/docker-compose.tls.yml mounts, in
# docker/secrets/tls/ (mode 0700), made with the openssl CLI:
#
#   ca.crt, ca.key   the cluster's own CA (EC P-256, 10 years); ca.key is
#                    never mounted: keep it to issue certificates, or move it
#                    offline
#   SERVICE.crt/.key one certificate per dcache service (master1, master2,
#                    aux1..aux3, http; 1 year), server and client use: every
#                    node presents it on its port and on the links it opens
#   client.crt/.key  a client certificate for applications and tools on the
#                    host (the masters require one: --tls-client-auth)
#
# Names (subjectAltName): every certificate names its compose service (what
# peers and the shim dial; nodes do not check host names between
# themselves, docs/SECURITY.md). The masters' and the shim's also name nginx
# (clients on the compose network), localhost and 127.0.0.1 (clients on the
# host, through nginx's published ports: nginx passes TLS through, so the
# client checks the master's or the shim's certificate).
#
# Usage: docker/create-secrets.sh [--tls] [DIR]    (default: secrets/ next to this script)
#
# Each value is `openssl rand -hex 32`. Existing files are kept, so running
# this again is harmless. To rotate one, delete it, run this again and
# recreate the services (`docker compose ... up -d --force-recreate`): the
# cluster secret must change on every master and aux node at once. The same
# for a certificate: delete SERVICE.crt and SERVICE.key, run this again (the
# CA is kept, so the others stay valid), recreate the service. A new CA
# (delete tls/ entirely) needs every service recreated at once.
#
# Modes: the directories are 0700, so no other user of the host gets in. The
# .env files are 0600: the compose CLI reads them, as you. cluster_secret is
# 0444: compose gives a file secret to a container as a bind mount that keeps
# the host file's owner and mode (it ignores uid/gid/mode for file secrets),
# and the daemons run as uid 10001, not as you, so they read it as "other".
# 0444 is the mode Docker gives secrets by default. The mounted TLS files
# (ca.crt, SERVICE.crt, SERVICE.key) are 0444 for the same reason, keys
# included: the 0700 directories keep them from the host's other users.
# ca.key, client.crt and client.key are 0600: only you use them.
set -eu

tls=false
if [ "${1:-}" = --tls ]; then
    tls=true
    shift
fi
case "${1:-}" in
    -*) echo "usage: create-secrets.sh [--tls] [DIR]" >&2; exit 2 ;;
esac
dir=${1:-"$(dirname "$0")/secrets"}
command -v openssl >/dev/null 2>&1 || { echo "create-secrets.sh: openssl not found" >&2; exit 1; }

umask 077
mkdir -p "$dir"
chmod 0700 "$dir"

# create NAME MODE PREFIX: NAME holds PREFIX and 32 random bytes in hex, unless it exists.
create() {
    if [ -e "$dir/$1" ]; then
        echo "kept    $dir/$1"
        return
    fi
    value=$(openssl rand -hex 32)
    printf '%s%s\n' "$3" "$value" >"$dir/$1.tmp"  # 0600 from the start (umask)
    chmod "$2" "$dir/$1.tmp"
    mv "$dir/$1.tmp" "$dir/$1"
    echo "created $dir/$1"
}

create cluster_secret 0444 ""
create auth_token.env 0600 "DCACHE_AUTH_TOKEN="
create http_token.env 0600 "DCACHE_HTTP_TOKEN="

[ "$tls" = true ] || exit 0

# -- TLS (docker/docker-compose.tls.yml) ---------------------------------------

tls_dir="$dir/tls"
mkdir -p "$tls_dir"
chmod 0700 "$tls_dir"
EC="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"

# quiet COMMAND...: run it, show its output only if it fails.
quiet() {
    out=$("$@" 2>&1) || { printf '%s\n' "$out" >&2; echo "create-secrets.sh: $1 failed" >&2; return 1; }
}

# The CA, unless it exists (then it signs the certificates still missing).
if [ -e "$tls_dir/ca.crt" ] && [ -e "$tls_dir/ca.key" ]; then
    echo "kept    $tls_dir/ca.crt"
else
    # shellcheck disable=SC2086  # $EC: several words on purpose
    quiet openssl req -x509 $EC -days 3650 -subj /CN=dcache-compose-ca \
        -keyout "$tls_dir/ca.key.tmp" -out "$tls_dir/ca.crt.tmp" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
        -addext subjectKeyIdentifier=hash
    chmod 0600 "$tls_dir/ca.key.tmp"
    chmod 0444 "$tls_dir/ca.crt.tmp"
    mv "$tls_dir/ca.key.tmp" "$tls_dir/ca.key"
    mv "$tls_dir/ca.crt.tmp" "$tls_dir/ca.crt"
    echo "created $tls_dir/ca.crt"
fi

# issue NAME MODE SAN: NAME.crt and NAME.key, signed by the CA, unless both exist.
issue() {
    if [ -e "$tls_dir/$1.crt" ] && [ -e "$tls_dir/$1.key" ]; then
        echo "kept    $tls_dir/$1.crt"
        return
    fi
    printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n' \
        "$3" >"$tls_dir/$1.ext"
    # shellcheck disable=SC2086
    quiet openssl req $EC -subj "/CN=$1" -keyout "$tls_dir/$1.key.tmp" -out "$tls_dir/$1.csr"
    quiet openssl x509 -req -in "$tls_dir/$1.csr" -CA "$tls_dir/ca.crt" -CAkey "$tls_dir/ca.key" -CAcreateserial \
        -days 365 -extfile "$tls_dir/$1.ext" -out "$tls_dir/$1.crt.tmp"
    rm -f "$tls_dir/$1.csr" "$tls_dir/$1.ext"
    chmod "$2" "$tls_dir/$1.key.tmp" "$tls_dir/$1.crt.tmp"
    mv "$tls_dir/$1.key.tmp" "$tls_dir/$1.key"
    mv "$tls_dir/$1.crt.tmp" "$tls_dir/$1.crt"
    echo "created $tls_dir/$1.crt"
}

# Reached through nginx (published on the host): masters and the shim.
published="DNS:nginx,DNS:localhost,IP:127.0.0.1"
issue master1 0444 "DNS:master1,$published"
issue master2 0444 "DNS:master2,$published"
issue aux1 0444 "DNS:aux1"
issue aux2 0444 "DNS:aux2"
issue aux3 0444 "DNS:aux3"
issue http 0444 "DNS:http,$published"
issue client 0600 "DNS:dcache-client"
rm -f "$tls_dir/ca.srl"
