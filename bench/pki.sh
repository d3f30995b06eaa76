# Sourced by the link benchmarks: certificates for the relay (relay.bench) and the agent
# (agent.bench) in $1, signed by one CA, as an operator would make them with openssl; the
# relay's [relay] keys for them (listening on netlab's cloud end) and the agent's.
bench_pki() (
  mkdir -p "$1" && cd "$1"
  o() { openssl "$@" >/dev/null 2>&1; }
  o req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem \
    -days 2 -subj "/CN=bench CA" -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign
  for n in relay agent; do
    o req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $n.key -out $n.csr -subj "/CN=$n.bench"
    echo "subjectAltName=DNS:$n.bench" >$n.ext
    o x509 -req -in $n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $n.pem -days 2 -extfile $n.ext
  done
)

# The [relay] lines for the certificates in $1: listen address and TLS files.
bench_relay_tls() {
  printf '%s\n' 'listen = "198.18.0.2:4433"' "cert_file = \"$1/relay.pem\"" \
    "key_file = \"$1/relay.key\"" "client_ca_file = \"$1/ca.pem\""
}

# The agent's [destination] lines for a relay with the certificates in $1.
bench_agent_tls() {
  printf '%s\n' 'type = "quic"' 'relay = "198.18.0.2:4433"' 'server_name = "relay.bench"' \
    "ca_file = \"$1/ca.pem\"" "cert_file = \"$1/agent.pem\"" "key_file = \"$1/agent.key\""
}
