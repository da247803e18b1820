#!/usr/bin/env bash
# Create the credentials of a secure fedlora deployment (TLS + SuperNode authentication + SuperExec secrets).
#
# Usage: fedlora certs [--out DIR] [--nodes N] [--san NAME_OR_IP ...] [--days D] [--force]
#        (the same script as deploy/make_certs.sh in a checkout; it ships inside the fedlora package)
#
#   --out DIR     where to write (default: deploy/certs); created if missing
#   --nodes N     SuperNode authentication key pairs to create (default: 2)
#   --san VALUE   extra subjectAltName of the SuperLink certificate, repeatable; an IPv4/IPv6
#                 address becomes an IP SAN, anything else a DNS SAN. localhost and 127.0.0.1
#                 are always included. Every name or IP that SuperNodes, SuperExecs or the
#                 flwr CLI use to reach the SuperLink must be listed (e.g. --san superlink for
#                 docker compose, --san fl.example.org --san 10.0.0.5 for real hosts).
#   --days D      certificate validity in days (default: 365)
#   --force       overwrite existing files in DIR (default: refuse)
#
# Writes into DIR:
#   ca.crt, ca.key                 the certificate authority (keep ca.key offline; ship ca.crt)
#   server.pem, server.key         the SuperLink certificate (signed by the CA) and its key
#   supernode-<i>, supernode-<i>.pub   OpenSSH ECDSA P-384 key pairs, i = 1..N; the private key
#                                  stays on site i, the .pub is registered with
#                                  `flwr supernode register DIR/supernode-<i>.pub <connection>`
#   superlink.secret               the SuperExec secret shared by the SuperLink and its ServerApp runner
#                                  (--superexec-auth-secret-file on both); stays on the SuperLink host
#   supernode-<i>.secret           the SuperExec secret shared by SuperNode i and its ClientApp runner;
#                                  stays on site i
# Private keys and secrets are written with mode 600 (owner only), the rest 644.
# Needs: openssl, ssh-keygen.
set -euo pipefail

out="deploy/certs"
nodes=2
days=365
force=0
sans=("localhost" "127.0.0.1")

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --nodes) nodes="$2"; shift 2 ;;
    --san) sans+=("$2"); shift 2 ;;
    --days) days="$2"; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '/^set -euo/q; 2,$p' "$0"; exit 0 ;;
    *) echo "make_certs.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

[[ "$nodes" =~ ^[0-9]+$ ]] || { echo "make_certs.sh: --nodes must be a non-negative integer" >&2; exit 2; }
[[ "$days" =~ ^[1-9][0-9]*$ ]] || { echo "make_certs.sh: --days must be a positive integer" >&2; exit 2; }
for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "make_certs.sh: '$tool' not found; install it (apt-get install openssl openssh-client)" >&2; exit 1; }
done

mkdir -p "$out"
if [[ $force -eq 0 ]] && { [[ -e "$out/ca.crt" ]] || compgen -G "$out/supernode-*" >/dev/null; }; then
  echo "make_certs.sh: $out already holds credentials; pass --force to replace them" >&2
  exit 1
fi
rm -f "$out"/ca.* "$out"/server.* "$out"/supernode-* "$out"/superlink.secret

alt_names=""
dns_i=0
ip_i=0
declare -A seen=()
unique=()
for san in "${sans[@]}"; do
  [[ -n "${seen[$san]:-}" ]] && continue
  seen[$san]=1
  unique+=("$san")
  if [[ "$san" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || "$san" == *:* ]]; then
    ip_i=$((ip_i + 1)); alt_names+="IP.${ip_i} = ${san}"$'\n'
  else
    dns_i=$((dns_i + 1)); alt_names+="DNS.${dns_i} = ${san}"$'\n'
  fi
done

ext="$(mktemp)"
trap 'rm -f "$ext" "$out/server.csr" "$out/ca.srl"' EXIT
cat >"$ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = @alt_names

[alt_names]
${alt_names}
EOF

umask 077
openssl req -x509 -newkey rsa:4096 -sha256 -nodes -days "$days" \
  -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=fedlora deployment CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey rsa:4096 -sha256 -nodes -keyout "$out/server.key" -out "$out/server.csr" \
  -subj "/CN=${sans[0]}" 2>/dev/null
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
  -days "$days" -sha256 -extfile "$ext" -out "$out/server.pem" 2>/dev/null

for ((i = 1; i <= nodes; i++)); do
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedlora-supernode-$i" -f "$out/supernode-$i"
done
# 32 random bytes, hex, no newline: Flower reads a secret file as exact raw bytes
openssl rand -hex 32 | tr -d '\n' >"$out/superlink.secret"
for ((i = 1; i <= nodes; i++)); do openssl rand -hex 32 | tr -d '\n' >"$out/supernode-$i.secret"; done
chmod 600 "$out/ca.key" "$out/server.key" "$out/superlink.secret"
for ((i = 1; i <= nodes; i++)); do chmod 600 "$out/supernode-$i" "$out/supernode-$i.secret"; done
chmod 644 "$out/ca.crt" "$out/server.pem"
for ((i = 1; i <= nodes; i++)); do chmod 644 "$out/supernode-$i.pub"; done

echo "make_certs.sh: wrote CA, SuperLink certificate (SANs: ${unique[*]}), $nodes SuperNode key pair(s) and the SuperExec secrets to $out"
