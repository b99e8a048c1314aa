#!/usr/bin/env python3
"""Stand-in for the server side of a k3s cluster with embedded etcd, for tests of
kiln-k3s-bootstrap (tests/k3s_bootstrap.rs). k3s itself cannot run where kiln's tests run.

Modelled on k3s's source (k3s-io/k3s; file and function named at each piece):

`serve`: a running cluster, reachable at one address (a surviving master, or the VIP):
  * /ping -> "pong" and /cacerts -> the server CA, both unauthenticated
    (pkg/server/handlers/router.go).
  * /db/info -> {"members": [...]} with basic auth server:<secret> (ETCD.handler/infoHandler,
    pkg/etcd/etcd.go; auth.IsLocalOrHasRole "k3s:server"): 401 without credentials.
  * /api/v1/nodes/<name> GET/DELETE, authenticated by a client certificate of the cluster's
    client CA (kube-apiserver, anonymous-auth=false: 401 without one; 403 unless the
    certificate's organization is system:masters).
  * A Node of an etcd member carries the finalizer wrangler.cattle.io/managed-etcd-controller
    and the annotations etcd.k3s.cattle.io/node-name and -node-address
    (pkg/etcd/member_controller.go, metadata_controller.go). DELETE sets deletionTimestamp;
    the controller removes the etcd member (RemovePeer) and then the finalizer: the Node is
    gone (404) only after the member is, which takes --remove-lag seconds here.
  * POST /kiln-standin/member-add: what a joiner's etcd MemberAddAsLearner plus its kubelet's
    Node registration amount to (the test cannot speak etcd gRPC).
  * GET /kiln-standin/state: the members and nodes, for the test's assertions.
  * Draining a node as `kubectl drain` does it (k8s.io/kubectl/pkg/drain: cordon by patching
    spec.unschedulable, list the node's pods with fieldSelector spec.nodeName=<node>, skip
    DaemonSet-owned and mirror pods (annotation kubernetes.io/config.mirror), evict the others
    through policy/v1 Eviction): PATCH /api/v1/nodes/<name> (merge patch), GET /api/v1/pods,
    POST /api/v1/namespaces/<ns>/pods/<name>/eviction — 429 TooManyRequests for a pod whose
    PodDisruptionBudget allows no disruption (kube-apiserver's eviction REST,
    pkg/registry/core/pod/storage/eviction.go), 404 for a pod that is gone. Same client
    certificate rule as the nodes. --workers=a,b adds agent Nodes; --pods=ns/name@node[:ds|:mirror|:pdb],...
    the pods.

`server [--cluster-reset] [--cluster-reset-restore-path=P]`: a k3s server starting on the node
whose root is $KILN_ROOT, reading config.yaml and config.yaml.d/*.yaml, then exiting:
  * member/wal exists -> restart from the data (pkg/cluster/managed.go assignManagedDriver,
    ETCD.Start "Starting etcd for existing cluster member"); no join.
  * `server:` set and no data -> join (pkg/clientaccess/token.go: /cacerts hashed against the
    token's pin; pkg/etcd/etcd.go ETCD.join: /db/info, then the duplicate-name check: a member
    whose name, cut at the last '-', is this node's name but is not this node's member name
    -> "etcd cluster join failed: duplicate node name found, please use a unique name for this
    node", exit 1).
  * cluster-init and no data -> a new single-member cluster.
  * --cluster-reset: refused with `server:` set, or without a token; else etcd data from the
    snapshot, a new member name, db/reset-flag, the "membership has been reset" line, exit 0
    (pkg/cli/server/server.go, ETCD.Reset).
Member names are <node-name>-<8 hex> (ETCD.setName), kept in server/db/etcd/name.
"""
import base64
import datetime
import glob
import hashlib
import http.server
import ipaddress
import json
import os
import secrets
import socketserver
import ssl
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import yaml

FINALIZER = "wrangler.cattle.io/managed-etcd-controller"


def fail(msg):
    print(msg, flush=True)
    sys.exit(1)


# --------------------------------------------------------------------------------------------
# serve
# --------------------------------------------------------------------------------------------


