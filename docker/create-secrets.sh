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
# Usage: docker/create-secrets.sh [DIR]    (default: secrets/ next to this script)
#
# Each value is `openssl rand -hex 32`. Existing files are kept, so running
# this again is harmless. To rotate one, delete it, run this again and
# recreate the services (`docker compose ... up -d --force-recreate`): the
# cluster secret must change on every master and aux node at once.
#
# Modes: the directory is 0700, so no other user of the host gets in. The
# .env files are 0600: the compose CLI reads them, as you. cluster_secret is
# 0444: compose gives a file secret to a container as a bind mount that keeps
# the host file's owner and mode (it ignores uid/gid/mode for file secrets),
# and the daemons run as uid 10001, not as you, so they read it as "other".
# 0444 is the mode Docker gives secrets by default.
set -eu

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