class Cluster:
    def __init__(self, secret, remove_lag):
        self.secret = secret
        self.remove_lag = remove_lag
        self.lock = threading.Lock()
        self.members = {}  # member name -> peer address
        self.nodes = {}  # node name -> Node object (dict)
        self.pods = {}  # (namespace, name) -> {"node": ..., "kind": "ds" | "mirror" | "pdb" | ""}
        self.events = []

    def add_worker(self, node):
        with self.lock:
            self.nodes[node] = {"apiVersion": "v1", "kind": "Node",
                                "metadata": {"name": node, "labels": {}}, "spec": {}}

    def pod_json(self, ns, name, p):
        meta = {"name": name, "namespace": ns, "annotations": {}}
        if p["kind"] == "ds":
            meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                                        "name": name.rsplit("-", 1)[0], "controller": True}]
        if p["kind"] == "mirror":
            meta["annotations"]["kubernetes.io/config.mirror"] = "x"
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                "spec": {"nodeName": p["node"]}}

    def add_member(self, member, address):
        node = member[: member.rfind("-")] if member.rfind("-") > 1 else member
        with self.lock:
            self.members[member] = address
            self.nodes[node] = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": node,
                    "finalizers": [FINALIZER],
                    "annotations": {
                        "etcd.k3s.cattle.io/node-name": member,
                        "etcd.k3s.cattle.io/node-address": address,
                    },
                    "labels": {"node-role.kubernetes.io/etcd": "true"},
                },
            }
            self.events.append(f"member-add {member} {address}")

    def delete_node(self, node):
        with self.lock:
            n = self.nodes.get(node)
            if n is None:
                return None
            if "deletionTimestamp" not in n["metadata"]:
                n["metadata"]["deletionTimestamp"] = (
                    datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                )
                self.events.append(f"node-delete {node}")
                threading.Timer(self.remove_lag, self._on_remove, args=(node,)).start()
            return n

    def _on_remove(self, node):
        # member_controller onRemove: RemovePeer(name, address), then the finalizer goes.
        with self.lock:
            n = self.nodes.get(node)
            if n is None:
                return
            ann = n["metadata"]["annotations"]
            member = ann["etcd.k3s.cattle.io/node-name"]
            if self.members.get(member) == ann["etcd.k3s.cattle.io/node-address"]:
                del self.members[member]
                self.events.append(f"member-remove {member}")
            del self.nodes[node]
            self.events.append(f"node-gone {node}")


def make_handler(cluster, server_ca_pem):
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def send(self, code, body, ctype="application/json"):
            if not isinstance(body, bytes):
                body = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def status(self, code, reason, msg):
            self.send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                             "reason": reason, "message": msg, "code": code})

        def basic_server(self):
            h = self.headers.get("Authorization", "")
            if not h.startswith("Basic "):
                return False
            try:
                user, _, pw = base64.b64decode(h[6:]).decode().partition(":")
            except Exception:
                return False
            return user == "server" and pw == cluster.secret

        def client_groups(self):
            cert = self.connection.getpeercert()
            if not cert:
                return None
            groups = []
            for rdn in cert.get("subject", ()):
                for k, v in rdn:
                    if k == "organizationName":
                        groups.append(v)
            return groups

        def node_route(self):
            p = self.path.split("?")[0]
            prefix = "/api/v1/nodes/"
            if not p.startswith(prefix) or "/" in p[len(prefix):]:
                return None
            groups = self.client_groups()
            if groups is None:
                self.status(401, "Unauthorized", "Unauthorized")
                return False
            if "system:masters" not in groups:
                self.status(403, "Forbidden", "nodes is forbidden")
                return False
            return p[len(prefix):]

        def masters(self):
            groups = self.client_groups()
            if groups is None:
                self.status(401, "Unauthorized", "Unauthorized")
                return False
            if "system:masters" not in groups:
                self.status(403, "Forbidden", "forbidden")
                return False
            return True

        def body(self):
            return json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")

        def do_PATCH(self):
            name = self.node_route()
            if name is False:
                return
            if name is None:
                return self.send(405, b"", "text/plain")
            patch = self.body()
            with cluster.lock:
                n = cluster.nodes.get(name)
                if n is None:
                    return self.status(404, "NotFound", f'nodes "{name}" not found')
                u = patch.get("spec", {}).get("unschedulable")
                if u is not None:
                    n.setdefault("spec", {})["unschedulable"] = bool(u)
                    cluster.events.append(f"{'cordon' if u else 'uncordon'} {name}")
            self.send(200, n)

        def do_GET(self):
            p = self.path.split("?")[0]
            if p == "/api/v1/pods":
                if not self.masters():
                    return
                q = urllib.parse.parse_qs(self.path.partition("?")[2])
                sel = q.get("fieldSelector", [""])[0]
                node = sel[len("spec.nodeName="):] if sel.startswith("spec.nodeName=") else None
                with cluster.lock:
                    items = [cluster.pod_json(ns, n, v) for (ns, n), v in sorted(cluster.pods.items())
                             if node is None or v["node"] == node]
                return self.send(200, {"apiVersion": "v1", "kind": "PodList", "items": items})
            if p == "/ping":
                return self.send(200, b"pong", "text/plain")
            if p == "/cacerts":
                return self.send(200, server_ca_pem, "text/plain")
            if p == "/db/info":
                if not self.basic_server():
                    return self.send(401, b"not authorized\n", "text/plain")
                with cluster.lock:
                    ms = [{"ID": i + 1, "name": m,
                           "peerURLs": [f"https://{a}:2380"], "clientURLs": [f"https://{a}:2379"]}
                          for i, (m, a) in enumerate(sorted(cluster.members.items()))]
                return self.send(200, {"members": ms})
            if p == "/kiln-standin/state":
                with cluster.lock:
                    return self.send(200, {"members": cluster.members,
                                           "nodes": sorted(cluster.nodes),
                                           "unschedulable": sorted(k for k, v in cluster.nodes.items()
                                                                   if v.get("spec", {}).get("unschedulable")),
                                           "pods": sorted(f"{ns}/{n}" for ns, n in cluster.pods),
                                           "events": cluster.events})
            name = self.node_route()
            if name is False:
                return
            if name is not None:
                with cluster.lock:
                    n = cluster.nodes.get(name)
                if n is None:
                    return self.status(404, "NotFound", f'nodes "{name}" not found')
                return self.send(200, n)
            self.send(404, b"404 page not found\n", "text/plain")

        def do_DELETE(self):
            name = self.node_route()
            if name is False:
                return
            if name is None:
                return self.send(405, b"", "text/plain")
            n = cluster.delete_node(name)
            if n is None:
                return self.status(404, "NotFound", f'nodes "{name}" not found')
            self.send(200, n)

        def do_POST(self):
            parts = self.path.split("?")[0].strip("/").split("/")
            if len(parts) == 7 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods" \
                    and parts[6] == "eviction":
                if not self.masters():
                    return
                ns, name = parts[3], parts[5]
                self.body()
                with cluster.lock:
                    pod = cluster.pods.get((ns, name))
                    if pod is None:
                        return self.status(404, "NotFound", f'pods "{name}" not found')
                    if pod["kind"] == "pdb":
                        cluster.events.append(f"evict-refused {ns}/{name}")
                        return self.status(429, "TooManyRequests",
                                           "Cannot evict pod as it would violate the pod's disruption budget.")
                    del cluster.pods[(ns, name)]
                    cluster.events.append(f"evict {ns}/{name}")
                return self.send(201, {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201})
            if self.path != "/kiln-standin/member-add":
                return self.send(404, b"", "text/plain")
            if not self.basic_server():
                return self.send(401, b"not authorized\n", "text/plain")
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            cluster.add_member(body["name"], body["address"])
            self.send(200, {"ok": True})

    return H


def server_cert(tls, addr, out_dir, foreign):
    """A serving certificate for addr signed by tls/server-ca (or, foreign, by a new CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    if foreign:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "k3s-server-ca@1")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key()).serial_number(1)
              .not_valid_before(now - datetime.timedelta(days=1))
              .not_valid_after(now + datetime.timedelta(days=10))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))
        ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    else:
        ca_pem = open(os.path.join(tls, "server-ca.crt"), "rb").read()
        ca = x509.load_pem_x509_certificate(ca_pem)
        ca_key = serialization.load_pem_private_key(
            open(os.path.join(tls, "server-ca.key"), "rb").read(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "k3s")]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=10))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(addr))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    c = os.path.join(out_dir, "serving.crt")
    k = os.path.join(out_dir, "serving.key")
    with open(c, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(k, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return c, k, ca_pem


def serve(args):
    opts = dict(a.split("=", 1) for a in args)
    tls, addr, port = opts["--tls"], opts["--addr"], int(opts["--port"])
    cluster = Cluster(opts["--secret"], float(opts.get("--remove-lag", "2")))
    for m in filter(None, opts.get("--members", "").split(",")):
        name, a = m.split("@")
        cluster.add_member(name, a)
    for w in filter(None, opts.get("--workers", "").split(",")):
        cluster.add_worker(w)
    for spec in filter(None, opts.get("--pods", "").split(",")):
        ref, _, rest = spec.partition("@")
        node, _, kind = rest.partition(":")
        ns, _, name = ref.partition("/")
        cluster.pods[(ns, name)] = {"node": node, "kind": kind}
    work = tempfile.mkdtemp(prefix="k3s-standin-")
    c, k, ca_pem = server_cert(tls, addr, work, opts.get("--foreign") == "1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(c, k)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(os.path.join(tls, "client-ca.crt"))

    class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        allow_reuse_address = True

        def get_request(self):
            sock, a = self.socket.accept()
            return ctx.wrap_socket(sock, server_side=True), a

    srv = S((addr, port), make_handler(cluster, ca_pem))
    print(f"k3s-standin: serving on {addr}:{port}", flush=True)
    srv.serve_forever()


# --------------------------------------------------------------------------------------------
# server (a k3s server starting on a node)
# --------------------------------------------------------------------------------------------


def load_config(root):
    etc = os.path.join(root, "etc/rancher/k3s")
    cfg = {}
    files = [os.path.join(etc, "config.yaml")] + sorted(glob.glob(os.path.join(etc, "config.yaml.d/*.yaml")))
    for f in files:
        if os.path.isfile(f):
            cfg.update(yaml.safe_load(open(f)) or {})
    return cfg


def k3s_server(args):
    root = os.environ.get("KILN_ROOT", "")
    port = os.environ.get("KILN_K3S_PORT", "6443")
    cfg = load_config(root)
    reset = "--cluster-reset" in args
    restore = next((a.split("=", 1)[1] for a in args if a.startswith("--cluster-reset-restore-path=")), None)
    db = os.path.join(root, "var/lib/rancher/k3s/server/db")
    wal = os.path.join(db, "etcd/member/wal")
    name_file = os.path.join(db, "etcd/name")
    node = cfg.get("node-name", "")
    token_file = cfg.get("token-file", "/etc/rancher/k3s/token")
    token_path = os.path.join(root, token_file.lstrip("/"))
    token = open(token_path).read().strip() if os.path.isfile(token_path) else ""

    def new_member():
        os.makedirs(wal, exist_ok=True)
        m = f"{node}-{secrets.token_hex(4)}"
        with open(name_file, "w") as f:
            f.write(m)
        return m

    if restore is not None and not reset:
        fail("invalid flag use; --cluster-reset required with --cluster-reset-restore-path")
    if reset:
        if cfg.get("server"):
            fail("cannot perform cluster-reset while server URL is set - remove server from configuration before resetting")
        if restore is not None and not token:
            fail(f"{token_path} does not exist, please pass --token to complete the restoration")
        if restore is not None and restore.startswith("/") and not os.path.isfile(os.path.join(root, restore.lstrip("/"))):
            fail(f"etcd: snapshot path does not exist: {restore}")
        if os.path.isdir(os.path.join(db, "etcd")):
            os.rename(os.path.join(db, "etcd"), os.path.join(db, f"etcd-old-{int(time.time())}"))
        m = new_member()
        open(os.path.join(db, "reset-flag"), "w").close()
        print(f"k3s-standin: restored {restore or '(reset only)'} as member {m}", flush=True)
        print("Managed etcd cluster membership has been reset, restart without --cluster-reset flag now. "
              "Backup and delete ${datadir}/server/db on each peer etcd server and rejoin the nodes", flush=True)
        return 0
    if os.path.isdir(wal):
        print("Starting etcd for existing cluster member", flush=True)
        return 0
    if cfg.get("server"):
        import urllib.request
        url = cfg["server"]
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        try:
            body = urllib.request.urlopen(url + "/cacerts", context=insecure, timeout=5).read()
        except Exception as e:
            fail(f"failed to get CA certs: {e}")
        pin = token[3:67] if token.startswith("K10") else ""
        got = hashlib.sha256(body).hexdigest()
        if pin and pin != got:
            fail(f"token CA hash does not match the Cluster CA certificate hash: {pin} != {got}")
        secret = token.split("::", 1)[1].split(":", 1)[1] if "::" in token else token
        auth = base64.b64encode(f"server:{secret}".encode()).decode()
        req = urllib.request.Request(url + "/db/info", headers={"Authorization": "Basic " + auth})
        members = json.loads(urllib.request.urlopen(req, context=insecure, timeout=5).read())["members"]
        me = open(name_file).read() if os.path.isfile(name_file) else f"{node}-{secrets.token_hex(4)}"
        for mem in members:
            i = mem["name"].rfind("-")
            mnode = mem["name"][:i] if i > 1 else mem["name"]
            if mem["name"] != me and mnode == node:
                if os.path.isfile(name_file):
                    os.remove(name_file)
                fail("etcd cluster join failed: duplicate node name found, please use a unique name for this node")
        addr = cfg.get("node-ip", "127.0.0.1")
        data = json.dumps({"name": me, "address": addr}).encode()
        req = urllib.request.Request(url + "/kiln-standin/member-add", data=data, method="POST",
                                     headers={"Authorization": "Basic " + auth, "Content-Type": "application/json"})
        urllib.request.urlopen(req, context=insecure, timeout=5).read()
        os.makedirs(wal, exist_ok=True)
        with open(name_file, "w") as f:
            f.write(me)
        print(f"k3s-standin: joined {url} as member {me}", flush=True)
        return 0
    if cfg.get("cluster-init"):
        m = new_member()
        print(f"k3s-standin: Managed etcd cluster initializing: founded as member {m}", flush=True)
        return 0
    fail("k3s-standin: neither server nor cluster-init: this server would use sqlite (kine), not etcd")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "server":
        sys.exit(k3s_server(sys.argv[2:]))
    else:
        fail("usage: k3s_cluster.py serve --tls=DIR --addr=IP --port=N --secret=S [--members=m@a,...] "
             "[--remove-lag=SEC] [--foreign=1] | server [--cluster-reset] [--cluster-reset-restore-path=P]")
